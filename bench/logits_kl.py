"""Benchmark: value + gradient of the logits-level forward KL, ours vs TRL's `generalized_jsd_loss(beta=0)`.

Command (4-8 minutes on the shared 2-core VM; needs the bench extra, `pip install -e ".[bench]"`):

    python bench/logits_kl.py
    python bench/logits_kl.py --quick --repeats 1          # smoke run, small shapes, seconds

What is measured, on the same float32 inputs [1, 2048, 151936] (Qwen3's vocabulary; logits ~ N(0, 2^2)):

  ours      one compiled `jax.value_and_grad(forward_kl(s, t, reduction="sum", chunk_size=C))` w.r.t. the
            student logits, for each C in --chunk-sizes ("none" = unchunked);
  autodiff  the same loss through plain autodiff (the implementation before the analytic gradient), for
            reference, at the same chunk sizes (skip with --no-autodiff);
  TRL       `GKDTrainer.generalized_jsd_loss(s, t, beta=0, temperature=1)` (forward KL, default
            "batchmean" reduction = the sum over positions at B = 1, so the values are comparable), then
            `.backward()` into a leaf tensor that requires grad, PyTorch CPU on the same cores.

Time: median wall time of --repeats calls (after compiling, for ours; after one untimed warm-up call, for
both). The VM has 2 cores shared with other work: timings are noisy, the medians are what is reported.
"cpu s" is the median process CPU time of the same calls (all threads, user + system, page faults
included): on a loaded machine it moves far less than wall time, so its ratio is printed too.

Scratch beyond the gradient (the gradient itself, one [N, V] tensor, is the same unavoidable output for both):
  ours   XLA's `compiled.memory_analysis().temp_size_in_bytes`: everything the executable allocates beyond
         its arguments and outputs (the gradient is an output). Deterministic.
  TRL    the peak of torch's allocation counter during one value+grad call, from `torch.profiler` with
         `profile_memory=True` (the "Total Allocated" field of its memory events, which counts from 0 at the
         start of the profile, i.e. beyond the already-allocated inputs), minus the gradient's bytes.
  TRL's figure is cross-checked by its peak RSS (VmHWM, reset through /proc/self/clear_refs) during one
  call minus the RSS before it, minus the gradient's bytes ("rss" column; Linux). Not for ours: XLA's
  runtime reuses buffers freed by the previous call, so RSS deltas there are meaningless (even negative).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from kldistill_jax.losses import divergences
from kldistill_jax.losses import forward_kl

TOKENS, VOCAB = 2048, 151936
QUICK_TOKENS, QUICK_VOCAB = 256, 32768
MIB = 2.0 ** 20
TARGET_SPEEDUP, TARGET_SCRATCH = 5.0, 20.0  # issue 10: >= 5x faster with >= 20x less scratch, one setting


# ------------------------------------------------------------------------------------------------ memory
def _rss_bytes(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_delta(fn):
  """Peak resident memory during fn() minus the resident memory before it (Linux), or None."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS
    before = _rss_bytes("VmRSS")
  except OSError:
    return None
  fn()
  return _rss_bytes("VmHWM") - before


# ------------------------------------------------------------------------------------------------ ours
def our_loss(form, chunk_size):
  if form == "ours":
    return lambda s, t: forward_kl(s, t, reduction="sum", chunk_size=chunk_size)
  # plain autodiff through the generic per-position kernel path (what forward_kl was before)
  return lambda s, t: divergences._token_loss(divergences._forward, s, t, None, 1.0, "sum", chunk_size,
                                              None)


def measure_jax(form, chunk_size, s, t, repeats):
  compiled = jax.jit(jax.value_and_grad(our_loss(form, chunk_size))).lower(s, t).compile()
  scratch = int(compiled.memory_analysis().temp_size_in_bytes)
  out = jax.block_until_ready(compiled(s, t))  # warm-up
  loss, grad = float(out[0]), np.asarray(out[1])
  del out
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(s, t))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return {"time": statistics.median(times), "times": times, "cpu": statistics.median(cpu),
          "scratch": scratch, "loss": loss, "rss": None}, grad


# ------------------------------------------------------------------------------------------------ TRL
def measure_trl(s_np, t_np, repeats):
  import torch
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  from torch.profiler import ProfilerActivity, profile
  try:
    from trl.experimental.gkd import GKDTrainer  # trl >= 1.0
  except ImportError:
    from trl import GKDTrainer

  student, teacher = torch.from_numpy(s_np), torch.from_numpy(t_np)

  def value_and_grad():
    s = student.detach().requires_grad_(True)
    loss = GKDTrainer.generalized_jsd_loss(s, teacher, beta=0.0, temperature=1.0)
    loss.backward()
    return loss.detach(), s.grad

  value_and_grad()  # warm-up
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    value_and_grad()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  grad_bytes = student.numel() * student.element_size()
  with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    loss, grad = value_and_grad()
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
      events = json.load(f)["traceEvents"]
  peak = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
  del grad
  rss = peak_rss_delta(value_and_grad)
  return {"time": statistics.median(times), "times": times, "cpu": statistics.median(cpu),
          "scratch": peak - grad_bytes,
          "loss": float(loss), "rss": None if rss is None else rss - grad_bytes,
          "version": __import__("trl").__version__, "torch": torch.__version__,
          "threads": torch.get_num_threads()}, value_and_grad()[1].numpy()


