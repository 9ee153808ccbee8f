"""The command line of `run.py`: its flags, `--help` with the shipped configs, `--show` of a resolved config,
and user errors (a bad flag, a misspelled or invalid override, a missing config file) as one line, exit 2.

    python run.py --help                                   # flags and configs/*.py with their first lines
    python run.py --config configs/opd.py --show           # every field: value, meaning, default; presets
    python run.py --config configs/opd.py:smoke --workdir /tmp/opd --config.objective.discount=1.0
"""

import ast
import difflib
import importlib.util
import io
import os
import pathlib
import re
import sys
import tokenize

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from kldistill_jax import errors, jobs

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEFAULTS = pathlib.Path(__file__).resolve().parent / "train" / "defaults.py"
USAGE = "python run.py --config configs/<name>.py[:<preset>] [--workdir DIR] [--config.<field>=<value> ...]"
_HELP_FLAGS = ("-h", "--help", "-?", "--helpshort")
_OWN_FLAGS = ("config", "workdir", "show", "traceback")


def main(argv=None):
  """What `run.py` does: defines its flags, parses them (`parse_flags`) and runs the config's job."""
  config_flags.DEFINE_config_file("config", None, "Python config file, configs/<name>.py[:<preset>]; fields "
                                  "are overridden as --config.<section>.<field>=<value>.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, exports and reports.")
  flags.DEFINE_bool("show", False, "Print the resolved config (each field's value, meaning and default) and "
                    "the config file's presets, then exit without running anything.")
  flags.DEFINE_bool("traceback", False, "Show the traceback of a user error (for bug reports).")
  app.run(_main, argv=argv, flags_parser=parse_flags)


def _main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])} (usage: {USAGE})")
  if flags.FLAGS["config"].value is None:
    _fail(f"--config is required (usage: {USAGE}; python run.py --help lists the configs)")
  if flags.FLAGS.show:
    print(describe(flags.FLAGS.config, config_flags.get_config_filename(flags.FLAGS["config"])))
    sys.exit(0)
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; -v 0 brings it back
    logging.set_verbosity(logging.WARNING)
  sys.exit(jobs.exit_code(flags.FLAGS.config, flags.FLAGS.workdir, traceback=flags.FLAGS.traceback))


def _fail(message):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """`app.run`'s flags_parser: absl's parsing, with `--help` printing `help_text()` (exit 0) and a user's
  mistake in the flags reported as one `error:` line (exit 2) instead of a traceback."""
  if any(arg in _HELP_FLAGS for arg in argv[1:]):
    print(help_text())
    sys.exit(0)
  spec = _config_spec(argv)
  if spec and not pathlib.Path(spec.split(":", 1)[0]).is_file():
    _fail(f"--config={spec}: no such file (python run.py --help lists the configs)")
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (anything that is not the user's is re-raised)
    message = flag_error(argv, e)
    if message is None or "--traceback" in argv:
      raise
    _fail(message)


def flag_error(argv, error):
  """The one-line message of a flag-parsing `error` that the user made, or None for a bug: a config file
  whose get_config raises a `UserError` (an unknown preset), an override naming no field, a value absl
  could not parse."""
  spec = _config_spec(argv)
  if spec:
    try:
      config = load_config(spec)
    except errors.UserError as e:
      return f"--config={spec}: {e}"
    except Exception:  # pylint: disable=broad-except  (a bug in the config file: its traceback is wanted)
      return None
    for dotted in _overrides(argv):
      message = missing_field(config, dotted)
      if message:
        return f"--config.{dotted}: {message}"
  if isinstance(error, flags.Error):
    return str(error).splitlines()[0]
  return None


def _config_spec(argv):
  """The value of --config in argv (`configs/x.py:preset`), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv):
  """The dotted fields of the --config.<field>=<value> overrides in argv."""
  found = (re.match(r"^--?(?:no)?config\.([^=]+)", arg) for arg in argv)
  return [m.group(1) for m in found if m]


def missing_field(config, dotted):
  """Why `dotted` (e.g. "objective.lamda") names no field of `config`, with the nearest names; None if it
  does."""
  section, where = config, "the config"
  for name in dotted.split("."):
    name = name.split("[", 1)[0]
    if not isinstance(section, ml_collections.ConfigDict):
      return f"{where} is a value, not a section"
    if name not in section:
      close = difflib.get_close_matches(name, list(section.keys()), n=3, cutoff=0.6)
      hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
      return f"no field {name!r} in {where}{hint}"
    section, where = section[name], name if where == "the config" else f"{where}.{name}"
  return None


def load_module(path):
  """The config file at `path` as a module (how ml_collections loads it)."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"{path.stem}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec):
  """get_config(preset) of `configs/x.py[:preset]`."""
  path, *arg = spec.split(":", 1)
  return load_module(path).get_config(*arg)


def presets(path):
  """{name: first docstring line} of the presets the config file passes to `presets.apply_arg`."""
  module = load_module(path)
  for node in ast.walk(ast.parse(pathlib.Path(path).read_text())):
    if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "apply_arg"
        and len(node.args) == 3 and isinstance(node.args[2], ast.Dict)):
      table = node.args[2]
      return {ast.literal_eval(k): first_line(_resolve(v, module).__doc__) for k, v in zip(table.keys, table.values)}
  return {}


