"""Greedy answers for the tasks: prefill the prompt into the cache, then decode step by step.

Separate from `rtpurbo_jax.generate` because the evaluation needs two things it does not give:
the `SelectionStats` that each decode step sows (measured decode sparsity), and one prefill
shared by modes whose prefill is identical (rtpurbo and topk differ only in decode), so
`decode` takes a cache built by another model of the same cache layout.

Prompts are right-padded to a fixed length per context length (one compilation per length):
input_ids [batch, prompt_len] int32, prompt_lengths [batch] int32. The prefill runs in chunks
of `prefill_chunk` tokens through the attention's contiguous fast path, as the inference
engine does: local heads then read only their window's slice of the cache per chunk, which on
CPU (the jnp reference attention computes every score it masks) cuts the cost of a long prompt
several times over against one [prompt, max_len] pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtpurbo_jax.attention.mixed import DECODE, SelectionStats
from rtpurbo_jax.infer.engine import prefill_chunk_size, prefill_chunks


class GreedyDecoder:
  """Jitted prefill and a compiled greedy decode loop for one model (mode fixed at
  construction)."""

  def __init__(self, model, prefill_chunk: int = 1024):
    if prefill_chunk < 1:
      raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 1")
    self.model, self.prefill_chunk = model, int(prefill_chunk)
    self.graphdef, self.state = nnx.split(model)
    graphdef = self.graphdef

    @jax.jit
    def first_token(state, last_h):
      m = nnx.merge(graphdef, state)
      return jnp.argmax(m.logits_from_hidden(last_h[:, None])[:, 0], axis=-1).astype(jnp.int32)

    # Layers with selected heads: their decode steps sow a selected fraction ([n_ret] each).
    self.selecting = {i: len(l.attn.routing.selected) for i, l in enumerate(model.layers)
                      if l.attn.routing.selected}
    selecting = self.selecting

    @functools.partial(jax.jit, static_argnames=("steps",))
    def loop(state, first, cache, steps):
      """`steps` greedy decode steps in one compiled loop: (tokens [steps, batch], summed
      selected fractions {layer: [n_ret]})."""
      def body(carry, _):
        tok, cache, sums = carry
        m = nnx.merge(graphdef, state)  # inside the loop body: capture sows at its trace level
        (logits, cache), stats = nnx.capture(m, SelectionStats)(tok[:, None], cache=cache,
                                                                phase=DECODE)
        fr = _step_fractions(nnx.to_pure_dict(stats))
        if set(fr) - set(sums):
          raise ValueError(f"layers {sorted(set(fr) - set(sums))} sow selection stats but "
                           "have no retrieval heads")
        sums = {layer: sums[layer] + fr[layer] for layer in sums}
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return (nxt, cache, sums), nxt

      sums = {layer: jnp.zeros((n,), jnp.float32) for layer, n in selecting.items()}
      (_, _, sums), toks = jax.lax.scan(body, (first, cache, sums), None, length=steps)
      return toks, sums

    self._first, self._loop = first_token, loop

  def prefill(self, input_ids, prompt_lengths, max_len: int):
    """Returns (first new token [batch], cache holding the prompts)."""
    ids = jnp.asarray(input_ids, jnp.int32)
    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    if int(jnp.max(lengths)) + 1 > max_len:
      raise ValueError(f"prompt of {int(jnp.max(lengths))} tokens leaves no room in a cache of "
                       f"{max_len}")
    b, p = ids.shape
    chunk = prefill_chunk_size(self.prefill_chunk, p, self.model.sparse)
    last_h = jnp.zeros((b, self.model.cfg.hidden_size), self.model.dtype)
    # The inference engine's chunked prefill (one compilation: the chunk offset is traced).
    cache, last_h, _ = prefill_chunks(self.state, self.model.init_cache(b, max_len), ids,
                                      lengths, chunk, last_h, graphdef=self.graphdef, mesh=None)
    return self._first(self.state, last_h), cache

  def decode(self, first, cache, steps: int):
    """Greedy tokens [batch, steps] (the first is `first`) and the mean selected fraction per
    retrieval head over the decode steps ({layer: [n_ret]}, empty for dense / streaming).

    The cache is not donated: modes sharing a prefill decode from the same cache."""
    if steps < 1:
      raise ValueError(f"steps={steps} must be >= 1")
    if steps == 1:
      return np.asarray(first)[:, None], {}
    # One compiled loop per (steps, cache shape): no per-step dispatch or host sync.
    toks, sums = jax.device_get(self._loop(self.state, first, cache, steps - 1))
    fractions = {layer: np.asarray(s) / (steps - 1) for layer, s in sums.items()}
    return np.concatenate([np.asarray(first)[:, None], np.asarray(toks).T], axis=1), fractions


def _step_fractions(stats: dict) -> dict:
  """{layer: selected fraction per retrieval head [n_ret]} of one decode step's sown stats
  (inside jit: the jnp form of `sparsity.decode_fractions`)."""
  out = {}
  for layer, sub in (stats.get("layers") or {}).items():
    vals = sub.get("attn", {}).get("selected_fraction")
    if vals is not None:
      out[int(layer)] = jnp.mean(jnp.stack([jnp.asarray(v, jnp.float32) for v in vals]),
                                 axis=0)
  return out
