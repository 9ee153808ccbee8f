"""The measured memory plan of configs/qwen3_8b_to_0p6b.py: every phase compiled, never run.

Command (this 2-core CPU: 85 s when quiet; nothing is allocated: inputs are `jax.ShapeDtypeStruct`s):

    python bench/memory_plan.py              # the real shapes: Qwen3-8B -> Qwen3-0.6B, 512 + 4096 tokens
    python bench/memory_plan.py --quick      # tiny shapes in MB: ~75 s (the same 16 compiles, smaller)

Each phase of the run is lowered and compiled by XLA:CPU on a simulated mesh of the target's FSDP width
(`--xla_force_host_platform_device_count`), and `compiled.memory_analysis()` gives the bytes one device
holds: arguments + outputs - donated aliases + scratch. The data axis of a pod's mesh only splits the batch
and replicates everything else, so a device's program on mesh (data, fsdp, 1) with m rows per device is the
program of mesh (1, fsdp, 1) with m rows per device: that is what is compiled (fsdp 8 for the H100 node
and v4-64, fsdp 4 for v5p-64).

Phases, each at m = 1 and m = 2 rows per device (the bytes are affine in m: resident + m x per row; at
--quick's toy shapes buffer reuse can make "per row" negative, and "rows that fit" is then "-"):
  student generation   the sampler over the student (its float32 masters, as the loop hands them over),
                       512-token prompts + 4096 new tokens, whole batch at once
  teacher generation   the same with the bfloat16 teacher (the teacher-prefix cells: sft, dagger presets)
  train step (exact)   the config's step: student fwd+bwd (remat="block"), the teacher's forward, the fused
                       mixed-KL loss, AdamW; the state donated
  train step (:opd)    the `:opd` preset: sampled reverse KL (its micro_batches; m rows per micro-batch)
For the sampler it also reports where the FSDP all-gathers of the weights sit: inside the layer scans
(one layer's weights per iteration, freed after use) or outside the loops (held while they run). With the
layers scanned, only the embedding and the output head are gathered whole.

These are XLA:CPU's figures for the device programs: the GPU and TPU compilers fuse, schedule and pick
attention kernels differently (on CPU the attention is `blockwise`, the flash-style pure-JAX kernel; on GPU
`auto` is cuDNN, on TPU splash, which hold no more). One CPU artefact inflates the bfloat16 phases: XLA:CPU
computes bfloat16 matmuls in float32, so it converts bfloat16 weights (and the gathered embedding and head)
to float32 copies that a GPU or TPU never makes: e.g. the 8B teacher's gathered embedding + head are
2 x 151,936 x 4,096 x 4 B = 5.0 GB here, 2.5 GB on a device. Read the figures as upper bounds close to the
device compilers', not equal to them.
"""

import argparse
import os
import re
import sys
import time

_DEVICES = 8
if "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_DEVICES}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from kldistill_jax import objectives, sampling  # noqa: E402
from kldistill_jax.models import Transformer, sharding  # noqa: E402
from kldistill_jax.models.config import QWEN3_0P6B, QWEN3_8B, qwen3  # noqa: E402
from kldistill_jax.train import setup, state as state_lib, step as step_lib  # noqa: E402
from kldistill_jax.train.presets import apply_arg  # noqa: E402,F401  (the config file uses it)

UNIT = (1e9, "GB")  # bytes per printed unit; --quick reports MB (1e6 B) instead
# name: (HBM bytes per device, the pod's mesh (data, fsdp, tensor), chips)
TARGETS = {
    "8x H100-80GB": (80e9, (1, 8, 1), 8),
    "v5p-64": (95e9, (8, 4, 1), 32),
    "v4-64": (32 * 2**30, (4, 8, 1), 32),
}


