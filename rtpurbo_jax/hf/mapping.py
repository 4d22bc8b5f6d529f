"""HF tensor names <-> this project's parameters: one table per family.

Each `Entry` names an HF tensor, the parameter path in `Transformer` (dots; digits index
`layers`), and how the layout differs:
  COPY    same shape (embeddings, norm scales);
  FLAT    HF keeps a flat vector, we keep [heads, head_dim] (q/k/v bias);
  LINEAR  a torch Linear weight [out, in]; ours is [*in_dims, *out_dims] with `n_in` leading
          input dims, e.g. q_proj [embed, heads, head_dim] (n_in=1) and o_proj
          [heads, head_dim, embed] (n_in=2). to_ours: reshape(out, in).T.reshape(ours).
Indexer tensors (RTPurbo) are not in these tables: they depend on the head plan (see api.py).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from rtpurbo_jax.config import ModelConfig

COPY, FLAT, LINEAR = "copy", "flat", "linear"


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str  # HF tensor name; "{i}" = layer index
  ours: str  # parameter path in Transformer; "{i}" = layer index
  kind: str = COPY
  n_in: int = 1  # LINEAR only: number of leading input dims of our parameter

  def at(self, i: int) -> "Entry":
    return dataclasses.replace(self, hf=self.hf.format(i=i), ours=self.ours.format(i=i))

  def hf_shape(self, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that corresponds to our parameter shape."""
    if self.kind == COPY:
      return tuple(ours_shape)
    if self.kind == FLAT:
      return (math.prod(ours_shape),)
    return (math.prod(ours_shape[self.n_in:]), math.prod(ours_shape[:self.n_in]))

  def to_ours(self, x: np.ndarray, ours_shape: tuple[int, ...]) -> np.ndarray:
    """HF array (already checked to have `hf_shape`) -> our layout."""
    if self.kind == LINEAR:
      x = x.T
    return x.reshape(ours_shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    """Our array -> HF layout (contiguous)."""
    if self.kind == COPY:
      return np.ascontiguousarray(x)
    if self.kind == FLAT:
      return np.ascontiguousarray(x.reshape(-1))
    n_in = math.prod(x.shape[:self.n_in])
    return np.ascontiguousarray(x.reshape(n_in, -1).T)


_LAYER = "model.layers.{i}."
_OURS = "layers.{i}."

LLAMA_GLOBAL = (
    Entry("model.embed_tokens.weight", "embed", COPY),
    Entry("model.norm.weight", "final_norm.scale", COPY),
)
LM_HEAD = Entry("lm_head.weight", "lm_head", LINEAR)

LLAMA_LAYER = (
    Entry(_LAYER + "input_layernorm.weight", _OURS + "input_norm.scale", COPY),
    Entry(_LAYER + "post_attention_layernorm.weight", _OURS + "post_attn_norm.scale", COPY),
    Entry(_LAYER + "self_attn.q_proj.weight", _OURS + "attn.q_proj", LINEAR),
    Entry(_LAYER + "self_attn.k_proj.weight", _OURS + "attn.k_proj", LINEAR),
    Entry(_LAYER + "self_attn.v_proj.weight", _OURS + "attn.v_proj", LINEAR),
    Entry(_LAYER + "self_attn.o_proj.weight", _OURS + "attn.o_proj", LINEAR, n_in=2),
    Entry(_LAYER + "mlp.gate_proj.weight", _OURS + "mlp.gate", LINEAR),
    Entry(_LAYER + "mlp.up_proj.weight", _OURS + "mlp.up", LINEAR),
    Entry(_LAYER + "mlp.down_proj.weight", _OURS + "mlp.down", LINEAR),
)
QWEN2_LAYER = LLAMA_LAYER + (
    Entry(_LAYER + "self_attn.q_proj.bias", _OURS + "attn.q_bias", FLAT),
    Entry(_LAYER + "self_attn.k_proj.bias", _OURS + "attn.k_bias", FLAT),
    Entry(_LAYER + "self_attn.v_proj.bias", _OURS + "attn.v_bias", FLAT),
)
QWEN3_LAYER = LLAMA_LAYER + (
    Entry(_LAYER + "self_attn.q_norm.weight", _OURS + "attn.q_norm.scale", COPY),
    Entry(_LAYER + "self_attn.k_norm.weight", _OURS + "attn.k_norm.scale", COPY),
)

TABLES = {"llama": LLAMA_LAYER, "qwen2": QWEN2_LAYER, "qwen3": QWEN3_LAYER}

# Tensors some HF checkpoints carry that hold nothing the model needs.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# RTPurbo indexer tensors: [n_retrieval_heads_of_layer, r, head_dim], float32.
INDEXER = (
    Entry(_LAYER + "self_attn.indexer.wq", _OURS + "attn.indexer_wq", COPY),
    Entry(_LAYER + "self_attn.indexer.wk", _OURS + "attn.indexer_wk", COPY),
)


def entries(cfg: ModelConfig) -> list[Entry]:
  """Every backbone tensor of a model with this config, layer indices filled in."""
  out = list(LLAMA_GLOBAL)
  if not cfg.tie_embeddings:
    out.append(LM_HEAD)
  for i in range(cfg.num_layers):
    out.extend(e.at(i) for e in TABLES[cfg.family])
  return out


# The indexer's distance bias (`SparseConfig.distance_buckets` > 0): [n_retrieval_heads_of_layer,
# distance_buckets], float32.
DISTANCE_BIAS = Entry(_LAYER + "self_attn.indexer.distance_bias", _OURS + "attn.indexer_bias",
                      COPY)


def indexer_entries(layers_with_retrieval) -> list[Entry]:
  return [e.at(i) for i in layers_with_retrieval for e in INDEXER]


def distance_bias_entries(layers_with_retrieval) -> list[Entry]:
  return [DISTANCE_BIAS.at(i) for i in layers_with_retrieval]
