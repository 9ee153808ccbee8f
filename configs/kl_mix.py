"""Mixed KL on student prefixes: lam * KL(q || p_T) + (1 - lam) * KL(p_T || q), exact estimator.

`objective.lam` is the weight of the REVERSE KL (lam=0: pure forward, i.e. configs/dagger.py; lam=1:
pure reverse with the exact estimator). The default 0.25 is forward-heavy, as the paper recommends for
long runs: it keeps most of reverse KL's accuracy while entropy and response length stay stable.

Launch (built-in arithmetic task, shipped teacher, the quickstart student):
  python run.py --config configs/kl_mix.py --workdir /tmp/mix
Sweep lam (then compare the results.json files):
  for lam in 0 0.25 0.5 0.75 1; do
    python run.py --config configs/kl_mix.py --config.objective.lam=$lam --workdir /tmp/mix_$lam
  done
Smoke (seconds; tests):
  python run.py --config configs/kl_mix.py:smoke --workdir /tmp/mix_smoke
"""

from kldistill_jax.train import presets
from kldistill_jax.train.defaults import base_config


def get_config(arg=None):
  c = presets.arithmetic(base_config())
  c.objective.prefix = "student"
  c.objective.kl = "mixed"
  c.objective.lam = 0.25  # reverse-KL weight: forward-heavy
  c.objective.estimator = "exact"
  return presets.apply_arg(c, arg, {"smoke": presets.smoke})
