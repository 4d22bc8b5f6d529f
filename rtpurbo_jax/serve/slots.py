"""The device side of the server: one mixed KV cache of `slots` rows and two jitted steps.

Each slot is one row of every `LayerCache` array (`[slots, ...]`), holding one request at a
time. The steps have fixed shapes, so each compiles once for the server's life:

  prefill   ids [1, chunk] of one request at positions p0..p0+chunk-1 (p0 traced) into row
            `slot` (traced): the row is sliced out, run through the model's contiguous
            chunked-prefill path, and written back (the cache is donated, so the update is
            in place). When the chunk holds the prompt's last token it also samples the
            request's first new token from that token's hidden state, exactly as
            `infer.engine` does after its prefill.
  decode    tokens [slots] at positions [slots] (one per row, each row its own position):
            one forward of every row, then per-row sampling. Rows that are not decoding
            (free, or mid-prefill) pass `active=False`: their token is not written to the
            cache (`valid=False` drops the write and leaves `length` as it was), and their
            output is ignored.

Reuse of a row: a request's first prefill chunk (p0 == 0) resets its row's `length` to 0 and
`ring_pos` to -1 before writing. That is all a row needs: full K/V and compressed-key slots at
or beyond `length` are never visible (every read masks by `length` or by causality), and a
ring slot is visible only through its `ring_pos`. Stale values of the previous request stay
in memory but cannot be read.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtpurbo_jax.attention.mixed import (DECODE, PREFILL, PrefillSelectionStats,
                                         RowSelectionStats)
from rtpurbo_jax.infer.engine import prefill_chunk_size, tree_bytes
from rtpurbo_jax.serve.sampling import sample_rows


@dataclasses.dataclass
class RowSampling:
  """Sampling settings of one request (see `serve.sampling`)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0


def _sampling_arrays(rows: list[RowSampling], steps) -> dict:
  return dict(
      temperature=np.asarray([r.temperature for r in rows], np.float32),
      top_k=np.asarray([r.top_k for r in rows], np.int32),
      top_p=np.asarray([r.top_p for r in rows], np.float32),
      seed=np.asarray([r.seed % (1 << 32) for r in rows], np.uint32),
      step=np.asarray(steps, np.int32))


def _row(cache, slot):
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0), cache)


def _put_row(cache, row, slot):
  return jax.tree.map(lambda x, r: jax.lax.dynamic_update_slice_in_dim(x, r, slot, axis=0),
                      cache, row)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(state, cache, slot, ids, p0, length, samp, *, graphdef):
  """ids [1, C] at positions p0.. of row `slot`; length: the prompt's length () int32.

  Returns (cache, first token () int32 (meaningful once the chunk holds token length-1),
  prefill blocks float32 [2] = (selected, causal) pairs of sparse prefill, zeros without it).
  """
  model = nnx.merge(graphdef, state)
  c = ids.shape[1]
  fresh = p0 == 0
  row = [dataclasses.replace(l, length=jnp.where(fresh, 0, l.length),
                             ring_pos=jnp.where(fresh, -1, l.ring_pos))
         for l in _row(cache, slot)]
  pos = (p0 + jnp.arange(c, dtype=jnp.int32))[None]
  (h, row), stats = nnx.capture(model.hidden_states, PrefillSelectionStats)(
      ids, positions=pos, valid=pos < length, cache=row, phase=PREFILL, contiguous=True)
  cache = _put_row(cache, row, slot)
  last = jax.lax.dynamic_index_in_dim(h[0], jnp.clip(length - 1 - p0, 0, c - 1), axis=0)
  logits = model.logits_from_hidden(last[None])[:, 0]  # [1, vocab]
  tok = sample_rows(logits, **samp)[0]
  blocks = sum(jax.tree.leaves(stats), jnp.zeros((2,), jnp.float32))
  return cache, tok, blocks


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode(state, cache, tokens, positions, active, samp, *, graphdef):
  """tokens, positions: [slots] int32; active: [slots] bool.

  Returns (cache, next tokens [slots] int32, selected-block fraction over the active rows'
  retrieval heads () float32, NaN when no layer selects).
  """
  model = nnx.merge(graphdef, state)
  (logits, cache), stats = nnx.capture(model, RowSelectionStats)(
      tokens[:, None], positions=positions[:, None], valid=active[:, None], cache=cache,
      phase=DECODE)
  nxt = sample_rows(logits[:, 0], **samp)
  rows = [f for f in jax.tree.leaves(stats)]  # each [slots, n_ret]
  if rows:
    per_row = jnp.mean(jnp.concatenate(rows, axis=1), axis=1)  # [slots]
    w = active.astype(jnp.float32)
    frac = jnp.sum(per_row * w) / jnp.maximum(jnp.sum(w), 1.0)
  else:
    frac = jnp.float32(jnp.nan)
  return cache, nxt, frac


