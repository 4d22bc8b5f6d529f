"""MixedHeadAttention: the one attention module of every decoder layer.

Per layer, query heads are retrieval or local (HeadPlan). Modes (docs/DESIGN.md §1):
  dense      every head causal over the full history;
  rtpurbo    local heads: sinks + window; retrieval heads: dense in prefill (or indexer-sparse
             with `sparse_prefill`), indexer top-p over blocks in decode;
  streaming  every head local;
  topk       as rtpurbo, but decode keeps a fixed number of blocks per retrieval head.
Below `seqlen_threshold` tokens of context every head runs dense.

Shapes: x [batch, seq, embed]; q/k/v [batch, seq, heads, head_dim]; caches as in cache.py.
Attention math goes through `pallas_kernels.ops` (accelerator kernels or jnp references).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import ops
from rtpurbo_jax.attention import cache as cache_lib
from rtpurbo_jax.attention import indexer as indexer_lib
from rtpurbo_jax.attention import routing as routing_lib
from rtpurbo_jax.attention import select
from rtpurbo_jax.attention.plan import LayerHeads
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.models.layers import RMSNorm, apply_rope, param


class SelectionStats(nnx.Intermediate):
  """Sown by decode steps: fraction of causal blocks each retrieval head read."""


class RowSelectionStats(nnx.Intermediate):
  """Sown by decode steps beside `SelectionStats`: the same fractions per batch row,
  [batch, n_retrieval], for callers that average over some rows only (a server's active
  slots)."""


class PrefillSelectionStats(nnx.Intermediate):
  """Sown by sparse prefill chunks: [selected, causal] (query block, key block) pairs of the
  retrieval heads, over the valid query blocks of sparse-active rows (float32 [2])."""


class MixedHeadAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, sparse: SparseConfig, heads: LayerHeads, *, dtype,
               rngs: nnx.Rngs, init_std: float = 0.02):
    self.cfg = cfg
    self.sparse = sparse
    self.heads = heads
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
    n_ret = len(heads.retrieval)
    if n_ret:
      w = indexer_lib.rotary_init(n_ret, sparse.indexer_dim, d)
      self.indexer_wq = IndexerVar(w, ("heads", None, None))
      self.indexer_wk = IndexerVar(w, ("heads", None, None))

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
    """Compressed queries/keys of the retrieval heads: [batch, seq, n_retrieval, r] each."""
    ret = self.heads.retrieval
    kv = tuple(self.heads.kv_of(h) for h in ret)
    qi = indexer_lib.project(self.indexer_wq[...], q_pre[:, :, jnp.asarray(ret)])
    ki = indexer_lib.project(self.indexer_wk[...], k_pre[:, :, jnp.asarray(kv)])
    return qi, ki

  # -- forward -----------------------------------------------------------------

  def __call__(self, x, positions, inv_freq, *, cache: cache_lib.LayerCache | None = None,
               valid=None, sparse_queries=None, contiguous=False):
    """x: [batch, seq, embed]; positions: [batch, seq] int32.

    valid: [batch, seq] bool, False for padding (None = all real, positions 0..seq-1).
    sparse_queries: [batch, seq] bool, queries at which retrieval heads select blocks by
      indexer top-p as a decode step would (stage 2 labels, sparse evaluation); no-cache only.
    contiguous: static; with a cache, positions are p0 + arange(seq) in every row (one p0) and
      padding only sits at the right end of a row: prefill takes the bounded fast path.
    Returns (y [batch, seq, embed], new cache or None).
    """
    q_pre, k_pre, q, k, v = self.project_qkv(x, positions, inv_freq)
    if cache is None:
      out = self._self_attention(q_pre, k_pre, q, k, v, positions, valid, sparse_queries)
      new_cache = None
    else:
      out, new_cache = self._cached_attention(q_pre, k_pre, q, k, v, positions, valid, cache,
                                              contiguous)
    y = jnp.einsum("bshd,hde->bse", out.astype(x.dtype), self.o_proj[...])
    return y, new_cache

  def _sparse_active(self, positions, valid):
    """[batch] bool: context long enough for the sparse rules (else dense fallback)."""
    length = jnp.max(jnp.where(valid, positions + 1, 0), axis=1)
    return length >= self.sparse.seqlen_threshold

  def _self_attention(self, q_pre, k_pre, q, k, v, positions, valid, sparse_queries):
    """Attention of a whole sequence over itself (training, scoring, calibration)."""
    sp, cfg = self.sparse, self.cfg
    b, s, h, d = q.shape
    r = self.routing
    local, selected, dense = r.local.heads, r.selected.heads, r.dense.heads
    contiguous = valid is None
    if valid is None:
      valid = jnp.ones((b, s), bool)
    active = self._sparse_active(positions, valid)
    k_pos = jnp.where(valid, positions, -1)
    out = jnp.zeros(q.shape, q.dtype)
    static_sparse = s >= sp.seqlen_threshold

    def kv_of(hs):
      return tuple(self.heads.kv_of(i) for i in hs)

    if local:
      idx = jnp.asarray(local)
      if contiguous and sparse_queries is not None:
        # Stage-2 training / decode-style scoring: the window kernels have no VJP, and the jnp
        # `window_attention` scores all S keys. The banded form is differentiable and
        # O(S x window) on every backend; window=s is exactly causal (below the threshold).
        from pallas_kernels import reference
        o, _ = reference.banded_window_attention(
            q[:, :, idx], k, v, kv_of(local), sinks=sp.sinks,
            window=sp.window if static_sparse else s)
      elif contiguous and static_sparse:
        o, _ = ops.window_attention(q[:, :, idx], k, v, kv_of(local), sinks=sp.sinks,
                                    window=sp.window)
      elif contiguous:
        o, _ = ops.causal_attention(q[:, :, idx], k, v, kv_of(local))
      else:
        o, _ = ops.masked_attention(q[:, :, idx], k, v, positions, k_pos, kv_of(local),
                                    sinks=sp.sinks, window=sp.window, sparse_active=active,
                                    chunk=sp.chunk_size)
      out = out.at[:, :, idx].set(o)
    full = dense + (selected if sparse_queries is None and not sp.sparse_prefill else ())
    if full:
      idx = jnp.asarray(full)
      if contiguous:
        o, _ = ops.causal_attention(q[:, :, idx], k, v, kv_of(full))
      else:
        o, _ = ops.masked_attention(q[:, :, idx], k, v, positions, k_pos, kv_of(full),
                                    chunk=sp.chunk_size)
      out = out.at[:, :, idx].set(o)
    if selected and (sparse_queries is not None or sp.sparse_prefill):
      o = self._selected_prefill(q_pre, k_pre, q, k, v, positions, valid, k_pos, active,
                                 sparse_queries, contiguous and static_sparse)
      out = out.at[:, :, jnp.asarray(selected)].set(o)
    return out

  def _selected_prefill(self, q_pre, k_pre, q, k, v, positions, valid, k_pos, active,
                        sparse_queries, use_kernel):
    """Retrieval heads with indexer selection inside one sequence."""
    sp = self.sparse
    ret = self.heads.retrieval
    kv = tuple(self.heads.kv_of(i) for i in ret)
    qi, ki = self.indexer_qk(q_pre, k_pre)
    b, s = positions.shape
    bs = sp.block_size
    s_pad = -(-s // bs) * bs
    pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
    q_ret = q[:, :, jnp.asarray(ret)]
    if sparse_queries is None and use_kernel:
      mask = select.prefill_topp(qi, ki, sp.top_p, bs)
      o, _ = ops.sparse_prefill(jnp.pad(q_ret, pad), jnp.pad(k, pad), jnp.pad(v, pad), kv,
                                mask, block_size=bs)
      return o[:, :s]
    if sparse_queries is None:
      sparse_queries = valid
    mask = select.per_query_selection(qi, ki, positions, k_pos, sp, s_pad)  # [b, h, s, nb]
    use = (sparse_queries & active[:, None])[:, None, :, None]
    mask = mask | ~use
    o, _ = ops.masked_attention(q_ret, k, v, positions, k_pos, kv, key_block_mask=mask,
                                block_size=bs, chunk=sp.chunk_size)
    return o

  def _cached_attention(self, q_pre, k_pre, q, k, v, positions, valid, cache, contiguous=False):
    """Prefill chunk or decode step against the mixed cache.

    With `contiguous` (a prefill chunk at positions p0..p0+s-1, right padding only), heads that
    read the full cache go through `ops.cache_causal_attention` (q_offset=p0, a traced scalar)
    and `_local_prefill_fast`, local heads on ring KV heads through `_ring_prefill_fast`, and,
    with `sparse_prefill`, retrieval heads through `_selected_chunk_prefill`, instead of
    `ops.masked_attention` over all `max_len` slots (or the ring + chunk), whose memory is
    O(s x max_len) and whose math is fp32 jnp. Keys beyond a valid query's position are hidden
    by causality, so padding and unwritten slots never reach a valid query.
    """
    sp, cfg, lay = self.sparse, self.cfg, self.routing
    b, s, h, d = q.shape
    if valid is None:
      valid = jnp.ones((b, s), bool)
    local, selected, dense = lay.local.heads, lay.selected.heads, lay.dense.heads
    ck = None
    if lay.selected:
      qi, ck = self.indexer_qk(q_pre, k_pre)
    ring_before = (cache.ring_k, cache.ring_v, cache.ring_pos)
    new = cache_lib.write(cache, lay, k, v, ck, positions, valid, sp)
    active = self._sparse_active(positions, valid)
    t = new.max_len
    full_pos = jnp.where(jnp.arange(t)[None] < new.length[:, None], jnp.arange(t)[None], -1)
    full_k, full_v = jnp.swapaxes(new.full_k, 1, 2), jnp.swapaxes(new.full_v, 1, 2)
    out = jnp.zeros(q.shape, q.dtype)
    decode = s == 1

    ring_local, full_local = lay.ring_local.heads, lay.full_local.heads
    ring_kvh = lay.ring_local.slots
    full_kvh = lambda hs: tuple(lay.full_kv.index(self.heads.kv_of(i)) for i in hs)
    window_rule = dict(sinks=sp.sinks, window=sp.window, sparse_active=active)

    def put(out, hs, o):
      return out.at[:, :, jnp.asarray(hs)].set(o.reshape(b, s, len(hs), d))

    if decode:
      # The new token is already in the ring; eviction only drops positions outside the window.
      if ring_local:
        o, _ = ops.ring_decode(q[:, 0, jnp.asarray(ring_local)], new.ring_k, new.ring_v,
                               new.ring_pos, ring_kvh, positions[:, 0], **window_rule)
        out = put(out, ring_local, o)
      if full_local:
        # Only sinks and the newest ring_capacity slots can be visible: read those, not T.
        rk, rv, rpos = recent_slots(new.full_k, new.full_v, new.length, sp)
        o, _ = ops.ring_decode(q[:, 0, jnp.asarray(full_local)], rk, rv, rpos,
                               full_kvh(full_local), positions[:, 0], **window_rule)
        out = put(out, full_local, o)
    else:
      if ring_local and contiguous:
        sel = jnp.asarray(lay.ring_kv)
        o = self._ring_prefill_fast(q[:, :, jnp.asarray(ring_local)], ring_before[:2],
                                    (k[:, :, sel], v[:, :, sel]), new, ring_kvh,
                                    positions[0, 0], active)
        out = put(out, ring_local, o)
      elif ring_local:
        # A chunk may evict ring entries its own early queries need: attend over the ring as it
        # was plus the new tokens.
        rk, rv, rpos = ring_before
        sel = jnp.asarray(lay.ring_kv)
        keys = jnp.concatenate([jnp.swapaxes(rk, 1, 2), k[:, :, sel].astype(rk.dtype)], axis=1)
        vals = jnp.concatenate([jnp.swapaxes(rv, 1, 2), v[:, :, sel].astype(rv.dtype)], axis=1)
        kpos = jnp.concatenate([rpos, jnp.where(valid, positions, -1)], axis=1)
        o, _ = ops.masked_attention(q[:, :, jnp.asarray(ring_local)], keys, vals, positions,
                                    kpos, ring_kvh, chunk=sp.chunk_size, **window_rule)
        out = put(out, ring_local, o)
      if full_local and contiguous:
        o = self._local_prefill_fast(q[:, :, jnp.asarray(full_local)], new.full_k, new.full_v,
                                     full_kvh(full_local), positions[0, 0], active)
        out = put(out, full_local, o)
      elif full_local:
        o, _ = ops.masked_attention(q[:, :, jnp.asarray(full_local)], full_k, full_v, positions,
                                    full_pos, full_kvh(full_local), chunk=sp.chunk_size,
                                    **window_rule)
        out = put(out, full_local, o)
    # Dense heads, and retrieval heads outside decode (paper mode: dense in prefill) unless
    # `sparse_prefill` makes them indexer-sparse in prefill too.
    indexed_mode = sp.mode in ("rtpurbo", "topk")
    sparse_chunk = bool(selected) and not decode and sp.sparse_prefill and indexed_mode
    dense_now = dense + (selected if (not decode and not sparse_chunk) or not indexed_mode
                         else ())
    if sparse_chunk:
      if not contiguous:
        raise ValueError("sparse_prefill with a KV cache needs contiguous prefill chunks "
                         "(positions p0..p0+s-1 in every row, as the inference Engine runs "
                         "them); run the forward without a cache for one-pass scoring")
      o = self._selected_chunk_prefill(q[:, :, jnp.asarray(selected)], qi, new,
                                       full_kvh(selected), positions[0, 0], active)
      out = put(out, selected, o)
    if dense_now and contiguous and not decode:
      # The cache is read in its own [batch, kv, T, head_dim] layout (no transposed copy).
      o, _ = _traced_offset_call("cache_causal_attention", q[:, :, jnp.asarray(dense_now)],
                                 new.full_k, new.full_v, full_kvh(dense_now),
                                 q_offset=positions[0, 0], chunk=sp.chunk_size)
      out = put(out, dense_now, o)
    elif dense_now and decode:
      # Every written block: the split-KV decode kernel reads the cache in place.
      bs = sp.block_size
      blocks = jnp.arange(t // bs, dtype=jnp.int32)[None, None, :]
      every = jnp.broadcast_to(blocks * bs < new.length[:, None, None],
                               (b, len(dense_now), t // bs))
      o, _ = ops.sparse_decode(q[:, 0, jnp.asarray(dense_now)], new.full_k, new.full_v,
                               full_kvh(dense_now), every, new.length, block_size=bs)
      out = put(out, dense_now, o)
    elif dense_now:
      o, _ = ops.masked_attention(q[:, :, jnp.asarray(dense_now)], full_k, full_v, positions,
                                  full_pos, full_kvh(dense_now), chunk=sp.chunk_size)
      out = put(out, dense_now, o)
    if decode and selected and sp.mode in ("rtpurbo", "topk"):
      lengths = new.length
      mask = select.decode_blocks(qi[:, 0], new.ckeys, lengths, active, sp)
      rows = select.selected_fraction(mask, (lengths - 1)[:, None], sp.block_size)
      self.sow(SelectionStats, "selected_fraction", jnp.mean(rows, axis=0))
      self.sow(RowSelectionStats, "selected_fraction_rows", rows)
      o, _ = ops.sparse_decode(q[:, 0, jnp.asarray(selected)], new.full_k, new.full_v,
                               full_kvh(selected), mask, lengths, block_size=sp.block_size)
      out = put(out, selected, o)
    return out, new

  def _selected_chunk_prefill(self, q, qi, new, kv_heads, p0, active):
    """Retrieval heads of a contiguous prefill chunk with `sparse_prefill`: indexer-sparse.

    q: [batch, s, n_retrieval, head_dim] at positions p0..p0+s-1 (p0 traced; s and p0
    multiples of block_size: the Engine rounds its chunk to whole blocks); qi: [batch, s,
    n_retrieval, r]; new: the cache after this chunk's write; active: [batch] bool.
    Query block i picks key blocks by top-p of its pooled indexer query over the compressed
    keys in the cache (`ops.cache_prefill_select`) and attends to them in place
    (`ops.cache_sparse_prefill`): the one-pass `sparse_prefill` selection, chunk by chunk.
    Rows below the dense-fallback threshold read every causal block. The selection is top-p
    in both indexed modes (the top-k baseline is a decode rule).
    Returns [batch, s, n_retrieval, head_dim].
    """
    sp = self.sparse
    mask, pairs = select.chunk_blocks(qi, new.ckeys, new.length, p0, active, sp)
    self.sow(PrefillSelectionStats, "prefill_blocks", pairs)
    o, _ = ops.cache_sparse_prefill(q, new.full_k, new.full_v, kv_heads, mask, q_offset=p0,
                                    block_size=sp.block_size, chunk=sp.chunk_size)
    return o

  def _ring_prefill_fast(self, q, ring_before, chunk_kv, new, kv_heads, p0, active):
    """Local heads on ring KV heads for a contiguous chunk, through the window kernel.

    q: [batch, s, heads, head_dim] at positions p0..p0+s-1 (p0 traced); ring_before: ring_k,
    ring_v [batch, n_ring_kv, capacity, head_dim] before this chunk was written; chunk_kv:
    the chunk's k, v [batch, s, n_ring_kv, head_dim]; new: the cache after the write;
    active: [batch] bool. Two disjoint parts, merged by log-sum-exp:
      window: keys t - window < j <= t. The ring's slots for positions [start, p0),
        start = max(0, p0 - window + 1), are gathered in position order and followed by the
        chunk's keys: a contiguous key range of static length window - 1 + s in which the
        chunk starts at the traced offset p0 - start, so `ops.window_attention` (sinks=0)
        reads it with no [s, capacity + s] score matrix. The ring holds every such position
        (capacity - sinks >= window > p0 - start). Slots past the chunk's end (when
        p0 < window - 1) are causally invisible.
      prefix: keys j <= t - window that are sinks, or any (inactive rows, below the threshold):
        as in `_local_prefill_fast`, over the first slots of the new ring, whose `ring_pos`
        names each slot's position (below the threshold nothing has been evicted yet).
    Returns [batch, s, heads, head_dim].
    """
    sp = self.sparse
    b, s = q.shape[:2]
    cap = ring_before[0].shape[2]
    span = sp.window - 1
    start = jnp.maximum(p0 - span, 0)
    pos = start + jnp.arange(span + s, dtype=jnp.int32)  # position of each gathered key
    # Index into [ring slots (cap) ++ chunk (s)]: history from its ring slot, the rest from
    # the chunk (clipped past its end: those keys are never visible).
    idx = jnp.where(pos < p0, cache_lib.ring_slot(pos, sp.sinks, cap), cap + pos - p0)
    idx = jnp.clip(idx, 0, cap + s - 1)

    def keys(ring, chunk):
      both = jnp.concatenate([jnp.swapaxes(ring, 1, 2), chunk.astype(ring.dtype)], axis=1)
      return jnp.take(both, idx, axis=1)  # [b, span + s, n_ring_kv, d]

    kw, vw = keys(ring_before[0], chunk_kv[0]), keys(ring_before[1], chunk_kv[1])
    window = _traced_offset_call("window_attention", q, kw, vw, kv_heads, sinks=0,
                                 window=sp.window, q_offset=p0 - start, chunk=sp.chunk_size)
    q_shift = jnp.broadcast_to(p0 + jnp.arange(s, dtype=jnp.int32)[None] - sp.window, (b, s))

    def prefix(n):
      n = min(cap, n)
      if n == 0:
        return (jnp.zeros(q.shape, q.dtype), jnp.full((b, s, q.shape[2]), -jnp.inf))
      kp = jnp.swapaxes(new.ring_k[:, :, :n], 1, 2)
      vp = jnp.swapaxes(new.ring_v[:, :, :n], 1, 2)
      return ops.masked_attention(q, kp, vp, q_shift, new.ring_pos[:, :n], kv_heads,
                                  sinks=sp.sinks, window=0, sparse_active=active,
                                  chunk=sp.chunk_size)

    return _merge_with_prefix(window, prefix, cap, sp, active)

  def _local_prefill_fast(self, q, k_cache, v_cache, kv_heads, p0, active):
    """Local heads of a contiguous chunk over the full cache, in bounded memory.

    q: [batch, s, heads, head_dim] at positions p0..p0+s-1 (p0 traced); k_cache, v_cache:
    [batch, n_full_kv, max_len, head_dim], the chunk already written; active: [batch] bool.
    Two disjoint parts, merged by log-sum-exp:
      window: keys t - window < j <= t, read from a static-length slice [start, start + L),
        L = window - 1 + s, through `ops.window_attention` (sinks=0, shifted q_offset);
      prefix: keys j <= t - window that are sinks (j < sinks) or, below the threshold
        (inactive rows), any such key: `masked_attention` over the first P slots with query
        positions shifted by -window. P = sinks when every row is active, else
        max(sinks, seqlen_threshold), picked by lax.cond so both branches stay small.
    Returns [batch, s, heads, head_dim].
    """
    sp = self.sparse
    b, s = q.shape[:2]
    t = k_cache.shape[2]
    span = min(t, sp.window - 1 + s)
    start = jnp.clip(p0 - sp.window + 1, 0, t - span)
    kw = jnp.swapaxes(jax.lax.dynamic_slice_in_dim(k_cache, start, span, axis=2), 1, 2)
    vw = jnp.swapaxes(jax.lax.dynamic_slice_in_dim(v_cache, start, span, axis=2), 1, 2)
    window = _traced_offset_call("window_attention", q, kw, vw, kv_heads, sinks=0,
                                 window=sp.window, q_offset=p0 - start, chunk=sp.chunk_size)
    q_shift = p0 + jnp.arange(s, dtype=jnp.int32)[None] - sp.window  # j <= t - window

    def prefix(n):
      n = min(t, n)
      if n == 0:
        return (jnp.zeros(q.shape, q.dtype), jnp.full((b, s, q.shape[2]), -jnp.inf))
      kp = jnp.swapaxes(k_cache[:, :, :n], 1, 2)
      vp = jnp.swapaxes(v_cache[:, :, :n], 1, 2)
      kpos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
      # window=0 leaves exactly "j < sinks, or inactive" on top of j <= t - window.
      return ops.masked_attention(q, kp, vp, jnp.broadcast_to(q_shift, (b, s)), kpos, kv_heads,
                                  sinks=sp.sinks, window=0, sparse_active=active,
                                  chunk=sp.chunk_size)

    return _merge_with_prefix(window, prefix, t, sp, active)


def _merge_with_prefix(window, prefix, slots: int, sp: SparseConfig, active):
  """Merge (by log-sum-exp) a window part with the prefix part `prefix(n)` over the first n of
  `slots` key slots: n = sinks when every row is sparse-active, else max(sinks,
  seqlen_threshold), chosen by lax.cond so that both branches stay small."""
  wide = max(sp.sinks, sp.seqlen_threshold)
  if min(slots, wide) == min(slots, sp.sinks):
    pre = prefix(sp.sinks)
  else:
    pre = jax.lax.cond(jnp.all(active), lambda: prefix(sp.sinks), lambda: prefix(wide))
  out, _ = ops.merge_attention([window, pre])
  return out


def _traced_offset_call(op: str, *args, **kwargs):
  """`ops.<op>(..., q_offset=<traced scalar>)`, or the jnp reference when the accelerator
  kernel needs a static offset (it then fails at trace time converting or hashing the tracer).
  """
  from pallas_kernels import reference

  try:
    return getattr(ops, op)(*args, **kwargs)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
          ValueError):
    if ops.backend() == "reference":
      raise
    return getattr(reference, op)(*args, **kwargs)  # takes a traced offset


def recent_slots(k_cache, v_cache, length, sp: SparseConfig):
  """A ring-like view of a full cache for local-head decode.

  k_cache, v_cache: [batch, kv, T, head_dim]; length: [batch]. Returns keys, values
  [batch, kv, sinks + span, head_dim] and their positions [batch, sinks + span] (-1 empty):
  the sinks plus the newest span = ring_capacity - sinks slots, which hold every key a local
  head may see (window, or everything below the dense-fallback threshold).
  """
  t = k_cache.shape[2]
  span = min(t, sp.ring_capacity - sp.sinks)
  n_sink = min(sp.sinks, t)
  start = jnp.clip(length - span, 0, t - span)  # [batch]
  take = jax.vmap(lambda c, s0: jax.lax.dynamic_slice_in_dim(c, s0, span, axis=1))
  pos_w = start[:, None] + jnp.arange(span, dtype=jnp.int32)[None]
  pos_w = jnp.where(pos_w < length[:, None], pos_w, -1)
  sink_ids = jnp.arange(n_sink, dtype=jnp.int32)[None]
  pos_s = jnp.where(sink_ids < start[:, None], sink_ids, -1)  # not already in the span
  keys = jnp.concatenate([k_cache[:, :, :n_sink], take(k_cache, start)], axis=2)
  vals = jnp.concatenate([v_cache[:, :, :n_sink], take(v_cache, start)], axis=2)
  return keys, vals, jnp.concatenate([pos_s, pos_w], axis=1).astype(jnp.int32)


class IndexerVar(indexer_lib.IndexerParam):
  """An indexer weight annotated with logical axes."""

  def __init__(self, value, axes):
    super().__init__(jnp.asarray(value), out_sharding=axes, eager_sharding=False)
