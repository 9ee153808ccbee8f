"""Forward, reverse and mixed KL on logits with a one-pass analytic gradient: the kernel of `forward_kl`,
`reverse_kl` and `mixed_kl`.

Autodiff of a KL keeps both models' float32 log-softmaxes for the backward pass (with chunking it instead
reruns every chunk's forward under `jax.checkpoint`) and then builds the gradient from them in more
[N, V] passes. Here the forward pass computes, chunk by chunk, each position's KL and its gradient w.r.t.
the logits in closed form (as `fused.py` does for hidden states), and writes the gradient straight into
one [B, T, V] buffer in the logits' dtype, carried through the scan; the backward pass only scales that
buffer by the incoming per-position cotangent (in place). So the scratch beyond the gradient itself is
O(chunk_size * V) float32, and each logit is read a few times in one pass, never rematerialised.

Per position, with s = z_S / T, t = z_T / T, q = softmax(s), p = softmax(t), F = KL(p||q), R = KL(q||p):
  dF/ds = q - p                          dF/dt = p ⊙ (log p - log q - F)
  dR/ds = q ⊙ (log q - log p - R)        dR/dt = p - q
  mixed = lam R + (1 - lam) F;  d/dz = (d/ds) / T;  d/dlam = R - F;  d/dT = -(s · d/ds + t · d/dt) / T
(terms with q = 0, resp. p = 0, are 0, so -inf logits give finite gradients).

Gradients are computed only for the inputs being differentiated (`symbolic_zeros`): a teacher that is a
constant of the student's loss costs nothing, and a differentiated teacher gets its exact gradient too.
Forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) is not defined, as for any `jax.custom_vjp`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from kldistill_jax.losses.chunking import map_position_chunks, map_position_chunks_into

KINDS = ("forward", "reverse", "mixed")


def _combine(kind, lam, forward_term, reverse_term):
  """The kind's mixture of two lazily built terms (only the needed ones are traced)."""
  if kind == "forward":
    return forward_term()
  if kind == "reverse":
    return reverse_term()
  return (1.0 - lam) * forward_term() + lam * reverse_term()


def _chunk(s_BCV, t_BCV, keep_BC, lam, temperature, *, kind, need):
  """One chunk: per-position KL (and d/dlam, d/dT when needed) and the gradients in `need`, float32."""
  # Masked positions are computed on zero logits, so padding rows (e.g. all -inf) make no NaN.
  inv_temperature = 1.0 / temperature
  s = jnp.where(keep_BC[..., None], s_BCV.astype(jnp.float32), 0.0) * inv_temperature
  t = jnp.where(keep_BC[..., None], t_BCV.astype(jnp.float32), 0.0) * inv_temperature
  # Reusing the log-softmax's exp for the probabilities would save an exp per entry but keep two more
  # [c, V] arrays alive (XLA materialises an exp with several consumers): scratch matters more here.
  s_logp, t_logp = jax.nn.log_softmax(s), jax.nn.log_softmax(t)
  q, p = jnp.exp(s_logp), jnp.exp(t_logp)
  log_qp = jnp.where(s_logp > -jnp.inf, s_logp - t_logp, 0.0)  # log q - log p where q > 0
  log_pq = jnp.where(t_logp > -jnp.inf, t_logp - s_logp, 0.0)  # log p - log q where p > 0
  fkl = None if kind == "reverse" else jnp.sum(p * log_pq, axis=-1)
  rkl = None if kind == "forward" else jnp.sum(q * log_qp, axis=-1)
  small = {"kl": _combine(kind, lam, lambda: fkl, lambda: rkl)}
  d_s = lambda: _combine(kind, lam, lambda: q - p, lambda: q * (log_qp - rkl[..., None]))
  d_t = lambda: _combine(kind, lam, lambda: p * (log_pq - fkl[..., None]), lambda: p - q)
  if "lam" in need and kind == "mixed":
    small["d_lam"] = rkl - fkl
  if "temperature" in need:
    dot = lambda x, d: jnp.sum(jnp.where(x > -jnp.inf, x * d, 0.0), axis=-1)
    small["d_temperature"] = -(dot(s, d_s()) + dot(t, d_t())) / temperature
  large = {}
  if "student" in need:
    large["student"] = d_s() / temperature
  if "teacher" in need:
    large["teacher"] = d_t() / temperature
  return small, large


def _run(s_BTV, t_BTV, keep_BT, lam, temperature, kind, chunk_size, need):
  chunk_fn = functools.partial(_chunk, lam=lam, temperature=temperature, kind=kind, need=need)
  if not {"student", "teacher"} & set(need):
    return map_position_chunks(lambda *xs: chunk_fn(*xs)[0], (s_BTV, t_BTV, keep_BT), chunk_size), {}
  # The gradients are written into buffers of the logits' dtype as the chunks go, never stacked per chunk.
  buffers = {name: lax.empty(x.shape, x.dtype) for name, x in (("student", s_BTV), ("teacher", t_BTV))
             if name in need}  # every position is overwritten
  return map_position_chunks_into(chunk_fn, (s_BTV, t_BTV, keep_BT), chunk_size, buffers)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _per_position_kl(s_BTV, t_BTV, keep_BT, lam, temperature, kind, chunk_size):
  small, _ = _run(s_BTV, t_BTV, keep_BT, lam, temperature, kind, chunk_size, need=())
  return small["kl"]


def _per_position_kl_fwd(s_BTV, t_BTV, keep_BT, lam, temperature, kind, chunk_size):
  need = tuple(name for name, x in (("student", s_BTV), ("teacher", t_BTV), ("lam", lam),
                                    ("temperature", temperature)) if x.perturbed)
  small, large = _run(s_BTV.value, t_BTV.value, keep_BT.value, lam.value, temperature.value, kind,
                      chunk_size, need)
  return small["kl"], (small, large)


def _per_position_kl_bwd(kind, chunk_size, residuals, ct_BT):
  del kind, chunk_size
  small, large = residuals  # the gradients in `large` already have their logits' dtypes
  if isinstance(ct_BT, SymbolicZero):
    return None, None, None, None, None
  scale = lambda name: (ct_BT[..., None] * large[name]).astype(large[name].dtype) if name in large else None
  total = lambda name: jnp.sum(ct_BT * small[name]) if name in small else None
  # None is a zero cotangent: for the mask, and for lam in a pure forward or reverse KL.
  return (scale("student"), scale("teacher"), None, total("d_lam"),
          total("d_temperature"))


_per_position_kl.defvjp(_per_position_kl_fwd, _per_position_kl_bwd, symbolic_zeros=True)


def per_position_kl(s_BTV, t_BTV, keep_BT, *, kind, lam=0.0, temperature=1.0, chunk_size=None):
  """Per-position float32 KL [B, T] of `kind` ("forward", "reverse", "mixed" with weight `lam` on the
  reverse KL) between logits [B, T, V] (any float dtype); positions where `keep_BT` is False are computed
  on zero logits. Differentiable w.r.t. both logits, `lam` and `temperature`, in one pass (module doc)."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  return _per_position_kl(s_BTV, t_BTV, keep_BT, jnp.asarray(lam, jnp.float32),
                          jnp.asarray(temperature, jnp.float32), kind, chunk_size)
