"""`generate`: KV-cached sampling for a right-padded batch of prompts (the public entry point).

    new_tokens = generate(model, input_ids, max_new_tokens=32, prompt_lengths=lengths)

It builds an `Engine` (chunked prefill into the mixed cache, a jitted decode loop that never
recompiles per step) and returns only the tokens; use `Engine.generate` for the metrics.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from rtpurbo_jax.infer.engine import Engine, Sampling
from rtpurbo_jax.infer.sampling import check_params


def generate(model, input_ids, max_new_tokens: int, *, prompt_lengths=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | tuple[int, ...] | None = None, pad_token_id: int = 0,
             seed: int = 0, max_len: int | None = None, prefill_chunk: int | None = None,
             on_token: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
  """New tokens [batch, max_new_tokens] int32.

  Args:
    model: a `Transformer` (any mode: dense, rtpurbo, streaming, topk).
    input_ids: [batch, prompt_len] int, right-padded.
    prompt_lengths: [batch] real prompt lengths (None: every row is full).
    temperature: 0 = greedy; otherwise softmax(logits / temperature), filtered by `top_k`
      (0 = off) and `top_p` (1 = off); see `infer.sampling`.
    eos_token_id: an id or a tuple of ids; a row stops after emitting one and is filled with
      `pad_token_id` from then on. Generation ends early once every row has stopped.
    seed: PRNG seed (sampling is reproducible for a given seed).
    max_len: cache capacity in tokens (default: longest prompt + max_new_tokens).
    prefill_chunk: prompt tokens per prefill step (default: the whole prompt at once).
    on_token: streaming callback `on_token(step, tokens[batch])`, once per new token.
  """
  check_params(temperature, top_k, top_p)
  engine = Engine(model)
  result = engine.generate(
      input_ids, max_new_tokens, prompt_lengths=prompt_lengths,
      sampling=Sampling(float(temperature), int(top_k), float(top_p)),
      eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, max_len=max_len,
      prefill_chunk=prefill_chunk, on_token=on_token)
  return result.tokens
