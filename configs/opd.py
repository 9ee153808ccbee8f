"""On-policy distillation: student prefixes, reverse KL, sampled estimator (bottom-right cell).

Each step the current student samples a completion; the teacher scores the sampled tokens and the
student follows the policy gradient of KL(q || p_T) with the dense per-token reward log p_T - log q
(no importance weights: the samples are on-policy). This is on-policy distillation as in Thinking
Machines' "On-Policy Distillation" and the core of MiniLLM (Gu et al.), without their extras (MiniLLM's
length normalisation, teacher-mixed sampling and pretraining loss). Reverse KL is mode-seeking: higher
Avg@k, lower entropy and Pass@k; see configs/kl_mix.py for forward-heavy mixtures.

Launch (built-in arithmetic task, shipped teacher, the quickstart student; a few minutes on 2 CPU cores):
  python run.py --config configs/opd.py --workdir /tmp/opd
  python run.py --config configs/opd.py --config.objective.discount=1.0 --workdir /tmp/opd_rtg
  python run.py --config configs/opd.py:smoke --workdir /tmp/opd_smoke   # seconds: tests
"""

from kldistill_jax.train import presets
from kldistill_jax.train.defaults import base_config


def get_config(arg=None):
  c = presets.objective(presets.arithmetic(base_config()), "opd")
  # One sampled token per position is a noisy gradient: the exact cells' 5e-3 made accuracy worse here.
  c.optimizer.learning_rate = 1e-3
  return presets.apply_arg(c, arg, {"smoke": presets.smoke})
