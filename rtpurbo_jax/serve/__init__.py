"""An OpenAI-compatible HTTP server with continuous batching over the mixed KV cache.

  slots.py      the device side: a cache of `slots` rows; jitted prefill (one chunk of one
                request into its row) and decode (one token for every row) with fixed shapes
  sampling.py   per-row sampling (temperature / top-k / top-p / seed differ between rows)
  text.py       tokenizer adapter (HF or bytes), chat prompts, incremental detokenizer and
                stop strings
  scheduler.py  the engine thread: admission queue, slot table, prefill / decode interleave
  metrics.py    counters and gauges, Prometheus text format
  protocol.py   request / response models of the OpenAI API subset served
  app.py        the FastAPI application (routes, errors, streaming)
  build.py      model + tokenizer + scheduler from a run config; uvicorn in a thread
"""
