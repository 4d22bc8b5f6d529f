"""HF `config.json` <-> `ModelConfig` (+ the RTPurbo head plan and sparse settings).

Reads the transformers 5 layout (`rope_parameters` holding `rope_theta` and `rope_type`) and
the older one (top-level `rope_theta`, `rope_scaling` with `type` or `rope_type`). Writes both,
so that transformers 5 and older readers (RTP-LLM, vLLM) understand the file.

Families: LlamaForCausalLM (Llama 2/3/3.1, SmolLM2), Qwen2ForCausalLM (q/k/v bias),
Qwen3ForCausalLM (per-head q/k RMSNorm). Anything this project cannot represent exactly (o_proj or
MLP bias, sliding-window layers, yarn / dynamic rope, a non-SiLU MLP) is one ValueError.
"""

from __future__ import annotations

import dataclasses
import json
import os

from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ConfigError, ModelConfig, RopeScaling, SparseConfig

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_ARCH_OF = {v: k for k, v in ARCHITECTURES.items()}

# Our key in config.json holding the full SparseConfig, so that a save / load round trip keeps
# settings that headwise_config has no key for (mode, selector, sparse_prefill, ...).
SPARSE_KEY = "rtpurbo_sparse"


def read_config_json(folder: str) -> dict:
  """The parsed config.json of an HF model folder (FileNotFoundError / ValueError if bad)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"model folder {folder!r} does not exist")
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: an HF model folder needs a config.json")
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(d, dict):
    raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
  return d


def family_of(d: dict) -> str:
  """'llama' | 'qwen2' | 'qwen3' from `architectures` (or `model_type`)."""
  archs = d.get("architectures") or []
  for a in archs:
    if a in ARCHITECTURES:
      return ARCHITECTURES[a]
  mt = d.get("model_type")
  if not archs and mt in MODEL_TYPES:
    return MODEL_TYPES[mt]
  raise ConfigError(f"unsupported model: architectures={archs}, model_type={mt!r}; supported: "
                    f"{sorted(ARCHITECTURES)}")


def _rope(d: dict) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) from either config layout."""
  params = d.get("rope_parameters")
  legacy = d.get("rope_scaling")
  if isinstance(params, dict) and "rope_theta" in params:
    theta = params["rope_theta"]
    rope = params
  else:
    theta = d.get("rope_theta", 10000.0)
    rope = legacy or params or {}
  kind = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
  if kind in (None, "default"):
    return float(theta), None
  if kind == "linear":
    return float(theta), RopeScaling(rope_type="linear", factor=float(rope["factor"]))
  if kind == "llama3":
    try:
      return float(theta), RopeScaling(
          rope_type="llama3", factor=float(rope["factor"]),
          low_freq_factor=float(rope["low_freq_factor"]),
          high_freq_factor=float(rope["high_freq_factor"]),
          original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    except KeyError as e:
      raise ConfigError(f"rope scaling 'llama3' lacks the key {e.args[0]!r}") from None
  raise ConfigError(f"unsupported rope scaling type {kind!r} (supported: default, linear, "
                    "llama3)")


def model_config_from_hf(d: dict) -> ModelConfig:
  """ModelConfig from a parsed HF config.json."""
  family = family_of(d)
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"hidden_act={act!r}: only SiLU-gated MLPs are supported")
  if d.get("mlp_bias"):
    raise ConfigError("mlp_bias=true is not supported")
  if d.get("use_sliding_window"):
    raise ConfigError("use_sliding_window=true (sliding-window layers) is not supported")
  if family in ("llama", "qwen3") and d.get("attention_bias"):
    # HF adds a bias to o_proj as well in these families; the model has none.
    raise ConfigError(f"attention_bias=true is not supported for {family}")
  try:
    hidden = int(d["hidden_size"])
    heads = int(d["num_attention_heads"])
    kwargs = dict(
        vocab_size=int(d["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]), num_heads=heads)
  except KeyError as e:
    raise ConfigError(f"config.json lacks the key {e.args[0]!r}") from None
  theta, scaling = _rope(d)
  eos = d.get("eos_token_id")
  if isinstance(eos, list):
    eos = tuple(int(x) for x in eos) if len(eos) > 1 else (int(eos[0]) if eos else None)
  return ModelConfig(
      family=family,
      num_kv_heads=int(d.get("num_key_value_heads") or heads),
      head_dim=int(d.get("head_dim") or hidden // heads),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      qkv_bias=family == "qwen2",
      qk_norm=family == "qwen3",
      max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
      bos_token_id=d.get("bos_token_id"),
      eos_token_id=eos,
      **kwargs)


def check_representable(cfg: ModelConfig) -> None:
  """HF has no flag for q/k/v bias or q/k norm: they follow from the family."""
  want_bias, want_norm = cfg.family == "qwen2", cfg.family == "qwen3"
  if cfg.qkv_bias != want_bias or cfg.qk_norm != want_norm:
    raise ConfigError(
        f"family {cfg.family!r} with qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm} has no HF "
        f"equivalent (HF {_ARCH_OF[cfg.family]} has qkv_bias={want_bias}, qk_norm={want_norm})")


def hf_config_from_model(cfg: ModelConfig, dtype_name: str) -> dict:
  """An HF config.json dict that transformers loads into the same architecture."""
  check_representable(cfg)
  rope_params = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  legacy_scaling = None
  if cfg.rope_scaling is not None:
    legacy_scaling = {k: v for k, v in dataclasses.asdict(cfg.rope_scaling).items()
                      if cfg.rope_scaling.rope_type == "llama3" or k in ("rope_type", "factor")}
    rope_params.update(legacy_scaling)
  d = {
      "architectures": [_ARCH_OF[cfg.family]],
      "model_type": cfg.family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_embeddings,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": legacy_scaling,
      "rope_parameters": rope_params,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
                      else cfg.eos_token_id,
      "dtype": dtype_name,
      "torch_dtype": dtype_name,
  }
  if cfg.family in ("llama", "qwen3"):
    d["attention_bias"] = False
  if cfg.family == "llama":
    d["mlp_bias"] = False
  else:
    d["use_sliding_window"] = False
  return d


def sparse_from_hf(d: dict, cfg: ModelConfig, sparse: SparseConfig | None = None
                   ) -> tuple[HeadPlan | None, SparseConfig | None]:
  """(plan, sparse config) from `headwise_config`, or (None, sparse) when there is none.

  The sparse config is `sparse` if given; else our saved SparseConfig (SPARSE_KEY) updated with
  the headwise_config values (the file RTP-LLM users edit); else SparseConfig(mode="rtpurbo").
  """
  hw = d.get("headwise_config")
  if hw is None:
    return None, sparse
  if not isinstance(hw, dict):
    raise ConfigError(f"headwise_config must be a JSON object, got {type(hw).__name__}")
  plan, overrides = HeadPlan.from_headwise_config(hw, cfg.num_kv_heads)
  plan.check(cfg)
  if sparse is None:
    saved = d.get(SPARSE_KEY) or {"mode": "rtpurbo"}
    names = {f.name for f in dataclasses.fields(SparseConfig)}
    unknown = sorted(set(saved) - names)
    if unknown:
      raise ConfigError(f"{SPARSE_KEY} has unknown keys {unknown}")
    sparse = SparseConfig(**{**saved, **overrides})
  return plan, sparse


def sparse_to_hf(plan: HeadPlan, sparse: SparseConfig) -> dict:
  """The config.json keys describing an RTPurbo model: headwise_config + SPARSE_KEY."""
  return {"headwise_config": plan.to_headwise_config(sparse),
          SPARSE_KEY: dataclasses.asdict(sparse)}
