"""Block selection: the public API of the selection contract (docs/DESIGN.md §1), and the
selection the model runs for its selected heads.

Every function here is a thin shape-checking layer over the references in
`pallas_kernels/reference.py` (`topp_from_block_logmass`, `histogram_from_block_logmass`,
`topk_from_block_logmass`, `topp_select`, `prefill_select`) or the kernels behind
`pallas_kernels.ops`, so the rule lives in one place.

The token-score entry points take

  scores:          [..., q, T] float, score of query i for key j (key j sits at position j).
  query_positions: [..., q] int, absolute position of each query (broadcast against
                   scores.shape[:-1]). Keys j > position are the future and never count.

and return a bool mask over key blocks [..., q, ceil(T / block_size)]. T need not be a
multiple of the block size: the last block is partial and only its real keys count.

Exact block top-p (`block_topp`): block mass P_b = sum_{j in b, j <= t} softmax_j(s(t, .));
rank blocks by mass (ties: lower block index first); keep the shortest prefix whose
cumulative mass is >= p; always add the query's own block; p >= 1 keeps every causal block.
`block_topp_histogram` returns a superset of that set (256-bin fused-kernel rule),
`block_topk` the k heaviest blocks plus the own block, `streaming_mask` the token mask of a
local head (sinks + window).

The model's entry points take a `SparseConfig` and pick the rule of its mode (top-k in
`topk`, top-p otherwise, joined by the `min_blocks` heaviest blocks when `min_blocks` > 0):
`decode_blocks` (one decode step over the compressed-key cache), `chunk_blocks` (a
`sparse_prefill` chunk), `prefill_topp` (a whole sequence with
`sparse_prefill`) and `per_query_selection` (the decode rule at every query of a sequence:
stage 2, decode-style scoring, the sparsity report). The decode-style ones take the indexer's
distance bias (`SparseConfig.distance_buckets`), a per-block log-mass offset every rule reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import ops
from pallas_kernels import reference as ref
from pallas_kernels.config import KernelConfig
from rtpurbo_jax.attention import indexer as indexer_lib
from rtpurbo_jax.config import SparseConfig


def _check(p: float | None = None, block_size: int | None = None) -> None:
  if p is not None and not p > 0:
    raise ValueError(f"top-p threshold p={p} must be > 0 (p >= 1 selects every causal block)")
  if block_size is not None and (int(block_size) != block_size or block_size < 1):
    raise ValueError(f"block_size={block_size} must be a positive integer")


def causal_block_logmass(scores, query_positions, block_size: int = 64, key_valid=None):
  """Per-query block log-masses over the causal history.

  Args:
    scores: [..., q, T]; query_positions: broadcastable to [..., q];
    key_valid: optional bool broadcastable to [..., q, T] (False = empty key slot).
  Returns:
    logmass [..., q, nb] float32 (log of the block's unnormalised softmax mass, -inf when
    empty), valid [..., q, nb] bool (the block holds a visible key), own [..., q] int32.
  """
  _check(block_size=block_size)
  scores = jnp.asarray(scores)
  if scores.ndim < 1:
    raise ValueError("scores must be [..., q, T] (at least one key axis)")
  t = scores.shape[-1]
  lead = scores.shape[:-1]
  try:
    qpos = jnp.broadcast_to(jnp.asarray(query_positions, jnp.int32), lead)
  except ValueError:
    raise ValueError(f"query_positions of shape {jnp.shape(query_positions)} does not "
                     f"broadcast to the query axes {lead} of scores {scores.shape}") from None
  nb = -(-t // block_size)
  t_pad = nb * block_size
  s = jnp.pad(scores.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, t_pad - t)])
  kpos = jnp.arange(t_pad, dtype=jnp.int32)
  vis = (kpos < t) & (kpos <= qpos[..., None]) & (qpos[..., None] >= 0)
  if key_valid is not None:
    kv = jnp.broadcast_to(jnp.asarray(key_valid, bool), scores.shape)
    vis &= jnp.pad(kv, [(0, 0)] * len(lead) + [(0, t_pad - t)])
  lm, valid = ref.block_logmass(s, vis, block_size)
  return lm, valid, qpos // block_size


def block_topp(scores, query_positions, p: float, block_size: int = 64, *, key_valid=None):
  """Exact block top-p per query (the contract). Returns bool [..., q, nb]."""
  _check(p, block_size)
  lm, valid, own = causal_block_logmass(scores, query_positions, block_size, key_valid)
  return ref.topp_from_block_logmass(lm, valid, own, float(p))


def block_topp_histogram(scores, query_positions, p: float, block_size: int = 64, *,
                         key_valid=None, bins: int = ref.HIST_BINS,
                         span: float = ref.HIST_RANGE):
  """Histogram block top-p (fused decode kernel rule): a superset of `block_topp`."""
  _check(p, block_size)
  if bins < 1 or span <= 0:
    raise ValueError(f"histogram needs bins >= 1 and span > 0, got bins={bins}, span={span}")
  lm, valid, own = causal_block_logmass(scores, query_positions, block_size, key_valid)
  return ref.histogram_from_block_logmass(lm, valid, own, float(p), bins=bins, span=span)


def block_topk(scores, query_positions, k_tokens: int, block_size: int = 64, *,
               key_valid=None):
  """Top-k baseline: the ceil(k_tokens / block_size) heaviest causal blocks (ties: lower
  index first) plus the own block. Returns bool [..., q, nb]."""
  _check(block_size=block_size)
  if k_tokens < 1:
    raise ValueError(f"k_tokens={k_tokens} must be >= 1")
  lm, valid, own = causal_block_logmass(scores, query_positions, block_size, key_valid)
  return ref.topk_from_block_logmass(lm, valid, own, -(-int(k_tokens) // block_size))


def streaming_mask(query_positions, num_keys: int, sinks: int, window: int):
  """Token visibility of a local head: key j is visible to query t iff
  `0 <= j <= t and (j < sinks or t - window < j)`.

  query_positions: [..., q] int. Returns bool [..., q, num_keys].
  """
  if sinks < 0 or window < 1:
    raise ValueError(f"streaming needs sinks >= 0 and window >= 1, got sinks={sinks}, "
                     f"window={window}")
  t = jnp.asarray(query_positions, jnp.int32)[..., None]
  j = jnp.arange(num_keys, dtype=jnp.int32)
  return (j <= t) & ((j < sinks) | (j > t - window))


def block_mask_to_tokens(block_mask, num_keys: int, block_size: int = 64):
  """Expand a block mask [..., nb] to keys [..., num_keys] (key j is in block j // B)."""
  return jnp.repeat(block_mask, block_size, axis=-1)[..., :num_keys]


# ---------------------------------------------------------------------------
# Indexer-level entry points (what the model calls, routed through pallas_kernels.ops).


def decode_topp(qi, ckeys, lengths, p: float, block_size: int = 64, *,
                selector: str = "exact", kernels: KernelConfig | None = None,
                block_offset=None):
  """Decode selection from the compressed key cache (kernel-dispatched by `kernels`; None:
  the process default).

  qi: [batch, heads, r] indexer query of the newest token; ckeys: [batch, heads, T, r]
  with T % block_size == 0; lengths: [batch] tokens written, the newest included;
  block_offset: optional [batch, heads, T // block_size] added to the block log-masses.
  Returns bool [batch, heads, T // block_size].
  """
  _check(p, block_size)
  if ckeys.shape[2] % block_size:
    raise ValueError(f"compressed key cache length {ckeys.shape[2]} is not a multiple of "
                     f"block_size={block_size}")
  if selector not in ref.SELECTORS:
    raise ValueError(f"selector={selector!r}: expected one of {sorted(ref.SELECTORS)}")
  return ops.topp_select(qi, ckeys, lengths, top_p=float(p), block_size=block_size,
                         selector=selector, block_offset=block_offset, kernels=kernels)


def decode_topk(qi, ckeys, lengths, k_tokens: int, block_size: int = 64, *,
                block_offset=None):
  """Decode top-k baseline on the same interface as `decode_topp`."""
  _check(block_size=block_size)
  if ckeys.shape[2] % block_size:
    raise ValueError(f"compressed key cache length {ckeys.shape[2]} is not a multiple of "
                     f"block_size={block_size}")
  return ops.topk_select(qi, ckeys, lengths, k_tokens=int(k_tokens), block_size=block_size,
                         block_offset=block_offset)


def prefill_topp(qi, ki, p: float, block_size: int = 64, *,
                 kernels: KernelConfig | None = None):
  """Sparse-prefill selection per query block of one sequence (opt-in mode, beyond the paper).

  Query block i is represented by its mean indexer query and selects key blocks by exact
  top-p over keys up to the end of block i (own block always kept).
  qi, ki: [batch, S, heads, r], positions 0..S-1. S need not be a multiple of the block size:
  the last block's query is the mean of its real queries and the padding is never scored,
  as in a chunked prefill (`ops.cache_prefill_select`).
  kernels: the `KernelConfig` of the selection ops (None: the process default).
  Returns bool [batch, heads, nq, nq] with nq = ceil(S / block_size) (query block, key block).
  """
  _check(p, block_size)
  if qi.shape != ki.shape or qi.ndim != 4:
    raise ValueError(f"qi and ki must both be [batch, S, heads, r], got {qi.shape} and "
                     f"{ki.shape}")
  b, s = qi.shape[:2]
  s_pad = -(-s // block_size) * block_size
  if s == s_pad:
    return ops.prefill_select(qi, ki, top_p=float(p), block_size=block_size, kernels=kernels)
  pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
  return ops.cache_prefill_select(jnp.pad(qi, pad), jnp.swapaxes(jnp.pad(ki, pad), 1, 2),
                                  jnp.full((b,), s, jnp.int32), top_p=float(p),
                                  block_size=block_size, kernels=kernels)


def selected_fraction(block_mask, query_positions, block_size: int = 64):
  """Fraction of causal blocks selected, per query: block_mask [..., q, nb] ->
  float32 [..., q] (selected blocks / (position // block_size + 1))."""
  causal = jnp.asarray(query_positions, jnp.int32) // block_size + 1
  return jnp.sum(block_mask, axis=-1) / jnp.maximum(causal, 1).astype(jnp.float32)


# ---------------------------------------------------------------------------
# The model's selection for its selected heads, by the rule of the configured mode.


def _check_bias(bias, heads: int, sp: SparseConfig):
  if bias is None:
    return
  if bias.shape != (heads, sp.distance_buckets):
    raise ValueError(f"distance bias of shape {tuple(bias.shape)}: expected [heads={heads}, "
                     f"sparse.distance_buckets={sp.distance_buckets}]")


def decode_blocks(qi, ckeys, lengths, active, sp: SparseConfig,
                  kernels: KernelConfig | None = None, *, bias=None):
  """Key blocks each selected head reads in one decode step (top-p through `kernels`).

  qi: [batch, heads, r] indexer query of the new token; ckeys: [batch, heads, T, r], the new
  token already written; lengths: [batch] tokens written; active: [batch] bool, False below
  the dense-fallback threshold, where a row reads every written block; bias: the indexer's
  distance bias [heads, sp.distance_buckets] or None, added to every rule's block log-mass.
  Returns bool [batch, heads, T // block_size].
  """
  _check_bias(bias, qi.shape[1], sp)
  offset = None
  if bias is not None:
    own = (lengths - 1) // sp.block_size  # [batch]
    offset = jnp.swapaxes(indexer_lib.block_bias(bias, own, ckeys.shape[2] // sp.block_size),
                          0, 1)  # [batch, heads, nb]
  if sp.mode == "topk":
    mask = decode_topk(qi, ckeys, lengths, sp.topk_tokens, sp.block_size, block_offset=offset)
  else:
    mask = decode_topp(qi, ckeys, lengths, sp.top_p, sp.block_size, selector=sp.selector,
                       kernels=kernels, block_offset=offset)
    if sp.min_blocks:
      # The floor scores the compressed keys a second time (r-wide, small beside the
      # attention it selects for); one pass would need the top-p kernels to take the floor.
      mask |= decode_topk(qi, ckeys, lengths, sp.min_blocks * sp.block_size, sp.block_size,
                          block_offset=offset)
  return mask | ~active[:, None, None]


def chunk_blocks(qi, ckeys, lengths, p0, active, sp: SparseConfig,
                 kernels: KernelConfig | None = None):
  """Key blocks each query block of a contiguous `sparse_prefill` chunk reads.

  qi: [batch, s, heads, r] at positions p0..p0+s-1 (p0 traced; s and p0 multiples of
  block_size: the Engine rounds its chunk to whole blocks); ckeys: [batch, heads, T, r], the
  chunk already written; lengths: [batch]; active: [batch] bool.
  Query block i picks key blocks by top-p of its pooled indexer query over the compressed keys
  (`ops.cache_prefill_select`): the one-pass `prefill_topp` selection, chunk by chunk. Rows
  below the dense-fallback threshold read every causal block. The rule is top-p in both
  selecting modes (the top-k baseline is a decode rule).
  Returns (mask bool [batch, heads, s // block_size, T // block_size], pairs float32 [2]: the
  (selected, causal) (query block, key block) pairs over the valid query blocks of active
  rows).
  """
  bs = sp.block_size
  s = qi.shape[1]
  if s % bs:
    raise ValueError(f"sparse_prefill: a prefill chunk of {s} tokens is not a whole number "
                     f"of {bs}-token blocks (the Engine rounds its prefill_chunk up)")
  mask = ops.cache_prefill_select(qi, ckeys, lengths, q_offset=p0, top_p=sp.top_p,
                                  block_size=bs, kernels=kernels)
  nq, nk = mask.shape[2:]
  g = p0 // bs + jnp.arange(nq, dtype=jnp.int32)  # global block of each query block
  causal = jnp.arange(nk, dtype=jnp.int32)[None, :] <= g[:, None]  # [nq, nk]
  mask = mask | (~active[:, None, None, None] & causal)
  counted = ((g[None, :] * bs < lengths[:, None]) & active[:, None])[:, None, :, None]
  pairs = jnp.stack([jnp.sum(mask & causal & counted), jnp.sum(causal & counted) * qi.shape[2]])
  return mask, pairs.astype(jnp.float32)


def per_query_selection(qi, ki, positions, k_pos, sp: SparseConfig, s_pad: int, *,
                        bias=None):
  """Decode-style block selection for every query of a sequence, chunked over queries.

  qi: [batch, seq, heads, r], ki: [batch, kv_len, heads, r] (kv_len may differ from seq: a
  subset of queries); positions [batch, seq] / k_pos [batch, kv_len] as in masked attention
  (k_pos -1: an empty key). The rule of `sp.mode` (top-k in `topk`, else `sp.selector`
  top-p with the `min_blocks` floor) over each query's causal keys, as a decode step at that
  position selects; bias: the indexer's distance bias [heads, sp.distance_buckets] or None.
  Returns bool [batch, heads, seq, s_pad // block_size].
  """
  b, s, h, r = qi.shape
  _check_bias(bias, h, sp)
  bs = sp.block_size
  nb = s_pad // bs
  ki_p = jnp.pad(ki, ((0, 0), (0, s_pad - ki.shape[1]), (0, 0), (0, 0)))
  kpos_p = jnp.pad(k_pos, ((0, 0), (0, s_pad - k_pos.shape[1])), constant_values=-1)
  chunk = min(sp.chunk_size, s)
  n_chunks = -(-s // chunk)
  qi_p = jnp.pad(qi, ((0, 0), (0, n_chunks * chunk - s), (0, 0), (0, 0)))
  pos_p = jnp.pad(positions, ((0, 0), (0, n_chunks * chunk - s)), constant_values=0)
  select = ref.SELECTORS[sp.selector]

  def one(i):
    qc = jax.lax.dynamic_slice_in_dim(qi_p, i * chunk, chunk, axis=1)
    pc = jax.lax.dynamic_slice_in_dim(pos_p, i * chunk, chunk, axis=1)
    sc = indexer_lib.scores(qc, ki_p)  # [b, h, c, s_pad]
    vis = (kpos_p[:, None, None, :] >= 0) & (kpos_p[:, None, None, :] <= pc[:, None, :, None])
    lm, ok = ref.block_logmass(sc, jnp.broadcast_to(vis, sc.shape), bs)
    if bias is not None:
      lm = lm + jnp.moveaxis(indexer_lib.block_bias(bias, pc // bs, nb), 0, 1)  # [b, h, c, nb]
    own = jnp.broadcast_to((pc // bs)[:, None, :], lm.shape[:-1])
    if sp.mode == "topk":
      return ref.topk_from_block_logmass(lm, ok, own, -(-sp.topk_tokens // bs))
    mask = select(lm, ok, own, sp.top_p)
    if sp.min_blocks:
      mask |= ref.topk_from_block_logmass(lm, ok, own, sp.min_blocks)
    return mask

  m = jax.lax.map(one, jnp.arange(n_chunks))  # [n, b, h, c, nb]
  m = jnp.moveaxis(m, 0, 2).reshape(b, h, n_chunks * chunk, nb)
  return m[:, :, :s]


__all__ = ["causal_block_logmass", "block_topp", "block_topp_histogram", "block_topk",
           "streaming_mask", "block_mask_to_tokens", "decode_topp", "decode_topk",
           "prefill_topp", "selected_fraction", "decode_blocks", "chunk_blocks",
           "per_query_selection"]
