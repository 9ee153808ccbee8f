"""Token KL from hidden states and output heads, never materialising either model's [N, V] logits.

Each chunk of positions computes both models' logits, the loss, and (under differentiation) the analytic
gradient w.r.t. the student logits, which is immediately contracted into the student hidden-state and
head gradients. The forward pass thus does all the work once: no rematerialisation, so the teacher head
runs exactly once per position, and the peak extra memory is O(chunk_size * V) plus one head-gradient
accumulator. The backward pass only scales the stored gradients by the incoming cotangent.

Gradient of the mixed loss w.r.t. the student logits z at one position (s = z / T, q = softmax(s)):
  d/dz [(1 - lam) KL(p||q) + lam KL(q||p)] = [(1 - lam)(q - p) + lam q ⊙ (log q - log p - KL(q||p))] / T

Precision: the three V-wide matmuls per chunk (both models' logits, and the student's hidden-state and
head gradients) run in the compute dtype, each model's hidden-state dtype (the heads are cast to it once,
as the model's own forward does), with float32 accumulation; the divergence math is float32. So bf16
activations with float32 master weights give bf16 MXU/tensor-core matmuls, not float32 ones.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from kldistill_jax.losses import _checks
from kldistill_jax.losses.chunking import as_batch_time, mask_weights, scan_position_chunks
from kldistill_jax.losses.divergences import entropy_from_log_probs, kl_from_log_probs


# Vocabulary columns per head-gradient update. XLA does not fuse a dot into the accumulation that follows
# it, so updating the whole [D, V] accumulator at once would allocate a second [D, V] temporary.
HEAD_GRAD_BLOCK = 8192


def _matmul(a, b):
  """a @ b with operands in the compute dtype and float32 accumulation.

  XLA:CPU (jax 0.10) fails on some bf16 x bf16 -> float32 dots ("Unsupported element type for
  DotThunk"); there the operands are widened to float32 first, which gives the same products (the
  product of two bf16 numbers is exact in float32), so CPU tests check the accelerators' numerics.
  """
  widened = lambda a, b: jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                                 preferred_element_type=jnp.float32)
  native = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
  return lax.platform_dependent(a, b, cpu=widened, default=native)


def _accumulate_head_grad(head_grad_DV, hidden_ND, dz_NV):
  """head_grad += hidden^T @ dz (float32 accumulator), in place, one block of vocabulary columns at a
  time; the product runs in the dtype of dz (the compute dtype)."""
  vocab = dz_NV.shape[1]
  block = min(HEAD_GRAD_BLOCK, vocab)
  hidden_DN = hidden_ND.T.astype(dz_NV.dtype)

  def update(i, acc):
    start = jnp.minimum(i * block, vocab - block)  # the last block is shifted back to end at V ...
    fresh = start + jnp.arange(block) >= i * block  # ... and skips the columns already updated
    dz_NB = jnp.where(fresh[None, :], lax.dynamic_slice_in_dim(dz_NV, start, block, axis=1), 0.0)
    acc_DB = lax.dynamic_slice_in_dim(acc, start, block, axis=1) + _matmul(hidden_DN, dz_NB)
    return lax.dynamic_update_slice_in_dim(acc, acc_DB, start, axis=1)

  return lax.fori_loop(0, math.ceil(vocab / block), update, head_grad_DV)


def _chunk(head_grad, fresh, s_hidden_BCD, t_hidden_BCE, weights_BC, *, student_head, teacher_head, lam,
           temperature, with_grad):
  """One chunk [B, c]: per-position loss and stats, and (with_grad) the weighted student gradients."""
  s_logits = _matmul(s_hidden_BCD, student_head) / temperature
  t_logits = _matmul(t_hidden_BCE, teacher_head) / temperature
  s_logp, t_logp = jax.nn.log_softmax(s_logits), jax.nn.log_softmax(t_logits)
  fkl, rkl = kl_from_log_probs(t_logp, s_logp), kl_from_log_probs(s_logp, t_logp)
  out = {"loss": lam * rkl + (1.0 - lam) * fkl, "forward_kl": fkl, "reverse_kl": rkl,
         "student_entropy": entropy_from_log_probs(s_logp),
         "teacher_entropy": entropy_from_log_probs(t_logp)}
  if not with_grad:
    return head_grad, out
  q, p = jnp.exp(s_logp), jnp.exp(t_logp)
  log_ratio = jnp.where(s_logp > -jnp.inf, s_logp - t_logp, 0.0)
  # A position's weight is zero when masked or already counted by an earlier (overlapping) chunk.
  w = jnp.where(fresh & (weights_BC != 0), weights_BC, 0.0)[..., None] / temperature
  dz_BCV = jnp.where(w != 0, w * ((1.0 - lam) * (q - p) + lam * q * (log_ratio - rkl[..., None])), 0.0)
  # Both gradient matmuls take dz in the compute dtype (as autodiff of a bf16 matmul would).
  dz_BCV = dz_BCV.astype(student_head.dtype)
  out["hidden_grad"] = _matmul(dz_BCV, student_head.T)
  head_grad = _accumulate_head_grad(head_grad, s_hidden_BCD.reshape(-1, s_hidden_BCD.shape[-1]),
                                    dz_BCV.reshape(-1, dz_BCV.shape[-1]))
  return head_grad, out


def _run(student_hidden, student_head, teacher_hidden, teacher_head, weights, lam, temperature,
         chunk_size, with_grad):
  init = jnp.zeros(student_head.shape, jnp.float32) if with_grad else None
  # Cast once, outside the scan: each chunk then reads the heads in the compute dtype.
  student_head = student_head.astype(student_hidden.dtype)
  teacher_head = teacher_head.astype(teacher_hidden.dtype)
  body = functools.partial(_chunk, student_head=student_head, teacher_head=teacher_head, lam=lam,
                           temperature=temperature, with_grad=with_grad)
  return scan_position_chunks(body, (student_hidden, teacher_hidden, weights), chunk_size, init)


def _loss_and_stats(out, weights):
  loss = jnp.sum(jnp.where(weights != 0, out.pop("loss") * weights, 0.0))
  out.pop("hidden_grad", None)
  return loss, jax.tree.map(lax.stop_gradient, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused(student_hidden, student_head, teacher_hidden, teacher_head, weights, lam, temperature,
           chunk_size):
  _, out = _run(student_hidden, student_head, teacher_hidden, teacher_head, weights, lam, temperature,
                chunk_size, with_grad=False)
  return _loss_and_stats(out, weights)


def _fused_fwd(student_hidden, student_head, teacher_hidden, teacher_head, weights, lam, temperature,
               chunk_size):
  head_grad, out = _run(student_hidden, student_head, teacher_hidden, teacher_head, weights, lam,
                        temperature, chunk_size, with_grad=True)
  # Stored in the inputs' dtypes, which the backward pass reads back off the residuals.
  residuals = (out["hidden_grad"].astype(student_hidden.dtype), head_grad.astype(student_head.dtype))
  return _loss_and_stats(out, weights), residuals


def _fused_bwd(chunk_size, residuals, cotangents):
  del chunk_size
  hidden_grad, head_grad = residuals
  ct_loss, _ = cotangents  # the stats are diagnostics: no gradient flows through them
  # Teacher inputs, weights, lam and temperature are constants of distillation: zero cotangents (None).
  return ((ct_loss * hidden_grad).astype(hidden_grad.dtype), (ct_loss * head_grad).astype(head_grad.dtype),
          None, None, None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_token_kl_with_stats(student_hidden, student_head, teacher_hidden, teacher_head, mask=None, *,
                              lam, temperature=1.0, chunk_size=64, reduction="mean", num_tokens=None):
  """`fused_token_kl` and its per-position diagnostics.

  Returns:
    (loss, stats) where stats maps "forward_kl", "reverse_kl", "student_entropy", "teacher_entropy" to
    per-position float32 arrays of shape [...] (unmasked, not differentiable).
  """
  _checks.check_in_range("lam", lam, 0.0, 1.0)
  _checks.check_temperature(temperature)
  _checks.check_chunk_size(chunk_size)
  _checks.check_reduction(reduction, allowed=("mean", "sum"))
  positions = student_hidden.shape[:-1]
  if teacher_hidden.shape[:-1] != positions:
    raise ValueError(f"shape mismatch: student_hidden {student_hidden.shape} vs teacher_hidden "
                     f"{teacher_hidden.shape} (positions must agree)")
  for name, hidden, head in (("student", student_hidden, student_head),
                             ("teacher", teacher_hidden, teacher_head)):
    if head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
      raise ValueError(f"{name}_head must have shape [hidden={hidden.shape[-1]}, V], got {head.shape} "
                       f"({name}_hidden has shape {hidden.shape})")
  if student_head.shape[1] != teacher_head.shape[1]:
    raise ValueError(f"vocabulary size mismatch: student_head has V={student_head.shape[1]} "
                     f"(shape {student_head.shape}), teacher_head has V={teacher_head.shape[1]} "
                     f"(shape {teacher_head.shape})")
  _checks.check_mask(mask, positions)
  weights = mask_weights(mask, positions)
  if reduction == "mean":
    denominator = jnp.sum(weights) if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
    weights = jnp.where(denominator > 0, weights / jnp.where(denominator > 0, denominator, 1.0), 0.0)
  loss, stats = _fused(as_batch_time(student_hidden, 1), student_head, as_batch_time(teacher_hidden, 1),
                       teacher_head, as_batch_time(weights, 0), jnp.asarray(lam, jnp.float32),
                       jnp.asarray(temperature, jnp.float32), chunk_size)
  return loss, jax.tree.map(lambda v: v.reshape(positions), stats)


def fused_token_kl(student_hidden, student_head, teacher_hidden, teacher_head, mask=None, *, lam,
                   temperature=1.0, chunk_size=64, reduction="mean", num_tokens=None):
  """lam * KL(q_θ || p_T) + (1 - lam) * KL(p_T || q_θ) from hidden states and output heads.

  Equals `mixed_kl(student_hidden @ student_head, teacher_hidden @ teacher_head, mask, lam=lam, ...)`
  in value and in the gradients w.r.t. the student hidden states and head, with peak extra memory
  O(chunk_size * V) instead of O(N * V).

  Args:
    student_hidden: [..., D_s] final (post-norm) hidden states; teacher_hidden: [..., D_t], same [...].
    student_head: [D_s, V]; teacher_head: [D_t, V] (for tied embeddings pass the embedding transposed),
      any float dtype: each is cast to its hidden states' dtype, the matmuls' compute dtype (float32
      accumulation); the head gradient comes back in the head's own dtype.
    mask: optional [...] weights.
    lam: weight of the reverse KL in [0, 1] (0 = forward KL, 1 = reverse KL).
    temperature: divides both models' logits.
    chunk_size: positions per chunk (the memory/speed knob). Scratch is about 5 * chunk_size * V float32
      plus one [D_s, 8192] block: the default 64 keeps it under 20% of one [2048, V] logits tensor at
      Qwen3's V = 151,936 (bench/losses.py).
    reduction: "mean" (global token mean) or "sum".
    num_tokens: denominator for "mean" instead of the mask's count.

  The teacher's inputs are constants: their gradients are zero, as with `stop_gradient`.
  """
  loss, _ = fused_token_kl_with_stats(student_hidden, student_head, teacher_hidden, teacher_head, mask,
                                      lam=lam, temperature=temperature, chunk_size=chunk_size,
                                      reduction=reduction, num_tokens=num_tokens)
  return loss
