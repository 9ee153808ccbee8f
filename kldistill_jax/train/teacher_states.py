"""The teacher as a hidden-state cache stores it: final (post-norm) hidden states in bfloat16 and the
output head, and what each way of caching a teacher costs per token.

    states = teacher_states.hidden_states(teacher, tokens, mask)       # bfloat16 [B, L, D]
    dtype = teacher_states.write_head(file, teacher)                    # the head [D, V], once
    head = teacher_states.load_head(file, dtype, mesh)                  # on the mesh, for the train step

The train step computes the teacher's logits as states @ head inside the fused loss (`step`), so a run on
such a cache needs neither a teacher forward nor the teacher's other parameters. `trajectories` decides
where the files go and records the head's dtype.

numpy has no bfloat16 of its own (`np.save` writes opaque `|V2` records): bfloat16 arrays are stored as
their uint16 bits (`to_disk`) and viewed back (`from_disk`, a view of the memory map: nothing is read until
a row is).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kldistill_jax.models import sequence, sharding
from kldistill_jax.train import distributed

DTYPE = jnp.bfloat16  # of the stored states


def hidden_states(model, tokens, mask):
  """bfloat16 [B, L, D]: the model's final hidden states on (tokens, mask), the call the train step's live
  teacher makes (`models.sequence.forward`), rounded."""
  graphdef, state = nnx.split(model)
  return _hidden_states(graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))


@functools.partial(jax.jit, static_argnames="graphdef")
def _hidden_states(graphdef, state, tokens, mask):
  return sequence.forward(nnx.merge(graphdef, state), tokens, mask).astype(DTYPE)


def write_head(file, teacher) -> str:
  """The teacher's output head [D, V] (the transposed embedding when tied) into `file`, atomically, by
  every process (each its own copy: storage may be host-local); returns its dtype's name."""
  head = distributed.to_host(teacher.output_head())  # collective with several processes
  file.parent.mkdir(parents=True, exist_ok=True)
  temporary = file.with_name(f".{file.name}.{jax.process_index()}.tmp")
  with open(temporary, "wb") as f:
    np.save(f, to_disk(head))
    os.fsync(f.fileno())
  os.replace(temporary, file)
  return head.dtype.name


def load_head(file, dtype, mesh):
  """The head `write_head` stored, as `dtype`, on `mesh` sharded as a model's head is (embed over 'fsdp',
  vocab over 'tensor'); each device reads only its block of the memory-mapped file."""
  stored = from_disk(np.load(file, mmap_mode="r"), jnp.dtype(dtype))
  placed = jax.sharding.NamedSharding(mesh, sharding.spec_for(stored.shape, ("embed", "vocab"), mesh))
  return jax.make_array_from_callback(stored.shape, placed, lambda index: np.asarray(stored[index]))


def to_disk(x):
  return x.view(np.uint16) if x.dtype == jnp.bfloat16 else x


def from_disk(x, dtype):
  """The stored array as `dtype` (None: as stored), as a view."""
  return x if dtype is None or x.dtype == dtype else x.view(dtype)


def bytes_per_token(*, hidden_size, vocab_size, top_k):
  """Bytes of teacher outputs one cached token costs, for each way of caching them:

    hidden_states  2 D: the final hidden state in bfloat16 (plus the head, D x V, once per cache)
    top_k          8 k: k int32 ids and k float32 log-probs (an approximation of the KL)
    logits         2 V: every logit in bfloat16 (the exact KL without the head)
    rows           20: what every trajectory cache stores per token besides (tokens, attention and loss
                   masks in int32, the sampler's and the teacher's log-probs of the token in float32)
  """
  return {"hidden_states": 2 * hidden_size, "top_k": 8 * top_k, "logits": 2 * vocab_size, "rows": 20}


def describe_bytes(stored, hidden_size, vocab_size, top_k=20):
  """One line: `stored` bytes per token next to the other ways of caching the teacher."""
  sizes = bytes_per_token(hidden_size=hidden_size, vocab_size=vocab_size, top_k=top_k)
  return (f"{stored} bytes/token stored; teacher outputs per token (+{sizes['rows']} for the tokens, masks "
          f"and log-probs): hidden states {sizes['hidden_states']}, top-{top_k} {sizes['top_k']}, bfloat16 "
          f"logits {sizes['logits']}")
