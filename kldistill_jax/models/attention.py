"""Causal self-attention over a slot axis: one entry point, one implementation per backend.

    out_BTHD = attend(q_BTHD, k_BKSD, v_BKSD, key_valid_BS, q_offset, implementation="auto")

Queries sit at slots [q_offset, q_offset + T) of the key axis (q_offset = 0 for a full forward,
`cache.index` when writing into a KV cache); query slot i attends to key slot j iff j <= i and
key_valid[b, j]. K/V keep the cache layout [B, kv_heads, S, head_dim]; the H = kv_heads * G query heads
of one kv head share its keys (GQA, never repeated). Scores and softmax statistics are float32.
With `layer=i`, K/V are the model's stacked cache [layers, B, kv_heads, S, head_dim] and layer i is read
in place: `blockwise` slices each key block out of the stack, so a decode step inside the layer scan
never copies a layer's S slots.

Implementations (`ModelConfig.attention`):
  xla        the scores [B, kv, S, G*T] materialised: the reference the others are tested against.
  blockwise  pure JAX flash attention: online softmax over key blocks, blocks above the causal diagonal
             (and, with a cache, past the filled slots) never computed, gradient recomputed per block
             (custom VJP). Memory O(B*H*T*block); a decode step costs O(filled slots), not O(S).
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")` (NVIDIA GPU, bf16/fp16).
  splash     the Pallas TPU splash-attention kernel (padding as segment ids); off TPU it runs in the
             Pallas interpreter (exact, slow: how the tests check it on CPU).
  auto       splash on TPU, cudnn on GPU, blockwise elsewhere.
The fused kernels take the full forward (q_offset static 0, T == S: training and scoring); calls with a
cache (prefill, decode) and calls a kernel cannot take use `blockwise`, which logs once why.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
BLOCK_Q = 512  # query rows per block (times the G heads of a kv head)
BLOCK_K = 512  # key slots per block; a decode step reads ceil((index + 1) / BLOCK_K) blocks
_MASKED = -1e30  # xla: finite, so fully masked (padding) query rows give finite garbage, never NaN
_logged = set()


def _log_once(message):
  if message not in _logged:
    _logged.add(message)
    logging.warning("attention: %s", message)


def resolve(implementation, *, full, dtype, head_dim, backend=None):
  """(the implementation a call runs, why it is not the one asked for or None): `auto` picks by backend;
  the fused kernels take only the full forward (`full`: no cache), cuDNN only bf16/fp16 and its head
  sizes. `train.flops` counts attention work by the same answer."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  backend = backend or jax.default_backend()
  if implementation == "auto":
    implementation = {"tpu": "splash", "gpu": "cudnn"}.get(backend, "blockwise")
  if implementation in ("cudnn", "splash") and not full:
    return "blockwise", None  # cached calls: the length-aware kernel (see the module docstring)
  if implementation == "cudnn":
    why = _cudnn_unsupported(dtype, head_dim, backend)
    if why is not None:
      return "blockwise", f"cudnn unavailable ({why}); using blockwise"
  return implementation, None


def attend(q_BTHD, k_BKSD, v_BKSD, key_valid_BS, q_offset=0, *, implementation="auto", layer=None):
  """[B, T, H, D] attention output (dtype of q) of queries at slots q_offset + [0, T); with `layer`, K/V
  are stacked [L, B, kv_heads, S, head_dim] and layer `layer` is attended to."""
  full = (layer is None and isinstance(q_offset, int) and q_offset == 0
          and q_BTHD.shape[1] == k_BKSD.shape[2])
  implementation, why = resolve(implementation, full=full, dtype=q_BTHD.dtype, head_dim=q_BTHD.shape[-1])
  if why is not None:
    _log_once(why)
  if implementation == "cudnn":
    return _cudnn(q_BTHD, k_BKSD, v_BKSD, key_valid_BS)
  if implementation == "splash":
    interpret = jax.default_backend() != "tpu"
    if interpret:
      _log_once(f"splash on {jax.default_backend()} runs in the Pallas interpreter (slow: for tests)")
    return splash(q_BTHD, k_BKSD, v_BKSD, key_valid_BS, interpret=interpret)
  offset = jnp.asarray(q_offset, jnp.int32)
  if implementation == "xla":
    if layer is not None:  # the reference reads every slot anyway
      k_BKSD, v_BKSD = k_BKSD[layer], v_BKSD[layer]
    return xla(q_BTHD, k_BKSD, v_BKSD, key_valid_BS, offset)
  return blockwise(q_BTHD, k_BKSD, v_BKSD, key_valid_BS, offset, layer=layer)


