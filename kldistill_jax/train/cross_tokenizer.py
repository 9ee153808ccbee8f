"""Cross-tokenizer batches (objective.cross_tokenizer): the student's rows as text, re-tokenized for the
teacher and aligned by character spans, on the host between sampling and the step.

Per row: the completion ids (the student's sample or the dataset's response) are decoded piece by piece
(`data.alignment.decode_pieces`), so each student token has a character span of the completion text; the
teacher's tokenizer encodes that text, and the record's prompt rendered by the teacher's own template; the
two span lists are aligned (`data.alignment.align`). A completion that ended with an EOS ends with one
more group, the student's EOS against the teacher's. The arrays are those `cross_objectives` documents.
"""

import dataclasses
import pathlib

import jax
import numpy as np

from kldistill_jax import data
from kldistill_jax.cross_objectives import SharedVocab
from kldistill_jax.data import alignment
from kldistill_jax.data.templates import format_record
from kldistill_jax.errors import UserError
from kldistill_jax.sampling import bucket_length
from kldistill_jax.train import distributed


@dataclasses.dataclass(frozen=True, eq=False)
class CrossTokenizer:
  """The two tokenizers and their shared vocabulary (`shared_vocab`)."""
  student: object  # data.tokenizer: the student's ids in every batch
  teacher: object  # the teacher's own tokenizer
  shared: SharedVocab

  @property
  def exact_pairs(self):
    """{student id: teacher id} of the shared tokens."""
    return dict(zip(self.shared.student_ids.tolist(), self.shared.teacher_ids.tolist()))


def teacher_tokenizer(config):
  """teacher.tokenizer ("char", "byte" or a local Hugging Face tokenizer directory); "" = the tokenizer
  files of teacher.path."""
  if jax.process_count() > 1:
    raise UserError("objective.cross_tokenizer runs in one process (the alignment is built on the host "
                    "from the whole batch)")
  spec = config.teacher.tokenizer
  if not spec:
    path = pathlib.Path(config.teacher.path) if config.teacher.path else None
    if path is None or not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
      raise UserError("objective.cross_tokenizer needs the teacher's own tokenizer: set teacher.tokenizer "
                      "('char', 'byte' or a local Hugging Face tokenizer directory), or a teacher.path that "
                      "ships tokenizer files")
    spec = config.teacher.path
  elif spec not in ("char", "byte") and not pathlib.Path(spec).is_dir():
    raise UserError(f"teacher.tokenizer={spec!r}: not 'char', 'byte' or a tokenizer directory")
  return data.load_tokenizer(spec)


def _texts(tokenizer, rows):
  """{text: id} of the ids < rows that decode alone to a non-empty text no other id decodes to."""
  seen, repeated = {}, set()
  for i in range(min(rows, tokenizer.vocab_size)):
    if i == tokenizer.pad_id or i in tokenizer.eos_ids:
      continue
    text = tokenizer.decode([i])
    if not text or alignment.REPLACEMENT in text:  # special tokens, bytes of a character, unused ids
      continue
    if text in seen:
      repeated.add(text)
    seen[text] = i
  return {text: i for text, i in seen.items() if text not in repeated}


def shared_vocab(student, teacher, *, student_rows, teacher_rows) -> SharedVocab:
  """The tokens both vocabularies hold: the same tokenizer (same `name`) and as many rows -> every id;
  otherwise the ids whose decoded text is the same on both sides, plus EOS with EOS."""
  if student.name == teacher.name and student_rows == teacher_rows:
    ids = np.arange(student_rows, dtype=np.int32)
    return SharedVocab(ids, ids, identity=True)
  s_texts, t_texts = _texts(student, student_rows), _texts(teacher, teacher_rows)
  pairs = [(student.eos_id, teacher.eos_id)] + [(s_texts[t], t_texts[t]) for t in sorted(s_texts)
                                                if t in t_texts]
  s_ids, t_ids = (np.array(side, np.int32) for side in zip(*pairs))
  return SharedVocab(s_ids, t_ids)


def make(student, teacher, *, student_rows, teacher_rows) -> CrossTokenizer:
  return CrossTokenizer(student, teacher, shared_vocab(student, teacher, student_rows=student_rows,
                                                       teacher_rows=teacher_rows))


def teacher_prompts(records, indices, template, teacher):
  """The teacher's prompt ids of each record index: the record rendered by the teacher's own template."""
  prompts = []
  for index in indices:
    text = format_record(records[int(index)], template, teacher)
    try:
      prompts.append(teacher.encode(text))
    except UserError as e:
      raise UserError(f"record {int(index)}: the teacher's tokenizer (teacher.tokenizer) cannot encode the "
                      f"prompt: {e}") from e
  return prompts


