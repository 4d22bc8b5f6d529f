"""Load benchmark of the OpenAI-compatible server: throughput and latency under N clients.

The server (rtpurbo_jax/serve: continuous batching over the mixed KV cache) runs in this
process on a free localhost port with a random-weight model; client threads (stdlib
`http.client`, streaming completions with prompt token ids and `ignore_eos`, so every
request generates exactly --max_tokens tokens) send --requests_per_client requests each, one
after another, at every concurrency level. Per request: TTFT (request sent -> first token
received), TPOT (mean time per output token after the first), end-to-end latency; per level:
p50 / p90 / p99 / mean of each, output tokens per second, requests per second, and the
server's /metrics (selected-block fraction of the retrieval heads, slot occupancy).

  python benchmarks/serve_load.py --out benchmarks/results/serve_load_h100.json
      Llama-3.1-8B shape, bf16, random weights, rtpurbo, 8 slots x 32K tokens; prompts of
      16K-31K random tokens, 128 new tokens; concurrency 1, 4, 8 (a GPU)
  python benchmarks/serve_load.py --mode=dense --out ...      the dense baseline
  python benchmarks/serve_load.py --tiny --out /tmp/serve_load.json   CPU smoke run (CI)

Needs fastapi and uvicorn besides jax / flax / numpy (no ml_collections, grain, gguf,
transformers: no tokenizer, no downloads). Prompts are random token ids, so the generated text
means nothing; the indexer of random weights is flat, so the selected fractions are those
of random weights, not of a trained model. Compilation happens before timing (server
warmup + one request).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import http.client
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from e2e import LLAMA8B, LLAMA8B_SPARSE, TINY, TINY_SPARSE, build_model, environment  # noqa: E402
from pallas_kernels import config as kernel_config  # noqa: E402
from rtpurbo_jax.config import parse_size  # noqa: E402
from rtpurbo_jax.infer import memory  # noqa: E402
from rtpurbo_jax.serve import build  # noqa: E402
from rtpurbo_jax.serve.text import Codec  # noqa: E402

NAME = "bench"


@dataclasses.dataclass
class Setup:
  cfg: object
  sparse: object
  dtype: str
  slots: int
  ctx: int
  prefill_chunk: int
  prompt_min: int
  prompt_max: int
  max_tokens: int
  concurrency: tuple[int, ...]
  requests_per_client: int


def setup_for(args) -> Setup:
  if args.tiny:
    s = Setup(TINY, TINY_SPARSE, "float32", slots=4, ctx=512, prefill_chunk=128,
              prompt_min=64, prompt_max=400, max_tokens=8, concurrency=(1, 4),
              requests_per_client=2)
  else:
    s = Setup(LLAMA8B, LLAMA8B_SPARSE, "bfloat16", slots=8, ctx=32 * 1024,
              prefill_chunk=4096, prompt_min=16 * 1024, prompt_max=31 * 1024, max_tokens=128,
              concurrency=(1, 4, 8), requests_per_client=2)
  for f in ("slots", "prefill_chunk", "max_tokens", "requests_per_client", "prompt_min",
            "prompt_max"):
    if getattr(args, f) is not None:
      setattr(s, f, getattr(args, f))
  if args.ctx is not None:
    s.ctx = parse_size(args.ctx)
  if args.concurrency:
    s.concurrency = tuple(int(c) for c in args.concurrency.split(","))
  if args.mode:
    s.sparse = dataclasses.replace(s.sparse, mode=args.mode)
  s.prompt_max = min(s.prompt_max, s.ctx - s.max_tokens)
  if not 1 <= s.prompt_min <= s.prompt_max:
    raise SystemExit(f"prompt lengths [{s.prompt_min}, {s.prompt_max}] do not fit ctx={s.ctx} "
                     f"with max_tokens={s.max_tokens}")
  return s


# ---------------------------------------------------------------------------------------------
# Client.


def one_request(host: str, port: int, prompt: list[int], max_tokens: int) -> dict:
  """A streaming completion; times from sending the request."""
  body = json.dumps({"model": NAME, "prompt": prompt, "max_tokens": max_tokens,
                     "temperature": 0, "stream": True, "ignore_eos": True,
                     "return_token_ids": True})
  conn = http.client.HTTPConnection(host, port, timeout=3600)
  t0 = time.perf_counter()
  try:
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
      return {"ok": False, "error": f"HTTP {resp.status}: {resp.read()[:300]!r}"}
    ttft, n, finish = None, 0, None
    while True:
      line = resp.readline()
      if not line:
        break
      if not line.startswith(b"data: "):
        continue
      payload = line[6:].strip()
      if payload == b"[DONE]":
        break
      obj = json.loads(payload)
      if "error" in obj:
        return {"ok": False, "error": obj["error"].get("message")}
      choice = obj["choices"][0]
      n += len(choice.get("token_ids") or ())
      if ttft is None and n:
        ttft = time.perf_counter() - t0
      finish = choice.get("finish_reason") or finish
    e2e = time.perf_counter() - t0
  except (OSError, http.client.HTTPException, ValueError) as e:
    return {"ok": False, "error": f"{type(e).__name__}: {e}"}
  finally:
    conn.close()
  return {"ok": n == max_tokens, "tokens": n, "prompt_tokens": len(prompt), "ttft": ttft,
          "e2e": e2e, "tpot": (e2e - ttft) / (n - 1) if n > 1 else None, "finish": finish,
          **({} if n == max_tokens else {"error": f"{n} tokens of {max_tokens}"})}


def stats(values) -> dict:
  v = np.asarray([x for x in values if x is not None], np.float64)
  if not v.size:
    return {}
  return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
          "p99": float(np.percentile(v, 99)), "mean": float(v.mean()), "max": float(v.max())}


def _host_port(url: str) -> tuple[str, int]:
  host, port = url.split("//")[1].rsplit(":", 1)
  return host, int(port)


def run_level(url: str, setup: Setup, clients: int, rng: np.random.Generator) -> dict:
  host, port = _host_port(url)
  n = clients * setup.requests_per_client
  lengths = rng.integers(setup.prompt_min, setup.prompt_max + 1, n)
  prompts = [rng.integers(0, setup.cfg.vocab_size, int(k)).tolist() for k in lengths]

  def client(c: int) -> list[dict]:
    return [one_request(host, port, prompts[c * setup.requests_per_client + i],
                        setup.max_tokens) for i in range(setup.requests_per_client)]

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    rows = [r for rs in pool.map(client, range(clients)) for r in rs]
  wall = time.perf_counter() - t0
  ok = [r for r in rows if r["ok"]]
  out_tokens = sum(r.get("tokens", 0) for r in rows)
  return {
      "concurrency": clients, "requests": n, "completed": len(ok), "failed": n - len(ok),
      "errors": sorted({r["error"] for r in rows if not r["ok"]})[:5],
      "max_tokens": setup.max_tokens, "prompt_tokens": int(lengths.sum()),
      "output_tokens": out_tokens, "wall_s": wall, "output_tok_s": out_tokens / wall,
      "requests_per_s": len(ok) / wall,
      "ttft_s": stats(r["ttft"] for r in ok), "tpot_s": stats(r["tpot"] for r in ok),
      "e2e_s": stats(r["e2e"] for r in ok),
  }


def server_metrics(url: str) -> dict:
  conn = http.client.HTTPConnection(*_host_port(url), timeout=60)
  try:
    conn.request("GET", "/metrics?format=json")
    return json.loads(conn.getresponse().read())
  finally:
    conn.close()


# ---------------------------------------------------------------------------------------------


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="tiny CPU shapes (CI smoke run)")
  p.add_argument("--out", required=True, help="JSON file to write (a folder: "
                 "serve_load_<device>.json inside it)")
  p.add_argument("--mode", choices=("rtpurbo", "dense", "streaming", "topk"))
  p.add_argument("--slots", type=int)
  p.add_argument("--ctx", help="tokens per slot, e.g. 32K")
  p.add_argument("--prefill_chunk", type=int)
  p.add_argument("--prompt_min", type=int)
  p.add_argument("--prompt_max", type=int)
  p.add_argument("--max_tokens", type=int)
  p.add_argument("--concurrency", help="comma-separated client counts, e.g. 1,4,8")
  p.add_argument("--requests_per_client", type=int)
  p.add_argument("--device_memory", help="bytes per device for the memory check, e.g. 80GB")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  setup = setup_for(args)
  env = environment()
  out = args.out
  if os.path.isdir(out):
    out = os.path.join(out, f"serve_load_{env['device'].replace(' ', '_').lower()}.json")

  plan = memory.synthetic_plan(setup.cfg, 0.15, args.seed)
  dev_mem = memory.parse_bytes(args.device_memory) if args.device_memory else None
  mem = memory.check_memory(memory.plan_memory(
      setup.cfg, setup.sparse, plan, setup.ctx, batch=setup.slots, dtype=setup.dtype,
      device_memory=dev_mem, prefill_chunk=setup.prefill_chunk, n_devices=1))
  print(mem.describe(), flush=True)
  t = time.perf_counter()
  # reads setup.cfg / .sparse / .dtype; the kernels of this process (RTPURBO_* read once)
  model = build_model(setup, plan, args.seed, kernel_config.default())
  server = build.build_server(model, Codec.bytes(setup.cfg.vocab_size), NAME,
                              slots=setup.slots, max_len=setup.ctx,
                              prefill_chunk=setup.prefill_chunk, max_queue=1024)
  startup = time.perf_counter() - t
  sm = server.slot_model
  print(f"server: {setup.slots} slots x {sm.max_len} tokens, chunk {sm.chunk}, KV cache "
        f"{memory.fmt(sm.cache_bytes)}, startup (build + compile) {startup:.1f}s", flush=True)
  rng = np.random.default_rng(args.seed)
  result = {
      "environment": env, "mode": setup.sparse.mode, "model": "tiny" if args.tiny else
      "llama8b-shape (random weights)", "dtype": setup.dtype, "slots": setup.slots,
      "ctx": sm.max_len, "prefill_chunk": sm.chunk, "prompt_tokens_range": [setup.prompt_min,
                                                                             setup.prompt_max],
      "max_tokens": setup.max_tokens, "requests_per_client": setup.requests_per_client,
      "kv_cache_bytes": sm.cache_bytes, "memory_plan": mem.as_dict(), "startup_s": startup,
      "results": []}
  try:
    with build.serve_in_thread(server.app) as url:
      warm = one_request(*_host_port(url),
                         rng.integers(0, setup.cfg.vocab_size, setup.prompt_min).tolist(), 2)
      if not warm["ok"]:
        raise SystemExit(f"warmup request failed: {warm.get('error')}")
      for clients in setup.concurrency:
        row = run_level(url, setup, clients, rng)
        row["server"] = server_metrics(url)
        result["results"].append(row)
        print(f"concurrency {clients}: {row['completed']}/{row['requests']} ok, "
              f"{row['output_tok_s']:.1f} out tok/s, TTFT p50 "
              f"{row['ttft_s'].get('p50', float('nan')):.3f}s p99 "
              f"{row['ttft_s'].get('p99', float('nan')):.3f}s, TPOT p50 "
              f"{row['tpot_s'].get('p50', float('nan')) * 1e3:.1f}ms, e2e p50 "
              f"{row['e2e_s'].get('p50', float('nan')):.2f}s", flush=True)
  finally:
    server.scheduler.stop()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=1, default=str)
    print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
