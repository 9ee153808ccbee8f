"""Benchmark: value+gradient of the mixed token KL (lam=0.5) in naive, chunked and fused forms.

Command (full run with the sweep: ~1 hour on a shared, loaded 2-core CPU; run it in the background):

    python bench/losses.py
    nohup python bench/losses.py --sweep-chunks > /tmp/bench_losses.txt 2>&1 &

Smoke run (seconds):

    python bench/losses.py --quick --repeats 1 --sweep-chunks

What is measured, for each shape (B, T, V) and each form, is one jitted
`jax.value_and_grad(loss, argnums=(0, 1))(student_hidden, student_head, teacher_hidden, teacher_head)`:

  naive    logits = hs @ Ws and ht @ Wt (full [B, T, V] each), then `mixed_kl(s, t, lam=0.5)`;
  chunked  the same logits, then `mixed_kl(s, t, lam=0.5, chunk_size=C)`;
  fused    `fused_token_kl(hs, Ws, ht, Wt, lam=0.5, chunk_size=C)` (never materialises [B*T, V]).

Student hidden Ds=1024 (Qwen3-0.6B), teacher hidden Dt=2560 (Qwen3-4B), V=151936, float32 everywhere,
hidden states ~ N(0, 1) and heads ~ N(0, 1/D) from a fixed PRNG, so the logits are O(1).

Memory is read from the compiled executable's `memory_analysis()` (deterministic): "scratch" is
temp_size_in_bytes, i.e. what XLA allocates beyond the arguments and outputs. Arguments (the heads, about
2.2 GiB) and outputs (the gradients, mostly the [Ds, V] head gradient) are printed separately.
"/[N,V]" divides scratch by the size of one float32 [N, V] tensor with N = B*T tokens (N = 2048 for
both default shapes; for B = 1 this is the [T, V] logits tensor).

Time: ahead-of-time compile (excluded), then the median wall time of --repeats calls, each ending in
`jax.block_until_ready`. On a small shared CPU box these timings are noisy; the memory numbers are not.

Targets (printed PASS/FAIL at the end):
  * fused scratch at 8192 tokens (B=1, T=8192, compile only) / fused scratch at 2048 tokens <= 1.25;
  * fused scratch at 2048 tokens < 25% of one float32 [T, V] tensor;
  * fused time <= 1.5x naive time (per shape).
With --sweep-chunks, fused chunk sizes 32, 64, 128 (or those given) are also timed at (1, 2048) and checked
against the same targets.
"""

import argparse
import dataclasses
import inspect
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from kldistill_jax.losses import fused_token_kl, mixed_kl

LAM = 0.5
D_STUDENT = 1024   # Qwen3-0.6B hidden size
D_TEACHER = 2560   # Qwen3-4B hidden size
VOCAB = 151936     # Qwen3 vocabulary
QUICK_VOCAB = 32768
SHAPES = {"1x2048": (1, 2048), "4x512": (4, 512)}
LONG_TOKENS = 8192  # the scaling check: B=1, T=8192 vs B=1, T=2048 (both divided by 4 with --quick)
SCALING_TARGET = 1.25
SCRATCH_FRACTION_TARGET = 0.25
TIME_RATIO_TARGET = 1.5
DEFAULT_SWEEP = (32, 64, 128)
MIB = 2.0 ** 20

DEFAULT_CHUNK_SIZE = inspect.signature(fused_token_kl).parameters["chunk_size"].default


# --------------------------------------------------------------------------------------------- losses
def naive_loss(hs, ws, ht, wt):
  return mixed_kl(hs @ ws, ht @ wt, lam=LAM)


def chunked_loss(hs, ws, ht, wt, *, chunk_size):
  return mixed_kl(hs @ ws, ht @ wt, lam=LAM, chunk_size=chunk_size)


def fused_loss(hs, ws, ht, wt, *, chunk_size):
  return fused_token_kl(hs, ws, ht, wt, lam=LAM, chunk_size=chunk_size)


def make_loss(form, chunk_size):
  if form == "naive":
    return naive_loss
  if form == "chunked":
    return lambda *a: chunked_loss(*a, chunk_size=chunk_size)
  if form == "fused":
    return lambda *a: fused_loss(*a, chunk_size=chunk_size)
  raise ValueError(form)


# --------------------------------------------------------------------------------------------- inputs
def make_heads(vocab, seed=0):
  ks, kt = jax.random.split(jax.random.PRNGKey(seed))
  ws = jax.random.normal(ks, (D_STUDENT, vocab), jnp.float32) / jnp.sqrt(float(D_STUDENT))
  wt = jax.random.normal(kt, (D_TEACHER, vocab), jnp.float32) / jnp.sqrt(float(D_TEACHER))
  return jax.block_until_ready((ws, wt))


def make_hidden(b, t, seed=1):
  ks, kt = jax.random.split(jax.random.PRNGKey(seed))
  hs = jax.random.normal(ks, (b, t, D_STUDENT), jnp.float32)
  ht = jax.random.normal(kt, (b, t, D_TEACHER), jnp.float32)
  return jax.block_until_ready((hs, ht))


