"""How a record's prompt becomes the model's prompt text (`data.template`, `data.system_prompt`,
`data.enable_thinking`).

  raw    the prompt as is (the built-in arithmetic task: "3+5+2=")
  plain  "Question: {prompt}\nAnswer:\n"; ends in a newline, not a space, so BPE tokenizers see the
         response's first word as they would anywhere else
  chat   the tokenizer's chat template around the conversation (a chat record's turns before its reference
         answer, else one user message), with the generation prompt; `system_prompt` becomes the first
         turn of conversations that have no system turn of their own; `enable_thinking` (None: the
         template's default) is passed to the template (Qwen3's switch)

A record's prompt is its text ("prompt"); chat records (data.source="chat") also carry the whole prompt
conversation ("messages"), which only the chat template can render: raw / plain accept a conversation
that is one user turn and refuse any other (a system or earlier turn would be dropped).
"""

import dataclasses

from kldistill_jax.errors import UserError

TEMPLATES = ("raw", "plain", "chat")


@dataclasses.dataclass(frozen=True)
class Template:
  """How prompts are rendered; a plain string names `kind` with the other fields at their defaults."""
  kind: str = "raw"
  system_prompt: str = ""
  enable_thinking: bool | None = None

  def __post_init__(self):
    if self.kind not in TEMPLATES:
      raise UserError(f"unknown data.template {self.kind!r} (expected one of {', '.join(TEMPLATES)})")
    if not isinstance(self.system_prompt, str):
      raise UserError(f"data.system_prompt must be a string, got {self.system_prompt!r}")
    if self.enable_thinking not in (None, True, False):
      raise UserError(f"data.enable_thinking must be True, False or unset, got {self.enable_thinking!r}")
    if self.kind != "chat":
      for field, value, unset in (("system_prompt", self.system_prompt, ""),
                                  ("enable_thinking", self.enable_thinking, None)):
        if value != unset:
          raise UserError(f"data.{field}={value!r} needs data.template='chat' (got {self.kind!r}): only "
                          "the chat template places it")


def _template(template) -> Template:
  return template if isinstance(template, Template) else Template(kind=template)


def format_prompt(record_prompt, template, tokenizer) -> str:
  """The prompt text of `record_prompt` (a string, or a conversation: a sequence of {"role", "content"}
  dicts whose last turn is the user's) under `template` (a `Template` or its kind)."""
  template = _template(template)
  if isinstance(record_prompt, str):
    messages = ({"role": "user", "content": record_prompt},)
  else:
    messages = tuple(record_prompt)
  if template.kind == "chat":
    if template.system_prompt and messages[0]["role"] != "system":
      messages = ({"role": "system", "content": template.system_prompt},) + messages
    return tokenizer.apply_chat_template(messages, enable_thinking=template.enable_thinking)
  if len(messages) != 1 or messages[0]["role"] != "user":
    raise UserError(f"a conversation of {len(messages)} turns ({', '.join(m['role'] for m in messages)}) "
                    f"needs data.template='chat' (got {template.kind!r}, which renders one user turn)")
  text = messages[0]["content"]
  return text if template.kind == "raw" else f"Question: {text}\nAnswer:\n"


def format_record(record, template, tokenizer) -> str:
  """The prompt text of a record: its conversation ("messages") when it has one, else its "prompt"."""
  return format_prompt(record.get("messages", record["prompt"]), template, tokenizer)
