"""Preflight: teacher vs student compatibility, read from files before any model is loaded.

Same-tokenizer distillation feeds both models the ids of ONE tokenizer (data.tokenizer, which encodes the
data and whose EOS ids stop the sampler) and compares their distributions row by row. It breaks silently
when the two sides disagree on what an id means, so the run refuses (one `UserError` naming every
mismatch) when:
- vocabulary: a side's token -> id mapping (added tokens included) differs;
- segmentation: the ids agree but text splits differently (merges, normalizer, pre-tokenizer): the teacher
  would score token sequences its tokenizer never produces;
- rows: a model has fewer vocabulary rows than the tokenizer has tokens (ids out of range), or teacher and
  student rows differ (token-level KL needs one V). More rows than tokens (Qwen3 pads 151,669 tokens to
  151,936 rows) is fine when the ids agree: noted;
- eos: a side ends sequences (its tokenizer's EOS, its generation_config.json `eos_token_id`) with an id
  the sampler does not stop on: sampled prefixes run past the answer's end and the student learns an end
  token that never stops it. Different but covered end ids are noted;
- chat template / BOS: with data.template="chat" the prompt both models condition on is rendered by
  data.tokenizer's template (which also places BOS), so a side whose template or BOS differs reads a
  prompt format it was not trained on. With "raw" / "plain" no template or BOS is placed: noted.
Pad ids are only ever written at masked positions: a difference is noted. The pairs compared are teacher
vs student and, when student.path ships a tokenizer, student vs data.tokenizer; an inline model reads
data.tokenizer's ids by construction, a checkpoint without tokenizer files is assumed to (noted).
"""

import dataclasses
import hashlib
import json
import pathlib

import jax

from kldistill_jax.errors import UserError
from kldistill_jax.models import hf
from kldistill_jax.train import setup

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
INLINE = "inline model (data.tokenizer's ids)"
CHAT = "chat"


@dataclasses.dataclass(frozen=True)
class TokenizerFacts:
  """What a tokenizer decides about ids, read from its files."""
  kind: str                            # tokenizer class (tokenizer_config.json's, else the object's)
  size: int                            # tokens, added tokens included
  vocabulary: str                      # digest of token -> id
  segmentation: str | None             # digest of how text splits into tokens; None: unknown (slow tokenizer)
  eos: int | None
  pad: int | None
  bos: int | None
  chat_template: str | None
  special_tokens: tuple = ()           # ((token, id), ...) sorted


@dataclasses.dataclass(frozen=True)
class Side:
  """One column of the table: a model as the run will feed it, or data.tokenizer itself."""
  name: str                            # "teacher" | "student" | "data.tokenizer"
  source: str                          # "/ckpt/Qwen3-8B (teacher.path)", `INLINE`, a tokenizer directory
  tokenizer: TokenizerFacts | None     # None: no tokenizer files (reads data.tokenizer's ids)
  rows: int | None = None              # vocabulary rows (config.json vocab_size); None for data.tokenizer
  generation: dict = dataclasses.field(default_factory=dict)  # generation_config.json: eos (tuple), pad, bos


@dataclasses.dataclass(frozen=True)
class Report:
  sources: list     # [(side name, source)], one per column
  rows: list        # [(field, *cells, status)]; status "ok" | "note" | "ERROR" | "" (not a check)
  errors: list      # messages, each starting with the field it names
  notes: list


def digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def facts_of(tokenizer, kind=None) -> TokenizerFacts:
  """TokenizerFacts of a `transformers` tokenizer."""
  segmentation = None
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:  # the model (vocab, merges or scores, flags), normalizer, pre-tokenizer
    spec = json.loads(backend.to_str())
    segmentation = digest([spec.get("model"), spec.get("normalizer"), spec.get("pre_tokenizer")])
  template = tokenizer.chat_template
  specials = sorted({(token, tokenizer.convert_tokens_to_ids(token)) for token in tokenizer.all_special_tokens})
  return TokenizerFacts(
      kind=kind or type(tokenizer).__name__, size=len(tokenizer),
      vocabulary=digest(sorted(tokenizer.get_vocab().items())), segmentation=segmentation,
      eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id,
      chat_template=template if template is None or isinstance(template, str) else json.dumps(template),
      special_tokens=tuple(specials))


