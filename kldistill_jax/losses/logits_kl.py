"""Forward, reverse and mixed KL on logits with an analytic gradient: the kernel of `forward_kl`,
`reverse_kl` and `mixed_kl`.

Autodiff of a KL keeps both models' float32 log-softmaxes for the backward pass (with chunking it instead
reruns every chunk's forward under `jax.checkpoint`) and then builds the gradient from them in more
[N, V] passes. Here the gradient has a closed form in the logits and a few per-position numbers, so:

  forward pass   chunk by chunk, each position's log-normalisers lse_s, lse_t and KL(s) (reductions only:
                 the chunk's [c, V] intermediates are the only scratch, and stay in cache when c is small);
  backward pass  one elementwise expression over [B, T, V] per differentiated input, e.g. for the forward
                 KL  g_s = ct / T * (exp(s - lse_s) - exp(t - lse_t)),  written straight into the gradient
                 (no zero-initialised buffer, no scan, no [N, V] temporary; the cotangent is fused in).

Per position, with s = z_S / T, t = z_T / T, q = softmax(s), p = softmax(t), F = KL(p||q), R = KL(q||p):
  log p - log q = t - s - c,  c = lse_t - lse_s
  F = Σ p (t - s - c)                    R = -Σ q (t - s - c)
  dF/ds = q - p                          dF/dt = p ⊙ (log p - log q - F)
  dR/ds = q ⊙ (log q - log p - R)        dR/dt = p - q
  mixed = lam R + (1 - lam) F;  d/dz = (d/ds) / T;  d/dlam = R - F;  d/dT = -(s · d/ds + t · d/dt) / T
(terms with q = 0, resp. p = 0, are 0, so -inf logits give finite gradients).

Why these shapes of code (XLA:CPU, measured with bench/logits_kl.py and the compiled HLO):
- the weighted sums Σ_v a b are dots (`_dot`): a fused multiply-then-reduce compiles to a loop about 4x
  slower than the dot of the same operands, while a plain exp-sum reduction is as fast as a dot;
- a gradient written in the forward pass into a carried [B, T, V] buffer costs an extra full write (the
  buffer's initialisation) and a serial scan of dynamic-update-slices; the backward's elementwise pass
  instead streams both logits once and writes the gradient once, split over the cores.

Gradients are computed only for the inputs being differentiated (`symbolic_zeros`): a teacher that is a
constant of the student's loss costs nothing, and a differentiated teacher gets its exact gradient too.
Forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) is not defined, as for any `jax.custom_vjp`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from kldistill_jax.losses.chunking import map_position_chunks

KINDS = ("forward", "reverse", "mixed")


def _combine(kind, lam, forward_term, reverse_term):
  """The kind's mixture of two lazily built terms (only the needed ones are traced)."""
  if kind == "forward":
    return forward_term()
  if kind == "reverse":
    return reverse_term()
  return (1.0 - lam) * forward_term() + lam * reverse_term()


def _dot(a, b):
  """Σ_v a b per position, in float32 on every backend (see the module doc for why a dot)."""
  return jnp.einsum("...v,...v->...", a, b, precision=lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)


def _scaled(x_BTV, keep_BT, inv_temperature):
  """float32 logits / T, zero at masked positions (so padding rows, e.g. all -inf, make no NaN)."""
  return jnp.where(keep_BT[..., None], x_BTV.astype(jnp.float32), 0.0) * inv_temperature


def _stats(s_BCV, t_BCV, keep_BC, inv_temperature, *, kind):
  """One chunk's per-position float32 numbers: lse_s, lse_t and the KLs that `kind` needs."""
  s, t = _scaled(s_BCV, keep_BC, inv_temperature), _scaled(t_BCV, keep_BC, inv_temperature)
  max_s, max_t = jnp.max(s, -1, keepdims=True), jnp.max(t, -1, keepdims=True)
  exp_s, exp_t = jnp.exp(s - max_s), jnp.exp(t - max_t)
  sum_s, sum_t = jnp.sum(exp_s, -1, keepdims=True), jnp.sum(exp_t, -1, keepdims=True)
  lse_s, lse_t = max_s + jnp.log(sum_s), max_t + jnp.log(sum_t)
  # log p - log q per entry, with c subtracted before summing: the terms stay as small as the KL.
  log_pq = t - s - (lse_t - lse_s)
  out = {"lse_s": lse_s[..., 0], "lse_t": lse_t[..., 0]}
  if kind != "reverse":
    out["forward"] = _dot(exp_t, jnp.where(t > -jnp.inf, log_pq, 0.0)) / sum_t[..., 0]
  if kind != "forward":
    out["reverse"] = -_dot(exp_s, jnp.where(s > -jnp.inf, log_pq, 0.0)) / sum_s[..., 0]
  return out


