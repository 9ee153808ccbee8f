"""The preflight table: every mismatch that breaks same-tokenizer distillation is a named error pointing to
objective.cross_tokenizer; harmless differences are notes; nothing but small files is read."""

import json
import pathlib

import pytest

import config_files
from kldistill_jax import data
from kldistill_jax.errors import UserError
from kldistill_jax.train import preflight, runner, setup
from kldistill_jax.train.defaults import base_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_CONFIG = json.loads((ROOT / "assets" / "arithmetic_teacher" / "config.json").read_text())


def checkpoint(path, rows=40, generation=None, tokenizer="char", **tokenizer_config):
  """A checkpoint directory without weights: config.json with `rows` vocabulary rows, the tokenizer's files
  (`tokenizer`: "char", None, or a `transformers` tokenizer) with `tokenizer_config` entries replaced, and a
  generation_config.json when `generation` is given."""
  path = pathlib.Path(path)
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({**MODEL_CONFIG, "vocab_size": rows}))
  if tokenizer == "char":
    data.CharTokenizer().save_pretrained(path)
  elif tokenizer is not None:
    tokenizer.save_pretrained(str(path))
  if tokenizer_config:
    file = path / "tokenizer_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **tokenizer_config}))
  if generation is not None:
    (path / "generation_config.json").write_text(json.dumps(generation))
  return path


def bpe(vocab, merges=()):
  """A `transformers` fast tokenizer over a BPE with this exact vocabulary and merges."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=list(merges)))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


def swapped_char():
  """The char tokenizer's tokens with two ids swapped: same size, same tokens, other ids."""
  vocab = data.CharTokenizer().to_hf().get_vocab()
  vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
  return bpe(dict(sorted(vocab.items(), key=lambda kv: kv[1])))


def config(teacher, student, tokenizer="char", template="raw"):
  c = base_config()
  c.teacher.path, c.student.path = str(teacher or ""), str(student or "")
  c.data.tokenizer, c.data.template = str(tokenizer), template
  return c


def run(c):
  return preflight.run(c, data.load_tokenizer(c.data.tokenizer), ("teacher", "student"))


def refused(c, *fields):
  with pytest.raises(UserError) as raised:
    run(c)
  message = str(raised.value)
  assert "objective.cross_tokenizer" in message and "\n" not in message
  for field in fields:
    assert f"{field}: " in message, (field, message)
  return message


def test_matching_pair_passes_and_notes_padded_rows(tmp_path, capsys):
  """Qwen3's case at small size: 40 tokens padded to 48 rows on both sides, the same ids."""
  generation = {"eos_token_id": [1], "pad_token_id": 0}
  teacher = checkpoint(tmp_path / "teacher", rows=48, generation=generation)
  student = checkpoint(tmp_path / "student", rows=48, generation=generation)
  report = run(config(teacher, student, tokenizer=student))
  assert not report.errors
  assert report.notes == ["rows: the teacher has 8 padded rows past the 40 tokens (fine: no id points there)",
                          "rows: the student has 8 padded rows past the 40 tokens (fine: no id points there)"]
  out = capsys.readouterr().out
  lines = {line.split()[0]: line for line in out.splitlines()[3:] if line.strip()}
  assert lines["rows"].split() == ["rows", "48", "48", "note"]
  assert lines["vocabulary"].split()[-1] == "ok" and "ERROR" not in out
  assert "note  rows: the teacher has 8 padded rows" in out


def test_inline_student_reads_the_data_tokenizer(tmp_path, capsys):
  report = run(config(checkpoint(tmp_path / "teacher"), None))  # the quickstart's shape
  assert not report.errors and not report.notes
  assert "= data.tokenizer" in capsys.readouterr().out


def test_checkpoint_without_tokenizer_files_is_noted(tmp_path):
  report = run(config(checkpoint(tmp_path / "teacher", tokenizer=None), None))
  assert not report.errors
  assert report.notes == [f"tokenizer: {tmp_path / 'teacher'} (teacher.path) has no tokenizer files: the ids of "
                          "data.tokenizer are assumed to be its own (unchecked)"]