def _ids(value):
  return () if value is None else tuple(value) if isinstance(value, list) else (value,)


def _ends(side, data):
  """Every id `side` ends a sequence with: its tokenizer's EOS and its generation_config.json's."""
  tokenizer = side.tokenizer or data.tokenizer
  return tuple(dict.fromkeys(_ids(tokenizer.eos) + side.generation.get("eos", ())))


def _fmt(value):
  if value is None or value == ():
    return "-"
  return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value)


def _name(token_id):
  return "none" if token_id is None else str(token_id)


def _template(text):
  return "none" if text is None else f"{digest(text)[:8]} ({len(text)} chars)"


def compare(teacher, student, data, *, stop_ids, template, cross_tokenizer=False) -> Report:
  """Table rows and blocking mismatches of `teacher` (None: no teacher) and `student` against `data`.

  stop_ids: the ids the sampler stops on (data.tokenizer's `eos_ids`); template: data.template.
  cross_tokenizer: the teacher reads text, not the student's ids, so teacher vs student is not compared.
  """
  models = [s for s in (teacher, student) if s is not None]
  sides = models + [data]
  checks = []  # (field, level, message)

  def check(field, bad, message, blocking=True):
    if bad:
      checks.append((field, "ERROR" if blocking else "note", f"{field}: {message}"))

  def label(side):
    return "data.tokenizer" if side is data else f"the {side.name}'s tokenizer"

  pairs = []
  if teacher is not None and teacher.tokenizer is not None and not cross_tokenizer:
    pairs.append((teacher, student if student.tokenizer is not None else data))
  if student.tokenizer is not None:
    pairs.append((student, data))
  chat = template == CHAT
  for a, b in pairs:
    x, y = a.tokenizer, b.tokenizer
    hint = ("set data.tokenizer to the student's tokenizer directory" if b is data
            else "the teacher would read the student's ids")
    check("vocabulary", x.vocabulary != y.vocabulary,
          f"{label(a)} ({x.kind}, {x.size} tokens) and {label(b)} ({y.kind}, {y.size} tokens) map tokens "
          f"to different ids ({hint})")
    check("segmentation", x.vocabulary == y.vocabulary and None not in (x.segmentation, y.segmentation)
          and x.segmentation != y.segmentation,
          f"{label(a)} and {label(b)} share the ids but split text differently (merges, normalizer or "
          f"pre-tokenizer), so the {a.name} scores token sequences its tokenizer never produces")
    check("chat template", x.chat_template != y.chat_template,
          f"{label(a)} and {label(b)} have different chat templates "
          + ("(data.template='chat' renders every prompt with data.tokenizer's)" if chat
             else "(unused: data.template is not 'chat')"), blocking=chat)
    check("bos", x.bos != y.bos,
          f"BOS {_name(x.bos)} in {label(a)}, {_name(y.bos)} in {label(b)} "
          + ("(the chat template places data.tokenizer's)" if chat else "(unused: no template places it)"),
          blocking=chat)
    check("pad", x.pad != y.pad, f"pad {_name(x.pad)} in {label(a)}, {_name(y.pad)} in {label(b)} "
          "(harmless: pad positions are masked)", blocking=False)
    check("special tokens", x.special_tokens != y.special_tokens,
          f"{label(a)} and {label(b)} flag different special tokens", blocking=False)

  for side in models:  # ids in range: the data's, and the side's own tokenizer's when it reads its own
    own = side.tokenizer.size if side.tokenizer is not None else 0
    needed = own if side is teacher and cross_tokenizer and own else max(own, data.tokenizer.size)
    check("tokenizer", side.tokenizer is None and side.source != INLINE, f"{side.source} has no tokenizer "
          "files: the ids of data.tokenizer are assumed to be its own (unchecked)", blocking=False)
    if side.rows is None:
      continue
    check("rows", side.rows < needed, f"the {side.name} has {side.rows} vocabulary rows but the tokenizer it "
          f"reads has {needed} tokens (ids {side.rows}..{needed - 1} are out of range)")
    check("rows", side.rows > needed, f"the {side.name} has {side.rows - needed} padded rows past the "
          f"{needed} tokens (fine: no id points there)", blocking=False)
  if teacher is not None and not cross_tokenizer and None not in (teacher.rows, student.rows):
    check("rows", teacher.rows != student.rows, f"teacher {teacher.rows} vs student {student.rows} vocabulary "
          "rows: token-level KL compares the two distributions row by row and needs one vocabulary size")

  for side in models:
    if side is teacher and cross_tokenizer:
      continue
    missing = tuple(i for i in _ends(side, data) if i not in stop_ids)
    check("eos", bool(missing), f"the {side.name} ends sequences with {_fmt(missing)}, which the sampler does "
          f"not stop on (it stops on data.tokenizer's EOS ids {_fmt(tuple(stop_ids))}): sampled prefixes run "
          "past the end and the student learns an end that never stops it; list it in eos_token_id of "
          "data.tokenizer's generation_config.json if it ends the student's turns too")
  if teacher is not None and not cross_tokenizer:
    check("eos", _ends(teacher, data) != _ends(student, data) and not any(c[0] == "eos" for c in checks),
          f"teacher ends with {_fmt(_ends(teacher, data))}, student with {_fmt(_ends(student, data))} (the "
          "sampler stops on all of them)", blocking=False)

  def cells(get):
    return [get(side) for side in sides]

  def tok(get):
    return cells(lambda s: get(s.tokenizer) if s.tokenizer is not None else
                 "= data.tokenizer" if s.source == INLINE else "no tokenizer files")

  def gen(key):
    return cells(lambda s: "" if s is data and not s.generation else _fmt(s.generation.get(key)))

  table = [
      ("tokenizer", *tok(lambda t: t.kind)),
      ("tokens", *tok(lambda t: str(t.size))),
      ("vocabulary", *tok(lambda t: t.vocabulary)),
      ("segmentation", *tok(lambda t: t.segmentation or "unknown")),
      ("rows", *cells(lambda s: "" if s.rows is None else str(s.rows))),
      ("eos", *tok(lambda t: _fmt(t.eos))),
      ("eos (generation)", *gen("eos")),
      ("stop ids", *cells(lambda s: _fmt(tuple(stop_ids)) if s is data else "")),
      ("pad", *tok(lambda t: _fmt(t.pad))),
      ("pad (generation)", *gen("pad")),
      ("bos", *tok(lambda t: _fmt(t.bos))),
      ("bos (generation)", *gen("bos")),
      ("chat template", *tok(lambda t: _template(t.chat_template))),
      ("special tokens", *tok(lambda t: f"{len(t.special_tokens)} ({digest(t.special_tokens)[:8]})")),
  ]
  level = {}
  for field, severity, _ in checks:
    level[field] = "ERROR" if "ERROR" in (severity, level.get(field)) else severity
  checked = ("tokenizer", "vocabulary", "segmentation", "rows", "eos", "pad", "bos", "chat template", "special tokens")
  rows = [(field, *values, level.get(field, "ok") if field in checked else "") for field, *values in table]
  return Report(sources=[(side.name, side.source) for side in sides], rows=rows,
                errors=[m for _, s, m in checks if s == "ERROR"], notes=[m for _, s, m in checks if s == "note"])


