"""Off-policy SFT: teacher prefixes, forward KL, exact estimator (the 2x2's top-left cell).

Each step the teacher samples a completion per prompt; the student is trained on those sequences with
the full-vocabulary forward KL(p_T(.|s_t) || q(.|s_t)) at every position, i.e. cross-entropy against the
teacher's soft targets. This is supervised KD on teacher samples: sequence-level KD (Kim & Rush's SeqKD)
with soft instead of one-hot targets. Teacher trajectories do not depend on the student, so they can be
sampled once and reused (`--config.teacher_cache.enabled=True`): the cheap cell at matched FLOPs.

Launch (built-in arithmetic task, shipped teacher, the quickstart student; a few minutes on 2 CPU cores):
  python run.py --config configs/sft.py --workdir /tmp/sft
  python run.py --config configs/sft.py --config.teacher_cache.enabled=True --workdir /tmp/sft_cached
  python run.py --config configs/sft.py:smoke --workdir /tmp/sft_smoke   # seconds: tests
"""

from kldistill_jax.train import presets
from kldistill_jax.train.defaults import base_config


def get_config(arg=None):
  c = presets.objective(presets.arithmetic(base_config()), "sft")
  return presets.apply_arg(c, arg, {"smoke": presets.smoke})
