"""Quick GPU check of the chunked-prefill fast paths, run before a long e2e benchmark.

1. Model level: a 2-layer model with Llama-8B attention shapes (32 query / 8 KV heads,
   head_dim 128, bf16, a random plan with 25 % retrieval heads), window 1024 + 4 sinks,
   threshold 2048 (ring capacity 2048), a 6000-token prompt prefilled in 1000-token chunks
   (chunk boundaries cross the ring's wrap-around) through the accelerator kernels, against
   the same run on the jnp references (the model rebuilt with the reference backend):
   first-token logits.
   The same with `sparse_prefill` (retrieval heads select key blocks per query block,
   `cache_prefill_select` + `cache_sparse_prefill`): in float32 with the indexer sharpened
   so that top-p keeps a fraction of the blocks (both sides in exact fp32, so the selections
   must agree); in bfloat16 with top_p 1, every causal block (a sharp selection is not
   continuous in its inputs: bf16 rounding upstream flips blocks at the threshold, which a
   logit tolerance cannot tell from a bug; on the H200 that gave 7% logit error with equal
   argmax, where exact fp32 gave 1.7e-6).
2. `cache_prefill_select` and `cache_sparse_prefill` kernels vs their references at a
   moderate size (a chunk at an offset inside a longer cache, ragged lengths), then one
   1M-context chunk timed: selection + sparse attention for 5 retrieval heads, next to the
   dense `cache_causal_attention` of the same chunk.
3. `cache_causal_attention` (retrieval heads of a chunk over the KV cache): the Pallas
   flash kernel (kv_major) and the cuDNN split against the reference at a moderate size, then
   both timed at the 1M shape (one chunk at the middle of a 1M-slot cache, 5 query heads on
   4 KV heads). The faster correct one is written to OUT/cache_attn.txt, next to the
   dispatch's own choice on this device (`dispatch` in the choice row): on Hopper the
   dispatch defaults to cudnn from this measurement (82.9 vs 104.7 ms on the H200), so e2e.py
   needs `RTPURBO_CACHE_ATTN=<cache_attn.txt>` only where the two differ.

  python benchmarks/check_prefill.py --out DIR      # prints one JSON line per check
  python benchmarks/check_prefill.py --checks=model_sparse,sparse_chunk   # a subset
  RTPURBO_INTERPRET=1 python benchmarks/check_prefill.py --smoke   # CPU, tiny shapes
Exit status 1 when the model-level check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pallas_kernels import config as kernel_config  # noqa: E402
from pallas_kernels import ops  # noqa: E402
from pallas_kernels import reference as ref  # noqa: E402
from pallas_kernels.gpu import cudnn_attention  # noqa: E402
from pallas_kernels.gpu import window_attention as flash  # noqa: E402
from pallas_kernels.gpu import window_attention_mgpu  # noqa: E402
from rtpurbo_jax import convert  # noqa: E402
from rtpurbo_jax.config import ModelConfig, SparseConfig  # noqa: E402
from rtpurbo_jax.infer import memory  # noqa: E402
from rtpurbo_jax.infer.engine import Engine  # noqa: E402
from rtpurbo_jax.models.transformer import Transformer  # noqa: E402

SMOKE_SPARSE = SparseConfig(mode="rtpurbo", window=64, sinks=4, top_p=0.9, block_size=64,
                            seqlen_threshold=128, indexer_dim=16)
CFG = ModelConfig(family="llama", vocab_size=1000, hidden_size=512, intermediate_size=1024,
                  num_layers=2, num_heads=32, num_kv_heads=8, head_dim=128,
                  rope_theta=500000.0, max_position_embeddings=131072)
SPARSE = SparseConfig(mode="rtpurbo", window=1024, sinks=4, top_p=0.9, block_size=64,
                      seqlen_threshold=2048, indexer_dim=16)
KV_HEADS = (0, 0, 1, 2, 3)  # 5 retrieval query heads on 4 KV heads (a group of 2)


def model_check(prompt_len: int, chunk: int, sparse: SparseConfig, backend: str,
                dtype: str, indexer_scale: float = 1.0) -> dict:
  """Chunked prefill, accelerator kernels (`backend`, as RTPURBO_KERNELS names it; the other
  RTPURBO_* settings from the environment) vs jnp references: first-token logits. float32
  runs the Pallas kernels at fp32 (a tight check of their indexing); bfloat16 the production
  path (cuDNN where it applies)."""
  plan = memory.synthetic_plan(CFG, 0.25, 1)
  model = Transformer(CFG, sparse=sparse, plan=plan, dtype=dtype, rngs=nnx.Rngs(1),
                      init_std=0.05)
  convert.scale_indexer_queries(model, indexer_scale)
  ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (1, prompt_len), dtype=np.int32)
  logits, secs, fracs = {}, {}, {}
  for name in ("reference", backend):
    # The kernel config is part of the model's graph definition: the engine's jitted steps
    # are traced afresh for each.
    kernels = kernel_config.KernelConfig.from_env({**os.environ, "RTPURBO_KERNELS": name})
    run_model = convert.rebuild(model, kernels=kernels)
    t = time.perf_counter()
    # XLA's fp32 matmuls on the GPU default to TF32; the Pallas kernels' fp32 dots are exact.
    # Exact fp32 on both sides keeps a sharp top-p selection from flipping blocks that sit at
    # the threshold by rounding alone.
    with jax.default_matmul_precision("highest"):
      res = Engine(run_model, progress=False).generate(ids, 2, prefill_chunk=chunk)
    secs[name] = time.perf_counter() - t
    logits[name] = np.asarray(res.first_logits, np.float32)
    fracs[name] = res.summary.get("prefill_selected_fraction")
  want, got = logits["reference"], logits[backend]
  rel = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))
  tol = 1e-3 if dtype == "float32" else 3e-2
  name = "sparse_prefill_model" if sparse.sparse_prefill else "chunked_prefill_model"
  return {"check": f"{name}/{dtype}", "prompt": prompt_len, "chunk": chunk,
          "max_rel_err": rel, "argmax_equal": bool(np.argmax(got) == np.argmax(want)),
          "prefill_selected_fraction": fracs.get(backend), "seconds": secs,
          "ok": bool(np.isfinite(got).all() and rel < tol)}


def _seconds(fn, *args, reps: int = 3) -> float:
  """Median wall time of `fn(*args)` after one warm-up call (compilation)."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def _causal_fraction(mask, q_offset: int, bs: int) -> float:
  """Fraction of the causal (query block, key block) pairs a [b, h, nq, nk] mask selects for
  a chunk at q_offset."""
  nq, nk = mask.shape[2:]
  g = q_offset // bs + jnp.arange(nq)
  causal = (jnp.arange(nk)[None] <= g[:, None])[None, None]
  return float(jnp.sum(mask & causal) / (jnp.sum(causal) * mask.shape[0] * mask.shape[1]))