def _row(cross, tokens, attention_mask, loss_mask, prompt_ids):
  """One row: (teacher ids, [(student positions, teacher indices into those ids)] per aligned group)."""
  completion = np.flatnonzero(loss_mask)
  if not len(completion):
    return list(prompt_ids), []
  first, last = int(completion[0]), int(completion[-1]) + 1
  if not (loss_mask[first:last] == 1).all():
    raise ValueError("a row's trained tokens (loss_mask) must be contiguous")
  ids = [int(i) for i in tokens[first:last]]
  ended = ids[-1] in cross.student.eos_ids
  text_ids = ids[:-1] if ended else ids
  context = [int(i) for i in tokens[:first][attention_mask[:first] > 0]][-4:]
  pieces = alignment.decode_pieces(cross.student.decode, text_ids, prefix=context)
  t_ids, t_spans, t_valid = alignment.encode_with_spans(cross.teacher, "".join(pieces))
  s_group, t_group, count = alignment.align(alignment.spans_of(pieces), t_spans, b_valid=t_valid)
  offset = len(prompt_ids)
  groups = [(first + np.flatnonzero(s_group == g), offset + np.flatnonzero(t_group == g)) for g in range(count)]
  row = list(prompt_ids) + list(t_ids)
  if ended and (s_group >= 0).all() and (t_group >= 0).all():  # the end is aligned when all text before is
    groups.append((np.array([last - 1]), np.array([len(row)])))
    row.append(cross.teacher.eos_id)
  return row, groups


def build(cross: CrossTokenizer, batch, prompt_ids):
  """The teacher's rows and the alignment arrays (`cross_objectives.KEYS`, numpy) of a step batch.

  batch: numpy tokens / attention_mask / loss_mask [B, L] (student ids); prompt_ids: the teacher's prompt
  ids per row (`teacher_prompts`). Teacher rows are left-padded to a power-of-two length (few compiles).
  """
  tokens, attention, loss_mask = (np.asarray(batch[k]) for k in ("tokens", "attention_mask", "loss_mask"))
  b, length = tokens.shape
  rows = [_row(cross, tokens[i], attention[i], loss_mask[i], prompt_ids[i]) for i in range(b)]
  width = bucket_length(max(len(row) for row, _ in rows))
  out = {"teacher_tokens": np.full((b, width), cross.teacher.pad_id, np.int32),
         "teacher_attention_mask": np.zeros((b, width), np.int32),
         "cross_student_group": np.full((b, length), -1, np.int32),
         "cross_teacher_group": np.full((b, width), -1, np.int32),
         "cross_teacher_start": np.full((b, length), -1, np.int32),
         "cross_exact": np.zeros((b, length), np.int32)}
  pairs = cross.exact_pairs
  for i, (row, groups) in enumerate(rows):
    pad = width - len(row)
    out["teacher_tokens"][i, pad:] = row
    out["teacher_attention_mask"][i, pad:] = 1
    for s_positions, t_indices in groups:
      t_positions = pad + t_indices
      key = s_positions[0] - 1  # the student prediction of the group's first token
      out["cross_student_group"][i, s_positions] = key
      out["cross_teacher_group"][i, t_positions] = key
      out["cross_teacher_start"][i, s_positions[0]] = t_positions[0] - 1
      if len(s_positions) == len(t_positions) == 1:
        s_id, t_id = int(tokens[i, s_positions[0]]), row[int(t_indices[0])]
        out["cross_exact"][i, s_positions[0]] = int(pairs.get(s_id) == t_id)
  return out


def check_rows(teacher_model_rows, teacher_tok):
  """The teacher model has a row for every id of its own tokenizer."""
  if teacher_tok.vocab_size > teacher_model_rows:
    raise UserError(f"teacher tokenizer {teacher_tok.name} (teacher.tokenizer) has {teacher_tok.vocab_size} "
                    f"tokens but the teacher vocabulary has {teacher_model_rows}")



def extend_batch(cross: CrossTokenizer, batch, indices, records, template, mesh):
  """The step batch (global arrays) plus the teacher's rows and the alignment (`build`) on `mesh`;
  indices: the rows' record indices in `records`, whose prompts the teacher's template renders."""
  host = {key: distributed.to_host(batch[key]) for key in ("tokens", "attention_mask", "loss_mask")}
  prompts = teacher_prompts(records, distributed.to_host(indices), template, cross.teacher)
  return {**batch, **distributed.global_batch(build(cross, host, prompts), mesh)}
