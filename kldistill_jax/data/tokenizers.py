"""Tokenizers with one small interface: the built-in character tokenizer and local Hugging Face ones.

Both expose `vocab_size`, `pad_id`, `eos_id`, `eos_ids`, `name`, `encode(text) -> list[int]`,
`encode_batch(texts) -> list[list[int]]` (the same ids; one call for many texts),
`decode(ids) -> str` (stops at the first EOS, drops padding) and `apply_chat_template(messages) -> str`.
`name` identifies the vocabulary, so a teacher and a student can be checked to share one.
"""

import hashlib
import json
import pathlib

from kldistill_jax.models import hf

# Every character the built-in arithmetic task and the "plain" template ("Question: ...\nAnswer:\n")
# emit. Changing it changes the ids, so it also changes `CharTokenizer.name`.
CHAR_ALPHABET = "0123456789+-=,.#:? \nQAuestionwr"
_UNUSED = "\ufffd"  # how decode shows ids past the alphabet (an untrained model may sample them)


class CharTokenizer:
  """One id per character: 0 = pad, 1 = EOS, then `CHAR_ALPHABET` (vocab rounded up to a multiple of 8)."""

  pad_id = 0
  eos_id = 1
  eos_ids = (1,)
  name = "char-v1"

  def __init__(self):
    self._ids = {c: i + 2 for i, c in enumerate(CHAR_ALPHABET)}
    self.vocab_size = -(-(len(CHAR_ALPHABET) + 2) // 8) * 8

  def encode(self, text: str) -> list[int]:
    ids = []
    for position, char in enumerate(text):
      if char not in self._ids:
        raise ValueError(f"character {char!r} at position {position} of {text[:80]!r} is not in the "
                         f"{self.name} alphabet {CHAR_ALPHABET!r}")
      ids.append(self._ids[char])
    return ids

  def encode_batch(self, texts) -> list[list[int]]:
    return [self.encode(text) for text in texts]

  def decode(self, ids) -> str:
    chars = []
    for i in map(int, ids):
      if i == self.eos_id:
        break
      if i != self.pad_id:
        chars.append(CHAR_ALPHABET[i - 2] if 2 <= i < len(CHAR_ALPHABET) + 2 else _UNUSED)
    return "".join(chars)

  def apply_chat_template(self, messages) -> str:
    del messages
    raise ValueError(f"the {self.name} tokenizer has no chat template: set data.template to 'raw' or "
                     "'plain'")


class HFTokenizer:
  """A local `transformers` tokenizer directory behind the same interface.

  `eos_ids` holds the tokenizer's EOS plus the `eos_token_id`s of a `generation_config.json` next to it
  (chat models end turns with a token other than the base EOS, e.g. Qwen's <|im_end|>). `pad_id` falls
  back to the EOS id. `encode` adds no special tokens: templates (the chat template) place them.
  """

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.tokenizer = hf.load_tokenizer(self.path)
    self.eos_id = self.tokenizer.eos_token_id
    if self.eos_id is None:
      raise ValueError(f"tokenizer at {self.path} defines no eos_token")
    self.eos_ids = (self.eos_id,) + tuple(i for i in self._generation_eos_ids() if i != self.eos_id)
    pad = self.tokenizer.pad_token_id
    self.pad_id = self.eos_id if pad is None else pad
    self.vocab_size = len(self.tokenizer)
    vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()), ensure_ascii=False)
    digest = hashlib.sha256(vocab.encode()).hexdigest()[:12]
    self.name = f"{type(self.tokenizer).__name__}-{self.vocab_size}-{digest}"

  def _generation_eos_ids(self):
    file = self.path / "generation_config.json"
    if not file.is_file():
      return ()
    try:
      ids = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read {file}: {e}") from e
    if ids is None:
      return ()
    return tuple(ids) if isinstance(ids, list) else (ids,)

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False))

  def encode_batch(self, texts) -> list[list[int]]:
    # One call: a fast tokenizer encodes the batch in Rust, in parallel.
    return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

  def decode(self, ids) -> str:
    kept = []
    for i in map(int, ids):
      if i in self.eos_ids:
        break
      if i != self.pad_id:
        kept.append(i)
    return self.tokenizer.decode(kept, skip_special_tokens=True)

  def apply_chat_template(self, messages) -> str:
    if not self.tokenizer.chat_template:
      raise ValueError(f"tokenizer at {self.path} has no chat template: set data.template to 'plain'")
    return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def load_tokenizer(spec: str):
  """"char" -> `CharTokenizer()`; anything else is a local Hugging Face tokenizer directory."""
  return CharTokenizer() if spec == "char" else HFTokenizer(spec)
