"""Configuration: the model architecture, the RTPurbo attention knobs, and the run schema.

Everything a user can set is data. `ModelConfig` and `SparseConfig` are frozen
dataclasses (hashable, so they can be static arguments of jitted functions);
`run_config()` is the ml_collections schema that `configs/*.py` fill in and that
`train.py` / `infer.py` override with `--config.a.b=v`. `validate()` gives one
clear error for an unknown key or an invalid value.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

MODES = ("rtpurbo", "dense", "streaming", "topk")
FAMILIES = ("llama", "qwen2", "qwen3")


class ConfigError(ValueError):
  """A configuration key or value is invalid. The message says which and why."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """`llama3` rope scaling (Llama 3.1), or `linear`. Mirrors HF `rope_scaling`."""

  rope_type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder architecture (Llama 2/3/3.1, Qwen2, Qwen3, SmolLM2)."""

  family: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ConfigError(f"model.family={self.family!r}: expected one of {FAMILIES}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"model.{name}={getattr(self, name)} must be positive")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"model.num_heads={self.num_heads} is not a multiple of "
          f"model.num_kv_heads={self.num_kv_heads} (GQA needs whole groups)")
    if self.head_dim % 2:
      raise ConfigError(f"model.head_dim={self.head_dim} must be even for RoPE")

  @property
  def group_size(self) -> int:
    """Query heads per KV head."""
    return self.num_heads // self.num_kv_heads

  def kv_head_of(self, q_head: int) -> int:
    return q_head // self.group_size

  def num_params(self) -> int:
    e, h, k, d, m = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                     self.intermediate_size)
    attn = e * h * d * 2 + e * k * d * 2 + (h + 2 * k) * d * self.qkv_bias
    per_layer = attn + 3 * e * m + 2 * e + 2 * d * self.qk_norm
    emb = self.vocab_size * e * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + emb + e


@dataclasses.dataclass(frozen=True)
class SparseConfig:
  """RTPurbo attention knobs (docs/DESIGN.md §1). `mode='dense'` is plain attention."""

  mode: str = "dense"
  window: int = 8192
  sinks: int = 4
  top_p: float = 0.9
  block_size: int = 64
  seqlen_threshold: int = 16384
  indexer_dim: int = 16
  topk_tokens: int = 4096
  sparse_prefill: bool = False
  # Decode selection: "exact" (the contract) or "histogram" (a superset, 256 bins).
  selector: str = "exact"
  # A floor under top-p (beyond the paper, 0 = off): a selected head also reads the
  # `min_blocks` heaviest blocks, so a head whose indexer mass piles on a few blocks (the
  # sink block) still reads more than those. Decode-style selection only.
  min_blocks: int = 0
  # A learned recency prior (beyond the paper, 0 = off): each selected head adds
  # bias[head, bucket] to the indexer log-mass of every key block, bucket 0 for the query's
  # own block and 1 + floor(log2(blocks back)) beyond, capped at `distance_buckets - 1`
  # (`indexer.distance_bucket`). The bias is an indexer parameter, trained in stage 1.
  # Decode-style selection only (top-p, its floor, top-k).
  distance_buckets: int = 0
  # Query rows per chunk in the reference attention (memory O(S x chunk)).
  chunk_size: int = 512

  def __post_init__(self):
    if self.mode not in MODES:
      raise ConfigError(f"sparse.mode={self.mode!r}: expected one of {MODES}")
    if self.window < 1:
      raise ConfigError(f"sparse.window={self.window} must be >= 1")
    if self.sinks < 0:
      raise ConfigError(f"sparse.sinks={self.sinks} must be >= 0")
    if not 0.0 < self.top_p:
      raise ConfigError(f"sparse.top_p={self.top_p} must be > 0 (>= 1 selects everything)")
    if self.block_size < 1 or self.block_size & (self.block_size - 1):
      raise ConfigError(f"sparse.block_size={self.block_size} must be a power of two")
    if self.seqlen_threshold < 0:
      raise ConfigError(f"sparse.seqlen_threshold={self.seqlen_threshold} must be >= 0")
    if self.indexer_dim < 1:
      raise ConfigError(f"sparse.indexer_dim={self.indexer_dim} must be >= 1")
    if self.topk_tokens < 1:
      raise ConfigError(f"sparse.topk_tokens={self.topk_tokens} must be >= 1")
    if self.selector not in ("exact", "histogram"):
      raise ConfigError(f"sparse.selector={self.selector!r}: expected 'exact' or 'histogram'")
    if self.chunk_size < 1:
      raise ConfigError(f"sparse.chunk_size={self.chunk_size} must be >= 1")
    if self.min_blocks < 0:
      raise ConfigError(f"sparse.min_blocks={self.min_blocks} must be >= 0 (0: no floor)")
    if self.min_blocks and self.sparse_prefill:
      raise ConfigError("sparse.min_blocks is a floor under the decode-style selection; "
                        "sparse_prefill's per-query-block selection does not take it: with "
                        "sparse_prefill=True set sparse.min_blocks=0 (configs/smollm2_135m.py "
                        "sets 8)")
    if self.distance_buckets < 0:
      raise ConfigError(f"sparse.distance_buckets={self.distance_buckets} must be >= 0 "
                        "(0: no distance bias)")
    if self.distance_buckets and self.sparse_prefill:
      raise ConfigError("sparse.distance_buckets (the indexer's distance bias) applies to the "
                        "decode-style selection; sparse_prefill's per-query-block kernels do "
                        "not take it: with sparse_prefill=True set sparse.distance_buckets=0")

  @property
  def ring_capacity(self) -> int:
    """Slots of a local-only KV head's ring buffer (sinks included).

    Holds sinks + window tokens, and never fewer than `seqlen_threshold` so that the
    dense fallback below the threshold still sees every token.
    """
    return max(self.sinks + self.window, self.seqlen_threshold)


