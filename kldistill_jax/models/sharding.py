"""Sharding rules for a ('data', 'fsdp', 'tensor') mesh: the one place logical axes meet mesh axes.

Parameters carry logical axis names (`logical_axes` metadata, set in `transformer.py`); `RULES` maps
each to a mesh axis. A dimension that the mesh axis does not divide is replicated instead (tiny test
models on 8 devices), so every model runs unchanged on 1 device, a simulated mesh and a pod.
Activations: under `jax.set_mesh(mesh)` the model pins its residual stream to ("batch", ·, ·) and its
logits to ("batch", ·, "vocab") with `constrain`; without an ambient mesh GSPMD propagates from the inputs.
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kldistill_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "layers": None,  # the stacked layers' leading axis: each device holds every layer's shard
    "batch": BATCH_AXES,
}


def make_mesh(data=1, fsdp=1, tensor=1, devices=None):
  """A ('data', 'fsdp', 'tensor') mesh with automatic (GSPMD) axis types."""
  devices = jax.devices() if devices is None else devices
  if data * fsdp * tensor != len(devices):
    raise UserError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} "
                    f"devices, but {len(devices)} are available")
  return jax.sharding.Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _axis_size(mesh, axis):
  if axis is None:
    return 1
  axes = axis if isinstance(axis, tuple) else (axis,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(shape, logical_axes, mesh):
  """PartitionSpec for an array of `shape` with `logical_axes`; indivisible dims are replicated."""
  if logical_axes is None:
    return PartitionSpec()
  mesh_axes = []
  for dim, name in zip(shape, logical_axes):
    axis = RULES.get(name)
    mesh_axes.append(axis if axis is not None and dim % _axis_size(mesh, axis) == 0 else None)
  return PartitionSpec(*mesh_axes)


def param_shardings(state, mesh):
  """NamedShardings for an nnx State (abstract or concrete) of a model's variables."""
  def one(variable):
    axes = variable.get_metadata().get("logical_axes")
    return NamedSharding(mesh, spec_for(variable.shape, axes, mesh))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x, logical_axes):
  """Pins an activation to the ambient mesh (`jax.set_mesh`) by its logical axes; a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(x.shape, logical_axes, mesh))


def batch_sharding(mesh, ndim=2):
  """Arrays whose leading axis is the batch: split it over ('data', 'fsdp'), replicate the rest."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def model_mesh(model):
  """The mesh the model's parameters are placed on, or None (single device / unsharded)."""
  for leaf in jax.tree.leaves(nnx.state(model)):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def constrain_cache(cache, mesh):
  """Pins a KV cache to the mesh: layers replicated, batch over ('data', 'fsdp'), kv heads over 'tensor'
  (when they divide)."""
  if mesh is None:
    return cache
  pin = lambda x, axes: jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, spec_for(x.shape, axes, mesh)))
  kv_axes = ("layers", "batch", "kv_heads", None, None)
  return type(cache)(k=pin(cache.k, kv_axes), v=pin(cache.v, kv_axes), valid=pin(cache.valid, ("batch", None)),
                     index=cache.index)


def shard_model(model, mesh):
  """Places every variable of `model` on its shard (in place) and returns the model."""
  graphdef, state = nnx.split(model)
  shardings = param_shardings(state, mesh)
  state = jax.tree.map(lambda v, s: v.replace(jax.device_put(v[...], s)), state, shardings,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(model, state)
  return model
