"""Shared pieces of the configs in configs/*.py (configs are loaded by path, so they share code here).

    c = base_config(); presets.arithmetic(c); presets.objective(c, "opd"); presets.smoke(c)
"""

import copy
import pathlib

from kldistill_jax import objectives
from kldistill_jax.errors import UserError

ASSETS = pathlib.Path(__file__).resolve().parents[2] / "assets"
ARITHMETIC_TEACHER = ASSETS / "arithmetic_teacher"

# The quickstart student: half the shipped teacher's width (see assets/arithmetic_teacher/config.json).
ARITHMETIC_STUDENT = dict(family="qwen3", hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=10_000.0)


def arithmetic(c):
  """The built-in task as configs/quickstart.py runs it: shipped teacher, small random student fitted
  briefly to the data, lengths, optimizer."""
  c.steps = 300
  c.batch_size = 64
  c.checkpoint_every = 50
  c.sampling.max_new_tokens = 36  # the longest response of difficulty 5, EOS included
  c.optimizer.learning_rate = 5e-3
  c.optimizer.warmup_steps = 10
  c.teacher.path = str(ARITHMETIC_TEACHER)
  c.student.model.update(ARITHMETIC_STUDENT)
  c.student.warmup_steps = 150  # a weak "base model" to distill into, not a random one
  c.student.warmup_learning_rate = 3e-3
  c.data.prompt_len = 12
  c.data.response_len = 36
  c.eval.max_new_tokens = 36
  return c


def objective(c, cell):
  """Sets objective.prefix/kl/estimator to one cell of the 2x2 ("sft", "dagger", "offline_rl", "opd")."""
  cell = objectives.PRESETS[cell]
  c.objective.prefix, c.objective.kl, c.objective.estimator = cell.prefix, cell.kl, cell.estimator
  return c


def smoke(c):
  """Seconds on CPU for tests: 2 steps, 8 prompts (one per simulated device), 2-term problems only."""
  c.steps = 2
  c.batch_size = 8
  c.log_every = 1
  c.checkpoint_every = 2
  c.optimizer.warmup_steps = 1
  c.student.warmup_steps = 1
  c.data.num_train = 64
  c.data.difficulties = (2,)  # "3+5=" -> "3+5=8#8": 8 tokens with EOS
  c.sampling.max_new_tokens = 12
  c.eval.num_problems = 8
  c.eval.difficulties = (2,)
  c.eval.batch_size = 8
  c.eval.max_new_tokens = 12
  return c


def apply_arg(c, arg, presets):
  """Applies the preset named by the config-file argument (`configs/x.py:smoke`); None = the default."""
  if arg is None or arg == "":
    return c
  if arg not in presets:
    raise UserError(f"unknown preset {arg!r}; known: {', '.join(sorted(presets))}")
  presets[arg](c)
  return c


def with_overrides(config, overrides):
  """A copy of `config` with (dotted field, value) pairs set, e.g. (("objective.kl", "mixed"), ...); the
  fields must exist (a mistyped name is an error, as on the command line)."""
  c = copy.deepcopy(config)  # keeps typed placeholders typed (copy_and_resolve_references would not)
  for dotted, value in overrides:
    *parents, leaf = dotted.split(".")
    section = c
    for parent in parents:
      section = section[parent]
    if leaf not in section:
      raise KeyError(f"no config field {dotted!r}")
    section[leaf] = value
  return c
