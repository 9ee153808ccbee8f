"""How a record's prompt text becomes the model's prompt (`data.template`).

  raw    the prompt as is (the built-in arithmetic task: "3+5+2=")
  plain  "Question: {prompt}\nAnswer:\n"; ends in a newline, not a space, so BPE tokenizers see the
         response's first word as they would anywhere else
  chat   the tokenizer's chat template around one user message, with the generation prompt
"""

from kldistill_jax.errors import UserError

TEMPLATES = ("raw", "plain", "chat")


def format_prompt(record_prompt: str, template: str, tokenizer) -> str:
  if template == "raw":
    return record_prompt
  if template == "plain":
    return f"Question: {record_prompt}\nAnswer:\n"
  if template == "chat":
    return tokenizer.apply_chat_template([{"role": "user", "content": record_prompt}])
  raise UserError(f"unknown data.template {template!r} (expected one of {', '.join(TEMPLATES)})")
