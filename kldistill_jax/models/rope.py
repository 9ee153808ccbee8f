"""Rotary position embeddings in the Hugging Face (rotate-half, not interleaved) layout."""

import math

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim, theta, scaling=None):
  """[head_dim // 2] float32 inverse frequencies, with Llama 3 scaling when `scaling` is given."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling is None:
    return inv_freq.astype(np.float32)
  # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
  low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply(x_BTHD, positions_BT, inv_freq):
  """Rotates x [B, T, H, D] by its positions [B, T]; math in float32, result in x's dtype."""
  angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x = x_BTHD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return (x * cos + rotated * sin).astype(x_BTHD.dtype)