def _logit_grads(s_BTV, t_BTV, keep_BT, stats, lam, inv_temperature, *, kind):
  """d KL / d (s, t) per entry (float32, elementwise, built lazily): {"student": fn, "teacher": fn}."""
  s, t = _scaled(s_BTV, keep_BT, inv_temperature), _scaled(t_BTV, keep_BT, inv_temperature)
  log_q, log_p = s - stats["lse_s"][..., None], t - stats["lse_t"][..., None]
  q, p = jnp.exp(log_q), jnp.exp(log_p)
  fkl = lambda: stats["forward"][..., None]
  rkl = lambda: stats["reverse"][..., None]
  d_s = lambda: _combine(kind, lam, lambda: q - p,
                         lambda: q * (jnp.where(s > -jnp.inf, log_q - log_p, 0.0) - rkl()))
  d_t = lambda: _combine(kind, lam, lambda: p * (jnp.where(t > -jnp.inf, log_p - log_q, 0.0) - fkl()),
                         lambda: p - q)
  return s, t, d_s, d_t


def _forward_stats(s_BTV, t_BTV, keep_BT, temperature, kind, chunk_size):
  chunk_fn = lambda s, t, keep: _stats(s, t, keep, 1.0 / temperature, kind=kind)
  return map_position_chunks(chunk_fn, (s_BTV, t_BTV, keep_BT), chunk_size)


def _value(stats, lam, kind):
  return _combine(kind, lam, lambda: stats["forward"], lambda: stats["reverse"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _per_position_kl(s_BTV, t_BTV, keep_BT, lam, temperature, kind, chunk_size):
  return _value(_forward_stats(s_BTV, t_BTV, keep_BT, temperature, kind, chunk_size), lam, kind)


def _per_position_kl_fwd(s_BTV, t_BTV, keep_BT, lam, temperature, kind, chunk_size):
  stats = _forward_stats(s_BTV.value, t_BTV.value, keep_BT.value, temperature.value, kind, chunk_size)
  # Which inputs need a gradient, carried as the residual's pytree structure (a static set of keys).
  need = {name: None for name, x in (("student", s_BTV), ("teacher", t_BTV), ("lam", lam),
                                     ("temperature", temperature)) if x.perturbed}
  residuals = (s_BTV.value, t_BTV.value, keep_BT.value, stats, lam.value, temperature.value, need)
  return _value(stats, lam.value, kind), residuals


def _per_position_kl_bwd(kind, chunk_size, residuals, ct_BT):
  s_BTV, t_BTV, keep_BT, stats, lam, temperature, need = residuals
  if isinstance(ct_BT, SymbolicZero):
    return None, None, None, None, None
  inv_temperature = 1.0 / temperature

  def logits_grad(x_BTV, which):
    _, _, d_s, d_t = _logit_grads(s_BTV, t_BTV, keep_BT, stats, lam, inv_temperature, kind=kind)
    d = d_s() if which == "student" else d_t()
    return ((ct_BT * inv_temperature)[..., None] * d).astype(x_BTV.dtype)

  def temperature_grad():
    # Σ_v (s d_s + t d_t) per position needs the logits again: a chunked reduction, only when asked.
    names = sorted(stats)

    def chunk_fn(s_BCV, t_BCV, keep_BC, *stats_BC):
      s, t, d_s, d_t = _logit_grads(s_BCV, t_BCV, keep_BC, dict(zip(names, stats_BC)), lam,
                                    inv_temperature, kind=kind)
      return (_dot(jnp.where(s > -jnp.inf, s, 0.0), d_s())
              + _dot(jnp.where(t > -jnp.inf, t, 0.0), d_t()))
    dots = map_position_chunks(chunk_fn, (s_BTV, t_BTV, keep_BT) + tuple(stats[k] for k in names),
                               chunk_size)
    return -jnp.sum(ct_BT * dots) * inv_temperature

  # None is a zero cotangent: for the mask, for lam in a pure forward or reverse KL, and for any input
  # not being differentiated.
  return (logits_grad(s_BTV, "student") if "student" in need else None,
          logits_grad(t_BTV, "teacher") if "teacher" in need else None,
          None,
          jnp.sum(ct_BT * (stats["reverse"] - stats["forward"])) if "lam" in need and kind == "mixed"
          else None,
          temperature_grad() if "temperature" in need else None)


_per_position_kl.defvjp(_per_position_kl_fwd, _per_position_kl_bwd, symbolic_zeros=True)


def per_position_kl(s_BTV, t_BTV, keep_BT, *, kind, lam=0.0, temperature=1.0, chunk_size=None):
  """Per-position float32 KL [B, T] of `kind` ("forward", "reverse", "mixed" with weight `lam` on the
  reverse KL) between logits [B, T, V] (any float dtype); positions where `keep_BT` is False are computed
  on zero logits. Differentiable w.r.t. both logits, `lam` and `temperature` (module doc)."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  return _per_position_kl(s_BTV, t_BTV, keep_BT, jnp.asarray(lam, jnp.float32),
                          jnp.asarray(temperature, jnp.float32), kind, chunk_size)