# ---------------------------------------------------------------------------
# Sizes such as "4K", "128K", "1M".

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_size(text: str | int) -> int:
  """'4K' -> 4096, '1M' -> 1048576, '8192' -> 8192 (binary K/M, like context sizes)."""
  if isinstance(text, int):
    return text
  m = _SIZE.match(str(text))
  if not m:
    raise ConfigError(f"cannot read size {text!r}: use e.g. 4096, 4K, 128K or 1M")
  value, unit = float(m.group(1)), m.group(2).upper()
  return int(value * {"": 1, "K": 1024, "M": 1024 * 1024}[unit])


# ---------------------------------------------------------------------------
# The run schema shared by configs/*.py, train.py and infer.py.


def run_config():
  """The full schema with defaults. `configs/*.py` start from this and override."""
  import ml_collections

  c = ml_collections.ConfigDict()
  c.name = "run"
  # A local HF folder, a registered name ("smollm2-135m", "smollm2-135m-rtpurbo"), or
  # "" for random init from `c.model`.
  c.model_path = ""
  c.dtype = "float32"  # parameter dtype: float32 | bfloat16
  c.seed = 0
  c.model = ml_collections.ConfigDict(
      {f.name: _schema_default(f) for f in dataclasses.fields(ModelConfig)})
  c.sparse = ml_collections.ConfigDict(
      {f.name: f.default for f in dataclasses.fields(SparseConfig)})
  c.plan = ml_collections.ConfigDict({
      "retrieval_ratio": 0.15,
      "path": "",  # a headwise_config JSON or a model folder with one
  })
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "context": 1})
  c.infer = ml_collections.ConfigDict({
      "model": "",  # what infer.py runs: an HF folder or registered name; "" = model_path
      "ctx": "4K",
      "max_new_tokens": 64,
      "temperature": 0.0,
      "top_k": 0,
      "top_p": 1.0,
      "prefill_chunk": 4096,
      "batch": 1,
  })
  c.train = ml_collections.ConfigDict({
      "stages": "calibrate,stage1,stage2",  # any of calibrate, stage1, stage2, lm, in order
      "workdir": "workdir",
      "log_every": 10,
      "checkpoint_every": 100,
      "keep_checkpoints": 3,
      "async_checkpoint": True,
      "progress": True,
      "remat": True,  # per-layer rematerialisation in stage 2 / lm
      "save_final": True,  # write <workdir>/final (HF format + headwise_config + indexer)
      "calibrate": {"length": 4096, "needle_len": 64, "seed": 0},
      # docs/METHOD.md §4: one long sequence per step; KL over query chunks, optional subsampling.
      # objective: "token" (the method's KL over keys) or "block" (KL of per-block masses).
      "stage1": _train_stage(steps=600, lr=1e-3, warmup=100, schedule="cosine", batch_size=1,
                             seq_len=32768, query_chunk=256, query_fraction=1.0,
                             query_min_pos=0, stats_stride=8, objective="token",
                             # The indexer's distance bias (sparse.distance_buckets > 0) at
                             # its own peak rate, same schedule, no weight decay: a bias of
                             # order 1 is out of reach of W's rate in a few hundred steps.
                             bias_lr=0.1),
      # docs/METHOD.md §4: top-10 KL on label tokens, global batch 8 by accumulation.
      # lora_rank 0: every backbone weight is trained (the paper); r > 0: only rank-r LoRA
      # factors of the attention / MLP weights (scale lora_alpha / r), plus full deltas of
      # the 1-D weights (norm gains) when lora_norms, so the result saves as a small
      # backbone delta (rtpurbo_jax/lowrank.py). LoRA usually wants a larger lr than 3e-6.
      # windows: every whole seq_len window of a text is an example (False: its first only);
      # max_examples > 0 keeps that many, spread evenly over the data.
      "stage2": _train_stage(steps=600, lr=3e-6, warmup=200, schedule="constant",
                             batch_size=8, seq_len=32768, topk=10, label_tokens=300,
                             windows=True, max_examples=0, teacher_batch=1, position_chunk=512,
                             lora_rank=0, lora_alpha=16.0, lora_norms=True),
      "lm": _train_stage(steps=1000, lr=1e-5, warmup=100, schedule="cosine", batch_size=8,
                         seq_len=4096, position_chunk=512),
  })
  c.data = ml_collections.ConfigDict({
      "train_files": "",  # comma-separated .txt / .jsonl paths or globs; "shakespeare"
      "stage2_files": "",  # "" = train_files
      "filler_files": "",  # calibration filler text; "" = Shakespeare (rtpurbo_jax.assets)
      "tokenizer": "",  # "" = the model's; "byte"; "hash:<vocab>"; a tokenizer folder
      "text_key": "text",
      "prompt_key": "prompt",
      "response_key": "response",
      "add_eos": True,
      "seed": 0,
  })
  # `python -m rtpurbo_jax.eval`: sizes like "4K", comma-separated lists.
  c.eval = ml_collections.ConfigDict({
      "model": "",  # what is evaluated: an HF folder or registered name; "" = model_path
      # The weights of the dense and streaming modes (rtpurbo / topk run `model`); "" = model.
      "baseline_model": "",
      "lengths": "2K,4K",
      "modes": "dense,rtpurbo,streaming,topk",
      "tasks": "passkey,niah_single,niah_multikey,niah_multivalue,variable_tracking,"
               "common_words",
      "samples": "2",  # per task: one count, or one per length ("4,2,1")
      "depths": "0.1,0.5,0.9",
      "seed": 0,
      "out_dir": "eval_results",
      "ppl_length": "",  # "" = every eval length; else sizes, e.g. "8K"
      "ppl_samples": 1,  # held-out windows per length (>= 2 for a bootstrap interval)
      # The perplexity text: "plays" = the held-out plays (assets.HELDOUT_PLAYS), "moby_dick" =
      # Melville's Moby-Dick, a text nothing in the project was fitted or chosen on.
      "ppl_text": "plays",
      "sparsity_queries": 32,
      "batch": 1,  # task prompts per batch (all tasks of a length mixed, one padded shape)
      "prefill_chunk": 1024,
      # topk's tokens per retrieval head: "binding" = what rtpurbo reads at that length
      # (measured first, rounded up to whole blocks), or a fixed count like "4K".
      "topk_budget": "binding",
      "decode_steps": 0,  # greedy steps per prompt; 0 = the longest answer of the tasks
      # A results.json to rerun (its recorded config, plan and settings) and check against:
      # identical predictions, perplexities to 1e-4 relative.
      "reproduce": "",
  })
  # Locked: a config file or a --config.x=v override naming an unknown key is an error.
  c.lock()
  return c


