"""`to_rtpurbo`: rebuild a model with a head plan, an indexer and a sparse mode;
`rebuild`: the same backbone with another plan, sparse config or kernel config.

The backbone weights are shared by value with the source model (no copy of the arrays);
indexer weights come from `indexer`, from the source model when its plan matches, or from
the rotary initialisation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.config import KernelConfig
from rtpurbo_jax.attention.indexer import IndexerParam, rotary_init
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ConfigError, SparseConfig
from rtpurbo_jax.models.transformer import Transformer

IndexerWeights = dict[int, tuple]  # layer -> (W_q [n_ret, r, d], W_k [n_ret, r, d])


def backbone_state(model: Transformer):
  """Every parameter except the indexer."""
  return nnx.state(model, nnx.All(nnx.Param, nnx.Not(IndexerParam)))


def indexer_weights(model: Transformer) -> IndexerWeights:
  """{layer: (W_q, W_k)} for layers with retrieval heads."""
  out = {}
  for i, layer in enumerate(model.layers):
    attn = layer.attn
    if attn.heads.retrieval:
      out[i] = (attn.indexer_wq[...], attn.indexer_wk[...])
  return out


def set_indexer(model: Transformer, weights: IndexerWeights) -> None:
  for i, layer in enumerate(model.layers):
    attn = layer.attn
    n = len(attn.heads.retrieval)
    if not n:
      if i in weights and len(weights[i][0]):
        raise ConfigError(f"indexer has weights for layer {i}, which has no retrieval heads")
      continue
    if i not in weights:
      raise ConfigError(f"indexer has no weights for layer {i} ({n} retrieval heads)")
    wq, wk = weights[i]
    want = attn.indexer_wq[...].shape
    for name, w in (("W_q", wq), ("W_k", wk)):
      if tuple(w.shape) != tuple(want):
        raise ConfigError(f"indexer {name} of layer {i} has shape {tuple(w.shape)}, "
                          f"expected {tuple(want)} (retrieval heads x indexer_dim x head_dim)")
    attn.indexer_wq[...] = jnp.asarray(wq, attn.indexer_wq[...].dtype)
    attn.indexer_wk[...] = jnp.asarray(wk, attn.indexer_wk[...].dtype)


def distance_biases(model: Transformer) -> dict[int, jax.Array]:
  """{layer: distance bias [n_ret, distance_buckets]} for layers with retrieval heads; empty
  when the model's sparse config has no distance bias."""
  return {i: layer.attn.distance_bias for i, layer in enumerate(model.layers)
          if layer.attn.heads.retrieval and layer.attn.distance_bias is not None}


def set_distance_bias(model: Transformer, biases: dict) -> None:
  """Set every retrieval layer's distance bias ({layer: [n_ret, distance_buckets]})."""
  for i, layer in enumerate(model.layers):
    attn = layer.attn
    if not attn.heads.retrieval:
      continue
    if attn.distance_bias is None:
      raise ConfigError("the model has no distance bias (sparse.distance_buckets=0)")
    if i not in biases:
      raise ConfigError(f"no distance bias for layer {i}")
    want = tuple(attn.indexer_bias.shape)
    if tuple(np.shape(biases[i])) != want:
      raise ConfigError(f"distance bias of layer {i} has shape {tuple(np.shape(biases[i]))}, "
                        f"expected {want} (retrieval heads x distance_buckets)")
    attn.indexer_bias.set_value(jnp.asarray(biases[i], jnp.float32))


def scale_indexer_queries(model: Transformer, scale: float) -> Transformer:
  """Multiply every layer's indexer W_q by `scale` in place (scores scale by it: a sharper or
  flatter top-p selection, e.g. a synthetic selection on random weights). Returns `model`."""
  if scale != 1.0:
    set_indexer(model, {i: (wq * scale, wk) for i, (wq, wk) in indexer_weights(model).items()})
  return model


def rebuild(model: Transformer, *, plan: HeadPlan | None = None,
            sparse: SparseConfig | None = None,
            kernels: KernelConfig | None = None) -> Transformer:
  """A new Transformer with another plan / sparse config / kernel config (None: the source
  model's) and the same backbone weights.

  Built abstractly (no second copy of the backbone is allocated); the indexer is the
  source model's when the plan and width match, otherwise the rotary initialisation (the
  distance bias likewise, when its buckets match too, otherwise zero).
  Another kernel config alone gives the same model with another graph definition: its jitted
  programs are traced (and compiled) afresh with those kernels.
  """
  plan = plan or model.plan
  sparse = sparse or model.sparse
  kernels = kernels or model.kernels
  plan.check(model.cfg)
  new = nnx.eval_shape(lambda: Transformer(model.cfg, sparse=sparse, plan=plan,
                                           dtype=model.dtype, rngs=nnx.Rngs(0),
                                           kernels=kernels))
  nnx.update(new, backbone_state(model))
  same = plan == model.plan and sparse.indexer_dim == model.sparse.indexer_dim
  ws = indexer_weights(model) if same else {}
  for i, layer in enumerate(new.layers):
    n = len(layer.attn.heads.retrieval)
    if n and i not in ws:
      w = rotary_init(n, sparse.indexer_dim, model.cfg.head_dim)
      ws[i] = (w, w)
  # The distance bias carries over with the indexer when its buckets match; else it starts
  # at zero (no prior).
  biases = distance_biases(model) if (
      same and sparse.distance_buckets == model.sparse.distance_buckets) else {}
  for i, layer in enumerate(new.layers):
    if i in ws:
      layer.attn.indexer_wq.set_value(jnp.asarray(ws[i][0], jnp.float32))
      layer.attn.indexer_wk.set_value(jnp.asarray(ws[i][1], jnp.float32))
    if layer.attn.heads.retrieval and sparse.distance_buckets:
      bias = biases.get(i, jnp.zeros(layer.attn.indexer_bias.shape, jnp.float32))
      layer.attn.indexer_bias.set_value(jnp.asarray(bias, jnp.float32))
  return new


def to_rtpurbo(model: Transformer, plan: HeadPlan, indexer: IndexerWeights | None = None, *,
               window: int | None = None, sinks: int = 4, top_p: float = 0.9,
               block_size: int = 64, seqlen_threshold: int = 16384, mode: str = "rtpurbo",
               **sparse_overrides) -> Transformer:
  """Return the RTPurbo version of `model` (same `__call__`; works with `generate`), with
  the source model's kernel config.

  Args:
    plan: retrieval/local heads (e.g. from `calibrate`).
    indexer: {layer: (W_q, W_k)}; default: the source model's (same plan) or rotary init.
    window: local-head window (default: the source model's sparse config, 8192).
    mode: "rtpurbo" | "dense" | "streaming" | "topk".
  """
  base = model.sparse
  sparse = dataclasses.replace(
      base, mode=mode, window=base.window if window is None else window, sinks=sinks,
      top_p=top_p, block_size=block_size, seqlen_threshold=seqlen_threshold,
      **sparse_overrides)
  new = rebuild(model, plan=plan, sparse=sparse)
  if indexer is not None:
    set_indexer(new, indexer)
  return new
