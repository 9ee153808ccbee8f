"""Independent float64 NumPy references for the loss core (explicit softmax, direct sums, python loops).

Nothing here imports the library: every test compares the library against these.
"""

import numpy as np


def log_softmax(logits, temperature=1.0):
  """float64 log-softmax over the last axis with explicit max subtraction; -inf entries stay -inf."""
  x = np.asarray(logits, np.float64) / temperature
  m = np.max(x, axis=-1, keepdims=True)
  shifted = x - m
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def softmax(logits, temperature=1.0):
  return np.exp(log_softmax(logits, temperature))


def kl(p, q):
  """KL(P || Q) per position for probability arrays [..., V]; terms with P(v) = 0 contribute 0."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  out = np.zeros(p.shape[:-1])
  for idx in np.ndindex(*p.shape[:-1]):
    total = 0.0
    for v in range(p.shape[-1]):
      if p[idx + (v,)] > 0:
        total += p[idx + (v,)] * (np.log(p[idx + (v,)]) - np.log(q[idx + (v,)]))
    out[idx] = total
  return out


def entropy(p):
  p = np.asarray(p, np.float64)
  logp = np.log(np.where(p > 0, p, 1.0))
  return -np.sum(np.where(p > 0, p * logp, 0.0), axis=-1)


def _probs(student_logits, teacher_logits, temperature):
  return softmax(student_logits, temperature), softmax(teacher_logits, temperature)


def forward_kl(student_logits, teacher_logits, temperature=1.0):
  """KL(p_T || q) per position."""
  q, p = _probs(student_logits, teacher_logits, temperature)
  return kl(p, q)


def reverse_kl(student_logits, teacher_logits, temperature=1.0):
  """KL(q || p_T) per position."""
  q, p = _probs(student_logits, teacher_logits, temperature)
  return kl(q, p)


def mixed_kl(student_logits, teacher_logits, lam, temperature=1.0):
  q, p = _probs(student_logits, teacher_logits, temperature)
  return lam * kl(q, p) + (1.0 - lam) * kl(p, q)


def generalized_jsd(student_logits, teacher_logits, beta, temperature=1.0):
  """M = beta p_T + (1 - beta) q; beta KL(p_T || M) + (1 - beta) KL(q || M)."""
  q, p = _probs(student_logits, teacher_logits, temperature)
  m = beta * p + (1.0 - beta) * q
  return beta * kl(p, m) + (1.0 - beta) * kl(q, m)


def skew_forward_kl(student_logits, teacher_logits, alpha, temperature=1.0):
  """KL(p_T || alpha p_T + (1 - alpha) q)."""
  q, p = _probs(student_logits, teacher_logits, temperature)
  return kl(p, alpha * p + (1.0 - alpha) * q)


def skew_reverse_kl(student_logits, teacher_logits, alpha, temperature=1.0):
  """KL(q || alpha q + (1 - alpha) p_T)."""
  q, p = _probs(student_logits, teacher_logits, temperature)
  return kl(q, alpha * q + (1.0 - alpha) * p)


def reduce(values, mask=None, reduction="mean", num_tokens=None):
  """Masked reduction: "none" zeroes masked positions (and scales by weights); "mean" divides the masked
  sum by num_tokens or by the total mask weight of the whole array; an all-masked mean is 0."""
  values = np.asarray(values, np.float64)
  w = np.ones_like(values) if mask is None else np.asarray(mask, np.float64)
  weighted = np.zeros_like(values)
  for idx in np.ndindex(*values.shape):
    if w[idx] != 0:
      weighted[idx] = values[idx] * w[idx]
  if reduction == "none":
    return weighted
  total = weighted.sum()
  if reduction == "sum":
    return total
  denominator = w.sum() if num_tokens is None else float(num_tokens)
  return total / denominator if denominator > 0 else 0.0


def reward_to_go(rewards, mask=None, discount=0.0):
  """R_t = sum_{k >= t, mask_k != 0} discount^(k - t) r_k along the last axis, by a python loop.

  Masked rewards count 0; fractional mask weights do not scale rewards (they weigh loss terms only).
  """
  r = np.asarray(rewards, np.float64)
  m = np.ones_like(r) if mask is None else np.asarray(mask, np.float64)
  out = np.zeros_like(r)
  for idx in np.ndindex(*r.shape[:-1]):
    for t in range(r.shape[-1]):
      total = 0.0
      for k in range(t, r.shape[-1]):
        if m[idx + (k,)] != 0:
          total += discount ** (k - t) * r[idx + (k,)]
      out[idx + (t,)] = total
  return out


def kl_estimator(student_logprobs, teacher_logprobs, kind):
  """Schulman's k1/k2/k3 with ratio r = p_T / q on tokens drawn from q."""
  logq = np.asarray(student_logprobs, np.float64)
  logp = np.asarray(teacher_logprobs, np.float64)
  ratio = np.exp(logp - logq)
  if kind == "k1":
    return -np.log(ratio)
  if kind == "k2":
    return 0.5 * np.log(ratio) ** 2
  if kind == "k3":
    return (ratio - 1.0) - np.log(ratio)
  raise ValueError(kind)


