"""Tiny random HF models built with transformers (torch, CPU, float32): the oracles for the
weight import and reusable fixtures for any test that needs a model folder.

    folder, hf_model = make_hf_folder(tmp_path / "m", "llama", tie=False, seed=0)
    ours = rtpurbo_jax.from_pretrained(folder)
    np.testing.assert_allclose(np.asarray(ours(ids)), hf_logits(hf_model, ids), atol=1e-4)

Every parameter is random (norm scales around 1, q/k/v biases non-zero), so a wrong mapping of
any tensor changes the logits. `init_std` (HF `initializer_range`) is raised to 0.2 by default
so that attention is sharp rather than near-uniform.
"""

from __future__ import annotations

import os

import numpy as np

# Small enough for CPU tests, with GQA (4 query / 2 KV heads) and head_dim != hidden / heads.
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)

# llama3 scaling with a short original context so that, at head_dim 16 and theta 1e4, some
# frequencies are scaled, some interpolated and some untouched.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def hf_config(family: str, *, tie: bool = False, init_std: float = 0.2, rope_scaling=True,
              **overrides):
  """A transformers config for a tiny model of `family` ('llama' | 'qwen2' | 'qwen3')."""
  import transformers

  kw = dict(TINY, tie_word_embeddings=tie, initializer_range=init_std,
            attn_implementation="eager")
  if family == "llama":
    cls = transformers.LlamaConfig
    if rope_scaling:
      kw["rope_parameters"] = dict(LLAMA3_ROPE)
  elif family == "qwen2":
    cls = transformers.Qwen2Config
  elif family == "qwen3":
    cls = transformers.Qwen3Config
  else:
    raise ValueError(f"unknown family {family!r}")
  kw.update(overrides)
  return cls(**kw)


def build_hf_model(family: str, *, tie: bool = False, seed: int = 0, init_std: float = 0.2,
                   **config_overrides):
  """A random transformers CausalLM (eval mode, float32) with every parameter randomised."""
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()
  cfg = hf_config(family, tie=tie, init_std=init_std, **config_overrides)
  cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
         "qwen3": transformers.Qwen3ForCausalLM}[family]
  torch.manual_seed(seed)
  model = cls(cfg).eval().to(torch.float32)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
      elif name.endswith(".bias"):
        p.copy_(init_std * torch.randn(p.shape, generator=gen))
  return model


def make_hf_folder(path, family: str = "llama", *, tie: bool = False, seed: int = 0,
                   init_std: float = 0.2, max_shard_size=None, **config_overrides):
  """Build a random HF model and save it at `path` (config.json + safetensors).

  max_shard_size: e.g. "20KB" to get a sharded model.safetensors.index.json.
  Returns (path as str, the torch model).
  """
  model = build_hf_model(family, tie=tie, seed=seed, init_std=init_std, **config_overrides)
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(os.fspath(path), **kw)
  return os.fspath(path), model


def hf_logits(model, input_ids) -> np.ndarray:
  """float32 logits [batch, seq, vocab] of a transformers model on int ids [batch, seq]."""
  import torch

  with torch.no_grad():
    out = model(torch.tensor(np.array(input_ids), dtype=torch.long))
  return out.logits.float().numpy()
