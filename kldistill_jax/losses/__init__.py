"""Pure, jit/vmap/grad-safe distillation losses on arrays. Conventions: see the README.

Exact full-vocabulary divergences (logits [..., V], never shifted), sampled-token estimators (per-token
log-probs [B, T]), the fused hidden-state form that never materialises [N, V] logits, and the forward KL
against a teacher's top-k log-probs (coarsened to the k tokens plus a rest bucket).
"""

from kldistill_jax.losses.divergences import (entropy_from_log_probs, forward_kl, generalized_jsd,
                                              kl_from_log_probs, log_probs, mixed_kl, reverse_kl,
                                              skew_forward_kl, skew_reverse_kl, token_stats)
from kldistill_jax.losses.fused import fused_token_kl, fused_token_kl_with_stats
from kldistill_jax.losses.sampled import (forward_kl_from_teacher_samples, importance_weights, kl_estimate, reverse_kl_policy_gradient,
                                          reward_to_go)
from kldistill_jax.losses.token_logprobs import head_logits, token_logprobs
from kldistill_jax.losses.topk import topk_forward_kl, topk_kl_from_log_probs

__all__ = [
    "entropy_from_log_probs", "forward_kl", "forward_kl_from_teacher_samples", "fused_token_kl", "fused_token_kl_with_stats",
    "generalized_jsd", "head_logits", "importance_weights", "kl_estimate", "kl_from_log_probs", "log_probs", "mixed_kl",
    "reverse_kl", "reverse_kl_policy_gradient", "reward_to_go", "skew_forward_kl", "skew_reverse_kl",
    "token_logprobs", "token_stats", "topk_forward_kl", "topk_kl_from_log_probs",
]