def _resolve(node, module):
  """The object a name or dotted name (`_smoke`, `presets.smoke`) of `module`'s source refers to."""
  if isinstance(node, ast.Attribute):
    return getattr(_resolve(node.value, module), node.attr)
  return getattr(module, node.id)


def first_line(doc):
  """The first paragraph of a docstring, on one line."""
  return " ".join((doc or "").strip().split("\n\n", 1)[0].split())


def field_comments(path):
  """{dotted field: comment} of the assignments `c.<section>.<field> = value  # comment` in a config
  source file (a comment on the lines just above an assignment counts too). The fields of a section built
  by a helper (`c.teacher = _model_section()`, whose body assigns `s.path = ...`) are found under each
  section the helper builds."""
  source = pathlib.Path(path).read_text()
  comments = {}  # line number -> comment text
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      comments[token.start[0]] = token.string.lstrip("#").strip()
  lines = source.splitlines()

  def comment_of(node):
    found = [comments[node.lineno]] if node.lineno in comments else []
    above, line = [], node.lineno - 1
    while line in comments and lines[line - 1].lstrip().startswith("#"):
      above.insert(0, comments[line])
      line -= 1
    return " ".join(above + found)

  def dotted(target):
    names = []
    while isinstance(target, ast.Attribute):
      names.insert(0, target.attr)
      target = target.value
    return (target.id, ".".join(names)) if isinstance(target, ast.Name) and names else (None, None)

  helpers = {}  # function name -> {field: comment} of what its local section gets
  result = {}
  tree = ast.parse(source)
  for function in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
    fields = {}
    for node in ast.walk(function):
      if isinstance(node, ast.Assign) and len(node.targets) == 1:
        _, name = dotted(node.targets[0])
        if name:
          fields[name] = comment_of(node)
          call = node.value
          if isinstance(call, ast.Call) and getattr(call.func, "id", None) in helpers:
            fields.update({f"{name}.{k}": v for k, v in helpers[call.func.id].items()})
    helpers[function.name] = fields
    result.update(fields)
  return {name: text for name, text in result.items() if text}


def describe(config, spec) -> str:
  """The resolved `config` of `spec` (`configs/x.py[:preset]`) as text: the file's first docstring
  paragraph, its presets, then every field as `name = value  # meaning; default: ...` (the meaning from the
comments of train/defaults.py, or of the config file for a field defaults.py does not have)."""
  path, _, preset = spec.partition(":")
  module = load_module(path)
  notes = field_comments(path)
  meanings, defaults = {}, ml_collections.ConfigDict()
  if "base_config" in vars(module):  # a training config: train/defaults.py says what each field means
    meanings, defaults = field_comments(DEFAULTS), module.base_config()
  out = [f"{path}: {first_line(module.__doc__)}"]
  table = presets(path)
  if table:
    out.append(f"presets ({path}:<preset>{', this one: ' + preset if preset else ''}):")
    out += [f"  {name}  {doc}" for name, doc in table.items()]
  out.append("fields (override as --config.<field>=<value>):")

  def walk(section, prefix, indent):  # values first, then sections
    for name, value in sorted(section.items(), key=lambda kv: isinstance(kv[1], ml_collections.ConfigDict)):
      dotted = f"{prefix}{name}"
      default = _lookup(defaults, dotted)
      meaning = meanings.get(dotted, "") if default is not _MISSING else notes.get(dotted, "")
      if isinstance(value, ml_collections.ConfigDict):
        out.append(f"{indent}{name}:" + (f"  # {meaning}" if meaning else ""))
        walk(value, dotted + ".", indent + "  ")
        continue
      note = f"default: {default!r}" if default is not _MISSING and default != value else ""
      text = "; ".join(t for t in (meaning, note) if t)
      out.append(f"{indent}{name} = {value!r}" + (f"  # {text}" if text else ""))

  walk(config, "", "  ")
  return "\n".join(out)


_MISSING = object()


def _lookup(config, dotted):
  for name in dotted.split("."):
    if not isinstance(config, ml_collections.ConfigDict) or name not in config:
      return _MISSING
    config = config[name]
  return config


def help_text() -> str:
  """`run.py --help`: usage, the flags, and every configs/*.py with the first paragraph of its docstring."""
  out = [f"usage: {USAGE}", "", "flags:"]
  for name in _OWN_FLAGS:
    if name in flags.FLAGS:
      out.append(f"  --{name}: {flags.FLAGS[name].help}")
  shown = os.path.relpath(CONFIGS)
  out += ["  -v N / --verbosity=N: log level (default here: warnings only; 0 = info)",
          "  --helpfull: every flag, absl's included", "",
          f"configs ({CONFIGS if shown.startswith('..') else shown}):"]
  names = sorted(CONFIGS.glob("*.py"))
  width = max((len(p.name) for p in names), default=0)
  for p in names:
    out.append(f"  {p.name:<{width}}  {first_line(ast.get_docstring(ast.parse(p.read_text())))}")
  out += ["", "See a config's fields, their meaning and its presets before running it:",
          "  python run.py --config configs/opd.py --show"]
  return "\n".join(out)
