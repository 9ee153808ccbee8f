"""Loading configs/*.py the way run.py does (by path) and applying dotted overrides, for the tests."""

import importlib.util
import pathlib

from kldistill_jax.train import presets

ROOT = pathlib.Path(__file__).resolve().parents[1]


def module(path):
  """The config file at `path` (absolute, or a name under configs/) as a module."""
  path = pathlib.Path(path)
  if not path.is_absolute():
    path = ROOT / "configs" / f"{path}.py"
  spec = importlib.util.spec_from_file_location(path.stem, path)
  loaded = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loaded)
  return loaded


def load(name, arg=None, **overrides):
  """configs/<name>.py's get_config(arg) with {"a.b": value} overrides applied."""
  return presets.with_overrides(module(name).get_config(arg), overrides.items())
