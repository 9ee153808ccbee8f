"""Gradient identities and the exact sequence-KL decomposition, checked numerically.

Launch:
  python run.py --config configs/identities.py
  python run.py --config configs/identities.py --config.sequence.length=3 --config.mc.repeats=50
Prints both sides of every identity in `kldistill_jax.identities` and their difference; exits non-zero
if an exact identity is off by more than `tolerance` (relative), or the Monte-Carlo error does not fall
like 1/sqrt(n).
"""

import ml_collections


def get_config(arg=None):
  del arg  # no presets: the whole check takes seconds
  config = ml_collections.ConfigDict()
  config.job = "identities"  # which `kldistill_jax.jobs` entry run.py calls
  config.seed = 0  # PRNG seed for the random logits and tabular models
  config.vocab_size = 32  # vocabulary of the token-level checks
  config.num_positions = 4  # independent prefixes in the token-level checks
  config.logit_scale = 2.0  # std of the random logits (peaked but not one-hot distributions)
  config.lam = 0.3  # reverse-KL weight for the mixing-linearity check
  config.tolerance = 1e-4  # max relative error an exact identity may show in float32

  config.sequence = ml_collections.ConfigDict()
  config.sequence.vocab_size = 3  # tabular autoregressive model: V^L sequences are enumerated
  config.sequence.length = 4

  config.mc = ml_collections.ConfigDict()
  config.mc.sample_sizes = (10, 100, 1000, 10000)  # tokens per REINFORCE estimate
  config.mc.repeats = 200  # independent estimates per size for the RMS error
  config.mc.slope_tolerance = 0.1  # |fitted slope + 0.5| allowed
  return config
