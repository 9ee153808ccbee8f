"""Tokenizers with one small interface: the built-in character and byte (`byte_tokenizer`) tokenizers and
local Hugging Face ones.

Both expose `vocab_size`, `pad_id`, `eos_id`, `eos_ids`, `name`, `encode(text) -> list[int]`,
`encode_batch(texts) -> list[list[int]]` (the same ids; one call for many texts),
`decode(ids) -> str` (stops at the first EOS, drops padding) and `apply_chat_template(messages, *,
enable_thinking=None) -> str`,
`bos_id` (None when there is none) and `save_pretrained(directory)` (Hugging Face tokenizer files, which
`hf.save(..., tokenizer=)` writes next to the weights).
`name` identifies the vocabulary, so a teacher and a student can be checked to share one.
"""

import hashlib
import json
import pathlib

from kldistill_jax.errors import UserError
from kldistill_jax.models import hf

# Every character the built-in arithmetic task and the "plain" template ("Question: ...\nAnswer:\n")
# emit. Changing it changes the ids, so it also changes `CharTokenizer.name`.
CHAR_ALPHABET = "0123456789+-=,.#:? \nQAuestionwr"
_UNUSED = "\ufffd"  # how decode shows ids past the alphabet (an untrained model may sample them)


class BuiltinTokenizer:
  """What the built-in tokenizers share: id 0 = pad, id 1 = EOS (the only one), no BOS, and one encode
  per text in `encode_batch`."""

  pad_id = 0
  eos_id = 1
  eos_ids = (1,)
  bos_id = None
  special_tokens = ("<pad>", "</s>")  # the names of ids 0 and 1 in the Hugging Face export (`to_hf`)

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_batch(self, texts) -> list[list[int]]:
    return [self.encode(text) for text in texts]


class CharTokenizer(BuiltinTokenizer):
  """One id per character: 0 = pad, 1 = EOS, then `CHAR_ALPHABET` (vocab rounded up to a multiple of 8)."""

  name = "char-v1"

  def __init__(self):
    self._ids = {c: i + 2 for i, c in enumerate(CHAR_ALPHABET)}
    self.vocab_size = -(-(len(CHAR_ALPHABET) + 2) // 8) * 8

  def encode(self, text: str) -> list[int]:
    ids = []
    for position, char in enumerate(text):
      if char not in self._ids:
        raise UserError(f"character {char!r} at position {position} of {text[:80]!r} is not in the "
                        f"{self.name} alphabet {CHAR_ALPHABET!r}")
      ids.append(self._ids[char])
    return ids

  def decode(self, ids) -> str:
    chars = []
    for i in map(int, ids):
      if i == self.eos_id:
        break
      if i != self.pad_id:
        chars.append(CHAR_ALPHABET[i - 2] if 2 <= i < len(CHAR_ALPHABET) + 2 else _UNUSED)
    return "".join(chars)

  def apply_chat_template(self, messages, *, enable_thinking=None) -> str:
    del messages, enable_thinking
    raise UserError(f"the {self.name} tokenizer has no chat template: set data.template to 'raw' or "
                    "'plain' (or data.tokenizer='byte', which has one)")

  def to_hf(self):
    """The same tokenizer as a `transformers` fast tokenizer (a `tokenizers` file, no custom code).

    Same ids, one token per character: a character-level BPE without merges after a pre-tokenizer that
    isolates every character (newlines included), joined back by a `Fuse` decoder; no spaces are cleaned
    up on decode. Ids past the alphabet are special `<unused_N>` tokens, so `len(tokenizer)` is
    `vocab_size`. Differences: characters outside the alphabet are dropped (here they raise) and
    `decode(..., skip_special_tokens=True)` drops unused ids (here they show as U+FFFD). No chat template.
    """
    import tokenizers  # pylint: disable=g-import-not-at-top  (only exports need them)
    import transformers  # pylint: disable=g-import-not-at-top
    vocab = {token: i for i, token in enumerate(self.special_tokens)}
    vocab.update(self._ids)
    unused = [f"<unused_{i}>" for i in range(len(vocab), self.vocab_size)]
    vocab.update({token: len(vocab) + k for k, token in enumerate(unused)})
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=self.special_tokens[self.pad_id],
        eos_token=self.special_tokens[self.eos_id], additional_special_tokens=unused,
        clean_up_tokenization_spaces=False, model_input_names=["input_ids", "attention_mask"])

  def save_pretrained(self, directory):
    """Writes tokenizer.json and tokenizer_config.json (`to_hf`) to `directory`."""
    save_hf_files(self.to_hf(), directory)


