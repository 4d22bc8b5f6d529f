"""Token sampling: greedy, temperature, top-k and top-p (nucleus), in plain jnp.

All functions take logits [batch, vocab] (any float dtype; math in float32) and are
jit-friendly: `temperature`, `top_k` and `top_p` are Python numbers (static under jit).

Order of operations (the usual one): divide by the temperature, keep the `top_k` largest
logits (ties at the k-th value are kept), then keep the shortest prefix of tokens ranked by
probability (ties: lower token id first) whose cumulative probability reaches `top_p`. Filtered
tokens get -inf. `temperature == 0` is greedy: the argmax (lowest id on ties).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def check_params(temperature: float, top_k: int, top_p: float) -> None:
  """One clear error for an invalid sampling setting."""
  if not temperature >= 0.0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k={top_k} must be a non-negative integer (0 = off)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off)")


def apply_top_k(logits: jax.Array, k: int) -> jax.Array:
  """Keep logits >= the k-th largest per row; others -inf. k <= 0 or k >= vocab: unchanged."""
  v = logits.shape[-1]
  if k <= 0 or k >= v:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, NEG_INF)


def apply_top_p(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: a token survives iff the probability mass ranked strictly ahead of it
  (descending probability, lower id first on ties) is < p. The top token always survives."""
  if p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  ahead = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = ahead < p
  keep = jnp.put_along_axis(jnp.zeros_like(keep_sorted), order, keep_sorted, axis=-1,
                            inplace=False)
  return jnp.where(keep & jnp.isfinite(logits), logits, NEG_INF)


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Tempered, filtered logits [batch, vocab] float32 (the distribution that is sampled)."""
  x = logits.astype(jnp.float32)
  if temperature > 0.0 and temperature != 1.0:
    x = x / temperature
  return apply_top_p(apply_top_k(x, top_k), top_p)


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """Next tokens [batch] int32 from logits [batch, vocab]."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  x = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
