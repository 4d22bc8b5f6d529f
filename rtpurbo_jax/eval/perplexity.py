"""Perplexity over held-out text at a fixed context length.

Token t's negative log-likelihood is -log softmax(logits[t - 1])[ids[t]]. Logits are formed
from the final hidden states in chunks of positions, so a long context never holds a
[seq, vocab] array (8K x 49K floats would be 1.6 GB).

Sparse modes are scored as they decode: with `decode_style=True` every query selects blocks
for its retrieval heads by indexer top-p (or top-k), exactly as a decode step at that
position would (`model(ids, sparse_queries=...)`); local heads see sinks + window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtpurbo_jax.attention import routing as routing_lib


def token_nll(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """logits [batch, seq, vocab], ids [batch, seq] -> nll [batch, seq - 1] of ids[:, 1:]."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def perplexity(nll, start: int = 0) -> float:
  """exp(mean nll) over predicted positions >= `start` (nll[:, t - 1] predicts token t)."""
  nll = np.asarray(nll, np.float64)
  return float(np.exp(nll[:, max(start - 1, 0):].mean()))


def heldout_windows(codec, text: str, length: int, count: int, seed: int) -> np.ndarray:
  """`count` windows of `length` token ids from `text`, evenly spread, int32 [count, length].

  The offset of the first window depends on `seed`; windows may overlap when the text is short.
  """
  return windows_from_ids(np.asarray(codec.encode(text), np.int32), length, count, seed)


def windows_from_ids(ids, length: int, count: int, seed: int) -> np.ndarray:
  """`heldout_windows` from the text's token ids [n] (encode a long text once, cut many)."""
  ids = np.asarray(ids, np.int32)
  if len(ids) < length + 1:
    raise ValueError(f"held-out text has {len(ids)} tokens, fewer than the {length} asked for")
  span = len(ids) - length
  rng = np.random.default_rng([seed, length])
  first = int(rng.integers(0, max(span // max(count, 1), 1)))
  starts = [first + (span - first) * i // max(count, 1) for i in range(count)]
  return np.stack([ids[s:s + length] for s in starts])


def window_nll(nll, length: int) -> dict:
  """Per-window mean nll of nll [windows, length - 1]: {"all": [windows], "tail": [windows]}
  (tail: predicted positions in the second half, as `perplexity(nll, length // 2)`)."""
  nll = np.asarray(nll, np.float64)
  return {"all": nll.mean(axis=1).tolist(),
          "tail": nll[:, max(length // 2 - 1, 0):].mean(axis=1).tolist()}


def relative_to_dense(ppl: dict, seed: int, n_boot: int = 2000) -> dict:
  """{mode: {length: {"ppl": interval, "tail": interval}}} for every non-dense mode with a dense
  counterpart at that length: `stats.paired_bootstrap_rel` over the held-out windows (the same
  windows for every mode: same seed, count and length). Entries without per-window nlls (older
  results) give the point value with lo = hi = rel."""
  from rtpurbo_jax.eval.stats import paired_bootstrap_rel
  dense = ppl.get("dense") or {}
  out: dict = {}
  for mode, per_length in ppl.items():
    if mode == "dense":
      continue
    for length, r in per_length.items():
      d = dense.get(length)
      if d is None:
        continue
      cell = {}
      for key, src in (("ppl", "all"), ("tail", "tail")):
        wa, wb = (r.get("window_nll") or {}).get(src), (d.get("window_nll") or {}).get(src)
        if wa is not None and wb is not None and len(wa) == len(wb):
          cell[key] = paired_bootstrap_rel(wa, wb, [int(seed), int(length), len(key)], n_boot)
        else:
          rel = r["ppl" if key == "ppl" else "ppl_tail"] / d[
              "ppl" if key == "ppl" else "ppl_tail"] - 1
          cell[key] = {"rel": rel, "lo": rel, "hi": rel, "windows": 0, "n_boot": 0}
      out.setdefault(mode, {})[length] = cell
  return out


def make_nll_fn(model, chunk: int = 512):
  """A jitted `f(ids [batch, seq] int32, sparse_queries bool [batch, seq] | None) -> nll`.

  nll: [batch, seq - 1] float32, as `token_nll` of the model's logits.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def nll_fn(state, ids, sparse_queries):
    m = nnx.merge(graphdef, state)
    h, _ = m.hidden_states(ids, sparse_queries=sparse_queries)
    b, s, e = h.shape
    n = -(-(s - 1) // chunk)
    pad = n * chunk - (s - 1)
    hp = jnp.pad(h[:, :-1], ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, e)
    tp = jnp.pad(ids[:, 1:], ((0, 0), (0, pad))).reshape(b, n, chunk)

    def one(args):
      hc, tc = args
      logp = jax.nn.log_softmax(m.logits_from_hidden(hc), axis=-1)
      return -jnp.take_along_axis(logp, tc[..., None], axis=-1)[..., 0]

    out = jax.lax.map(one, (jnp.moveaxis(hp, 1, 0), jnp.moveaxis(tp, 1, 0)))  # [n, b, chunk]
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk)[:, :s - 1]

  def run(ids, sparse_queries=None):
    return nll_fn(state, jnp.asarray(ids, jnp.int32), sparse_queries)

  return run


def decode_style(mode: str) -> bool:
  """Whether a mode selects blocks per query (rtpurbo, topk) when scoring a whole sequence."""
  return routing_lib.selects_blocks(mode)