def format_table(report) -> str:
  """The sources, the report as aligned columns (field, one per side, check), then errors and notes."""
  lines = [("", *(name for name, _ in report.sources), "check"), *report.rows]
  widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
  text = ["  ".join(f"{str(v):<{w}}" for v, w in zip(line, widths)).rstrip() for line in lines]
  text.insert(1, "-" * len(max(text, key=len)))
  text += [f"ERROR {m}" for m in report.errors] + [f"note  {m}" for m in report.notes]
  header = [f"  {name}: {source}" for name, source in report.sources]
  return "\n".join(["preflight: teacher vs student, both fed the ids of data.tokenizer", *header, *text])


def error_message(report, cross_tokenizer_field) -> str:
  """One line naming every blocking mismatch and the way out for tokenizers that differ."""
  way = ("set objective.cross_tokenizer to distill across tokenizers" if cross_tokenizer_field else
         "a teacher whose tokenizer differs needs cross-tokenizer distillation (objective.cross_tokenizer), "
         "which this version does not have yet")
  count = len(report.errors)
  return (f"preflight: {count} mismatch{'es' if count > 1 else ''} break{'' if count > 1 else 's'} "
          "same-tokenizer distillation (table above): " + "; ".join(report.errors) + f". Fix them; {way}")


# ------------------------------------------------------------------------------- facts from the config