# --------------------------------------------------------------------------------------------- measure
@dataclasses.dataclass
class Result:
  form: str
  shape: tuple          # (B, T, V)
  chunk_size: object    # int or None
  scratch: int          # temp_size_in_bytes
  argument: int
  output: int
  alias: int
  compile_s: float
  times: list           # seconds per timed call (empty when compile-only)
  loss: float = float("nan")

  @property
  def time(self):
    return statistics.median(self.times) if self.times else float("nan")

  @property
  def tokens(self):
    return self.shape[0] * self.shape[1]

  @property
  def nv_bytes(self):
    return 4 * self.tokens * self.shape[2]


def compile_value_and_grad(form, chunk_size, args):
  fn = jax.jit(jax.value_and_grad(make_loss(form, chunk_size), argnums=(0, 1)))
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def measure(form, chunk_size, hs, ws, ht, wt, repeats, compile_only=False):
  args = (hs, ws, ht, wt)
  compiled, compile_s = compile_value_and_grad(form, chunk_size, args)
  mem = compiled.memory_analysis()
  times, loss = [], float("nan")
  if not compile_only:
    for _ in range(repeats):
      t0 = time.perf_counter()
      out = jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t0)
      loss = float(out[0])
      del out
  b, t, _ = hs.shape
  return Result(form, (b, t, ws.shape[1]), chunk_size, int(mem.temp_size_in_bytes),
                int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                int(mem.alias_size_in_bytes), compile_s, times, loss)


def log(msg):
  print(msg, file=sys.stderr, flush=True)


def describe(r):
  times = ", ".join(f"{x:.2f}" for x in r.times) or "compile only"
  return (f"{r.form:<7} {shape_str(r.shape)} C={r.chunk_size}: compile {r.compile_s:.1f}s, "
          f"calls [{times}] s, loss {r.loss:.6f}, scratch {r.scratch / MIB:.1f} MiB")


# --------------------------------------------------------------------------------------------- report
def shape_str(shape):
  return "({}, {}, {})".format(*shape)


def fmt_ratio(x):
  return "-" if x != x else f"{x:.2f}x"  # NaN -> "-"


def print_table(title, rows, naive_by_shape):
  print()
  print(title)
  header = (f"{'form':<8} {'C':>5} {'shape (B, T, V)':<20} {'time s':>8} {'scratch MiB':>12} "
            f"{'/[N,V]':>7} {'args MiB':>9} {'out MiB':>8} {'t/naive':>8} {'mem/naive':>9}")
  print(header)
  print("-" * len(header))
  for r in rows:
    naive = naive_by_shape.get(r.shape)
    t_ratio = r.time / naive.time if naive and naive.times and r.times else float("nan")
    m_ratio = r.scratch / naive.scratch if naive and naive.scratch else float("nan")
    c = "-" if r.chunk_size is None else str(r.chunk_size)
    t = f"{r.time:.2f}" if r.times else "(compile)"
    print(f"{r.form:<8} {c:>5} {shape_str(r.shape):<20} {t:>8} {r.scratch / MIB:>12.1f} "
          f"{r.scratch / r.nv_bytes:>6.1%} {r.argument / MIB:>9.1f} {r.output / MIB:>8.1f} "
          f"{fmt_ratio(t_ratio):>8} {fmt_ratio(m_ratio):>9}")


def verdict(ok):
  return "PASS" if ok else "FAIL"


def target_lines(fused_base, fused_long, naive):
  """The three target lines for one fused configuration; returns (lines, all passed)."""
  lines, oks = [], []
  c = fused_base.chunk_size
  if fused_long is not None:
    ratio = fused_long.scratch / fused_base.scratch if fused_base.scratch else float("inf")
    ok = ratio <= SCALING_TARGET
    lines.append(f"[{verdict(ok)}] C={c}: fused scratch {fused_long.tokens} tokens / {fused_base.tokens} "
                 f"tokens = {fused_long.scratch / MIB:.1f} / {fused_base.scratch / MIB:.1f} MiB = "
                 f"{ratio:.3f} (target <= {SCALING_TARGET})")
    oks.append(ok)
  frac = fused_base.scratch / fused_base.nv_bytes
  ok = frac < SCRATCH_FRACTION_TARGET
  lines.append(f"[{verdict(ok)}] C={c}: fused scratch at {shape_str(fused_base.shape)} = "
               f"{fused_base.scratch / MIB:.1f} MiB = {frac:.1%} of one f32 [T, V] "
               f"({fused_base.nv_bytes / MIB:.1f} MiB) (target < {SCRATCH_FRACTION_TARGET:.0%})")
  oks.append(ok)
  if naive is not None and naive.times and fused_base.times:
    ratio = fused_base.time / naive.time
    ok = ratio <= TIME_RATIO_TARGET
    lines.append(f"[{verdict(ok)}] C={c}: fused time at {shape_str(fused_base.shape)} = "
                 f"{fused_base.time:.2f} s = {ratio:.2f}x naive ({naive.time:.2f} s) "
                 f"(target <= {TIME_RATIO_TARGET}x; noisy on a shared CPU)")
    oks.append(ok)
  return lines, all(oks)