# ------------------------------------------------------------------------------------------------ main
def max_rel_diff(a, b, rows=64):
  """max |a - b| / max |b| over the whole arrays, a block of rows at a time (no [N, V] temporaries)."""
  a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
  diff = max(float(np.max(np.abs(a[i:i + rows] - b[i:i + rows]))) for i in range(0, len(a), rows))
  return diff / float(np.max(np.abs(b)))


def parse_chunk(x):
  return None if x.lower() == "none" else int(x)


def fmt_mib(x):
  return "-" if x is None else f"{x / MIB:,.1f}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
  parser.add_argument("--chunk-sizes", nargs="+", type=parse_chunk, default=[2, 256, None],
                      metavar="C", help="chunk sizes for ours ('none' = unchunked)")
  parser.add_argument("--no-autodiff", action="store_true", help="skip the plain-autodiff reference rows")
  parser.add_argument("--quick", action="store_true",
                      help=f"smoke run at [1, {QUICK_TOKENS}, {QUICK_VOCAB}]")
  args = parser.parse_args(argv)
  n, v = (QUICK_TOKENS, QUICK_VOCAB) if args.quick else (TOKENS, VOCAB)
  t_start = time.perf_counter()

  rng = np.random.default_rng(0)
  s_np = (2.0 * rng.standard_normal((1, n, v), np.float32))
  t_np = (2.0 * rng.standard_normal((1, n, v), np.float32))
  nv_bytes = s_np.nbytes
  print(f"Forward KL value + gradient w.r.t. the student logits, [1, {n}, {v}] float32 "
        f"(one [N, V] tensor = {nv_bytes / MIB:,.1f} MiB); jax {jax.__version__} "
        f"({jax.default_backend()}), median of {args.repeats}; {os.cpu_count()} CPU cores (shared: noisy)")
  sys.stdout.flush()

  rows, reference_grad = [], None
  s, t = jnp.asarray(s_np), jnp.asarray(t_np)
  forms = ["ours"] + ([] if args.no_autodiff else ["autodiff"])
  for form in forms:
    for c in args.chunk_sizes:
      print(f"  {form} C={c} ...", file=sys.stderr, flush=True)
      r, grad = measure_jax(form, c, s, t, args.repeats)
      if reference_grad is None:
        reference_grad = grad
      r["grad_diff"] = max_rel_diff(grad, reference_grad)
      del grad
      rows.append((form, c, r))
  del s, t
  print("  TRL ...", file=sys.stderr, flush=True)
  trl, trl_grad = measure_trl(s_np, t_np, args.repeats)
  trl["grad_diff"] = max_rel_diff(trl_grad, reference_grad)
  del trl_grad

  print(f"TRL {trl['version']} (torch {trl['torch']}, {trl['threads']} threads); scratch = beyond inputs "
        "and the gradient; grad diff = max |g - g_ours(first row)| / max |g_ours|")
  header = (f"{'form':<9} {'C':>5} {'time s':>8} {'cpu s':>7} {'scratch MiB':>12} {'rss MiB':>9} "
            f"{'TRL/time':>9} {'TRL/cpu':>8} {'TRL/scratch':>11} {'loss':>14} {'grad diff':>9}")
  print(header)
  print("-" * len(header))
  best = []
  for form, c, r in rows + [("TRL", None, trl)]:
    speedup, cpu_ratio = trl["time"] / r["time"], trl["cpu"] / r["cpu"]
    less = trl["scratch"] / r["scratch"] if r["scratch"] > 0 else float("inf")
    if form == "ours":
      best.append((speedup, less, c, cpu_ratio))
    print(f"{form:<9} {'-' if c is None else c:>5} {r['time']:>8.2f} {r['cpu']:>7.2f} "
          f"{fmt_mib(r['scratch']):>12} {fmt_mib(r['rss']):>9} {speedup:>8.2f}x {cpu_ratio:>7.2f}x "
          f"{less:>10.1f}x {r['loss']:>14.2f} {r['grad_diff']:>9.1e}")
  print("times (s): " + "; ".join(f"{f} C={c}: {', '.join(f'{x:.2f}' for x in r['times'])}"
                                  for f, c, r in rows + [("TRL", None, trl)]))
  ok = [c for sp, le, c, _ in best if sp >= TARGET_SPEEDUP and le >= TARGET_SCRATCH]
  verdict = "PASS" if ok else "FAIL"
  detail = ", ".join(f"C={c}: {sp:.2f}x faster ({cr:.2f}x less CPU time), {le:.1f}x less scratch"
                     for sp, le, c, cr in best)
  print(f"[{verdict}] ours vs TRL (target >= {TARGET_SPEEDUP:g}x faster with >= {TARGET_SCRATCH:g}x less "
        f"scratch at one setting): {detail}")
  print(f"Total wall time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
  main()
