"""Chat data (`messages` JSONL): the last assistant turn is the reference, the turns before it the prompt,
rendered by the chat template with data.system_prompt and data.enable_thinking; malformed records name their
file and line."""

import json
import pathlib

import pytest

from kldistill_jax import data
from kldistill_jax.errors import UserError
from kldistill_jax.train import loop, runner, setup
from test_bad_input import tiny_config

DATA = pathlib.Path(__file__).parent / "data"
CHAT = DATA / "chat_sample.jsonl"


def _turn(role, content):
  return {"role": role, "content": content}


@pytest.fixture(scope="module")
def byte():
  return data.ByteTokenizer()


@pytest.fixture(scope="module")
def hf_byte(tmp_path_factory):
  """The byte tokenizer's export loaded as a Hugging Face tokenizer directory (a ChatML template that reads
  enable_thinking, as Qwen3's does)."""
  directory = tmp_path_factory.mktemp("chat_tokenizer")
  data.ByteTokenizer().save_pretrained(directory)
  return data.HFTokenizer(directory)


def test_records_split_the_conversation_at_the_last_assistant_turn():
  records = data.read_jsonl(CHAT, "chat")
  assert len(records) == 8 and records.origin(3) == f"{CHAT}:4"
  first = records[0]
  assert first["messages"] == (_turn("system", "You are a careful math tutor."),
                               _turn("user", "Tom has 12 apples and buys 7 more. How many apples does he have?"))
  assert first["prompt"] == first["messages"][-1]["content"]
  assert (first["response"], first["answer"]) == ("12 + 7 = 19.\n#### 19", "19")
  assert records[1]["answer"] == "54"  # the reference's last \boxed{}
  assert records[2]["answer"] == "24"  # an "answer" key wins (a number)
  multi = records[3]
  assert [m["role"] for m in multi["messages"]] == ["user", "assistant", "user"]
  assert multi["response"] == "5 + 4 = 9.\n#### 9"


@pytest.mark.parametrize("row,match", [
    ({"question": "q"}, r"missing key 'messages'"),
    ({"messages": "hi"}, r"'messages' must be a non-empty list"),
    ({"messages": []}, r"'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}]}, r"the last message is the reference response and must be the assistant's, got 'user'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     r"message 1: 'content' must be a string, got int"),
    ({"messages": [{"role": "tool", "content": "q"}, {"role": "assistant", "content": "a"}]},
     r"message 1: role 'tool' is not one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, r"alternating .* got user, user, assistant"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
     r"ending with the user's; got system, assistant"),
    ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}, r"message 1: missing key 'role'"),
    ({"messages": [["user", "q"], {"role": "assistant", "content": "a"}]}, r"message 1 must be an object"),
])
def test_malformed_records_name_file_and_line(tmp_path, row, match):
  path = tmp_path / "chat.jsonl"
  good = json.dumps({"messages": [_turn("user", "q"), _turn("assistant", "a")]})
  path.write_text(good + "\n" + json.dumps(row) + "\n")
  with pytest.raises(UserError, match=rf"{path}:2: chat record: (.* )?{match}"):
    data.read_jsonl(path, "chat")


def test_chat_template_renders_the_conversation_with_system_prompt_and_thinking_switch(byte, hf_byte):
  records = data.read_jsonl(CHAT, "chat")
  template = data.Template("chat", system_prompt="Be brief.", enable_thinking=False)
  # A record without a system turn gets data.system_prompt; the thinking switch closes an empty think block.
  expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSara has 5 dollars.<|im_end|>\n"
              "<|im_start|>assistant\nOkay, Sara has 5 dollars.<|im_end|>\n<|im_start|>user\nShe earns 4 more. "
              "How many dollars does she have now?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
  for tokenizer in (byte, hf_byte):
    assert data.format_record(records[3], template, tokenizer) == expected
  # A record's own system turn is kept; enable_thinking unset leaves the template's default (no block).
  own = data.format_record(records[0], data.Template("chat", system_prompt="Be brief."), hf_byte)
  assert own == ("<|im_start|>system\nYou are a careful math tutor.<|im_end|>\n<|im_start|>user\nTom has 12 "
                 "apples and buys 7 more. How many apples does he have?<|im_end|>\n<|im_start|>assistant\n")


