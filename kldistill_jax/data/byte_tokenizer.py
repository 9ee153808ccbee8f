"""The built-in byte-level tokenizer (`data.tokenizer = "byte"`): any UTF-8 text, no files, no download.

    0 = pad, 1 = EOS, 2 + b = byte b (0..255); 258 ids, the vocabulary rounded up to 264 (a multiple of 8)

So a real text dataset (GSM8K, chat JSONL) runs end to end with inline models on a fresh machine; the
built-in character tokenizer only knows the arithmetic task's 32 characters. Sequences are as long as the
text's UTF-8 bytes (one token per ASCII character), so lengths (data.prompt_len / response_len) count bytes.

It has a chat template (ChatML, as Qwen's, with Qwen3's `enable_thinking` switch): the markers are plain
text here (`<|im_start|>` is 12 byte tokens), so `data.template = "chat"` works on chat data too.
"""

import functools

from kldistill_jax.data.tokenizers import BuiltinTokenizer, check_thinking, save_hf_files

_SPECIALS = 2  # pad, EOS
_UNUSED = "\ufffd"  # how decode shows ids past the bytes (an untrained model may sample them)

# ChatML around each turn, then the generation prompt; enable_thinking=False opens and closes an empty
# think block as Qwen3's template does, so the model answers without reasoning. Rendered by jinja2 with the
# settings transformers uses (trim_blocks, lstrip_blocks), so the exported tokenizer renders it identically.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}")


def _bytes_to_unicode():
  """The GPT-2 byte -> printable character map that `tokenizers`' ByteLevel pre-tokenizer uses."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


class ByteTokenizer(BuiltinTokenizer):
  """One id per UTF-8 byte: 0 = pad, 1 = EOS, 2 + b = byte b; the same interface as `CharTokenizer`."""

  name = "byte-v1"
  chat_template = CHAT_TEMPLATE

  def __init__(self):
    self.vocab_size = -(-(256 + _SPECIALS) // 8) * 8

  @functools.cached_property
  def _template(self):
    import jinja2.sandbox  # pylint: disable=g-import-not-at-top  (only chat templates need it)
    return jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        CHAT_TEMPLATE)

  def encode(self, text: str) -> list[int]:
    return [b + _SPECIALS for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    """Text of `ids` up to the first EOS, padding dropped; bytes that are not valid UTF-8 (a model's
    sample may cut a character) and ids past the bytes show as U+FFFD."""
    parts, run = [], bytearray()
    for i in map(int, ids):
      if i == self.eos_id:
        break
      if _SPECIALS <= i < 256 + _SPECIALS:
        run.append(i - _SPECIALS)
      elif i != self.pad_id:
        parts.append(run.decode("utf-8", errors="replace") + _UNUSED)
        run = bytearray()
    return "".join(parts) + run.decode("utf-8", errors="replace")

  def apply_chat_template(self, messages, *, enable_thinking=None) -> str:
    """The conversation in ChatML with the assistant's generation prompt (`CHAT_TEMPLATE`)."""
    check_thinking(self.chat_template, enable_thinking, self.name)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return self._template.render(messages=list(messages), add_generation_prompt=True, **extra)

  def to_hf(self):
    """The same tokenizer as a `transformers` fast tokenizer (a `tokenizers` file, no custom code).

    Same ids and chat template: a byte-level BPE without merges (GPT-2's byte -> character map, no
    regex split, no prefix space), decoded by the ByteLevel decoder. Ids past the bytes are special
    `<unused_N>` tokens, so `len(tokenizer)` is `vocab_size`. Differences: the text of a special token's
    name ("</s>" in the text) becomes that special id there (here it is bytes), and
    `decode(..., skip_special_tokens=True)` drops unused ids (here they show as U+FFFD).
    """
    import tokenizers  # pylint: disable=g-import-not-at-top  (only exports need them)
    import transformers  # pylint: disable=g-import-not-at-top
    vocab = {token: i for i, token in enumerate(self.special_tokens)}
    vocab.update({char: b + _SPECIALS for b, char in _bytes_to_unicode().items()})
    unused = [f"<unused_{i}>" for i in range(len(vocab), self.vocab_size)]
    vocab.update({token: len(vocab) + k for k, token in enumerate(unused)})
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=self.special_tokens[self.pad_id],
        eos_token=self.special_tokens[self.eos_id], additional_special_tokens=unused,
        clean_up_tokenization_spaces=False, model_input_names=["input_ids", "attention_mask"],
        chat_template=CHAT_TEMPLATE)

  def save_pretrained(self, directory):
    """Writes tokenizer.json and tokenizer_config.json (`to_hf`, chat template included) to `directory`."""
    save_hf_files(self.to_hf(), directory)