def _generation(path) -> dict:
  """eos (a tuple), pad, bos of `path`/generation_config.json; {} when there is none."""
  file = pathlib.Path(path) / hf.GENERATION_FILE
  if not file.is_file():
    return {}
  try:
    values = json.loads(file.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {file}: {e}") from e
  found = {"eos": _ids(values.get("eos_token_id")) or None, "pad": values.get("pad_token_id"),
           "bos": values.get("bos_token_id")}
  return {key: value for key, value in found.items() if value is not None}


def _hf_facts(path) -> TokenizerFacts:
  kind = None
  config_file = pathlib.Path(path) / "tokenizer_config.json"
  if config_file.is_file():
    try:
      kind = json.loads(config_file.read_text()).get("tokenizer_class")
    except (OSError, ValueError) as e:
      raise UserError(f"cannot read {config_file}: {e}") from e
  return facts_of(hf.load_tokenizer(path), kind)


def data_side(tokenizer) -> Side:
  """The data.tokenizer column: a `kldistill_jax.data` tokenizer (the built-in one via its `to_hf`)."""
  if hasattr(tokenizer, "to_hf"):
    return Side("data.tokenizer", f"built in ({tokenizer.name})",
                facts_of(tokenizer.to_hf(), type(tokenizer).__name__))
  path = tokenizer.path
  return Side("data.tokenizer", str(path), _hf_facts(path), generation=_generation(path))


def model_side(config, field, data) -> Side:
  """`field`'s column: config.json vocab_size, tokenizer files and generation_config.json of its path
  (no weights read), or an inline model's rows (config.vocab_size, else data.tokenizer's size)."""
  section = config[field]
  if not section.path:
    return Side(field, INLINE, None, rows=config.vocab_size or data.tokenizer.size)
  path = pathlib.Path(section.path)
  setup.check_checkpoint_dir(f"{field}.path", path)
  facts = None
  if any((path / name).is_file() for name in TOKENIZER_FILES):
    same = pathlib.Path(data.source).is_dir() and pathlib.Path(data.source).resolve() == path.resolve()
    facts = data.tokenizer if same else _hf_facts(path)
  return Side(field, f"{section.path} ({field}.path)", facts, rows=hf.read_config(path).vocab_size,
              generation=_generation(path))


def _own_tokenizer(side, config) -> Side:
  """The teacher's column under objective.cross_tokenizer: the facts of teacher.tokenizer, which it reads
  the text with; an inline teacher has a row per token of it."""
  from kldistill_jax.train import cross_tokenizer  # pylint: disable=g-import-not-at-top
  own = data_side(cross_tokenizer.teacher_tokenizer(config))
  inline = side.source == INLINE
  return dataclasses.replace(
      side, tokenizer=own.tokenizer, rows=own.tokenizer.size if inline else side.rows,
      source=f"{'inline model' if inline else side.source}, reading text with teacher.tokenizer={config.teacher.tokenizer!r}")


def run(config, tokenizer, models=("teacher", "student")) -> Report:
  """Prints the table of `models` vs data.tokenizer (`tokenizer`) on process 0; raises a `UserError`
  naming every blocking mismatch. models: the config sections the job loads ("student" last)."""
  data = data_side(tokenizer)
  sides = {field: model_side(config, field, data) for field in models}
  cross_field = "cross_tokenizer" in config.objective
  cross = cross_field and config.objective.cross_tokenizer not in ("off", "")
  if "teacher" in sides and config.teacher.tokenizer:
    if not cross:
      raise UserError(f"teacher.tokenizer={config.teacher.tokenizer!r} is read only with "
                      "objective.cross_tokenizer 'uld' or 'span'; with 'off' the teacher reads data.tokenizer's ids")
    sides["teacher"] = _own_tokenizer(sides["teacher"], config)
  report = compare(sides.get("teacher"), sides["student"], data, stop_ids=tuple(tokenizer.eos_ids),
                   template=config.data.template, cross_tokenizer=cross)
  if jax.process_index() == 0:
    print(format_table(report), flush=True)
  if report.errors:
    raise UserError(error_message(report, cross_field))
  return report