def save_hf_files(fast_tokenizer, directory):
  """A built-in tokenizer's `to_hf()` saved to `directory` (tokenizer.json, tokenizer_config.json)."""
  directory = pathlib.Path(directory)
  fast_tokenizer.save_pretrained(str(directory))
  # transformers 5 names its fast class "TokenizersBackend" and lists extra special tokens as
  # "extra_special_tokens" (a dict of named tokens in transformers 4): the transformers 4 names, which
  # transformers 5 reads too, keep the directory loadable by serving engines pinned to 4.x.
  config_file = directory / "tokenizer_config.json"
  tokenizer_config = json.loads(config_file.read_text())
  tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
  if isinstance(tokenizer_config.get("extra_special_tokens"), list):
    tokenizer_config["additional_special_tokens"] = tokenizer_config.pop("extra_special_tokens")
  config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def check_thinking(chat_template, enable_thinking, name):
  """data.enable_thinking set for a chat template that never reads it would be ignored silently: refused."""
  if enable_thinking is not None and "enable_thinking" not in (chat_template or ""):
    raise UserError(f"data.enable_thinking={enable_thinking} but the chat template of {name} never reads "
                    "enable_thinking (Qwen3's does); leave data.enable_thinking unset")


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
      raise UserError(f"tokenizer at {self.path} defines no eos_token")
    self.eos_ids = (self.eos_id,) + tuple(i for i in self._generation_eos_ids() if i != self.eos_id)
    pad = self.tokenizer.pad_token_id
    self.pad_id = self.eos_id if pad is None else pad
    self.bos_id = self.tokenizer.bos_token_id
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
      raise UserError(f"cannot read {file}: {e}") from e
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

  def apply_chat_template(self, messages, *, enable_thinking=None) -> str:
    """The conversation with the generation prompt; enable_thinking (None: the template's default) is
    passed to the template (Qwen3's switch)."""
    if not self.tokenizer.chat_template:
      raise UserError(f"tokenizer at {self.path} has no chat template: set data.template to 'plain'")
    template = self.tokenizer.chat_template
    check_thinking(template if isinstance(template, str) else json.dumps(template), enable_thinking,
                   str(self.path))
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False,
                                              **extra)

  def save_pretrained(self, directory):
    """The tokenizer's files (chat template included) in `directory`; `hf.save` writes the EOS ids
    (`eos_ids`) to generation_config.json."""
    self.tokenizer.save_pretrained(str(directory))


def load_tokenizer(spec: str):
  """"char" -> `CharTokenizer()`, "byte" -> `ByteTokenizer()`; anything else is a local Hugging Face
  tokenizer directory."""
  if spec == "byte":
    from kldistill_jax.data.byte_tokenizer import ByteTokenizer  # pylint: disable=g-import-not-at-top  (it imports this module)
    return ByteTokenizer()
  return CharTokenizer() if spec == "char" else HFTokenizer(spec)


def stop_sequences(tokenizer, stops, field="sampling.stop") -> tuple:
  """The token-id sequences of stop strings (`field`, a tuple of strings) under `tokenizer`: each string
  encoded alone (no special tokens), which the sampler matches on generated ids.

  Exact for the built-in char and byte tokenizers (one token per character / byte). With a BPE tokenizer a
  string may tokenize differently in context ("</answer>" after a space or glued to the previous word can
  merge into other tokens), and a generation that spells it that way does not stop; list such variants as
  further stop strings.
  """
  if isinstance(stops, str) or not all(isinstance(s, str) for s in stops):
    raise UserError(f"{field} must be a tuple of strings, got {stops!r}")
  sequences = []
  for text in stops:
    if not text:
      raise UserError(f"{field} has an empty stop string")
    try:
      ids = tuple(tokenizer.encode(text))
    except ValueError as e:
      raise UserError(f"{field}: stop string {text!r}: {e}") from e
    if not ids:
      raise UserError(f"{field}: stop string {text!r} encodes to no tokens under {tokenizer.name}")
    sequences.append(ids)
  return tuple(dict.fromkeys(sequences))
