"""Cross-tokenizer distillation: alignment by character spans (hand-checked), the losses against numpy,
`span` == the ordinary token-level loss when both tokenizers are one, and a short run that improves a
student whose tokenizer (a BPE trained here) differs from the teacher's (the built-in char tokenizer)."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers

import config_files
from kldistill_jax import cross_objectives, objectives
from kldistill_jax.data import CharTokenizer, HFTokenizer, alignment
from kldistill_jax.errors import UserError
from kldistill_jax.losses import cross_tokenizer as xt
from kldistill_jax.train import cross_tokenizer as ct, runner
from kldistill_jax.train.metrics import read_metrics

CHAR = CharTokenizer()
# Arithmetic lines plus words with spaces and accents, so merges cross "+", "=", "#" and eat spaces.
CORPUS = ["5+2=7#7", "8+5=13,13+9=22#22", "9+8=17#17", "12+34=46#46", "Question: 3+4\nAnswer:\n7",
          "héllo wörld 12"] * 20


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """A byte-level BPE (GPT-2 style: "Ġ" marks a leading space) trained on CORPUS, as a tokenizer dir."""
  backend = tokenizers.Tokenizer(tokenizers.models.BPE())
  backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = tokenizers.decoders.ByteLevel()
  backend.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<pad>", "</s>"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  directory = tmp_path_factory.mktemp("bpe")
  transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                       eos_token="</s>").save_pretrained(str(directory))
  return HFTokenizer(directory)


def tokens_of(tokenizer, text):
  return [tokenizer.tokenizer.convert_ids_to_tokens(i) for i in tokenizer.encode(text)]


# ------------------------------------------------------------------------------------------- alignment

def test_align_merges_across_boundaries(bpe):
  text = "12+34=46#46"
  assert tokens_of(bpe, text) == ["12", "+", "34", "=", "46", "#", "46"]  # the trained merges
  _, c_spans, _ = alignment.encode_with_spans(CHAR, text)
  ids, b_spans, valid = alignment.encode_with_spans(bpe, text)
  assert b_spans.tolist() == [[0, 2], [2, 3], [3, 5], [5, 6], [6, 8], [8, 9], [9, 11]] and valid.all()
  c_group, b_group, count = alignment.align(c_spans, b_spans)
  assert count == 7 and b_group.tolist() == list(range(7))
  assert c_group.tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6]  # "12" = "1" "2" etc.
  # Two segmentations that cross: "ab|c" vs "a|bc" agree only around the whole "abc".
  a, b, count = alignment.align([[0, 2], [2, 3], [3, 4]], [[0, 1], [1, 3], [3, 4]])
  assert (a.tolist(), b.tolist(), count) == ([0, 0, 1], [0, 0, 1], 2)


def test_align_whitespace_and_newlines(bpe):
  text = "Question: 3+4\nAnswer:\n7"
  pieces = [bpe.decode([i]) for i in bpe.encode(text)]
  assert "".join(pieces) == text and " 3" in pieces  # the space is merged into the next token
  _, c_spans, _ = alignment.encode_with_spans(CHAR, text)
  _, b_spans, _ = alignment.encode_with_spans(bpe, text)
  c_group, b_group, count = alignment.align(c_spans, b_spans)
  assert (c_group >= 0).all() and (b_group >= 0).all() and count == len(pieces)
  space = text.index(" ")
  assert c_group[space] == c_group[space + 1]  # " " and "3" (char) are one group with " 3" (BPE)
  assert c_group[space - 1] != c_group[space]  # ":" stays its own group


def test_unicode_bytes_of_one_character(bpe):
  # "ü" is not in the corpus: two byte tokens, each alone an incomplete UTF-8 sequence.
  ids = bpe.encode("ü")
  assert len(ids) == 2 and bpe.decode(ids[:1]) == alignment.REPLACEMENT
  assert alignment.decode_pieces(bpe.decode, ids) == ["", "ü"]
  # The first byte's empty span joins the group of the byte that completes the character.
  _, spans, valid = alignment.encode_with_spans(bpe, "aü1")
  assert valid.all()
  b_group = alignment.align([[0, 1], [1, 2], [2, 3]], spans)[1]
  assert spans[1].tolist() == [1, 1] and b_group[1] == b_group[2] != b_group[0]
  # The char tokenizer cannot encode "é": the text is aligned up to it and nothing after it.
  ids, c_spans, c_valid = alignment.encode_with_spans(CHAR, "1+é=2")
  assert CHAR.decode(ids) == "1+" and c_valid.all()
  _, b_spans, b_valid = alignment.encode_with_spans(bpe, "1+é=2")
  c_group, b_group, count = alignment.align(c_spans, b_spans, a_valid=c_valid, b_valid=b_valid)
  assert count == 2 and c_group.tolist() == [0, 1] and b_group.tolist()[:2] == [0, 1]
  assert (b_group[2:] == -1).all()


def test_context_keeps_a_leading_space(bpe):
  """A token's piece is decoded after its predecessor, so a SentencePiece-style leading space or a byte
  merge sees its context; the pieces always concatenate to the decoded text."""
  ids = bpe.encode("héllo wörld 12")
  pieces = alignment.decode_pieces(bpe.decode, ids[1:], prefix=ids[:1])
  assert "".join(pieces) == bpe.decode(ids[1:]) and pieces[-1] == " 12"


# ------------------------------------------------------------------------------------------- losses

def test_losses_against_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(3, 7)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
  sp = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
  tp = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
  uld = np.abs(-np.sort(-sp, -1) - np.pad(-np.sort(-tp, -1), ((0, 0), (0, 2)))).sum(-1)
  np.testing.assert_allclose(xt.uld_distance(jnp.asarray(s), jnp.asarray(t)), uld, rtol=1e-5)

  s_ids, t_ids = np.array([4, 0, 2]), np.array([1, 3, 0])
  q = sp[:, s_ids] / sp[:, s_ids].sum(-1, keepdims=True)
  p = tp[:, t_ids] / tp[:, t_ids].sum(-1, keepdims=True)
  fwd, rev = (p * np.log(p / q)).sum(-1), (q * np.log(q / p)).sum(-1)
  got = xt.shared_vocab_kl(jnp.asarray(s), jnp.asarray(t), s_ids, t_ids, lam=0.25)
  np.testing.assert_allclose(got, 0.25 * rev + 0.75 * fwd, rtol=1e-5)

  log_p, log_q = np.log([0.3, 0.9, 1e-3]), np.log([0.5, 0.2, 1e-4])
  P, Q = np.exp(log_p), np.exp(log_q)
  expected = P * np.log(P / Q) + (1 - P) * np.log((1 - P) / (1 - Q))
  np.testing.assert_allclose(xt.bernoulli_kl(jnp.asarray(log_p), jnp.asarray(log_q)), expected, rtol=1e-5)
  # (student span, teacher span): reverse = KL(Bern(student) || Bern(teacher)), forward the other way
  for student, teacher, lam in ((log_p, log_q, 1.0), (log_q, log_p, 0.0)):
    got = xt.mixed_bernoulli_kl(jnp.asarray(student), jnp.asarray(teacher), lam=lam)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert np.isfinite(xt.bernoulli_kl(jnp.zeros(1), jnp.zeros(1))).all()  # span of probability 1

  values, groups = rng.normal(size=(2, 6)), np.array([[0, 0, 1, -1, 2, 2], [1, 1, 1, 0, -1, -1]])
  expected = np.zeros((2, 3))
  for r in range(2):
    for i in range(6):
      if groups[r, i] >= 0:
        expected[r, groups[r, i]] += values[r, i]
  np.testing.assert_allclose(xt.span_log_probs(jnp.asarray(values), groups, 3), expected, rtol=1e-6)


def _rows(tokenizer, prompts, completions, prompt_len=8, response_len=20):
  b = len(prompts)
  tokens = np.zeros((b, prompt_len + response_len), np.int32)
  attention, loss_mask = np.zeros_like(tokens), np.zeros_like(tokens)
  for i, (prompt, completion) in enumerate(zip(prompts, completions)):
    p, c = tokenizer.encode(prompt), tokenizer.encode(completion) + [tokenizer.eos_id]
    tokens[i, prompt_len - len(p):prompt_len], attention[i, prompt_len - len(p):prompt_len] = p, 1
    tokens[i, prompt_len:prompt_len + len(c)] = c
    attention[i, prompt_len:prompt_len + len(c)] = loss_mask[i, prompt_len:prompt_len + len(c)] = 1
  return dict(tokens=tokens, attention_mask=attention, loss_mask=loss_mask)


def test_span_equals_token_level_loss_with_one_tokenizer():
  """Both sides the char tokenizer: every group is one shared token, so `span` is the exact token-level
  loss (values and gradients), through the whole host-side path (decode, re-encode, align, teacher rows).
  Mixed KL (lam = 0.3) checks both directions at once; the sampled estimator is the per-token one; `uld`
  there is the sorted distance per token."""
  kl, lam = "mixed", 0.3
  cross = ct.make(CHAR, CHAR, student_rows=CHAR.vocab_size, teacher_rows=CHAR.vocab_size)
  prompts, completions = ["2+5=", "9+5+8="], ["5+2=7#7", "8+5=13,13+9=22#22"]
  batch = _rows(CHAR, prompts, completions)
  arrays = ct.build(cross, batch, [CHAR.encode(p) for p in prompts])
  assert arrays["teacher_tokens"].shape[1] == 32  # the power-of-two bucket of 4 + 17 + 1... tokens
  rng = np.random.default_rng(1)
  v = CHAR.vocab_size
  table = rng.normal(size=(64, v, v)).astype(np.float32) * 2  # logits = f(position in the text, token)

  def logits(tokens, mask):
    return jnp.asarray(table[np.maximum(np.cumsum(mask, 1) - 1, 0), tokens])

  s_logits = logits(batch["tokens"], batch["attention_mask"]) + rng.normal(size=(2, 28, v)).astype(np.float32)
  t_same = logits(batch["tokens"], batch["attention_mask"])  # the teacher at the student's ids
  t_own = logits(arrays["teacher_tokens"], arrays["teacher_attention_mask"])  # ... at its own
  def span_equals_token_level(ordinary, step_batch):
    """The span objective on the teacher's own ids vs `ordinary` on the student's: values and gradients."""
    span = dataclasses.replace(ordinary, cross_tokenizer="span")
    (want, _), want_grad = jax.value_and_grad(
        lambda s: objectives.compute(ordinary, s, t_same, step_batch), has_aux=True)(s_logits)
    (got, metrics), got_grad = jax.value_and_grad(
        lambda s: cross_objectives.compute(span, s, t_own, step_batch, cross.shared), has_aux=True)(s_logits)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-8)
    return metrics

  jbatch = {k: jnp.asarray(x) for k, x in {**batch, **arrays}.items()}
  metrics = span_equals_token_level(objectives.Objective(prefix="student", kl=kl, lam=lam, estimator="exact"),
                                    jbatch)
  assert metrics["cross_exact_fraction"] == 1 and metrics["cross_unaligned_fraction"] == 0

  # The sampled estimator (reverse KL, REINFORCE per span): one-token spans are the ordinary per-token one.
  behavior = rng.normal(size=batch["tokens"].shape).astype(np.float32) - 2.0
  span_equals_token_level(objectives.Objective(prefix="student", kl="reverse", estimator="sampled"),
                          dict(jbatch, behavior_logprobs=jnp.asarray(behavior)))

  uld = objectives.Objective(prefix="student", kl="forward", estimator="exact", cross_tokenizer="uld")
  got, _ = cross_objectives.compute(uld, s_logits, t_own, jbatch, cross.shared)
  per_token = xt.uld_distance(s_logits[:, :-1], t_same[:, :-1])
  mask = batch["loss_mask"][:, 1:]
  np.testing.assert_allclose(got, np.sum(per_token * mask) / mask.sum(), rtol=1e-5)


def test_batch_char_student_bpe_teacher(bpe):
  """A char student's rows for a BPE teacher: the teacher reads the same text in its tokens, groups
  join the char tokens each BPE token covers, the student's EOS meets the teacher's EOS."""
  cross = ct.make(CHAR, bpe, student_rows=CHAR.vocab_size, teacher_rows=bpe.vocab_size)
  batch = _rows(CHAR, ["12+34="], ["46#46"])
  arrays = ct.build(cross, batch, [bpe.encode("12+34=")])
  row = arrays["teacher_tokens"][0][arrays["teacher_attention_mask"][0] > 0].tolist()
  assert row == bpe.encode("12+34=") + bpe.encode("46#46") + [bpe.eos_id]
  group = arrays["cross_student_group"][0, 8:14].tolist()  # "4" "6" "#" "4" "6" EOS at 8..13
  assert group == [7, 7, 9, 10, 10, 12]  # key = the prediction index of the group's first token
  starts = arrays["cross_teacher_start"][0]
  teacher_group = arrays["cross_teacher_group"][0]
  for t in (8, 10, 11, 13):  # each group's first teacher token carries the same key
    assert teacher_group[starts[t] + 1] == t - 1
  assert arrays["cross_exact"][0, 8:14].tolist() == [0, 0, 1, 0, 0, 1]  # "#" and EOS are one shared token


def test_bad_settings_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="objective.estimator='exact'"):
    objectives.Objective(prefix="student", estimator="sampled", cross_tokenizer="uld")
  with pytest.raises(UserError, match="objective.discount"):
    objectives.Objective(prefix="student", estimator="sampled", discount=1.0, cross_tokenizer="span")
  with pytest.raises(UserError, match="objective.prefix must be 'student' or 'dataset'"):
    objectives.Objective(prefix="teacher", estimator="exact", cross_tokenizer="uld")
  with pytest.raises(UserError, match="cross_tokenizer"):
    objectives.Objective(estimator="exact", cross_tokenizer="spam")
  c = config_files.load("quickstart", **{"objective.cross_tokenizer": "span", "teacher.path": ""})
  with pytest.raises(UserError, match="teacher.tokenizer"):
    ct.teacher_tokenizer(c)
  c.teacher.tokenizer = str(tmp_path / "missing")
  with pytest.raises(UserError, match="teacher.tokenizer="):
    ct.teacher_tokenizer(c)


# ------------------------------------------------------------------------------------------- end to end

def test_run_improves_a_bpe_student_from_a_char_teacher(tmp_path):
  """configs/cross_tokenizer.py: the shipped char teacher (its tokenizer files) and a random inline student
  on the shipped arithmetic BPE's ids (merges across "+", "=", "#"), `span` at the dataset's responses:
  every position aligns, multi-character student tokens meet several teacher tokens, the loss halves."""
  c = config_files.load("cross_tokenizer", "smoke", **{
      "objective.prefix": "dataset", "objective.estimator": "exact", "objective.kl": "forward", "steps": 20, "log_every": 10, "checkpoint_every": 20,
      "student.warmup_steps": 0, "student.model.num_layers": 1, "optimizer.learning_rate": 1e-2,
      "optimizer.warmup_steps": 2})
  results = runner.run_distill(c, tmp_path)
  assert results["teacher"]["accuracy"] >= 0.5  # evaluated with its own (char) tokenizer
  metrics = read_metrics(tmp_path)
  first, last = metrics[0], metrics[-1]
  assert last["cross_unaligned_fraction"] == 0.0 and last["cross_exact_fraction"] < 0.9
  assert last["loss"] < 0.5 * first["loss"], (first["loss"], last["loss"])


def test_preflight_reads_the_teachers_own_tokenizer(bpe):
  """An inline teacher with teacher.tokenizer="char" next to a BPE data.tokenizer: teacher.tokenizer is
  refused without objective.cross_tokenizer; with it the teacher's column is the char tokenizer."""
  from kldistill_jax.train import preflight  # pylint: disable=g-import-not-at-top
  c = config_files.load("quickstart", **{"teacher.path": "", "teacher.tokenizer": "char",
                                         "data.tokenizer": str(bpe.path)})
  c.teacher.model.update(c.student.model)
  with pytest.raises(UserError, match="teacher.tokenizer='char' is read only with objective.cross_tokenizer"):
    preflight.run(c, bpe)
  c.objective.cross_tokenizer = "span"
  report = preflight.run(c, bpe)
  rows = {row[0]: row[1:] for row in report.rows}
  assert not report.errors and rows["rows"][0] == str(CHAR.vocab_size) and rows["tokens"][0] == "40"