def _train_stage(**overrides) -> dict:
  """One training stage's knobs: AdamW + warmup schedule (docs/METHOD.md §4) and batch shape."""
  d = {"steps": 600, "lr": 1e-3, "warmup": 100, "schedule": "cosine", "min_lr_ratio": 0.0,
       "weight_decay": 0.01, "clip": 1.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
       "batch_size": 1, "micro_batch": 1, "seq_len": 4096}
  d.update(overrides)
  return d


def _schema_default(field: dataclasses.Field) -> Any:
  if field.name == "rope_scaling":
    import ml_collections
    d = ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(RopeScaling)})
    d.rope_type = ""  # "" = no scaling
    return d
  if field.name == "eos_token_id":
    return -1
  if field.name == "bos_token_id":
    return -1
  return field.default


def model_config_from(cfg) -> ModelConfig:
  """ModelConfig from the `model` section of a run config (ConfigDict or dict)."""
  d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  rs = d.pop("rope_scaling", None)
  rope = None
  if rs and rs.get("rope_type"):
    rope = RopeScaling(**rs)
  bos = d.pop("bos_token_id", -1)
  eos = d.pop("eos_token_id", -1)
  return ModelConfig(rope_scaling=rope, bos_token_id=None if bos in (-1, None) else bos,
                     eos_token_id=None if eos in (-1, None) else eos, **d)


def sparse_config_from(cfg) -> SparseConfig:
  d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  return SparseConfig(**d)


def validate(cfg) -> None:
  """One clear error for any invalid value in a run config."""
  if cfg.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"dtype={cfg.dtype!r}: expected 'float32' or 'bfloat16'")
  if not cfg.model_path:
    model_config_from(cfg.model)
  sparse_config_from(cfg.sparse)
  if not 0.0 < cfg.plan.retrieval_ratio <= 1.0:
    raise ConfigError(f"plan.retrieval_ratio={cfg.plan.retrieval_ratio} must be in (0, 1]")
  parse_size(cfg.infer.ctx)
  for axis in ("data", "fsdp", "tensor", "context"):
    v = cfg.mesh[axis]
    if v == 0 or v < -1:
      raise ConfigError(f"mesh.{axis}={v}: use a positive size or -1 (all remaining devices)")