# --------------------------------------------------------------------------------------------- main
def parse_shape(s):
  if s in SHAPES:
    return s
  raise argparse.ArgumentTypeError(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
  parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                      help=f"positions per chunk for chunked/fused (default: fused_token_kl's default, "
                           f"{DEFAULT_CHUNK_SIZE})")
  parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(SHAPES),
                      metavar="BxT", help=f"subset of {list(SHAPES)} (V is always {VOCAB})")
  parser.add_argument("--quick", action="store_true",
                      help=f"smoke run: V={QUICK_VOCAB} and T/4 (also for the 8192-token check)")
  parser.add_argument("--sweep-chunks", nargs="*", type=int, default=None, metavar="C",
                      help=f"also time the fused form at (1, 2048) for these chunk sizes "
                           f"(no values: {' '.join(map(str, DEFAULT_SWEEP))})")
  args = parser.parse_args(argv)
  if args.repeats < 1 or args.chunk_size < 1:
    parser.error("--repeats and --chunk-size must be positive")
  sweep = None if args.sweep_chunks is None else (args.sweep_chunks or list(DEFAULT_SWEEP))

  t_start = time.perf_counter()
  div = 4 if args.quick else 1
  vocab = QUICK_VOCAB if args.quick else VOCAB
  base_bt = (1, SHAPES["1x2048"][1] // div)
  long_bt = (1, LONG_TOKENS // div)
  c = args.chunk_size

  print(f"kldistill_jax loss benchmark: value_and_grad w.r.t. (student hidden, student head), lam={LAM}")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}; "
        f"Ds={D_STUDENT}, Dt={D_TEACHER}, V={vocab}, float32; chunk_size={c} "
        f"(fused_token_kl default {DEFAULT_CHUNK_SIZE}); repeats={args.repeats} (median)"
        + ("; QUICK" if args.quick else ""))
  sys.stdout.flush()

  log("generating heads ...")
  ws, wt = make_heads(vocab)
  results = []       # main table rows
  naive_by_shape = {}
  cache = {}         # (form, chunk, (B, T)) -> Result, so the sweep reuses main-table measurements

  def run(form, chunk, bt, compile_only=False):
    key = (form, chunk, bt, compile_only)
    if key not in cache:
      hs, ht = make_hidden(*bt)
      log(f"{form} {bt} C={chunk}{' (compile only)' if compile_only else ''} ...")
      cache[key] = measure(form, chunk, hs, ws, ht, wt, args.repeats, compile_only)
      del hs, ht
      log("  " + describe(cache[key]))
    return cache[key]

  for name in args.shapes:
    b, t = SHAPES[name]
    bt = (b, t // div)
    for form, chunk in (("naive", None), ("chunked", c), ("fused", c)):
      r = run(form, chunk, bt)
      results.append(r)
      if form == "naive":
        naive_by_shape[r.shape] = r

  long_fused = run("fused", c, long_bt, compile_only=True)
  print_table("Value + gradient (jit), median over repeats; scratch = temp_size_in_bytes; "
              "/[N,V] = scratch / one f32 [B*T, V]", results + [long_fused], naive_by_shape)

  print()
  print("Targets (fused, chunk_size={}):".format(c))
  base_fused = run("fused", c, base_bt)
  base_naive = cache.get(("naive", None, base_bt, False))
  for line in target_lines(base_fused, long_fused, base_naive)[0]:
    print(line)
  for r in results:
    if r.form == "fused" and r.shape != base_fused.shape:
      naive = naive_by_shape.get(r.shape)
      if naive is not None and naive.times:
        ratio = r.time / naive.time
        print(f"[{verdict(ratio <= TIME_RATIO_TARGET)}] C={c}: fused time at {shape_str(r.shape)} = "
              f"{r.time:.2f} s = {ratio:.2f}x naive ({naive.time:.2f} s) (target <= {TIME_RATIO_TARGET}x)")
  sys.stdout.flush()

  if sweep:
    naive = run("naive", None, base_bt)
    rows, verdicts = [], {}
    for chunk in sweep:
      rows.append(run("fused", chunk, base_bt))
      rows.append(run("fused", chunk, long_bt, compile_only=True))
    print_table(f"Chunk-size sweep, fused form at {shape_str(base_fused.shape)} "
                f"(+ {long_bt[1]}-token compile-only scratch)", [naive] + rows,
                {naive.shape: naive})
    print()
    print("Sweep targets:")
    for chunk in sweep:
      lines, ok = target_lines(run("fused", chunk, base_bt), run("fused", chunk, long_bt, True), naive)
      verdicts[chunk] = ok
      for line in lines:
        print(line)
    passing = [ch for ch in sweep if verdicts[ch]]
    if passing:
      best = min(passing, key=lambda ch: run("fused", ch, base_bt).time)
      print(f"Fastest chunk size meeting all targets: {best}")
    else:
      print("No chunk size in the sweep meets all targets.")

  print()
  print(f"Total wall time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
  main()
