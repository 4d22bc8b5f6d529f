"""Greedy answers for the tasks: prefill the prompt into the cache, then decode step by step.

Separate from `rtpurbo_jax.generate` because the evaluation needs two things it does not give:
the `SelectionStats` that each decode step sows (measured decode sparsity), and one prefill
shared by modes whose prefill is identical (rtpurbo and topk differ only in decode), so
`decode` takes a cache built by another model of the same cache layout.

Prompts are right-padded to a fixed length per context length (one compilation per length):
input_ids [batch, prompt_len] int32, prompt_lengths [batch] int32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtpurbo_jax.attention.mixed import SelectionStats
from rtpurbo_jax.eval.sparsity import decode_fractions


class GreedyDecoder:
  """Jitted prefill and single decode steps for one model (mode fixed at construction)."""

  def __init__(self, model):
    self.model = model
    self.graphdef, self.state = nnx.split(model)
    graphdef = self.graphdef

    @jax.jit
    def prefill(state, ids, lengths, cache):
      m = nnx.merge(graphdef, state)
      valid = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
      h, cache = m.hidden_states(ids, valid=valid, cache=cache)
      last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [b, 1, e]
      tok = jnp.argmax(m.logits_from_hidden(last)[:, 0], axis=-1).astype(jnp.int32)
      return tok, cache

    @jax.jit
    def step(state, tok, cache):
      m = nnx.merge(graphdef, state)
      (logits, cache), stats = nnx.capture(m, SelectionStats)(tok[:, None], cache=cache)
      return (jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache,
              nnx.to_pure_dict(stats))

    self._prefill, self._step = prefill, step

  def prefill(self, input_ids, prompt_lengths, max_len: int):
    """Returns (first new token [batch], cache holding the prompts)."""
    ids = jnp.asarray(input_ids, jnp.int32)
    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    if int(jnp.max(lengths)) + 1 > max_len:
      raise ValueError(f"prompt of {int(jnp.max(lengths))} tokens leaves no room in a cache of "
                       f"{max_len}")
    cache = self.model.init_cache(ids.shape[0], max_len)
    return self._prefill(self.state, ids, lengths, cache)

  def decode(self, first, cache, steps: int):
    """Greedy tokens [batch, steps] (the first is `first`) and the mean selected fraction per
    retrieval head over the decode steps ({layer: [n_ret]}, empty for dense / streaming)."""
    toks, sums, n = [np.asarray(first)], {}, 0
    tok = first
    for _ in range(steps - 1):
      tok, cache, stats = self._step(self.state, tok, cache)
      toks.append(np.asarray(tok))
      for layer, f in decode_fractions(stats).items():
        sums[layer] = sums.get(layer, 0.0) + f
      n += 1
    fractions = {layer: s / n for layer, s in sums.items()}
    return np.stack(toks, axis=1), fractions