def _impls():
  interpret = kernel_config.default().interpret
  return {
      "pallas": lambda q, k, v, off: flash.causal_attention(q, k, v, KV_HEADS, q_offset=off,
                                                            kv_major=True, interpret=interpret),
      "cudnn": lambda q, k, v, off: cudnn_attention.cache_causal_attention(
          q, k, v, KV_HEADS, q_offset=off),
      "mgpu": lambda q, k, v, off: window_attention_mgpu.cache_causal_attention(
          q, k, v, KV_HEADS, q_offset=off, interpret=interpret),
  }


def _inputs(key, s, t):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (1, s, len(KV_HEADS), 128), jnp.bfloat16)
  k = jax.random.normal(kk, (1, 4, t, 128), jnp.bfloat16)
  v = jax.random.normal(kv, (1, 4, t, 128), jnp.bfloat16)
  return q, k, v


def cache_attention_check(chunk: int, ctx: int, s: int = 4096, t: int = 32768) -> list[dict]:
  """Correctness of both implementations at [s] x [t], then their time at `ctx`."""
  out = []
  q, k, v = _inputs(jax.random.key(0), s, t)
  ok = {}
  for name, fn in _impls().items():
    run = jax.jit(fn)
    errs = []
    try:
      for off in (0, t // 3 + 1, t - s):
        o, l = run(q, k, v, jnp.int32(off))
        wo, wl = ref.cache_causal_attention(q, k, v, KV_HEADS, q_offset=off)
        errs.append(float(jnp.max(jnp.abs(o.astype(jnp.float32) - wo.astype(jnp.float32)))
                          / jnp.max(jnp.abs(wo.astype(jnp.float32)))))
        errs.append(float(jnp.max(jnp.abs(l - wl))))
      ok[name] = bool(np.all(np.isfinite(errs)) and max(errs) < 2e-2)
      out.append({"check": f"cache_causal_attention/{name}", "max_err": max(errs),
                  "ok": ok[name]})
    except Exception as e:  # noqa: BLE001 (a failing implementation is simply not chosen)
      ok[name] = False
      out.append({"check": f"cache_causal_attention/{name}", "ok": False,
                  "error": f"{type(e).__name__}: {e}"[:500]})
  q, k, v = _inputs(jax.random.key(1), chunk, ctx)
  off = jnp.int32(ctx // 2)
  times = {}
  for name, fn in _impls().items():
    if not ok[name]:
      continue
    run = jax.jit(fn)
    try:
      times[name] = _seconds(run, q, k, v, off)
      flops = 4 * 128 * chunk * (ctx // 2 + chunk / 2) * len(KV_HEADS)
      out.append({"check": f"cache_causal_attention/{name}/time", "chunk": chunk, "ctx": ctx,
                  "ms": 1e3 * times[name], "tflops": flops / times[name] / 1e12})
    except Exception as e:  # noqa: BLE001
      out.append({"check": f"cache_causal_attention/{name}/time", "ok": False,
                  "error": f"{type(e).__name__}: {e}"[:500]})
  best = min(times, key=times.get) if times else "pallas"
  row = {"check": "cache_causal_attention/choice", "impl": best}
  kernels = kernel_config.default()
  if kernels.backend == "gpu":
    from pallas_kernels.gpu import dispatch
    row["dispatch"] = dispatch.impl_for("cache_causal_attention", q.dtype, kernels)
  out.append(row)
  return out


def _rel(got, want) -> float:
  got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
  return float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-6))


def sparse_chunk_check(chunk: int, ctx: int, s: int = 2048, t: int = 16384,
                       sharpness: float = 10.0) -> list[dict]:
  """The chunk-offset sparse-prefill kernels vs their references ([s] queries at an offset in
  a [t]-slot cache, one row ending inside the chunk), then their time on the last `chunk` of a
  `ctx` prefill, with the dense cache attention of the same chunk for scale."""
  out = []
  key = jax.random.split(jax.random.key(2), 6)
  nh, r, bs = len(KV_HEADS), 16, 64
  off = t // 2
  qi = jax.random.normal(key[0], (2, s, nh, r), jnp.float32) * sharpness
  ck = jax.random.normal(key[1], (2, nh, t, r), jnp.bfloat16)
  lengths = jnp.asarray([off + s, off + s // 3 + 5], jnp.int32)
  select = jax.jit(lambda a, c, n, o: ops.cache_prefill_select(a, c, n, q_offset=o, top_p=0.9,
                                                               block_size=bs))
  attend = jax.jit(lambda q, k, v, m, o: ops.cache_sparse_prefill(q, k, v, KV_HEADS, m,
                                                                  q_offset=o, block_size=bs))
  try:
    got = select(qi, ck, lengths, jnp.int32(off))
    with jax.default_matmul_precision("highest"):  # exact fp32 scores, as in the kernel
      want = ref.cache_prefill_select(qi, ck, lengths, q_offset=off, top_p=0.9, block_size=bs)
    frac = _causal_fraction(want, off, bs)
    # fp32 summation order may flip a block whose cumulative mass sits at p: count them.
    out.append({"check": "cache_prefill_select", "mismatched_blocks": int(jnp.sum(got != want)),
                "blocks": int(want.size), "selected_fraction": frac,
                "ok": int(jnp.sum(got != want)) <= want.size // 1000})
    q = jax.random.normal(key[2], (2, s, nh, 128), jnp.bfloat16)
    kc = jax.random.normal(key[3], (2, 4, t, 128), jnp.bfloat16)
    vc = jax.random.normal(key[4], (2, 4, t, 128), jnp.bfloat16)
    o, l = attend(q, kc, vc, want, jnp.int32(off))
    wo, wl = ref.cache_sparse_prefill(q, kc, vc, KV_HEADS, want, q_offset=off, block_size=bs)
    err = max(_rel(o, wo), float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(wl), l - wl, 0.0)))))
    out.append({"check": "cache_sparse_prefill", "max_err": err, "ok": err < 2e-2})
  except Exception as e:  # noqa: BLE001
    out.append({"check": "cache_sparse_prefill", "ok": False,
                "error": f"{type(e).__name__}: {e}"[:500]})
    return out
  # Time: the last chunk of a ctx-token prefill.
  off = ctx - chunk
  qi = jax.random.normal(key[5], (1, chunk, nh, r), jnp.float32) * sharpness
  ck = jax.random.normal(key[1], (1, nh, ctx, r), jnp.bfloat16)
  q, k, v = _inputs(jax.random.key(3), chunk, ctx)
  n = jnp.asarray([ctx], jnp.int32)
  both = jax.jit(lambda a, c, q, k, v, o: attend(q, k, v, select(a, c, n, o), o))
  dense = jax.jit(lambda q, k, v, o: ops.cache_causal_attention(q, k, v, KV_HEADS, q_offset=o))
  row = {"check": "sparse_chunk/time", "chunk": chunk, "ctx": ctx}
  for name, fn, args in (("select", select, (qi, ck, n, jnp.int32(off))),
                         ("select+attend", both, (qi, ck, q, k, v, jnp.int32(off))),
                         ("dense", dense, (q, k, v, jnp.int32(off)))):
    row[f"{name}_ms"] = 1e3 * _seconds(fn, *args)
  row["selected_fraction"] = _causal_fraction(select(qi, ck, n, jnp.int32(off)), off, bs)
  out.append(row)
  return out


CHECKS = ("model", "model_sparse", "sparse_chunk", "cache_attn")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="folder for cache_attn.txt and check.json")
  ap.add_argument("--chunk", type=int, default=16384, help="prefill chunk of the e2e run")
  ap.add_argument("--ctx", type=int, default=1 << 20, help="context of the timing shape")
  ap.add_argument("--smoke", action="store_true",
                  help="CPU-sized shapes (with RTPURBO_INTERPRET=1: the Pallas interpreter)")
  ap.add_argument("--checks", default=",".join(CHECKS),
                  help=f"comma list of checks to run, from {','.join(CHECKS)}")
  ap.add_argument("--indexer_scale", type=float, default=64.0,
                  help="W_q multiplier of the sparse-prefill model check (a sharper selection)")
  args = ap.parse_args(argv)
  todo = [c.strip() for c in args.checks.split(",") if c.strip()]
  if unknown := sorted(set(todo) - set(CHECKS)):
    raise SystemExit(f"--checks: unknown {unknown}; choose from {list(CHECKS)}")
  sp_sparse = dataclasses.replace(SMOKE_SPARSE if args.smoke else SPARSE, sparse_prefill=True)
  runs = {
      "model": lambda: ([model_check(300, 100, SMOKE_SPARSE, "gpu", "float32")] if args.smoke
                        else [model_check(6000, 1000, SPARSE, "auto", d)
                              for d in ("float32", "bfloat16")]),
      "model_sparse": lambda: ([model_check(300, 128, sp_sparse, "gpu", "float32",
                                            args.indexer_scale)] if args.smoke
                               else [model_check(6000, 1024, sp_sparse, "auto", "float32",
                                                 args.indexer_scale),
                                     model_check(6000, 1024, dataclasses.replace(
                                         sp_sparse, top_p=1.0), "auto", "bfloat16")]),
      "sparse_chunk": lambda: (sparse_chunk_check(128, 1024, s=128, t=512) if args.smoke
                               else sparse_chunk_check(args.chunk, args.ctx)),
      "cache_attn": lambda: (cache_attention_check(128, 1024, s=128, t=512) if args.smoke
                             else cache_attention_check(args.chunk, args.ctx)),
  }
  results, ok = [], True
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  for name in todo:
    for r in runs[name]():
      results.append(r)
      print(json.dumps(r), flush=True)
      if name.startswith("model"):
        ok &= bool(r["ok"])
      if args.out:  # as results come: a run stopped by a time limit keeps what it did
        with open(os.path.join(args.out, "check.json"), "w") as f:
          json.dump(results, f, indent=1)
  if args.out:
    choice = [r["impl"] for r in results if r["check"] == "cache_causal_attention/choice"]
    if choice:
      with open(os.path.join(args.out, "cache_attn.txt"), "w") as f:
        f.write(choice[0])
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
