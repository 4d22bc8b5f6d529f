"""Serve a model over an OpenAI-compatible HTTP API with continuous batching.

  python serve.py                                  SmolLM2-135M + its RTPurbo artifacts on CPU,
                                                   4 slots of 4K tokens, http://127.0.0.1:8000
  python serve.py --config=configs/tiny.py --slots=8
                                                   tiny random-weight model (byte tokenizer)
  python serve.py --config=configs/llama8b.py --random_weights --ctx=32K --slots=8
                                                   Llama-8B shapes with random weights (a GPU)

Routes: POST /v1/completions, POST /v1/chat/completions (streaming with "stream": true),
GET /v1/models, /health, /metrics (Prometheus text; ?format=json). The model is served under
--served_model_name (default: the registered name or folder, e.g. smollm2-135m-rtpurbo; the
config name with --random_weights).

Each of --slots sequence slots holds one request of up to --ctx tokens (prompt +
max_tokens); a request that cannot fit is refused with a 400, and one that finds --max_queue
requests already waiting with a 503. Before allocating, weights + the slots' KV cache +
workspace are checked against the device memory. Config values (`--config.sparse.top_p=0.95`,
`--config.dtype=bfloat16`, ...) work as in infer.py.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from rtpurbo_jax import cli

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "smollm2_135m.py")
_MODES = ("rtpurbo", "dense", "streaming", "topk")

_CONFIG = cli.define_config(_DEFAULT_CONFIG, "Run config file (ml_collections).")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_integer("slots", 4, "Sequence slots: requests decoded together.")
flags.DEFINE_string("ctx", None, "Tokens per slot (prompt + max_tokens), e.g. 4K or 32K "
                    "(default: config.infer.ctx).")
flags.DEFINE_integer("prefill_chunk", None, "Prompt tokens per prefill step (default: "
                     "config.infer.prefill_chunk, at most --ctx).")
flags.DEFINE_integer("max_queue", 256, "Requests that may wait for a slot; more get a 503.")
flags.DEFINE_string("model", None, "HF model folder or registered name (overrides "
                    "config.infer.model / config.model_path).")
flags.DEFINE_bool("random_weights", False, "Random weights from config.model (byte tokenizer).")
flags.DEFINE_enum("mode", None, _MODES, "Attention mode (default: config.sparse.mode).")
flags.DEFINE_string("served_model_name", None, "The model id clients send.")
flags.DEFINE_string("device_memory", None, "Memory per device, e.g. 80GB (default: detected).")
FLAGS = flags.FLAGS


class CliError(Exception):
  """A user-facing error: printed as one line, exit status 2."""


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from rtpurbo_jax import assets
  assets.enable_compilation_cache()
  from rtpurbo_jax.config import ConfigError
  from rtpurbo_jax.infer.memory import MemoryPlanError

  try:
    run(cli.load_config(_CONFIG))
  except (CliError, ConfigError, MemoryPlanError, FileNotFoundError, ValueError) as e:
    print(f"serve.py: error: {e}", file=sys.stderr)
    return 2
  return 0


def run(cfg) -> None:
  import uvicorn

  from rtpurbo_jax.config import parse_size, validate
  from rtpurbo_jax.infer import memory
  from rtpurbo_jax.serve import build

  if FLAGS.model is not None:
    cfg.infer.model = FLAGS.model
  if FLAGS.mode is not None:
    cfg.sparse.mode = FLAGS.mode
  if FLAGS.ctx is not None:
    cfg.infer.ctx = FLAGS.ctx
  validate(cfg)
  ctx = parse_size(cfg.infer.ctx)
  chunk = FLAGS.prefill_chunk or int(cfg.infer.prefill_chunk)
  if FLAGS.slots < 1 or ctx < 2 or chunk < 1 or FLAGS.max_queue < 0:
    raise CliError(f"need --slots >= 1 (got {FLAGS.slots}), --ctx >= 2 (got {ctx}), "
                   f"--prefill_chunk >= 1 (got {chunk}), --max_queue >= 0 (got "
                   f"{FLAGS.max_queue})")
  path = build.model_path(cfg, FLAGS.random_weights)
  name = FLAGS.served_model_name or (os.path.basename(os.path.normpath(path)) if path
                                     else cfg.name)

  model, note = build.load_model(cfg, random_weights=FLAGS.random_weights)
  dev_mem = memory.parse_bytes(FLAGS.device_memory) if FLAGS.device_memory else None
  mem = build.check_memory(cfg, model, slots=FLAGS.slots, max_len=ctx,
                           prefill_chunk=min(chunk, ctx), device_memory=dev_mem)
  codec = build.load_codec(cfg, model, FLAGS.random_weights)
  logging.info("model %s (%s, mode=%s; %s); %s", name, path or "random weights",
               model.sparse.mode, note, mem.describe())
  print(f"serve.py: compiling prefill and decode for {FLAGS.slots} slots x {ctx} tokens ...",
        flush=True)
  server = build.build_server(model, codec, name, slots=FLAGS.slots, max_len=ctx,
                              prefill_chunk=min(chunk, ctx), max_queue=FLAGS.max_queue)
  sm = server.slot_model
  print(f"serve.py: {name} on http://{FLAGS.host}:{FLAGS.port}/v1 ({sm.slots} slots x "
        f"{sm.max_len} tokens, prefill chunk {sm.chunk}, KV cache "
        f"{memory.fmt(sm.cache_bytes)}, tokenizer {codec.name})", flush=True)
  try:
    uvicorn.run(server.app, host=FLAGS.host, port=FLAGS.port, log_level="info")
  finally:
    server.scheduler.stop()


if __name__ == "__main__":
  if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl would exit 1 on --help
  cli.run(main)
