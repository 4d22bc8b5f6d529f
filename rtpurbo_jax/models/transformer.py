"""The decoder (Llama 2/3/3.1, Qwen2, Qwen3, SmolLM2) in flax.nnx.

Every layer's attention is a `MixedHeadAttention`; with `SparseConfig(mode="dense")` (the
default) the model is the plain full-attention decoder.

Shapes: input_ids [batch, seq] int32 -> logits [batch, seq, vocab] float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import config as kernel_config
from pallas_kernels.config import KernelConfig
from rtpurbo_jax.attention import cache as cache_lib
from rtpurbo_jax.attention.mixed import MixedHeadAttention
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.models.layers import MLP, RMSNorm, param, rope_inv_freq

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype):
  return DTYPES[dtype] if isinstance(dtype, str) else dtype


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, sparse: SparseConfig, plan: HeadPlan, layer: int, *,
               dtype, rngs: nnx.Rngs, init_std: float, kernels: KernelConfig):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.attn = MixedHeadAttention(cfg, sparse, plan.layer(layer), dtype=dtype, rngs=rngs,
                                   init_std=init_std, kernels=kernels)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.mlp = MLP(cfg, dtype, rngs, init_std)

  def __call__(self, x, positions, inv_freq, *, cache=None, valid=None, sparse_queries=None,
               phase=None, contiguous=False):
    # Named scopes label the two halves of a layer in profiles (HLO op metadata).
    with jax.named_scope("attention"):
      h, new_cache = self.attn(self.input_norm(x), positions, inv_freq, cache=cache,
                               valid=valid, sparse_queries=sparse_queries, phase=phase,
                               contiguous=contiguous)
    x = x + h
    with jax.named_scope("mlp"):
      x = x + self.mlp(self.post_attn_norm(x))
    return x, new_cache


class Transformer(nnx.Module):
  """Decoder-only LM. `plan`, `sparse` and `kernels` are static (part of the graph definition,
  so of every jit key): rebuild (`convert.rebuild` / `to_rtpurbo`) to change them.

  kernels: the `KernelConfig` every attention op runs with (None: the process default,
    `pallas_kernels.config.default()`, from the environment). Not a weight: checkpoints and
    HF folders do not store it.
  """

  def __init__(self, cfg: ModelConfig, *, sparse: SparseConfig | None = None,
               plan: HeadPlan | None = None, dtype="float32", rngs: nnx.Rngs | None = None,
               init_std: float = 0.02, kernels: KernelConfig | None = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    self.sparse = sparse or SparseConfig()
    self.kernels = kernel_config.resolve(kernels)
    self.plan = plan or HeadPlan.all_local(cfg)
    self.plan.check(cfg)
    self.dtype = as_dtype(dtype)
    init = nnx.initializers.normal(init_std)
    self.embed = param(rngs, init, (cfg.vocab_size, cfg.hidden_size), self.dtype,
                       ("vocab", "embed"))
    self.layers = nnx.List([
        DecoderLayer(cfg, self.sparse, self.plan, i, dtype=self.dtype, rngs=rngs,
                     init_std=init_std, kernels=self.kernels) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.dtype)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, init, (cfg.hidden_size, cfg.vocab_size), self.dtype,
                           ("embed", "vocab"))

  def inv_freq(self):
    return rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)

  def hidden_states(self, input_ids, *, positions=None, valid=None, cache=None,
                    sparse_queries=None, phase=None, contiguous=False):
    """Final-norm hidden states [batch, seq, embed] and the new cache (or None).

    phase (static, required with a cache): "prefill" for a chunk of prompt tokens, "decode"
    for one new token per row (`mixed.PREFILL` / `mixed.DECODE`).
    contiguous (static): with a cache, promises that every row's positions are p0 + arange(seq)
    for one shared p0 and that padding (valid False) only sits at the right end of a row; a
    prefill chunk then takes its fast paths (see MixedHeadAttention.prefill_chunk).
    """
    b, s = input_ids.shape
    if positions is None:
      if cache is not None:
        positions = cache[0].length[:, None] + jnp.arange(s, dtype=jnp.int32)[None]
      else:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = jnp.take(self.embed[...], input_ids, axis=0)
    inv_freq = self.inv_freq()
    new_cache = [] if cache is not None else None
    for i, layer in enumerate(self.layers):
      x, c = layer(x, positions, inv_freq, cache=None if cache is None else cache[i],
                   valid=valid, sparse_queries=sparse_queries, phase=phase,
                   contiguous=contiguous)
      if cache is not None:
        new_cache.append(c)
    return self.final_norm(x), new_cache

  def logits_from_hidden(self, h):
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return jnp.einsum("bse,ev->bsv", h, w, preferred_element_type=jnp.float32)

  def __call__(self, input_ids, *, positions=None, valid=None, cache=None, sparse_queries=None,
               phase=None, contiguous=False):
    """Logits [batch, seq, vocab] (float32); with `cache` (and `phase`), returns (logits,
    new_cache)."""
    h, new_cache = self.hidden_states(input_ids, positions=positions, valid=valid, cache=cache,
                                      sparse_queries=sparse_queries, phase=phase,
                                      contiguous=contiguous)
    logits = self.logits_from_hidden(h)
    return logits if cache is None else (logits, new_cache)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> list[cache_lib.LayerCache]:
    dtype = as_dtype(dtype) if dtype is not None else self.dtype
    return [cache_lib.init_layer_cache(layer.attn.routing, self.cfg, self.sparse, batch,
                                       max_len, dtype) for layer in self.layers]