# --------------------------------------------------------------------------------------------- xla

def xla(q_BTHD, k_BKSD, v_BKSD, key_valid_BS, q_offset):
  """The reference: every score materialised, masked, softmaxed over the slot axis."""
  b, t, h, d = q_BTHD.shape
  kv_heads, s = k_BKSD.shape[1], k_BKSD.shape[2]
  groups = h // kv_heads
  # Queries of one kv head's group are merged into one axis Q = groups * T. Keys/values are the LEFT
  # operands and slots stay in the middle: XLA:CPU runs these contraction orders several times faster
  # than the textbook "queries x keys^T" order on a long decode cache.
  q = q_BTHD.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, groups * t, d)
  scores = jnp.einsum("bksd,bkqd->bksq", k_BKSD.astype(q.dtype), q, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(d).astype(jnp.float32)
  causal_TS = jnp.arange(s)[None, :] <= q_offset + jnp.arange(t)[:, None]
  mask_BST = causal_TS.T[None] & key_valid_BS[:, :, None]
  mask = jnp.broadcast_to(mask_BST[:, :, None, :], (b, s, groups, t)).reshape(b, 1, s, groups * t)
  probs = jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=2).astype(q.dtype)
  out = jnp.einsum("bksq,bksd->bkqd", probs, v_BKSD.astype(q.dtype))
  return out.reshape(b, kv_heads, groups, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# --------------------------------------------------------------------------------------- blockwise
# Layout inside: queries [nq, B, K, R, D] with R = bq * G rows per block (row r is query bq*i + r // G
# of head group member r % G); scores of one block pair [B, K, bk, R] (slots in the middle, as `xla`).
# Keys/values are always stacked [L, B, K, S, D] inside (L = 1 without a cache) with the layer to read.
# The last key block is clamped to end at S (dynamic_slice would clamp it anyway) and its slots below
# the nominal start masked, so S need not divide by bk and the cache is never padded (a copy of the
# whole cache per step would make decode O(S) again).

def blockwise(q_BTHD, k_BKSD, v_BKSD, key_valid_BS, q_offset, *, block_q=None, block_k=None, layer=None):
  """Flash attention in pure JAX; values and gradients equal `xla` on every query with a valid key
  (rows with none give 0). Block sizes default to BLOCK_Q / BLOCK_K, read at trace time. With `layer`,
  k/v are stacked [L, B, K, S, D] and that layer is read."""
  block_q, block_k = block_q or BLOCK_Q, block_k or BLOCK_K
  if layer is None:
    k, v, layer = k_BKSD[None], v_BKSD[None], 0
  else:
    k, v = k_BKSD, v_BKSD
  layer = jnp.asarray(layer, jnp.int32)
  b, t, h, d = q_BTHD.shape
  kv_heads, s = k.shape[2], k.shape[3]
  groups = h // kv_heads
  bq, bk = min(block_q, t), min(block_k, s)
  nq = -(-t // bq)
  q = q_BTHD.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 1, 3, 4)  # [B, K, T, G, D]
  q = jnp.pad(q, ((0, 0), (0, 0), (0, nq * bq - t), (0, 0), (0, 0)))
  q = q.reshape(b, kv_heads, nq, bq * groups, d).transpose(2, 0, 1, 3, 4)
  out = _flash(q, k, v, key_valid_BS, q_offset, layer, (bq, bk, groups))
  out = out.transpose(1, 2, 0, 3, 4).reshape(b, kv_heads, nq * bq, groups, d)[:, :, :t]
  return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def _slots(x_LBKSD, layer, start, size):
  """[B, K, size, D]: slots [start, start + size) of one layer of a stacked array (only they are read)."""
  _, b, k, _, d = x_LBKSD.shape
  return jax.lax.dynamic_slice(x_LBKSD, (layer, 0, 0, start, 0), (1, b, k, size, d))[0]


def _block_scores(q_BKRD, k_LBKSD, key_valid_BS, q_offset, layer, i, j, blocks):
  """float32 scaled scores [B, K, bk, R] of query block i against key block j, their mask, the key
  block's start slot."""
  bq, bk, groups = blocks
  s = k_LBKSD.shape[3]
  start = jnp.minimum(j * bk, s - bk)
  k = _slots(k_LBKSD, layer, start, bk)
  valid = jax.lax.dynamic_slice_in_dim(key_valid_BS, start, bk, axis=1)
  key_slot = start + jnp.arange(bk)
  query_slot = q_offset + i * bq + jnp.arange(q_BKRD.shape[2]) // groups
  keep = (key_slot >= j * bk)[:, None] & (key_slot[:, None] <= query_slot[None, :])
  mask = valid[:, None, :, None] & keep[None, None]
  scale = 1.0 / np.sqrt(q_BKRD.shape[-1])
  scores = jnp.einsum("bksd,bkrd->bksr", k.astype(q_BKRD.dtype), q_BKRD,
                      preferred_element_type=jnp.float32) * scale
  return scores, mask, start


def _key_blocks_needed(q_offset, i, rows_per_block, bk, nk):
  """Key blocks up to the last query slot of block i: the dynamic trip count of the inner loop."""
  return jnp.minimum((q_offset + (i + 1) * rows_per_block - 1) // bk + 1, nk)


def _forward(q, k, v, key_valid, q_offset, layer, blocks):
  """(out [nq, B, K, R, D] in q's dtype, float32 log-sum-exp [nq, B, K, R]; 0 on rows with no key)."""
  bq, bk, _ = blocks
  nk = -(-k.shape[3] // bk)

  def query_block(i, q_BKRD):
    def key_block(j, carry):
      m, l, acc = carry
      scores, mask, start = _block_scores(q_BKRD, k, key_valid, q_offset, layer, i, j, blocks)
      m_new = jnp.maximum(m, jnp.max(jnp.where(mask, scores, -jnp.inf), axis=2))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.where(mask, jnp.exp(scores - m_safe[:, :, None, :]), 0.0)
      correction = jnp.exp(m - m_safe)
      vb = _slots(v, layer, start, bk).astype(q_BKRD.dtype)
      pv = jnp.einsum("bksr,bksd->bkrd", p.astype(q_BKRD.dtype), vb, preferred_element_type=jnp.float32)
      return m_new, l * correction + jnp.sum(p, axis=2), acc * correction[..., None] + pv

    stats = q_BKRD.shape[:3]
    init = (jnp.full(stats, -jnp.inf), jnp.zeros(stats), jnp.zeros(q_BKRD.shape, jnp.float32))
    # One key block (a cache of at most BLOCK_K slots) or one query block (every decode step): no loop.
    # On XLA:CPU a loop around a single small block costs about what the block does (4 decode
    # layers, batch 8, 320 slots: 5.2 -> 3.0 ms of CPU per step without the two loops).
    if nk == 1:
      m, l, acc = key_block(0, init)
    else:
      m, l, acc = jax.lax.fori_loop(0, _key_blocks_needed(q_offset, i, bq, bk, nk), key_block, init)
    empty = l == 0
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    return out.astype(q_BKRD.dtype), jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))

  if q.shape[0] == 1:  # see above
    out, lse = query_block(0, q[0])
    return out[None], lse[None]
  return jax.lax.map(lambda args: query_block(*args), (jnp.arange(q.shape[0]), q))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, key_valid, q_offset, layer, blocks):
  return _forward(q, k, v, key_valid, q_offset, layer, blocks)[0]


