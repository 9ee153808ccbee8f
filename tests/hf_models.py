"""Random tiny Hugging Face checkpoints, built locally with torch (nothing is downloaded)."""

import numpy as np
import torch
import transformers

# Small but not degenerate: GQA ratio 4, head_dim != hidden / heads (Qwen3), every dimension divisible by 2
# so a (2, 2, 2) mesh really shards them.
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2)

_CLASSES = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}


def make_model(family, seed=0, **overrides):
  """A random eval-mode float32 transformers model: std-0.2 weights, and norm scales and biases that are
  random too (at init they are 1 and 0, which would hide a swapped or dropped tensor)."""
  config_class, model_class = _CLASSES[family]
  kwargs = {**TINY, "initializer_range": 0.2, **overrides}
  config = config_class(**kwargs)
  config._attn_implementation = "eager"  # pylint: disable=protected-access  (the reference math)
  torch.manual_seed(seed)
  model = model_class(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight"):
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      elif name.endswith(".bias"):
        param.copy_(0.2 * torch.randn_like(param))
  return model


def save_model(model, directory, **kwargs):
  model.save_pretrained(str(directory), **kwargs)
  return directory


def batch(vocab_size, seed=0, length=12):
  """(tokens, mask, positions) int64 numpy [3, length]: an unpadded row, a left-padded and a right-padded one.

  positions = cumsum(mask) - 1 clipped at 0, as a sampler gives them for left-padded prompts.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab_size, size=(3, length))
  mask = np.ones((3, length), np.int64)
  mask[1, :4] = 0   # left padding
  mask[2, -5:] = 0  # right padding
  tokens = np.where(mask == 1, tokens, 0)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return tokens, mask, positions


def torch_logits(model, tokens, mask, positions):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                position_ids=torch.as_tensor(positions))
  return out.logits.float().numpy()