def load_config(preset=None):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "qwen3_8b_to_0p6b.py")
  spec = importlib.util.spec_from_file_location("qwen3_8b_to_0p6b", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def model_config(base, section):
  return base.replace(param_dtype=section.param_dtype, compute_dtype=section.compute_dtype,
                      remat=section.remat, attention=section.attention)


def abstract_split(config, mesh, trainable=True):
  """A state_lib.Split of a model whose arrays are sharded ShapeDtypeStructs (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shardings = sharding.param_shardings(state, mesh)
  state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), state,
                       shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  model = nnx.merge(graphdef, state)
  return state_lib.split(model) if trainable else model


def per_device_bytes(compiled):
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def _header(line):
  """The computation name when `line` starts one (unindented `[ENTRY ]%name (params) -> type {`)."""
  match = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s", line)
  return match.group(1) if match and line.rstrip().endswith("{") else None


def _while_bodies(hlo_text):
  """Names of the computations that are the body of a while loop (or called from one)."""
  bodies = set(re.findall(r"while\([^)]*\)[^\n]*body=%?([\w.\-]+)", hlo_text))
  calls = {}
  current = None
  for line in hlo_text.splitlines():
    header = _header(line)
    if header:
      current = header
      calls[current] = set()
    elif current is not None:
      calls[current].update(re.findall(r"(?:to_apply|calls|body|condition|branch_computations)="
                                       r"\{?%?([\w.\-]+)", line))
  inside, frontier = set(bodies), list(bodies)
  while frontier:
    for callee in calls.get(frontier.pop(), ()):
      if callee not in inside:
        inside.add(callee)
        frontier.append(callee)
  return inside, calls


def all_gathers(hlo_text):
  """(bytes all-gathered inside while loops, bytes all-gathered outside any loop, the largest single
  all-gather), from the compiled HLO. Inside: the layer scan gathers one layer's weights per iteration;
  outside: gathered before the loops start and held until their last use."""
  inside, _ = _while_bodies(hlo_text)
  sizes = {"f32": 4, "bf16": 2, "s32": 4, "f16": 2, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
  loop_bytes = outside_bytes = largest = 0
  current = None
  for line in hlo_text.splitlines():
    header = _header(line)
    if header:
      current = header
      continue
    found = re.search(r"=\s*(\w+)\[([\d,]*)\][^=]*\sall-gather(?:-start)?\(", line)
    if not found:
      continue
    dtype, dims = found.groups()
    count = 1
    for d in filter(None, dims.split(",")):
      count *= int(d)
    nbytes = count * sizes.get(dtype, 4)
    largest = max(largest, nbytes)
    if current in inside:
      loop_bytes += nbytes
    else:
      outside_bytes += nbytes
  return loop_bytes, outside_bytes, largest


def compile_generation(split_model, rows, prompt_len, new_tokens, mesh, settings_section):
  graphdef, state = nnx.split(split_model.merge())
  b = rows
  tokens = jax.ShapeDtypeStruct((b, prompt_len), jnp.int32, sharding=sharding.batch_sharding(mesh))
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
  settings = sampling.SamplerSettings(new_tokens, float(settings_section.temperature), eos_ids=(1,))
  with jax.set_mesh(mesh):
    return sampling._generate.lower(graphdef, state, tokens, tokens, keys, settings, mesh).compile()


def compile_train_step(config, student, teacher, rows, length, mesh):
  objective = setup.make_objective(config)
  optimizer = state_lib.make_optimizer(_optimizer_config(config))
  abstract = jax.eval_shape(lambda p: state_lib.init_state(p, optimizer, 0), student.params)
  shardings = state_lib.state_shardings(abstract, mesh)
  # shardings has one NamedSharding where the state has an nnx.Variable (a pytree node around its array)
  state = jax.tree.map(lambda s, x: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), x), shardings, abstract)
  batch_sharding = sharding.batch_sharding(mesh)
  keys = ("tokens", "attention_mask", "loss_mask")
  batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch_sharding) for k in keys}
  if objective.estimator == "sampled":
    batch["behavior_logprobs"] = jax.ShapeDtypeStruct((rows, length), jnp.float32, sharding=batch_sharding)
  step_fn = step_lib.build_train_step(
      student=state_lib.Split(student.graphdef, None, student.rest), objective=objective,
      optimizer=optimizer, micro_batches=config.micro_batches, state_shardings=shardings,
      batch_sharding=batch_sharding, fused=config.objective.fused)
  with jax.set_mesh(mesh):
    return step_fn.lower(state, batch, teacher).compile()


def _optimizer_config(config):
  c = config.optimizer.copy_and_resolve_references()
  with c.unlocked():
    c.total_steps = config.steps
  return c


def measure(name, compile_fn):
  """{m: (bytes per device, compile seconds, compiled)} for m = 1, 2 rows per device."""
  out = {}
  for m in (1, 2):
    began = time.perf_counter()
    compiled = compile_fn(m)
    out[m] = (per_device_bytes(compiled), time.perf_counter() - began, compiled)
    print(f"  {name}, {m} row(s)/device: {out[m][0] / UNIT[0]:.2f} {UNIT[1]}, compiled in {out[m][1]:.0f} s",
          flush=True)
  return out


def fits(hbm, measured):
  """(resident bytes, bytes per row, rows per device that fit in hbm)."""
  per_row = measured[2][0] - measured[1][0]
  resident = measured[1][0] - per_row
  if per_row <= 0:
    return resident, per_row, None
  return resident, per_row, int((hbm - resident) // per_row)


def _count(params):
  return f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"


def plan(args):
  exact, opd = load_config(), load_config("opd")
  prompt_len, new_tokens = exact.data.prompt_len, exact.sampling.max_new_tokens
  student_base, teacher_base = QWEN3_0P6B, QWEN3_8B
  if args.quick:
    prompt_len, new_tokens = 16, 48
    student_base = qwen3(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16)
    teacher_base = student_base.replace(hidden_size=128, intermediate_size=256, num_layers=3)
  length = prompt_len + new_tokens
  print(f"jax {jax.__version__}, XLA:{jax.devices()[0].platform.upper()} ({_DEVICES} simulated devices); "
        f"student {_count(student_base.num_params())} ({exact.student.param_dtype} masters, "
        f"{exact.student.compute_dtype} compute, remat={exact.student.remat}), teacher "
        f"{_count(teacher_base.num_params())} ({exact.teacher.param_dtype}); prompt {prompt_len} + "
        f"{new_tokens} new tokens", flush=True)
  widths = sorted({(mesh[1], mesh[2]) for _, mesh, _ in TARGETS.values()}, reverse=True)
  results = {}
  for fsdp, tensor in widths:
    mesh = sharding.make_mesh(1, fsdp, tensor, devices=jax.devices()[:fsdp * tensor])
    shards = fsdp
    print(f"mesh (1, {fsdp}, {tensor}):", flush=True)
    student = abstract_split(model_config(student_base, exact.student), mesh)
    teacher = abstract_split(model_config(teacher_base, exact.teacher), mesh)
    phases = {}
    phases["student generation"] = measure("student generation", lambda m: compile_generation(
        student, m * shards, prompt_len, new_tokens, mesh, exact.sampling))
    phases["teacher generation"] = measure("teacher generation", lambda m: compile_generation(
        teacher, m * shards, prompt_len, new_tokens, mesh, exact.sampling))
    phases["train step (exact)"] = measure("train step (exact)", lambda m: compile_train_step(
        exact, student, teacher, m * shards, length, mesh))
    phases["train step (:opd)"] = measure("train step (:opd)", lambda m: compile_train_step(
        opd, student, teacher, m * shards * opd.micro_batches, length, mesh))
    results[(fsdp, tensor)] = phases
  return results, dict(prompt_len=prompt_len, new_tokens=new_tokens, micro_batches=opd.micro_batches)


def report(results, shape):
  scale, unit = UNIT
  print(f"\n## Bytes per device ({unit} = {scale:.0e} B) and rows per device that fit\n")
  print("Resident = what does not grow with the batch (weights, optimizer state, compiled scratch); per row "
        "= each more row per device (per micro-batch row for :opd). Rows that fit = (HBM - resident) / per "
        "row, at the whole HBM.\n")
  print("| target (mesh) | HBM | phase | resident | per row | rows/device that fit | compile (1 row) |")
  print("|---|---|---|---|---|---|---|")
  for target, (hbm, mesh, chips) in TARGETS.items():
    phases = results[(mesh[1], mesh[2])]
    for phase, measured in phases.items():
      resident, per_row, rows = fits(hbm, measured)
      rows_text = "-" if rows is None else (f"{rows}" if rows > 0 else "0 (does not fit)")
      print(f"| {target} {mesh} | {hbm / scale:.1f} | {phase} | {resident / scale:.2f} | {per_row / scale:.3f} | "
            f"{rows_text} | {measured[1][1]:.0f} s |")
  print("\n## All-gathers of the sampler (FSDP)\n")
  print("Inside loops: in the layer scans (prefill and decode), one layer's weights per iteration, freed "
        "after it; outside: gathered before the loops and held through them.\n")
  print("| mesh | model | gathered inside loops | gathered outside loops | largest single gather |")
  print("|---|---|---|---|---|")
  for (fsdp, tensor), phases in results.items():
    for phase in ("student generation", "teacher generation"):
      inside, outside, largest = all_gathers(phases[phase][1][2].as_text())
      print(f"| (1, {fsdp}, {tensor}) | {phase.split()[0]} | {inside / scale:.3f} {unit} | "
            f"{outside / scale:.3f} {unit} | {largest / scale:.3f} {unit} |")
  print(f"\nprompt {shape['prompt_len']} + {shape['new_tokens']} new tokens; :opd rows are per micro-batch "
        f"(micro_batches={shape['micro_batches']}). XLA:CPU figures: approximate the device compilers'.")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny models and lengths, figures in MB (~75 s: the same compiles, smaller)")
  args = parser.parse_args()
  if args.quick:
    global UNIT
    UNIT = (1e6, "MB")
  began = time.perf_counter()
  results, shape = plan(args)
  report(results, shape)
  print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
  main()