def _flash_fwd(q, k, v, key_valid, q_offset, layer, blocks):
  out, lse = _forward(q, k, v, key_valid, q_offset, layer, blocks)
  return out, (q, k, v, key_valid, q_offset, layer, out, lse)


def _flash_bwd(blocks, residuals, d_out):
  """The flash backward, outer loop over key blocks, inner over the query blocks that see them:
  p = exp(s - lse), dV += p^T dO, dS = p * (dO V^T - rowsum(dO * O)), dQ += dS K, dK += dS^T Q.
  dK / dV have the stacked shape, zero outside the layer read."""
  q, k, v, key_valid, q_offset, layer, out, lse = residuals
  bq, bk, _ = blocks
  nq, s = q.shape[0], k.shape[3]
  nk = -(-s // bk)
  scale = 1.0 / np.sqrt(q.shape[-1])
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def key_block(carry, j):
    dq, dk, dv = carry

    def query_block(i, inner):
      dq, dk_j, dv_j = inner
      q_i, do_i = q[i], d_out[i].astype(q.dtype)
      scores, mask, start = _block_scores(q_i, k, key_valid, q_offset, layer, i, j, blocks)
      p = jnp.where(mask, jnp.exp(scores - lse[i][:, :, None, :]), 0.0)
      vb = _slots(v, layer, start, bk).astype(q.dtype)
      dv_j = dv_j + jnp.einsum("bksr,bkrd->bksd", p.astype(q.dtype), do_i, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bksd,bkrd->bksr", vb, do_i, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[i][:, :, None, :]) * scale).astype(q.dtype)
      kb = _slots(k, layer, start, bk).astype(q.dtype)
      dq = dq.at[i].add(jnp.einsum("bksr,bksd->bkrd", ds, kb, preferred_element_type=jnp.float32))
      dk_j = dk_j + jnp.einsum("bksr,bkrd->bksd", ds, q_i, preferred_element_type=jnp.float32)
      return dq, dk_j, dv_j

    first = jnp.clip((j * bk - q_offset) // bq, 0, nq)  # the first query block with a slot >= j * bk
    block = jnp.zeros(k.shape[1:3] + (bk, k.shape[4]), jnp.float32)
    dq, dk_j, dv_j = jax.lax.fori_loop(first, nq, query_block, (dq, block, block))
    start = jnp.minimum(j * bk, s - bk)
    add = lambda full, part: jax.lax.dynamic_update_slice(
        full, (_slots(full, layer, start, bk) + part)[None], (layer, 0, 0, start, 0))
    return (dq, add(dk, dk_j), add(dv, dv_j)), None

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  (dq, dk, dv), _ = jax.lax.scan(key_block, (zeros(q), zeros(k), zeros(v)), jnp.arange(nk))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------- cudnn

def _cudnn_unsupported(dtype, head_dim, backend):
  """Why cuDNN's fused attention cannot take a call, or None."""
  if backend != "gpu":
    return f"backend is {backend}, not an NVIDIA GPU"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"dtype {jnp.dtype(dtype)} (cuDNN fused attention takes bfloat16/float16)"
  if head_dim % 8 or head_dim > 256:
    return f"head_dim {head_dim} (cuDNN needs a multiple of 8, at most 256)"
  return None


def _cudnn(q_BTHD, k_BKSD, v_BKSD, key_valid_BS):
  """Causal + the key-padding mask. The mask goes in as [B, 1, T, S] bool (cuDNN takes arbitrary
  padding only as a mask/bias): T*S bytes per row, not the H*T*S float32 scores of `xla`."""
  t = q_BTHD.shape[1]
  k, v = k_BKSD.transpose(0, 2, 1, 3), v_BKSD.transpose(0, 2, 1, 3)
  mask = jnp.broadcast_to(key_valid_BS[:, None, None, :], (q_BTHD.shape[0], 1, t, k.shape[1]))
  return jax.nn.dot_product_attention(q_BTHD, k.astype(q_BTHD.dtype), v.astype(q_BTHD.dtype), mask=mask,
                                      is_causal=True, implementation="cudnn")


# ------------------------------------------------------------------------------------------ splash

SPLASH_BLOCK = 128  # the splash kernel's query and key block (every BlockSizes field)


def splash(q_BTHD, k_BKSD, v_BKSD, key_valid_BS, *, interpret=False, block=SPLASH_BLOCK):
  """The Pallas splash kernel (MQA form per kv head, vmapped over batch and kv heads), causal, padding
  as segment ids (1 = real, 0 = padding: a real query sees only real keys, whatever their order). T is
  padded to a multiple of `block`. `interpret=True` runs the kernel through the Pallas interpreter."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top
  b, t, h, d = q_BTHD.shape
  kv_heads = k_BKSD.shape[1]
  groups = h // kv_heads
  padded = -(-t // block) * block
  pad = lambda x, axis: jnp.pad(x, [(0, padded - t if a == axis else 0) for a in range(x.ndim)])
  q = pad(q_BTHD * (1.0 / np.sqrt(d)), 1).reshape(b, padded, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)
  k, v = pad(k_BKSD.astype(q.dtype), 2), pad(v_BKSD.astype(q.dtype), 2)
  segments = pad(key_valid_BS.astype(jnp.int32), 1)
  mask = sa.MultiHeadMask([sa.CausalMask((padded, padded)) for _ in range(groups)])
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = sa.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  per_row = lambda q, k, v, seg: jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=sa.SegmentIds(seg, seg)))(
      q, k, v)
  out = jax.vmap(per_row)(q, k, v, segments)  # [B, K, G, T', D]
  return out.transpose(0, 3, 1, 2, 4)[:, :t].reshape(b, t, h, d)
