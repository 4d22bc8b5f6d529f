"""The passkey demo prompt of `python infer.py`: Shakespeare filling the context, one pass key.

It differs from the evaluation's `passkey` task (`eval/tasks.py`) on purpose. The task is the
instructed form (a preamble saying a key is hidden, a needle repeating it, a question), the
usual benchmark prompt for comparing modes over many samples; SmolLM2-135M barely answers it
even dense (4% at 4K and 8K, `eval_results/smollm2_h200/README.md`). The demo is the completion
form a 135M model answers: no preamble, no chat template, and the prompt ends with the needle's
own opening words, so the model answers by recalling the number that followed them. One run
then shows whether the sparse model still reaches a token far back.
"""

from __future__ import annotations

PREAMBLE_CHARS = 6000  # the Project Gutenberg header of the first play


def passkey_prompt(tok, ctx: int, max_new: int, depth: float, seed: int):
  """(prompt ids, passkey): Shakespeare filling `ctx` tokens with the key at `depth`, leaving
  room for `max_new` new tokens. Raises CliError when `ctx` cannot hold the prompt."""
  import numpy as np

  from rtpurbo_jax import assets
  from rtpurbo_jax.infer.command import CliError  # here: command imports this module

  key = str(np.random.default_rng(seed).integers(10000, 100000))
  needle = f"\nThe pass key is {key}.\n"
  question = "\n\nThe pass key is"
  text = assets.shakespeare_text()[PREAMBLE_CHARS:]
  budget = ctx - max_new

  def encode(t):
    return list(tok(t, add_special_tokens=False)["input_ids"])

  n_fill = budget - len(encode(needle + question)) - 1
  if n_fill < 1:
    raise CliError(f"--ctx={ctx} is too short for the passkey prompt with {max_new} new tokens")
  chars = min(len(text), 6 * n_fill)
  while True:
    filler = encode(text[:chars])
    if len(filler) >= n_fill or chars >= len(text):
      break
    chars = min(len(text), 2 * chars)
  reps = -(-n_fill // max(1, len(filler)))
  filler = (filler * reps)[:n_fill]
  for _ in range(4):  # re-tokenizing the joined text can shift the count a little
    cut = int(round(depth * len(filler)))
    ids = encode(tok.decode(filler[:cut]) + needle + tok.decode(filler[cut:]) + question)
    if len(ids) <= budget:
      return ids, key
    filler = filler[:len(filler) - (len(ids) - budget) - 8]
  raise CliError("could not fit the passkey prompt into --ctx")