class SlotModel:
  """A model, its `slots`-row cache of `max_len` tokens per row, and the two steps.

  Not thread-safe: one thread (the scheduler's) calls `prefill` and `decode`.
  max_len is rounded up to whole prefill chunks (and blocks): a prompt padded to whole chunks
  always fits in its row.
  """

  def __init__(self, model, *, slots: int, max_len: int, prefill_chunk: int):
    if slots < 1:
      raise ValueError(f"slots={slots} must be >= 1")
    if max_len < 2:
      raise ValueError(f"max_len={max_len} must be >= 2 (a prompt token and a new one)")
    self.model = model
    self.slots = int(slots)
    self.chunk = prefill_chunk_size(prefill_chunk, max_len, model.sparse)
    bs = model.sparse.block_size
    unit = int(np.lcm(self.chunk, bs))
    self.max_len = int(-(-int(max_len) // unit) * unit)
    self.graphdef, self.state = nnx.split(model)
    self.cache = model.init_cache(self.slots, self.max_len)
    self.cache_bytes = tree_bytes(self.cache)
    self.vocab_size = model.cfg.vocab_size

  def warmup(self) -> None:
    """Compile both steps (row 0 is left free: its contents are never read)."""
    self.prefill(0, np.zeros(self.chunk, np.int32), 0, 1, RowSampling())
    self.decode(np.zeros(self.slots, np.int32), np.zeros(self.slots, np.int32),
                np.zeros(self.slots, bool), [RowSampling()] * self.slots,
                np.zeros(self.slots, np.int32))

  def prefill(self, slot: int, chunk_ids, p0: int, length: int, sampling: RowSampling):
    """Write one chunk of a prompt into row `slot`.

    chunk_ids: the prompt's tokens p0..p0+chunk-1 (shorter at the end: padded here);
    length: the prompt's length. Returns (first new token or None when the prompt continues
    past this chunk, blocks (selected, causal) as numpy float [2])."""
    ids = np.zeros((1, self.chunk), np.int32)
    ids[0, :len(chunk_ids)] = chunk_ids
    self.cache, tok, blocks = _prefill(
        self.state, self.cache, np.int32(slot), ids, np.int32(p0), np.int32(length),
        _sampling_arrays([sampling], [0]), graphdef=self.graphdef)
    last = p0 + self.chunk >= length
    return (int(tok) if last else None), np.asarray(blocks)

  def decode(self, tokens, positions, active, sampling: list[RowSampling], steps):
    """One token for every row. tokens / positions / steps: [slots] int (`steps` = index of
    the token being sampled, for the row's random stream); active: [slots] bool.
    Returns (next tokens [slots] numpy int32, selected fraction or None)."""
    self.cache, nxt, frac = _decode(
        self.state, self.cache, np.asarray(tokens, np.int32), np.asarray(positions, np.int32),
        np.asarray(active, bool), _sampling_arrays(sampling, steps), graphdef=self.graphdef)
    nxt, frac = jax.device_get((nxt, frac))
    frac = float(frac)
    return np.asarray(nxt), (None if np.isnan(frac) else frac)
