"""What training carries from step to step, and the optimizer that updates it.

Only the student is trained: `TrainState.params` holds the student's trainable variables (`trainable`:
its `nnx.Param`s, or only its LoRA adapters when it has any); the rest of it (a LoRA student's base
weights, RoPE frequencies) and the whole teacher stay outside, as frozen inputs of the step.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kldistill_jax.errors import UserError
from kldistill_jax.models import lora, sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  params: Any  # nnx.State of the student's trainable variables (float32 masters; see `trainable`)
  opt_state: Any
  step: jax.Array  # int32 scalar: optimizer updates done
  rng: jax.Array  # uint32 key data; step i uses fold_in(rng, i), so a resumed run draws the same keys


@functools.partial(jax.tree_util.register_dataclass, data_fields=("params", "rest"),
                   meta_fields=("graphdef",))
@dataclasses.dataclass(frozen=True)
class Split:
  """A model as (graphdef, trainable params, frozen rest), a pytree; `merge` rebuilds the nnx module."""
  graphdef: Any
  params: Any
  rest: Any

  def merge(self, params=None):
    return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)


def trainable(model):
  """The nnx filter of what training updates: the LoRA adapters (`models.lora`) when `model` has any, the
  base weights staying frozen; otherwise every `nnx.Param`."""
  return nnx.LoRAParam if lora.has_adapters(model) else nnx.Param


def split(model) -> Split:
  graphdef, params, rest = nnx.split(model, trainable(model), ...)
  return Split(graphdef, params, rest)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine (or constant) decay, after global-norm clipping.

  config: the `optimizer` ConfigDict (learning_rate, warmup_steps, schedule, b1, b2, eps, weight_decay,
  grad_clip) and `steps` for the decay horizon, passed as config.total_steps.
  """
  if config.schedule not in ("cosine", "constant"):
    raise UserError(f"optimizer.schedule must be 'cosine' or 'constant', got {config.schedule!r}")
  if config.warmup_steps < 0 or config.learning_rate <= 0:
    raise UserError("optimizer.warmup_steps must be >= 0 and optimizer.learning_rate > 0, got "
                    f"{config.warmup_steps} and {config.learning_rate}")
  warmup = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
  decay_steps = max(config.total_steps - config.warmup_steps, 1)
  after = (optax.cosine_decay_schedule(config.learning_rate, decay_steps, alpha=0.1)
           if config.schedule == "cosine" else optax.constant_schedule(config.learning_rate))
  schedule = optax.join_schedules([warmup, after], [config.warmup_steps])
  chain = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
  chain.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  return optax.chain(*chain)


def init_state(params, optimizer, seed) -> TrainState:
  """A fresh state; jit it with `out_shardings=state_shardings(...)` to place it on a mesh."""
  return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                    rng=jax.random.key_data(jax.random.key(seed)))


def state_shardings(abstract_state: TrainState, mesh):
  """Params, and every params-shaped subtree of the optimizer state, follow the parameter rules."""
  params = sharding.param_shardings(abstract_state.params, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  treedef = jax.tree.structure(abstract_state.params, is_leaf=_is_var)
  opt_state = _map_param_like(abstract_state.opt_state, treedef, params, replicated)
  return TrainState(params=params, opt_state=opt_state, step=replicated, rng=replicated)


def _is_var(x):
  return isinstance(x, nnx.Variable)


def _map_param_like(tree, treedef_params, param_shardings, replicated):
  """Shardings for an optax state: subtrees shaped like the params get the params' shardings."""
  if jax.tree.structure(tree, is_leaf=_is_var) == treedef_params:
    return param_shardings
  if isinstance(tree, (tuple, list)) and not hasattr(tree, "_fields"):
    return type(tree)(_map_param_like(t, treedef_params, param_shardings, replicated) for t in tree)
  if hasattr(tree, "_fields"):  # NamedTuple optax states (ScaleByAdamState(count, mu, nu), ...)
    return type(tree)(*(_map_param_like(t, treedef_params, param_shardings, replicated) for t in tree))
  if isinstance(tree, dict):
    return {k: _map_param_like(v, treedef_params, param_shardings, replicated) for k, v in tree.items()}
  return jax.tree.map(lambda _: replicated, tree)