def mixed_kl_grad(student_logits, teacher_logits, lam, temperature=1.0):
  """d/dz of the PER-POSITION lam KL(q||p) + (1-lam) KL(p||q), z the student logits (analytic):
  [(1 - lam)(q - p) + lam q (log q - log p - KL(q||p))] / T, with 0 where q = 0."""
  q, p = _probs(student_logits, teacher_logits, temperature)
  rkl = kl(q, p)[..., None]
  with np.errstate(divide="ignore", invalid="ignore"):
    log_ratio = np.where(q > 0, np.log(np.where(q > 0, q, 1.0)) - np.log(np.where(q > 0, p, 1.0)), 0.0)
  return ((1.0 - lam) * (q - p) + lam * q * (log_ratio - rkl)) / temperature


def _coarsened(student_logits, topk_ids, topk_logprobs, temperature):
  """Per position: (p over the k listed ids + rest, q likewise, listed ids, q over the vocabulary), by
  loops in float64. The rest bucket exists only when the ids leave some token out; p_rest = 1 − Σ p_i
  (0 when rounding makes Σ p_i exceed 1), q_rest = the student's mass on the unlisted tokens."""
  q_full = softmax(student_logits, temperature)
  ids, lp = np.asarray(topk_ids), np.asarray(topk_logprobs, np.float64)
  for idx in np.ndindex(*ids.shape[:-1]):
    listed = [int(v) for v in ids[idx]]
    p = list(np.exp(lp[idx]))
    q = [q_full[idx][v] for v in listed]
    unlisted = [v for v in range(q_full.shape[-1]) if v not in listed]
    if unlisted:
      p.append(max(1.0 - sum(p), 0.0))
      q.append(sum(q_full[idx][v] for v in unlisted))
    yield idx, np.array(p), np.array(q), listed, q_full[idx]


def topk_forward_kl(student_logits, topk_ids, topk_logprobs, temperature=1.0):
  """KL of the teacher and student distributions coarsened to the k listed ids plus a rest bucket."""
  out = np.zeros(np.shape(topk_ids)[:-1])
  for idx, p, q, _, _ in _coarsened(student_logits, topk_ids, topk_logprobs, temperature):
    out[idx] = kl(p, q)
  return out


def topk_forward_kl_grad(student_logits, topk_ids, topk_logprobs, temperature=1.0):
  """d/dz of the PER-POSITION coarsened KL (analytic): (q − target) / T, target = p_i on listed ids and
  p_rest q_v / q_rest on the others."""
  out = np.zeros(np.shape(student_logits), np.float64)
  for idx, p, q, listed, q_full in _coarsened(student_logits, topk_ids, topk_logprobs, temperature):
    target = q_full * (p[-1] / q[-1] if len(p) > len(listed) else 0.0)
    target[listed] = p[:len(listed)]
    out[idx] = (q_full - target) / temperature
  return out
