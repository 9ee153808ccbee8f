"""Benchmark: generated tokens per second, our in-JAX sampler vs transformers `generate` (PyTorch CPU).

Command:

    python bench/sampler.py                 # both sizes, greedy and sampled (~10-20 min on 2 CPU cores)
    python bench/sampler.py --quick         # tiny smoke run (seconds)

Both run on identical random weights: a random Qwen3 checkpoint is made with torch, saved with
`save_pretrained`, and loaded into our model with `kldistill_jax.models.hf.load`. Batch 8, prompt 64,
256 new tokens (EOS disabled on both sides so every row generates the full budget), sizes hidden 256 x 4
layers and hidden 1024 x 8 layers with a 32k vocabulary; greedy and sampled (temperature 1, no top-k /
top-p). `--dtype bfloat16` casts both sides' weights and activations to bfloat16 (the accelerator
setting); float32 runs both at full float32 precision (on a GPU, JAX's matmul precision is set to "highest",
as torch runs float32 matmuls without TF32 by default). Our time excludes compilation (one warm-up call per configuration, as a training loop amortises
it); both report the median of --repeats calls. Greedy outputs are compared token by token as a check.
"""

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import timing
from kldistill_jax import sampling
from kldistill_jax.models import hf

SIZES = {  # name: (hidden, layers, heads, kv_heads, head_dim, intermediate)
    "h256x4": (256, 4, 4, 2, 64, 768),
    "h1024x8": (1024, 8, 16, 8, 64, 3072),
}


def make_checkpoint(directory, size, vocab_size, seed, device, dtype):
  hidden, layers, heads, kv_heads, head_dim, intermediate = size
  torch.manual_seed(seed)
  config = transformers.Qwen3Config(
      vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
      max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="float32")
  model = transformers.Qwen3ForCausalLM(config).eval()
  model.save_pretrained(directory)
  return model.to(device=device, dtype=getattr(torch, dtype))


def bench_ours(model, prompts, new_tokens, greedy, repeats):
  prompt_tokens, prompt_mask = jnp.asarray(prompts), jnp.ones(prompts.shape, jnp.int32)
  run = lambda: jax.block_until_ready(sampling.sample(
      model, prompt_tokens, prompt_mask, rng=jax.random.key(0), max_new_tokens=new_tokens,
      temperature=0.0 if greedy else 1.0, bucket=False))
  out = run()  # compile
  return timing.median_seconds(run, repeats), np.asarray(out.tokens[:, prompts.shape[1]:])


def bench_transformers(model, prompts, new_tokens, greedy, repeats):
  inputs = torch.from_numpy(prompts.astype(np.int64)).to(model.device)
  kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=not greedy,
                pad_token_id=0, eos_token_id=None)
  if not greedy:
    kwargs.update(temperature=1.0, top_k=0, top_p=1.0)

  def run():
    with torch.no_grad():
      # .cpu() waits for the GPU, so the time covers the whole generation
      return model.generate(inputs, attention_mask=torch.ones_like(inputs), **kwargs).cpu()

  out = run()  # warm-up, as for ours
  return timing.median_seconds(run, repeats), out[:, prompts.shape[1]:].numpy()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--quick", action="store_true", help="tiny run: vocab 1024, 32 new tokens")
  args = parser.parse_args()
  if args.quick:
    args.vocab, args.new_tokens, args.prompt, args.repeats, args.sizes = 1024, 32, 16, 1, ["h256x4"]
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda" and args.dtype == "float32":
    jax.config.update("jax_default_matmul_precision", "highest")  # torch's float32 matmuls use no TF32

  print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} ({device}, "
        f"{torch.get_num_threads()} threads), transformers {transformers.__version__}, {args.dtype}")
  print(f"batch {args.batch}, prompt {args.prompt}, new tokens {args.new_tokens}, vocab {args.vocab}, "
        f"median of {args.repeats}")
  rows = []
  for name in args.sizes:
    with tempfile.TemporaryDirectory() as directory:
      torch_model = make_checkpoint(directory, SIZES[name], args.vocab, 0, device, args.dtype)
      ours = hf.load(directory, dtype=args.dtype, compute_dtype=args.dtype)
    prompts = np.random.default_rng(0).integers(1, args.vocab, (args.batch, args.prompt))
    generated = args.batch * args.new_tokens
    for mode in ("greedy", "sampled"):
      ours_s, ours_tokens = bench_ours(ours, prompts, args.new_tokens, mode == "greedy", args.repeats)
      hf_s, hf_tokens = bench_transformers(torch_model, prompts, args.new_tokens, mode == "greedy",
                                           args.repeats)
      agree = f"{np.mean(ours_tokens == hf_tokens):.3f}" if mode == "greedy" else "-"
      rows.append((name, mode, generated / ours_s, generated / hf_s, hf_s / ours_s, agree))
      print(f"  {name} {mode}: ours {ours_s:.2f}s, transformers {hf_s:.2f}s", flush=True)

  print("\n| size | mode | ours tok/s | transformers tok/s | ours / transformers | greedy tokens equal |")
  print("|---|---|---|---|---|---|")
  for name, mode, ours_tps, hf_tps, ratio, agree in rows:
    print(f"| {name} | {mode} | {ours_tps:,.0f} | {hf_tps:,.0f} | {ratio:.2f}x | {agree} |")


if __name__ == "__main__":
  main()
