"""The Mosaic GPU prefill kernel (`pallas_kernels/gpu/window_attention_mgpu.py`) on one Hopper
GPU, against cuDNN in the same process; about a minute.

  check   both rules (window 1000 + 4 sinks, causal) at 4196 tokens, 5 heads on 3 KV heads,
          head_dim 128, for three tile settings: max |out - reference| and max |lse - ref|
  window  the paper-mode window part of a Llama-3.1-8B layer at 32K (27 local heads on 8 KV
          heads, window 8192 + 4 sinks, bf16): cuDNN's sliding-window path against the kernel
          with and without the warpgroups taking turns and with 64-key steps; TFLOP/s over
          the visible (query, key) pairs
  layer   the whole paper-mode layer at 32K (27 window heads + 5 dense causal retrieval heads)
          with each implementation of each part, against cuDNN dense causal attention over
          all 32 heads (the ratio the issue's targets name), and the 5 causal heads alone

Timings are medians of 5 calls after one warm-up call (compilation excluded). Writes
$OUT/window_mgpu.json (or --out). Imports only jax / numpy and this repo:
  PYTHONPATH=. python benchmarks/window_mgpu.py --out DIR [--parts check,window,layer]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.gpu import cudnn_attention  # noqa: E402
from pallas_kernels.gpu import window_attention_mgpu as mgpu_k  # noqa: E402

SEQ, WINDOW, SINKS, D = 32768, 8192, 4, 128
KV_OF = tuple(h // 4 for h in range(32))  # Llama-3.1-8B: 32 query heads on 8 KV heads
RETRIEVAL = (3, 9, 14, 22, 30)
LOCAL = tuple(h for h in range(32) if h not in RETRIEVAL)


def median_ms(fn, *args, reps: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t) * 1e3)
  return float(np.median(times))


def window_pairs(s: int, sinks: int, window: int) -> float:
  t = np.arange(s, dtype=np.float64)
  return float(np.sum(np.minimum(t + 1, window) + np.clip(np.minimum(sinks, t - window + 1), 0,
                                                           None)))


def check(rng) -> dict:
  s, kv = 4096 + 100, (0, 1, 1, 2, 0)
  q = jnp.asarray(rng.normal(size=(1, s, 5, D)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.normal(size=(1, s, 3, D)), jnp.bfloat16) for _ in range(2))
  out = {}
  for tiles in (mgpu_k.Tiles(), mgpu_k.Tiles(pingpong=False), mgpu_k.Tiles(64, 64, 4)):
    for window in (1000, None):
      if window is None:
        o, lse = mgpu_k.causal_attention(q, k, v, kv, tiles=tiles)
        ro, rl = mgpu_k.reference_causal(q, k, v, kv)
      else:
        o, lse = mgpu_k.window_attention(q, k, v, kv, sinks=SINKS, window=window, tiles=tiles)
        ro, rl = mgpu_k.reference(q, k, v, kv, sinks=SINKS, window=window)
      err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ro.astype(jnp.float32))))
      lse_err = float(jnp.max(jnp.abs(lse - rl)))
      out[f"{tiles} window={window}"] = dict(out_max_abs=err, lse_max_abs=lse_err)
      print(f"check {tiles} window={window}: out {err:.3g} lse {lse_err:.3g}", flush=True)
  return out


def cudnn_window(q, k, v, kvh):
  return cudnn_attention.window_attention(q, k, v, kvh, sinks=SINKS, window=WINDOW)[0]


def cudnn_causal(q, k, v, kvh):
  return cudnn_attention.causal_attention(q, k, v, kvh)[0]


def mgpu_window(q, k, v, kvh, tiles=mgpu_k.Tiles()):
  return mgpu_k.window_attention(q, k, v, kvh, sinks=SINKS, window=WINDOW, tiles=tiles)[0]


def mgpu_causal(q, k, v, kvh):
  return mgpu_k.causal_attention(q, k, v, kvh)[0]


def window_part(rng) -> dict:
  kvl = tuple(KV_OF[h] for h in LOCAL)
  q = jnp.asarray(rng.normal(size=(1, SEQ, len(LOCAL), D)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.normal(size=(1, SEQ, 8, D)), jnp.bfloat16) for _ in range(2))
  flops = 4.0 * len(LOCAL) * D * window_pairs(SEQ, SINKS, WINDOW)
  variants = {"cudnn": cudnn_window, "mgpu": mgpu_window,
              "mgpu_nopp": lambda *a: mgpu_window(*a, tiles=mgpu_k.Tiles(pingpong=False)),
              "mgpu_k64s4": lambda *a: mgpu_window(*a, tiles=mgpu_k.Tiles(64, 64, 4))}
  rows = {}
  for name, fn in variants.items():
    ms = median_ms(jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, kvl)), q, k, v)
    rows[name] = dict(ms=ms, tflops=flops / ms / 1e9)
    print(f"window {len(LOCAL)}h @ {SEQ}: {name:11s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s",
          flush=True)
  diff = float(jnp.max(jnp.abs(mgpu_window(q, k, v, kvl).astype(jnp.float32)
                               - cudnn_window(q, k, v, kvl).astype(jnp.float32))))
  return dict(rows=rows, flops=flops, mgpu_vs_cudnn_max_abs=diff)


def layer_part(rng) -> dict:
  q = jnp.asarray(rng.normal(size=(1, SEQ, 32, D)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.normal(size=(1, SEQ, 8, D)), jnp.bfloat16) for _ in range(2))
  inv = np.argsort(np.asarray(LOCAL + RETRIEVAL))

  def layer(q, k, v, win, cau):
    ol = win(q[:, :, jnp.asarray(LOCAL)], k, v, tuple(KV_OF[h] for h in LOCAL))
    orr = cau(q[:, :, jnp.asarray(RETRIEVAL)], k, v, tuple(KV_OF[h] for h in RETRIEVAL))
    return jnp.concatenate([ol, orr], axis=2)[:, :, jnp.asarray(inv)]

  kvr = tuple(KV_OF[h] for h in RETRIEVAL)
  qr = q[:, :, jnp.asarray(RETRIEVAL)]
  ms = {"dense_cudnn_32h": median_ms(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn")), q, k, v)}
  for name, win, cau in (("layer_cudnn_cudnn", cudnn_window, cudnn_causal),
                         ("layer_mgpu_cudnn", mgpu_window, cudnn_causal),
                         ("layer_mgpu_mgpu", mgpu_window, mgpu_causal)):
    ms[name] = median_ms(jax.jit(lambda q, k, v, win=win, cau=cau: layer(q, k, v, win, cau)),
                         q, k, v)
  ms["causal5_cudnn"] = median_ms(jax.jit(lambda q, k, v: cudnn_causal(q, k, v, kvr)), qr, k, v)
  ms["causal5_mgpu"] = median_ms(jax.jit(lambda q, k, v: mgpu_causal(q, k, v, kvr)), qr, k, v)
  for name, t in ms.items():
    print(f"{name:20s} {t:8.3f} ms  x{ms['dense_cudnn_32h'] / t:5.2f} vs dense", flush=True)
  diff = float(jnp.max(jnp.abs(layer(q, k, v, mgpu_window, mgpu_causal).astype(jnp.float32)
                               - layer(q, k, v, cudnn_window, cudnn_causal).astype(jnp.float32))))
  return dict(ms=ms, vs_dense={n: ms["dense_cudnn_32h"] / t for n, t in ms.items()},
              mgpu_vs_cudnn_max_abs=diff)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n\n", 1)[1])
  ap.add_argument("--out", default=os.environ.get("OUT"))
  ap.add_argument("--parts", default="check,window,layer")
  args = ap.parse_args(argv)
  parts = args.parts.split(",")
  unknown = set(parts) - {"check", "window", "layer"}
  if unknown:
    raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from check, window, layer")
  rng = np.random.default_rng(0)
  rep = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
  for name, fn in (("check", check), ("window", window_part), ("layer", layer_part)):
    if name in parts:
      rep[name] = fn(rng)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "window_mgpu.json"), "w") as f:
      json.dump(rep, f, indent=1)


if __name__ == "__main__":
  main()
