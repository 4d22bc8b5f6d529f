"""MixedHeadAttention: the one attention module of every decoder layer.

Per layer, query heads are retrieval or local (HeadPlan); the mode routes them
(`routing.HeadRouting`, docs/DESIGN.md §1):
  dense      every head dense (causal over the full history);
  rtpurbo    local heads: sinks + window; selected (retrieval) heads: dense in prefill (or
             indexer-sparse with `sparse_prefill`), indexer top-p over blocks in decode;
  streaming  every head local;
  topk       as rtpurbo, but decode keeps a fixed number of blocks per selected head.
Below `seqlen_threshold` tokens of context every head runs dense.

Three forms of one layer's attention, each a method: a whole sequence without a cache
(`attend_sequence`), a prefill chunk written into the cache (`prefill_chunk`) and a decode
step (`decode_step`). With a cache the caller names the phase (`PREFILL` / `DECODE`, static).
Local heads go through `local.py`, block selection through `select.py`.

Shapes: x [batch, seq, embed]; q/k/v [batch, seq, heads, head_dim]; caches as in cache.py.
Attention math goes through `pallas_kernels.ops` (accelerator kernels or jnp references),
always with the module's `kernels` (a static `KernelConfig`, part of the graph definition).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from pallas_kernels import config as kernel_config
from pallas_kernels import ops
from pallas_kernels import reference
from pallas_kernels.config import KernelConfig
from rtpurbo_jax.attention import cache as cache_lib
from rtpurbo_jax.attention import indexer as indexer_lib
from rtpurbo_jax.attention import local
from rtpurbo_jax.attention import routing as routing_lib
from rtpurbo_jax.attention import select
from rtpurbo_jax.attention.plan import LayerHeads
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.models.layers import RMSNorm, apply_rope, param


# The phase of a forward with a cache (a static argument).
PREFILL = "prefill"
DECODE = "decode"


class SelectionStats(nnx.Intermediate):
  """Sown by decode steps: fraction of causal blocks each selected head read."""


class RowSelectionStats(nnx.Intermediate):
  """Sown by decode steps beside `SelectionStats`: the same fractions per batch row,
  [batch, n_selected], for callers that average over some rows only (a server's active
  slots)."""


class PrefillSelectionStats(nnx.Intermediate):
  """Sown by sparse prefill chunks: [selected, causal] (query block, key block) pairs of the
  selected heads, over the valid query blocks of sparse-active rows (float32 [2])."""


class MixedHeadAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, sparse: SparseConfig, heads: LayerHeads, *, dtype,
               rngs: nnx.Rngs, init_std: float = 0.02, kernels: KernelConfig | None = None):
    self.cfg = cfg
    self.sparse = sparse
    self.heads = heads
    # Static (graph definition, jit key): the kernels every op below runs; None: the process
    # default, resolved here so that the module holds the config it traces with.
    self.kernels = kernel_config.resolve(kernels)
    self.routing = routing_lib.head_routing(heads, sparse.mode, cfg.num_heads, cfg.num_kv_heads)
    e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = nnx.initializers.normal(init_std)
    zeros = nnx.initializers.zeros
    self.q_proj = param(rngs, init, (e, h, d), dtype, ("embed", "heads", None))
    self.k_proj = param(rngs, init, (e, k, d), dtype, ("embed", "kv_heads", None))
    self.v_proj = param(rngs, init, (e, k, d), dtype, ("embed", "kv_heads", None))
    self.o_proj = param(rngs, init, (h, d, e), dtype, ("heads", None, "embed"))
    if cfg.qkv_bias:
      self.q_bias = param(rngs, zeros, (h, d), dtype, ("heads", None))
      self.k_bias = param(rngs, zeros, (k, d), dtype, ("kv_heads", None))
      self.v_bias = param(rngs, zeros, (k, d), dtype, ("kv_heads", None))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, axis_name=None)
      self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, axis_name=None)
    # The indexer belongs to the plan's retrieval heads in every mode, so that rebuilding the
    # model in another mode keeps it.
    n_ret = len(heads.retrieval)
    if n_ret:
      w = indexer_lib.rotary_init(n_ret, sparse.indexer_dim, d)
      self.indexer_wq = IndexerVar(w, ("heads", None, None))
      self.indexer_wk = IndexerVar(w, ("heads", None, None))
      if sparse.distance_buckets:
        # Starts at zero: the position-free score of the method.
        self.indexer_bias = IndexerVar(jnp.zeros((n_ret, sparse.distance_buckets),
                                                 jnp.float32), ("heads", None))

  @property
  def distance_bias(self):
    """[n_retrieval, distance_buckets] float32, or None (no distance bias)."""
    return self.indexer_bias[...] if hasattr(self, "indexer_bias") else None

  # -- projections -----------------------------------------------------------

  def project_qkv(self, x, positions, inv_freq):
    """Returns q_pre, k_pre (pre-RoPE, post-norm), q, k (RoPE applied), v."""
    q = jnp.einsum("bse,ehd->bshd", x, self.q_proj[...])
    k = jnp.einsum("bse,ekd->bskd", x, self.k_proj[...])
    v = jnp.einsum("bse,ekd->bskd", x, self.v_proj[...])
    if self.cfg.qkv_bias:
      q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

  def indexer_qk(self, q_pre, k_pre):
    """Compressed queries/keys of the retrieval heads: [batch, seq, n_retrieval, r] each (in
    the selecting modes these are the selected heads, in `routing.selected` order)."""
    ret = self.heads.retrieval
    kv = tuple(self.heads.kv_of(h) for h in ret)
    qi = indexer_lib.project(self.indexer_wq[...], q_pre[:, :, jnp.asarray(ret)])
    ki = indexer_lib.project(self.indexer_wk[...], k_pre[:, :, jnp.asarray(kv)])
    return qi, ki

  # -- forward -----------------------------------------------------------------

  def __call__(self, x, positions, inv_freq, *, cache: cache_lib.LayerCache | None = None,
               valid=None, sparse_queries=None, phase: str | None = None, contiguous=False):
    """x: [batch, seq, embed]; positions: [batch, seq] int32.

    valid: [batch, seq] bool, False for padding (None = all real, positions 0..seq-1).
    sparse_queries: [batch, seq] bool, queries at which selected heads select blocks as a
      decode step would (stage 2 labels, sparse evaluation); no-cache only.
    phase: static, required with a cache: PREFILL (a chunk of prompt tokens) or DECODE (one
      new token per row, seq == 1).
    contiguous: static; for PREFILL, positions are p0 + arange(seq) in every row (one p0) and
      padding only sits at the right end of a row: the chunk takes the bounded fast paths.
    Returns (y [batch, seq, embed], new cache or None).
    """
    q_pre, k_pre, q, k, v = self.project_qkv(x, positions, inv_freq)
    if cache is None:
      out = self.attend_sequence(q_pre, k_pre, q, k, v, positions, valid, sparse_queries)
      new_cache = None
    elif phase == DECODE:
      out, new_cache = self.decode_step(q_pre, k_pre, q, k, v, positions, valid, cache)
    elif phase == PREFILL:
      out, new_cache = self.prefill_chunk(q_pre, k_pre, q, k, v, positions, valid, cache,
                                          contiguous)
    else:
      raise ValueError(f"a forward with a KV cache needs phase={PREFILL!r} or {DECODE!r}, "
                       f"got {phase!r}")
    y = jnp.einsum("bshd,hde->bse", out.astype(x.dtype), self.o_proj[...])
    return y, new_cache

  @property
  def _decode_heads(self) -> reference.DecodeHeads:
    """The routing as the layer-decode op takes it: (query heads, KV slots) per set."""
    r = self.routing
    return reference.DecodeHeads.of(
        ring=(r.ring_local.heads, r.ring_local.slots),
        local=(r.full_local.heads, r.full_local.slots),
        dense=(r.dense.heads, r.dense.slots),
        selected=(r.selected.heads, r.selected.slots))

  def _sparse_active(self, positions, valid):
    """[batch] bool: context long enough for the sparse rules (else dense fallback)."""
    length = jnp.max(jnp.where(valid, positions + 1, 0), axis=1)
    return length >= self.sparse.seqlen_threshold

  # -- a whole sequence ----------------------------------------------------------

  def attend_sequence(self, q_pre, k_pre, q, k, v, positions, valid, sparse_queries):
    """Attention of a whole sequence over itself (training, scoring, calibration).

    Selected heads select blocks only at `sparse_queries` (or, with `sparse_prefill`, per
    query block); otherwise they are dense, as in paper-mode prefill.
    Returns [batch, seq, heads, head_dim].
    """
    sp, r = self.sparse, self.routing
    b, s = positions.shape
    contiguous = valid is None
    if valid is None:
      valid = jnp.ones((b, s), bool)
    active = self._sparse_active(positions, valid)
    k_pos = jnp.where(valid, positions, -1)
    out = jnp.zeros(q.shape, q.dtype)
    sparse_selected = sparse_queries is not None or sp.sparse_prefill
    if r.local:
      o = local.over_sequence(q[:, :, _index(r.local)], k, v, r.local.kv, positions, k_pos,
                              active, sp, self.kernels, contiguous=contiguous,
                              differentiable=sparse_queries is not None)
      out = _put(out, r.local, o)
    full = r.dense + (r.selected if not sparse_selected else routing_lib.HeadGroup())
    if full:
      if contiguous:
        o, _ = ops.causal_attention(q[:, :, _index(full)], k, v, full.kv,
                                    kernels=self.kernels)
      else:
        o, _ = ops.masked_attention(q[:, :, _index(full)], k, v, positions, k_pos, full.kv,
                                    chunk=sp.chunk_size)
      out = _put(out, full, o)
    if r.selected and sparse_selected:
      o = self._selected_sequence(q_pre, k_pre, q, k, v, positions, valid, k_pos, active,
                                  sparse_queries, contiguous and s >= sp.seqlen_threshold)
      out = _put(out, r.selected, o)
    return out

  def _selected_sequence(self, q_pre, k_pre, q, k, v, positions, valid, k_pos, active,
                         sparse_queries, use_kernel):
    """Selected heads with indexer selection inside one sequence: per query block
    (`sparse_prefill`, through the block-sparse kernel when `use_kernel`), else per query
    at `sparse_queries`. Returns [batch, seq, n_selected, head_dim]."""
    sp, sel = self.sparse, self.routing.selected
    qi, ki = self.indexer_qk(q_pre, k_pre)
    s = positions.shape[1]
    bs = sp.block_size
    s_pad = -(-s // bs) * bs
    pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
    q_sel = q[:, :, _index(sel)]
    if sparse_queries is None and use_kernel:
      mask = select.prefill_topp(qi, ki, sp.top_p, bs, kernels=self.kernels)
      o, _ = ops.sparse_prefill(jnp.pad(q_sel, pad), jnp.pad(k, pad), jnp.pad(v, pad), sel.kv,
                                mask, block_size=bs, kernels=self.kernels)
      return o[:, :s]
    if sparse_queries is None:
      sparse_queries = valid
    mask = select.per_query_selection(qi, ki, positions, k_pos, sp, s_pad,
                                      bias=self.distance_bias)  # [b, h, s, nb]
    use = (sparse_queries & active[:, None])[:, None, :, None]
    mask = mask | ~use
    o, _ = ops.masked_attention(q_sel, k, v, positions, k_pos, sel.kv, key_block_mask=mask,
                                block_size=bs, chunk=sp.chunk_size)
    return o

  # -- against the KV cache ------------------------------------------------------

  def decode_step(self, q_pre, k_pre, q, k, v, positions, valid, cache):
    """One new token per row (q [batch, 1, heads, head_dim]) against the mixed cache.

    The token is written first, then local heads read the ring (or the recent slots of the
    full cache), dense heads every written block and selected heads the blocks their indexer
    selects. Where the backend has a layer-decode kernel for these shapes (`ops.layer_decode`,
    GPU) one kernel reads the cache in place for every head; otherwise each set goes through
    its own decode op.
    Returns (out [batch, 1, heads, head_dim], the new cache).
    """
    sp, r = self.sparse, self.routing
    b, s = positions.shape
    if s != 1:
      raise ValueError(f"a decode step takes one token per row, got {s}")
    if valid is None:
      valid = jnp.ones((b, s), bool)
    ck = None
    if r.selected:
      qi, ck = self.indexer_qk(q_pre, k_pre)
    new = cache_lib.write(cache, r, k, v, ck, positions, valid, sp)
    active = self._sparse_active(positions, valid)
    q0, q_pos = q[:, 0], positions[:, 0]
    mask = None
    if r.selected:
      mask = select.decode_blocks(qi[:, 0], new.ckeys, new.length, active, sp, self.kernels,
                                  bias=self.distance_bias)
      rows = select.selected_fraction(mask, (new.length - 1)[:, None], sp.block_size)
      self.sow(SelectionStats, "selected_fraction", jnp.mean(rows, axis=0))
      self.sow(RowSelectionStats, "selected_fraction_rows", rows)
    # Every head of the layer in one kernel where the backend has one for these shapes.
    fused = ops.kernel_for(
        "layer_decode", q0, new.ring_k, new.ring_v, new.ring_pos, new.full_k, new.full_v,
        new.length, q_pos, mask, heads=self._decode_heads, sinks=sp.sinks, window=sp.window,
        sparse_active=active, block_size=sp.block_size, kernels=self.kernels)
    if fused is not None:
      return fused()[0][:, None], new
    out = jnp.zeros(q.shape, q.dtype)
    if r.ring_local:
      o = local.ring_step(q0[:, _index(r.ring_local)], new, r.ring_local.slots, q_pos, active,
                          sp, self.kernels)
      out = _put(out, r.ring_local, o)
    if r.full_local:
      o = local.full_step(q0[:, _index(r.full_local)], new, r.full_local.slots, q_pos, active,
                          sp, self.kernels)
      out = _put(out, r.full_local, o)
    if r.dense:
      # Every written block: the split-KV decode kernel reads the cache in place.
      bs, t = sp.block_size, new.max_len
      blocks = jnp.arange(t // bs, dtype=jnp.int32)[None, None, :]
      every = jnp.broadcast_to(blocks * bs < new.length[:, None, None],
                               (b, len(r.dense), t // bs))
      o, _ = ops.sparse_decode(q0[:, _index(r.dense)], new.full_k, new.full_v, r.dense.slots,
                               every, new.length, block_size=bs, kernels=self.kernels)
      out = _put(out, r.dense, o)
    if r.selected:
      o, _ = ops.sparse_decode(q0[:, _index(r.selected)], new.full_k, new.full_v,
                               r.selected.slots, mask, new.length, block_size=sp.block_size,
                               kernels=self.kernels)
      out = _put(out, r.selected, o)
    return out, new

  def prefill_chunk(self, q_pre, k_pre, q, k, v, positions, valid, cache, contiguous=False):
    """A chunk of prompt tokens (q [batch, seq, heads, head_dim]) written into the cache and
    attending to it.

    With `contiguous` (positions p0..p0+s-1, right padding only), heads that read the full
    cache go through `ops.cache_causal_attention` (q_offset=p0, a traced scalar) and the
    window kernel (`local.full_chunk`), local heads on ring KV heads through the window kernel
    over the ring gathered in position order (`local.ring_chunk`), and, with `sparse_prefill`,
    selected heads through `ops.cache_sparse_prefill`, instead of `ops.masked_attention` over
    all `max_len` slots (or the ring + chunk), whose memory is O(s x max_len) and whose math
    is fp32 jnp. Keys beyond a valid query's position are hidden by causality, so padding and
    unwritten slots never reach a valid query.
    Returns (out [batch, seq, heads, head_dim], the new cache).
    """
    sp, r = self.sparse, self.routing
    b, s = positions.shape
    if s == 1:
      # One token attends as a decode step does; the decode kernels are the ones built for
      # a single query (selected heads then select blocks, as in decode).
      return self.decode_step(q_pre, k_pre, q, k, v, positions, valid, cache)
    if valid is None:
      valid = jnp.ones((b, s), bool)
    ck = None
    if r.selected:
      qi, ck = self.indexer_qk(q_pre, k_pre)
    ring_before = (cache.ring_k, cache.ring_v, cache.ring_pos)
    new = cache_lib.write(cache, r, k, v, ck, positions, valid, sp)
    active = self._sparse_active(positions, valid)
    p0 = positions[0, 0]
    out = jnp.zeros(q.shape, q.dtype)
    if r.ring_local:
      ring = jnp.asarray(r.ring_kv)
      o = local.ring_chunk(q[:, :, _index(r.ring_local)], ring_before, k[:, :, ring],
                           v[:, :, ring], new, r.ring_local.slots, positions, valid, active,
                           sp, self.kernels, contiguous=contiguous)
      out = _put(out, r.ring_local, o)
    if r.full_local:
      o = local.full_chunk(q[:, :, _index(r.full_local)], new, r.full_local.slots, positions,
                           active, sp, self.kernels, contiguous=contiguous)
      out = _put(out, r.full_local, o)
    # Selected heads are dense in prefill (paper mode) unless `sparse_prefill` makes them
    # indexer-sparse.
    sparse_chunk = bool(r.selected) and sp.sparse_prefill
    if sparse_chunk:
      if not contiguous:
        raise ValueError("sparse_prefill with a KV cache needs contiguous prefill chunks "
                         "(positions p0..p0+s-1 in every row, as the inference Engine runs "
                         "them); run the forward without a cache for one-pass scoring")
      mask, pairs = select.chunk_blocks(qi, new.ckeys, new.length, p0, active, sp,
                                        self.kernels)
      self.sow(PrefillSelectionStats, "prefill_blocks", pairs)
      o, _ = ops.cache_sparse_prefill(q[:, :, _index(r.selected)], new.full_k, new.full_v,
                                      r.selected.slots, mask, q_offset=p0,
                                      block_size=sp.block_size, chunk=sp.chunk_size,
                                      kernels=self.kernels)
      out = _put(out, r.selected, o)
    full = r.dense + (routing_lib.HeadGroup() if sparse_chunk else r.selected)
    if full and contiguous:
      # The cache is read in its own [batch, kv, T, head_dim] layout (no transposed copy).
      o, _ = ops.cache_causal_attention(q[:, :, _index(full)], new.full_k, new.full_v,
                                        full.slots, q_offset=p0, chunk=sp.chunk_size,
                                        kernels=self.kernels)
      out = _put(out, full, o)
    elif full:
      full_k, full_v, full_pos = cache_lib.full_view(new)
      o, _ = ops.masked_attention(q[:, :, _index(full)], full_k, full_v, positions, full_pos,
                                  full.slots, chunk=sp.chunk_size)
      out = _put(out, full, o)
    return out, new


def _index(group: routing_lib.HeadGroup):
  return jnp.asarray(group.heads)


def _put(out, group: routing_lib.HeadGroup, o):
  """out [batch, seq, heads, head_dim] with the group's heads set to o ([batch, seq, n,
  head_dim], or [batch, n, head_dim] for a decode step)."""
  b, s, _, d = out.shape
  return out.at[:, :, _index(group)].set(o.reshape(b, s, len(group), d))


class IndexerVar(indexer_lib.IndexerParam):
  """An indexer weight annotated with logical axes."""

  def __init__(self, value, axes):
    super().__init__(jnp.asarray(value), out_sharding=axes, eager_sharding=False)
