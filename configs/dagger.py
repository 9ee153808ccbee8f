"""DAgger-style on-policy SFT: student prefixes, forward KL, exact estimator (bottom-left cell).

Each step the CURRENT student samples a completion per prompt; the teacher labels every position of it
and the student minimises the full-vocabulary forward KL(p_T(.|s_t) || q(.|s_t)) there. The student
learns to recover from its own mistakes (DAgger's point) with SFT-style mode-covering targets. It is
GKD (Agarwal et al.) with on-policy fraction 1 and its JSD weight at the forward-KL end, i.e. lam=0 in
this library's convention (lam = the reverse-KL weight).

Launch (built-in arithmetic task, shipped teacher, the quickstart student; a few minutes on 2 CPU cores):
  python run.py --config configs/dagger.py --workdir /tmp/dagger
  python run.py --config configs/dagger.py:smoke --workdir /tmp/dagger_smoke   # seconds: tests
"""

from kldistill_jax.train import presets
from kldistill_jax.train.defaults import base_config


def get_config(arg=None):
  c = presets.objective(presets.arithmetic(base_config()), "dagger")
  return presets.apply_arg(c, arg, {"smoke": presets.smoke})