def test_student_only_jobs_ignore_the_teacher(tmp_path):
  """grpo and pretrain load only the student: a teacher.path left in the config is not read."""
  c = config(checkpoint(tmp_path / "teacher", rows=48, tokenizer=swapped_char()), None)
  report = preflight.run(c, data.load_tokenizer("char"), ("student",))
  assert not report.errors and [name for name, _ in report.sources] == ["student", "data.tokenizer"]


def test_swapped_ids_are_refused_though_sizes_match(tmp_path):
  """A teacher fed the student's ids: same 40 tokens, two of them at each other's ids."""
  teacher = checkpoint(tmp_path / "teacher", tokenizer=swapped_char())
  message = refused(config(teacher, checkpoint(tmp_path / "student")), "vocabulary")
  assert "40 tokens) and the student's tokenizer (" in message and "map tokens to different ids" in message


def test_different_vocabularies_are_refused(tmp_path):
  teacher = checkpoint(tmp_path / "teacher", tokenizer=bpe({"<pad>": 0, "</s>": 1, "a": 2, "b": 3}))
  message = refused(config(teacher, None), "vocabulary")
  assert "the teacher's tokenizer (TokenizersBackend, 4 tokens) and data.tokenizer (CharTokenizer, 40" in message


def test_same_ids_different_merges_are_refused(tmp_path):
  vocab = {"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}
  teacher = checkpoint(tmp_path / "teacher", tokenizer=bpe(vocab, [("a", "b")]))
  student = checkpoint(tmp_path / "student", tokenizer=bpe(vocab))
  message = refused(config(teacher, student, tokenizer=student), "segmentation")
  assert "vocabulary: " not in message and "split text differently" in message


def test_student_tokenizer_other_than_data_tokenizer(tmp_path):
  student = checkpoint(tmp_path / "student", tokenizer=swapped_char())
  message = refused(config(None, student), "vocabulary")
  assert "set data.tokenizer to the student's tokenizer directory" in message


def test_tokenizer_larger_than_model_rows(tmp_path):
  teacher = checkpoint(tmp_path / "teacher", rows=32)
  message = refused(config(teacher, checkpoint(tmp_path / "student", rows=32)), "rows")
  assert "the teacher has 32 vocabulary rows but the tokenizer it reads has 40 tokens (ids 32..39" in message
  assert "the student has 32 vocabulary rows" in message


def test_teacher_and_student_rows_differ(tmp_path):
  teacher = checkpoint(tmp_path / "teacher", rows=48)
  message = refused(config(teacher, checkpoint(tmp_path / "student")), "rows")
  assert "teacher 48 vs student 40 vocabulary rows" in message


def test_inline_student_rows_follow_config_vocab_size(tmp_path):
  c = config(checkpoint(tmp_path / "teacher"), None)
  c.vocab_size = 48
  assert "teacher 40 vs student 48 vocabulary rows" in refused(c, "rows")


def test_teacher_end_id_the_sampler_does_not_stop_on(tmp_path):
  """An instruct teacher ending turns with <|im_end|> (here id 5) the student's stop ids lack."""
  teacher = checkpoint(tmp_path / "teacher", generation={"eos_token_id": [5, 1]})
  student = checkpoint(tmp_path / "student", generation={"eos_token_id": 1})
  message = refused(config(teacher, student, tokenizer=student), "eos")
  assert "the teacher ends sequences with [5], which the sampler does not stop on (it stops on " \
         "data.tokenizer's EOS ids [1])" in message


def test_tokenizer_eos_differs(tmp_path):
  teacher = checkpoint(tmp_path / "teacher", eos_token="<unused_33>")
  message = refused(config(teacher, checkpoint(tmp_path / "student")), "eos")
  assert "ends sequences with [33]" in message


def test_end_ids_the_sampler_stops_on_all_are_a_note(tmp_path):
  teacher = checkpoint(tmp_path / "teacher", generation={"eos_token_id": 1})
  student = checkpoint(tmp_path / "student", generation={"eos_token_id": [1, 5]})
  report = run(config(teacher, student, tokenizer=student))
  assert not report.errors
  assert report.notes == ["eos: teacher ends with [1], student with [1, 5] (the sampler stops on all of them)"]


TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def test_chat_template_mismatch_with_chat_data(tmp_path):
  teacher = checkpoint(tmp_path / "teacher", chat_template=TEMPLATE)
  student = checkpoint(tmp_path / "student", chat_template=TEMPLATE.replace(": ", " said "))
  message = refused(config(teacher, student, tokenizer=student, template="chat"), "chat template")
  assert "different chat templates (data.template='chat' renders every prompt" in message
  report = run(config(teacher, student, tokenizer=student, template="plain"))  # unused: a note
  assert not report.errors and report.notes[0].startswith("chat template: ")


def test_bos_mismatch_with_chat_data(tmp_path):
  teacher = checkpoint(tmp_path / "teacher", chat_template=TEMPLATE, bos_token="<unused_34>")
  student = checkpoint(tmp_path / "student", chat_template=TEMPLATE)
  message = refused(config(teacher, student, tokenizer=student, template="chat"), "bos")
  assert "BOS 34 in the teacher's tokenizer, none in the student's tokenizer (the chat template places" in message
  report = run(config(teacher, student, tokenizer=student))  # raw: no template places a BOS
  assert not report.errors and any(n.startswith("bos: ") for n in report.notes)


def test_pad_difference_is_a_note(tmp_path):
  teacher = checkpoint(tmp_path / "teacher", pad_token="<unused_35>")
  report = run(config(teacher, checkpoint(tmp_path / "student")))
  assert not report.errors
  assert "pad: pad 35 in the teacher's tokenizer, 0 in the student's tokenizer (harmless: pad positions " \
         "are masked)" in report.notes


def test_cross_tokenizer_compares_no_ids(tmp_path):
  """With objective.cross_tokenizer on, the teacher reads text: only its own rows vs its own tokenizer."""
  teacher = checkpoint(tmp_path / "teacher", rows=48, tokenizer=swapped_char())
  c = config(teacher, None)
  with c.unlocked():
    c.objective.cross_tokenizer = "off"
  message = refused(c, "vocabulary", "rows")
  assert "set objective.cross_tokenizer to distill across tokenizers" in message
  c.objective.cross_tokenizer = "uld"
  assert not run(c).errors
  c.teacher.path = str(checkpoint(tmp_path / "small", rows=32, tokenizer=swapped_char()))
  assert "ids 32..39 are out of range" in refused(c, "rows")


def test_message_says_cross_tokenizer_is_not_there_yet(tmp_path):
  c = config(checkpoint(tmp_path / "teacher", rows=48), checkpoint(tmp_path / "student"))
  if "cross_tokenizer" in c.objective:
    pytest.skip("objective.cross_tokenizer exists")
  assert "(objective.cross_tokenizer), which this version does not have yet" in refused(c, "rows")


def test_distill_refuses_before_loading_weights(tmp_path, monkeypatch):
  def no_weights(*args, **kwargs):
    raise AssertionError("a model was loaded before the preflight refused")
  monkeypatch.setattr(setup, "load_model", no_weights)
  teacher = checkpoint(tmp_path / "teacher", tokenizer=swapped_char(), generation={"eos_token_id": [1, 7]})
  c = config_files.load("quickstart", **{"teacher.path": str(teacher), "steps": 2, "batch_size": 8,
                                         "eval.batch_size": 8, "student.warmup_steps": 0})
  with pytest.raises(UserError, match=r"preflight: 2 mismatches break .*vocabulary: .*; eos: .*"
                                      r"objective\.cross_tokenizer"):
    runner.run_distill(c, tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()
