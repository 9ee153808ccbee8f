"""bench/memory_plan.py's readings of a compiled program, on programs whose answers are known by hand:
bytes per device under a sharding, and where the all-gathers of a sharded weight sit (a loop-invariant
weight's gather is hoisted out of a while loop; a scanned stack's is gathered one slice per iteration)."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

_PATH = pathlib.Path(__file__).parent.parent / "bench" / "memory_plan.py"
_spec = importlib.util.spec_from_file_location("memory_plan", _PATH)
memory_plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_plan)

D, F = 64, 32


def _mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("fsdp",))


def test_bytes_are_per_device():
  """x [8 x 1024] float32 split over 8 devices, donated into x + 1: one device holds its 1024 floats."""
  mesh = _mesh()
  x = jax.ShapeDtypeStruct((8 * 1024,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
  compiled = jax.jit(lambda x: x + 1, donate_argnums=0).lower(x).compile()
  assert memory_plan.per_device_bytes(compiled) == 1024 * 4


def test_gathers_inside_and_outside_loops():
  mesh = _mesh()
  rows = NamedSharding(mesh, PartitionSpec("fsdp", None))  # weights and batch split alike: FSDP

  def hoisted(w, x):  # the same sharded weight every iteration: gathered once, before the loop
    return jax.lax.fori_loop(0, 3, lambda i, x: jnp.tanh(x @ w), x)

  w = jax.ShapeDtypeStruct((D, D), jnp.float32, sharding=rows)
  x = jax.ShapeDtypeStruct((8, D), jnp.float32, sharding=rows)
  text = jax.jit(hoisted).lower(w, x).compile().as_text()
  inside, outside, largest = memory_plan.all_gathers(text)
  assert (inside, outside, largest) == (0, D * D * 4, D * D * 4)

  def scanned(ws, x):  # a stack of 3 weights, each sharded on its rows: one slice gathered per iteration
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)[0]

  ws = jax.ShapeDtypeStruct((3, D, D), jnp.float32,
                            sharding=NamedSharding(mesh, PartitionSpec(None, "fsdp", None)))
  text = jax.jit(scanned).lower(ws, x).compile().as_text()
  inside, outside, largest = memory_plan.all_gathers(text)
  assert (inside, outside, largest) == (D * D * 4, 0, D * D * 4)


def test_rows_that_fit():
  measured = {1: (10e9 + 3e9, 0, None), 2: (10e9 + 6e9, 0, None)}  # resident 10 GB, 3 GB per row
  resident, per_row, rows = memory_plan.fits(80e9, measured)
  assert (resident, per_row, rows) == (10e9, 3e9, 23)
