"""Per-row sampling for a batch whose rows belong to different requests.

`infer.sampling` takes one (temperature, top_k, top_p) for the whole batch as static Python
numbers; a server batch mixes requests, so here they are arrays [batch] (traced: one
compilation for any mix). The rules are the same (see `infer.sampling`): divide by the
temperature, keep logits >= the k-th largest (ties kept), then the shortest prefix of tokens
ranked by probability (lower id first on ties) whose mass reaches top_p. temperature 0 is
greedy: the argmax (lowest id on ties), bitwise what `infer.sampling.sample` returns.

Randomness: row b draws with `fold_in(key(seed[b]), step[b])`, so a request's tokens depend
only on its own seed and token index, not on which other requests share the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                seed: jax.Array, step: jax.Array) -> jax.Array:
  """Next tokens [batch] int32.

  logits: [batch, vocab] (any float dtype; math in float32); temperature, top_p: [batch]
  float32; top_k: [batch] int32 (0 = off); seed: [batch] uint32; step: [batch] int32.
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sampled():
    v = logits.shape[-1]
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    x = logits / t
    order = jnp.argsort(-x, axis=-1, stable=True)  # descending, lower id first on ties
    xs = jnp.take_along_axis(x, order, axis=-1)
    k = jnp.where((top_k <= 0) | (top_k >= v), v, top_k)
    kth = jnp.take_along_axis(xs, (k - 1)[:, None], axis=-1)
    xs = jnp.where(xs >= kth, xs, -jnp.inf)
    probs = jax.nn.softmax(xs, axis=-1)
    ahead = jnp.cumsum(probs, axis=-1) - probs
    keep = (ahead < top_p[:, None]) | (top_p[:, None] >= 1.0)
    xs = jnp.where(keep & jnp.isfinite(xs), xs, -jnp.inf)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seed, step)
    pick = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, xs)
    tok = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, tok, greedy)

  # The sort over the vocabulary only runs when some row samples.
  return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)
