"""Benchmark: one distillation update (exact forward KL at dataset prefixes), ours vs PyTorch + transformers.

Command:

    python bench/train_step.py --quick                 # tiny shapes, f32, seconds on a CPU
    python bench/train_step.py                          # Qwen3-0.6B-shaped student, 1.7B-shaped teacher (GPU)

What one update is, on both sides: the teacher's forward (no gradient), the student's forward and backward,
the token-mean KL(p_T || q_S) over every response position of the full vocabulary, one AdamW update.
Ours is `train.step.build_train_step` with `Objective(prefix="dataset", kl="forward", estimator="exact")`
(the fused loss: no [B, L, V] logits); the baseline is the textbook PyTorch step used by GKD-style trainers:
`model(input_ids).logits` for both models, log-softmax, the KL, `loss.backward()`, fused `torch.optim.AdamW`.
Both read the same random Hugging Face checkpoints (made with torch, loaded into ours with `models.hf.load`)
and the same batch; the first step's loss is printed for both as a check. Precision: float32 master weights,
`--compute` dtype for matmuls (bfloat16: our `compute_dtype`, torch autocast). Times are the median of
`--repeats` updates after two warm-ups (ours: compile excluded). MFU counts `train.flops` (student
forward + backward, teacher forward) against `--peak-tflops` (H100 SXM dense bf16: 989).
"""

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

import timing
from kldistill_jax import objectives
from kldistill_jax.models import hf
from kldistill_jax.train import flops
from kldistill_jax.train.state import Split, init_state, split
from kldistill_jax.train.step import build_train_step

SHAPES = {  # name: (hidden, layers, heads, kv_heads, head_dim, intermediate), Qwen3 family shapes
    "0.6b": (1024, 28, 16, 8, 128, 3072),
    "1.7b": (2048, 28, 16, 8, 128, 6144),
    "tiny-s": (128, 2, 4, 2, 32, 384),
    "tiny-t": (256, 2, 4, 2, 64, 768),
}


def make_checkpoint(directory, shape, vocab, seed, device):
  hidden, layers, heads, kv_heads, head_dim, intermediate = SHAPES[shape]
  torch.manual_seed(seed)
  config = transformers.Qwen3Config(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=4096,
      tie_word_embeddings=False, torch_dtype="float32", attn_implementation="sdpa")
  with torch.device(device):
    model = transformers.Qwen3ForCausalLM(config)
  model.save_pretrained(directory)
  return model


def make_batch(batch, length, prompt, vocab):
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, (batch, length)).astype(np.int32)
  loss_mask = np.zeros((batch, length), np.int32)
  loss_mask[:, prompt:] = 1
  return {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": loss_mask}


def bench_ours(student_dir, teacher_dir, batch_np, compute, repeats):
  student = hf.load(student_dir, dtype="float32", compute_dtype=compute)
  teacher = hf.load(teacher_dir, dtype="float32", compute_dtype=compute)
  optimizer = optax.adamw(1e-5)
  model = split(student)
  state = jax.jit(lambda p: init_state(p, optimizer, 0))(model.params)
  step = build_train_step(student=Split(model.graphdef, None, model.rest),
                          objective=objectives.Objective(prefix="dataset", kl="forward", estimator="exact"),
                          optimizer=optimizer, micro_batches=1)
  batch = jax.tree.map(jnp.asarray, batch_np)
  teacher_split = split(teacher)
  holder = {"state": state}
  first_loss = []

  def run():
    holder["state"], metrics = step(holder["state"], batch, teacher_split)
    loss = float(metrics["loss"])  # device -> host: waits for the update
    first_loss.append(loss)

  seconds = timing.median_seconds(run, repeats, warmups=2)  # ours: compile; torch: allocator
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  return seconds, first_loss[0], peak, student.config, teacher.config


def bench_torch(student, teacher, batch_np, compute, repeats, device):
  tokens = torch.from_numpy(batch_np["tokens"].astype(np.int64)).to(device)
  mask = torch.from_numpy(batch_np["loss_mask"][:, 1:].astype(np.float32)).to(device)
  optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device == "cuda")
  teacher.eval()
  student.train()
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=compute == "bfloat16")
  first_loss = []
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()

  def run():
    with autocast:
      with torch.no_grad():
        t_logp = torch.log_softmax(teacher(tokens).logits[:, :-1].float(), dim=-1)
      s_logp = torch.log_softmax(student(tokens).logits[:, :-1].float(), dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    loss = (kl * mask).sum() / mask.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    first_loss.append(loss.item())  # waits for the update

  seconds = timing.median_seconds(run, repeats, warmups=2)  # ours: compile; torch: allocator
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return seconds, first_loss[0], peak


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--student", default="0.6b", choices=list(SHAPES))
  parser.add_argument("--teacher", default="1.7b", choices=list(SHAPES))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--prompt", type=int, default=256)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--compute", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--peak-tflops", type=float, default=989.0)
  parser.add_argument("--quick", action="store_true", help="tiny shapes, float32, vocab 4096")
  args = parser.parse_args()
  if args.quick:
    args.student, args.teacher, args.vocab, args.batch, args.length, args.prompt = \
        "tiny-s", "tiny-t", 4096, 4, 128, 32
    args.compute, args.repeats = "float32", 3
  device = "cuda" if torch.cuda.is_available() else "cpu"
  print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} ({device}), "
        f"transformers {transformers.__version__}")
  print(f"student {args.student}, teacher {args.teacher}, batch {args.batch} x {args.length} tokens "
        f"({args.length - args.prompt} trained per row), vocab {args.vocab}, compute {args.compute}, "
        f"median of {args.repeats}")
  batch_np = make_batch(args.batch, args.length, args.prompt, args.vocab)
  with tempfile.TemporaryDirectory() as s_dir, tempfile.TemporaryDirectory() as t_dir:
    torch_student = make_checkpoint(s_dir, args.student, args.vocab, 0, device)
    torch_teacher = make_checkpoint(t_dir, args.teacher, args.vocab, 1, device)
    # The baseline first, then its memory handed back, so the two allocators never hold memory at once.
    torch_s, torch_loss, torch_peak = bench_torch(torch_student, torch_teacher, batch_np, args.compute,
                                                  args.repeats, device)
    del torch_student, torch_teacher
    if device == "cuda":
      torch.cuda.empty_cache()
    ours_s, ours_loss, ours_peak, s_cfg, t_cfg = bench_ours(s_dir, t_dir, batch_np, args.compute, args.repeats)
  work = (flops.train_flops(s_cfg, args.batch, args.length) + flops.forward_flops(t_cfg, args.batch, args.length))
  tokens = args.batch * args.length

  def gib(b):
    return "-" if b is None else f"{b / 2**30:.2f}"

  def mfu(s):
    return f"{100 * work / s / (args.peak_tflops * 1e12):.1f}%" if device == "cuda" else "-"

  print(f"first-step loss: ours {ours_loss:.6f}, torch {torch_loss:.6f}")
  print("\n| side | s/update | tokens/s | MFU | peak memory GiB |")
  print("|---|---|---|---|---|")
  print(f"| ours (JAX, fused loss) | {ours_s:.4f} | {tokens / ours_s:,.0f} | {mfu(ours_s)} | {gib(ours_peak)} |")
  print(f"| PyTorch + transformers | {torch_s:.4f} | {tokens / torch_s:,.0f} | {mfu(torch_s)} | {gib(torch_peak)} |")
  print(f"\nours / baseline speed: {torch_s / ours_s:.2f}x")


if __name__ == "__main__":
  main()
