"""The server on SmolLM2-135M with the committed RTPurbo artifacts (CPU): two concurrent chat
requests of different lengths, through the official openai client, give each prompt's greedy
tokens alone through `rtpurbo_jax.generate`, and the short one answers the question."""

import asyncio

import numpy as np
import openai
import pytest

from rtpurbo_jax.infer.generate import generate
from rtpurbo_jax.serve import build
from rtpurbo_jax.serve.text import Codec

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-rtpurbo"
PAD, NEW = 192, 12  # one padded prompt shape for the `generate` references


def test_concurrent_chat_equals_generate_alone():
  import rtpurbo_jax

  model = rtpurbo_jax.from_pretrained(NAME)
  codec = Codec(rtpurbo_jax.load_tokenizer(NAME), vocab_size=model.cfg.vocab_size)
  # Chunks of 64: the long prompt takes two prefill chunks, interleaved with decode steps.
  srv = build.build_server(model, codec, NAME, slots=2, max_len=256, prefill_chunk=64)
  questions = [
      "What is the capital of France? Answer in one sentence.",
      "Here is a line from a play: 'Now is the winter of our discontent made glorious summer "
      "by this sun of York; and all the clouds that lour'd upon our house in the deep bosom "
      "of the ocean buried.' Which season does the speaker name first? Answer in one word.",
  ]
  messages = [[{"role": "user", "content": q}] for q in questions]
  try:
    with build.serve_in_thread(srv.app) as url:
      async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none",
                                      max_retries=0, timeout=600) as c:
          return await asyncio.gather(*[
              c.chat.completions.create(model=NAME, messages=m, max_tokens=NEW,
                                        temperature=0, extra_body={"return_token_ids": True})
              for m in messages])

      results = asyncio.run(run())
  finally:
    srv.scheduler.stop()
  eos = codec.eos_ids
  lengths = []
  for m, r in zip(messages, results):
    ids = codec.encode_chat(m)
    lengths.append(len(ids))
    padded = np.zeros((1, PAD), np.int32)
    padded[0, :len(ids)] = ids
    want = generate(model, padded, NEW, prompt_lengths=[len(ids)], eos_token_id=eos,
                    max_len=PAD + NEW)[0].tolist()
    want = want[:next((i + 1 for i, t in enumerate(want) if t in eos), NEW)]
    assert r.choices[0].token_ids == want
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == codec.decode([t for t in want if t not in eos])
  assert lengths[0] < 64 < lengths[1] <= PAD
  assert "Paris" in results[0].choices[0].message.content