def test_thinking_switch_on_a_template_that_never_reads_it_is_refused(hf_byte, monkeypatch):
  monkeypatch.setattr(hf_byte.tokenizer, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
  with pytest.raises(UserError, match=r"data\.enable_thinking=True but the chat template of .* never reads enable_thinking"):
    data.format_prompt("q", data.Template("chat", enable_thinking=True), hf_byte)
  assert data.format_prompt("q", data.Template("chat"), hf_byte) == "q"


@pytest.mark.parametrize("kind,field,value", [("plain", "system_prompt", "s"), ("raw", "enable_thinking", False)])
def test_chat_only_fields_need_the_chat_template(kind, field, value):
  with pytest.raises(UserError, match=rf"data\.{field}={value!r} needs data\.template='chat'"):
    data.Template(kind, **{field: value})


def test_plain_template_takes_one_user_turn_and_names_conversations_it_cannot_render(byte):
  records = data.read_jsonl(CHAT, "chat")
  assert data.format_record(records[1], "plain", byte) == "Question: What is 6 times 9?\nAnswer:\n"
  with pytest.raises(UserError, match=rf"{CHAT}:1: a conversation of 2 turns \(system, user\) needs "
                                      r"data\.template='chat'"):
    data.check_lengths(records, byte, template="plain", prompt_len=512, response_len=512)


def test_training_batches_hold_the_templated_conversation_and_the_reference(byte):
  records = data.read_jsonl(CHAT, "chat")
  template = data.Template("chat", system_prompt="Be brief.")
  batch = next(iter(data.make_dataset(records, byte, template=template, prompt_len=256, response_len=64,
                                      batch_size=8, seed=0, shuffle=False)))
  for row in range(8):
    prompt = batch["prompt_tokens"][row][batch["prompt_mask"][row] > 0]
    response = batch["response_tokens"][row][batch["response_mask"][row] > 0]
    assert bytes(int(i) - 2 for i in prompt).decode() == data.format_record(records[row], template, byte)
    assert list(response) == [b + 2 for b in records[row]["response"].encode()] + [byte.eos_id]


def test_held_out_chat_records_need_answers(tmp_path):
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"messages": [_turn("user", "hi"), _turn("assistant", "hello")]}) + "\n")
  config = tiny_config(**{"data.source": "chat", "data.train_path": str(path), "data.eval_path": str(path)})
  assert setup.make_source(config, "train")[0]["answer"] is None  # training needs no answer
  with pytest.raises(UserError, match=rf"1 of 1 records have no answer, which the held-out evaluation needs .*"
                                      rf"{path}:1"):
    setup.eval_records(config)


def test_runner_reads_chat_data_with_the_configured_template():
  # What the runner feeds the models (its data path, without the models: configs/gsm8k.py's end-to-end test
  # runs the byte tokenizer through a whole run): data.source, data.system_prompt, data.enable_thinking.
  config = tiny_config(**{
      "data.source": "chat", "data.train_path": str(CHAT), "data.eval_path": str(CHAT),
      "data.tokenizer": "byte", "data.template": "chat", "data.system_prompt": "Be brief.",
      "data.enable_thinking": False, "data.prompt_len": 272, "data.response_len": 64})
  tokenizer, train, held_out, _ = runner._data(config, ("student",))
  assert len(held_out) == 8 and held_out[3]["answer"] == "9"
  batch = next(loop.data_iterator(config, train, tokenizer))
  template = data.Template("chat", system_prompt="Be brief.", enable_thinking=False)
  prompts = {tokenizer.decode(row[mask > 0]) for row, mask in zip(batch["prompt_tokens"], batch["prompt_mask"])}
  assert prompts <= {data.format_record(r, template, tokenizer) for r in train}
  assert all(p.startswith("<|im_start|>system\n") and p.endswith("<think>\n\n</think>\n\n") for p in prompts)
