"""Putting a server together: model + tokenizer from a run config, memory check, scheduler,
app; and uvicorn in a background thread (tests, benchmarks).

    server = build_server(model, codec, "tiny", slots=8, max_len=1024, prefill_chunk=256)
    with serve_in_thread(server.app) as url:      # http://127.0.0.1:<free port>
      ...
    server.scheduler.stop()
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time

from rtpurbo_jax.serve.app import create_app
from rtpurbo_jax.serve.metrics import Metrics
from rtpurbo_jax.serve.scheduler import Scheduler
from rtpurbo_jax.serve.slots import SlotModel
from rtpurbo_jax.serve.text import Codec


@dataclasses.dataclass
class Server:
  app: object
  scheduler: Scheduler
  slot_model: SlotModel
  codec: Codec
  model_name: str


def build_server(model, codec: Codec, model_name: str, *, slots: int, max_len: int,
                 prefill_chunk: int, max_queue: int = 256, warmup: bool = True) -> Server:
  """Allocate the slot cache, compile the two steps (warmup), start the engine thread."""
  slot_model = SlotModel(model, slots=slots, max_len=max_len, prefill_chunk=prefill_chunk)
  if warmup:
    slot_model.warmup()
  scheduler = Scheduler(slot_model, codec, max_queue=max_queue, metrics=Metrics(slots))
  scheduler.start()
  return Server(create_app(scheduler, codec, model_name), scheduler, slot_model, codec,
                model_name)


# ---------------------------------------------------------------------------------------------
# From a run config (serve.py).


def load_model(cfg, *, random_weights: bool = False, init_std: float = 0.02):
  """(model, plan note) as infer.py runs it (`loading.load_model`): pretrained (`cfg.infer.model`,
  else `cfg.model_path`) or random weights from `cfg.model`, with the config's sparse
  settings and head plan."""
  from rtpurbo_jax.config import model_config_from, sparse_config_from
  from rtpurbo_jax import loading

  path = model_path(cfg, random_weights)
  model, note = loading.load_model(cfg, sparse_config_from(cfg.sparse), path=path,
                                model_cfg=None if path else model_config_from(cfg.model),
                                init_std=init_std)
  return model, note if path else note + ", random weights"


def model_path(cfg, random_weights: bool = False) -> str:
  """What a config serves: "" (random weights from cfg.model) or a folder / registered name."""
  if random_weights:
    return ""
  return cfg.infer.model or cfg.model_path


def load_codec(cfg, model, random_weights: bool = False) -> Codec:
  """The model's tokenizer, or bytes for random weights (no tokenizer to speak of)."""
  path = model_path(cfg, random_weights)
  eos = () if model.cfg.eos_token_id is None else (model.cfg.eos_token_id,)
  if not path:
    return Codec.bytes(model.cfg.vocab_size)
  import rtpurbo_jax

  return Codec(rtpurbo_jax.load_tokenizer(path), vocab_size=model.cfg.vocab_size,
               extra_eos=tuple(eos))


def check_memory(cfg, model, *, slots: int, max_len: int, prefill_chunk: int,
                 device_memory: int | None = None):
  """MemoryPlanError before allocating if weights + `slots` x `max_len` cache + workspace
  do not fit a device. Returns the `MemoryPlan`."""
  from rtpurbo_jax.infer import memory

  mem = memory.plan_memory(model.cfg, model.sparse, model.plan, max_len, batch=slots,
                           dtype=cfg.dtype, device_memory=device_memory,
                           prefill_chunk=prefill_chunk, n_devices=1)
  return memory.check_memory(mem)


# ---------------------------------------------------------------------------------------------
# uvicorn in a thread.


def free_port(host: str = "127.0.0.1") -> int:
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int | None = None,
                    timeout: float = 60.0):
  """Run uvicorn on a daemon thread; yields the base URL; stops it on exit."""
  import uvicorn

  port = port or free_port(host)
  config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
  server = uvicorn.Server(config)
  thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
  thread.start()
  deadline = time.monotonic() + timeout
  while not server.started:
    if not thread.is_alive() or time.monotonic() > deadline:
      raise RuntimeError(f"uvicorn did not start on {host}:{port}")
    time.sleep(0.02)
  try:
    yield f"http://{host}:{port}"
  finally:
    server.should_exit = True
    thread.join(timeout)
