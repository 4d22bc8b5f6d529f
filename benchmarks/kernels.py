"""RTPurbo attention kernels vs cuDNN dense attention on one GPU, in one process.

Config (Llama-3.1-8B attention layer): 32 query / 8 KV heads, head_dim 128, bf16, batch 1;
5 of 32 query heads are retrieval heads (on 5 distinct KV heads); window 8192 + 4 sinks;
block 64, indexer dim 16; selection density fixed at 3% and 10% of causal blocks.

For each context the script
  1. checks every kernel against `pallas_kernels.reference` at full size (prefill: on
     sampled query rows; decode: every head), fresh random inputs;
  2. times cuDNN dense (causal prefill; q_len 1 decode) and the RTPurbo layer variants:
       prefill paper mode  = 27 local heads sink+window + 5 retrieval heads dense causal
       prefill sparse mode = 27 local heads + indexer selection + block-sparse retrieval
       decode              = ring decode (local) + top-p selection + sparse decode
     plus each component alone;
  3. prints a table and writes JSON (GPU, versions, date, numbers) to --out.

Decode steps are timed inside one jitted loop (no per-call dispatch), rotating over
several cache copies so the L2 cache does not hold a layer's data between steps.
Import only pallas_kernels + jax/numpy (the GPU image has no other project deps).

  PYTHONPATH=. python benchmarks/kernels.py --out results_dir      # on a GPU
  PYTHONPATH=. python benchmarks/kernels.py --out DIR --prefill=512K,1M --decode=  # a subset
Every implementation of the window part is timed by name; the sparse-mode layer, the
retrieval heads' dense attention (`ops.causal_attention`) and `meta.kernel_impls` follow the
GPU dispatch's choice under the run's `KernelConfig` (backend gpu unless RTPURBO_KERNELS says
otherwise; its measured default, or RTPURBO_* / --window-impl overrides).
  PYTHONPATH=. RTPURBO_INTERPRET=1 python benchmarks/kernels.py --smoke   # plumbing, CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import config as kernel_config  # noqa: E402
from pallas_kernels import ops  # noqa: E402
from pallas_kernels import reference as ref  # noqa: E402
from pallas_kernels.gpu import cudnn_attention  # noqa: E402
from pallas_kernels.gpu import decode as decode_k  # noqa: E402
from pallas_kernels.gpu import dispatch  # noqa: E402
from pallas_kernels.gpu import layer_decode as layer_decode_k  # noqa: E402
from pallas_kernels.gpu import prefill_select as prefill_select_k  # noqa: E402
from pallas_kernels.gpu import sparse_prefill as sparse_prefill_k  # noqa: E402
from pallas_kernels.gpu import topp_rows  # noqa: E402
from pallas_kernels.gpu import topp_select as topp_select_k  # noqa: E402
from pallas_kernels.gpu import window_attention as flash_k  # noqa: E402
from pallas_kernels.gpu import window_attention_mgpu as mgpu_k  # noqa: E402
from rtpurbo_jax.attention.plan import HeadPlan  # noqa: E402
from rtpurbo_jax.attention.routing import head_routing  # noqa: E402

# Ceilings measured on the H200 used for these benchmarks: bf16 8192^3 matmul and a
# device-to-device copy (bytes read + written). fp32 FMA: datasheet.
BF16_FLOPS = 784e12
FP32_FLOPS = 67e12
HBM_BYTES = 4.3e12


@dataclasses.dataclass(frozen=True)
class Cfg:
  hq: int = 32
  hk: int = 8
  d: int = 128
  retrieval: tuple = (1, 6, 11, 16, 21)
  sinks: int = 4
  window: int = 8192
  bs: int = 64
  r: int = 16
  ring_capacity: int = 16384
  top_p: float = 0.9
  dtype: str = "bfloat16"

  @property
  def routing(self):
    """The layer in rtpurbo mode: the `retrieval` heads selected, the others local."""
    row = [h in self.retrieval for h in range(self.hq)]
    return head_routing(HeadPlan.from_mask([row], self.hk).layer(0), "rtpurbo", self.hq,
                        self.hk)

  @property
  def kv_of(self):
    return tuple(h * self.hk // self.hq for h in range(self.hq))

  @property
  def local(self):
    return self.routing.local.heads

  @property
  def full_kv(self):
    return self.routing.full_kv

  @property
  def ring_kv(self):
    return self.routing.ring_kv


SMOKE = Cfg(hq=8, hk=4, d=32, retrieval=(1, 6), window=256, ring_capacity=512)


def log(*a):
  print(*a, flush=True)


def _median_time(fn, args, reps, inner=1):
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times) * 1e3, [t * 1e3 for t in times]


def rel_err(a, b):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  if not np.all(np.isfinite(a[np.isfinite(b)])):
    return float("inf")
  fin = np.isfinite(b)
  return float(np.linalg.norm((a - b)[fin]) / max(np.linalg.norm(b[fin]), 1e-30))


class Run:
  """Collects checks and timings; writes JSON after every context (partial runs count)."""

  def __init__(self, out_dir, cfg, smoke, kernels):
    self.out_dir = out_dir
    self.cfg = cfg
    self.kernels = kernels  # the KernelConfig of every ops call
    self.checks = []
    self.timings = []
    self.errors = []
    dev = jax.devices()[0]
    try:
      import triton
      triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - optional on CPU
      triton_version = None
    import jaxlib
    self.meta = dict(
        gpu=dev.device_kind, platform=dev.platform, jax=jax.__version__,
        jaxlib=jaxlib.__version__, triton=triton_version, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        window_impl=dispatch.impl_for("window_attention", cfg.dtype, kernels),
        kernel_impls=dispatch.current_impls(cfg.dtype, kernels), smoke=smoke,
        kernel_overrides=dict(kernels.impls), config=dataclasses.asdict(cfg),
        ceilings=dict(bf16_flops=BF16_FLOPS, fp32_flops=FP32_FLOPS, hbm_bytes=HBM_BYTES))

  def check(self, name, ctx, **vals):
    row = dict(name=name, ctx=ctx, **vals)
    self.checks.append(row)
    log(f"  check {name:<28} ctx={ctx:<8} " + " ".join(f"{k}={v}" for k, v in vals.items()))

  def time(self, name, ctx, fn, args, *, reps, inner=1, flops=0.0, bytes_=0.0,
           flop_rate=BF16_FLOPS, **extra):
    try:
      ms, all_ms = _median_time(fn, args, reps, inner)
    except Exception as e:  # noqa: BLE001 - record and carry on
      self.errors.append(dict(name=name, ctx=ctx, error=f"{type(e).__name__}: {e}"[:2000]))
      log(f"  FAIL  {name} ctx={ctx}: {type(e).__name__}: {str(e)[:400]}")
      return None
    floor = max(flops / flop_rate, bytes_ / HBM_BYTES) * 1e3
    row = dict(name=name, ctx=ctx, ms=ms, all_ms=all_ms, flops=flops, bytes=bytes_,
               floor_ms=floor, **extra)
    self.timings.append(row)
    tf = f" {flops / ms / 1e9:7.1f} TFLOP/s" if flops else ""
    bw = f" {bytes_ / ms / 1e9:7.2f} TB/s" if bytes_ else ""
    log(f"  time  {name:<34} ctx={ctx:<8} {ms:10.3f} ms  floor {floor:9.3f} ms{tf}{bw}")
    return ms

  def save(self):
    if not self.out_dir:
      return
    os.makedirs(self.out_dir, exist_ok=True)
    with open(os.path.join(self.out_dir, "kernels.json"), "w") as f:
      json.dump(dict(meta=self.meta, checks=self.checks, timings=self.timings,
                     errors=self.errors, table=self.table()), f, indent=1)

  def table(self):
    """Layer rows with their ratio to cuDNN dense at the same context."""
    base = {(t["ctx"], t.get("phase")): t["ms"] for t in self.timings
            if t["name"] in ("dense_prefill_cudnn", "dense_decode_cudnn")}
    rows = []
    for t in self.timings:
      if not t.get("layer"):
        continue
      b = base.get((t["ctx"], t.get("phase")))
      rows.append(dict(phase=t["phase"], variant=t["name"], ctx=t["ctx"], ms=t["ms"],
                       dense_ms=b, speedup=(b / t["ms"]) if b else None))
    return rows


# ---------------------------------------------------------------------------
# Inputs.


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def block_density_mask(key, b, h, nq, nk, density, q_block_index=None):
  """Random causal block mask at `density` of causal blocks, plus each row's own block."""
  u = jax.random.uniform(key, (b, h, nq, nk))
  i = (jnp.arange(nq) if q_block_index is None else q_block_index)[:, None]
  j = jnp.arange(nk)[None, :]
  return ((u < density) & (j <= i)) | (j == i)


def ring_positions(cfg, q_pos, capacity):
  """Ring slot contents (cache.ring_slot layout) after writing positions 0..q_pos."""
  pos = np.full((capacity,), -1, np.int32)
  sinks = cfg.sinks
  ring = capacity - sinks
  lo = max(sinks, q_pos + 1 - ring)
  p = np.arange(lo, q_pos + 1)
  pos[sinks + (p - sinks) % ring] = p
  pos[:min(sinks, q_pos + 1)] = np.arange(min(sinks, q_pos + 1))
  return jnp.asarray(pos)[None]


# ---------------------------------------------------------------------------
# Prefill.


def window_fn(impl):
  """The local-head prefill implementation named `impl` (see dispatch.IMPLS; "mgpu": the
  Mosaic GPU kernel, Hopper only)."""
  if impl == "pallas":
    return flash_k.window_attention
  if impl == "mgpu":
    return mgpu_k.window_attention
  return functools.partial(cudnn_attention.window_attention, chunked=impl == "cudnn_chunked")


def prefill_layer_paper(cfg, window_impl, kernels):
  """Paper mode: local heads sink + window, retrieval heads dense causal (`kernels`)."""
  local, ret, kv_of = cfg.local, cfg.retrieval, cfg.kv_of
  inv = np.argsort(np.asarray(local + ret))

  def layer(q, k, v):
    ql, qr = q[:, :, jnp.asarray(local)], q[:, :, jnp.asarray(ret)]
    kvl = tuple(kv_of[h] for h in local)
    ol, _ = window_fn(window_impl)(ql, k, v, kvl, sinks=cfg.sinks, window=cfg.window)
    orr, _ = ops.causal_attention(qr, k, v, tuple(kv_of[h] for h in ret), kernels=kernels)
    return jnp.concatenate([ol, orr], axis=2)[:, :, jnp.asarray(inv)]

  return layer


def prefill_layer_sparse(cfg, window_impl, kernels):
  """Sparse prefill mode; the retrieval mask is given (fixed density) but the selection
  still runs and is returned, so its cost is inside the timing."""
  local, ret, kv_of = cfg.local, cfg.retrieval, cfg.kv_of
  inv = np.argsort(np.asarray(local + ret))

  def layer(q, k, v, qi, ki, mask):
    ql, qr = q[:, :, jnp.asarray(local)], q[:, :, jnp.asarray(ret)]
    kvl = tuple(kv_of[h] for h in local)
    ol, _ = window_fn(window_impl)(ql, k, v, kvl, sinks=cfg.sinks, window=cfg.window)
    sel = ops.prefill_select(qi, ki, top_p=cfg.top_p, block_size=cfg.bs, kernels=kernels)
    orr, _ = ops.sparse_prefill(qr, k, v, tuple(kv_of[h] for h in ret), mask,
                                block_size=cfg.bs, kernels=kernels)
    return jnp.concatenate([ol, orr], axis=2)[:, :, jnp.asarray(inv)], sel

  return layer


MGPU_TILES = {  # the default (Tiles()) is timed as window_mgpu_27h
    "q64k64s4": mgpu_k.Tiles(block_q=64, block_kv=64, stages=4),
    "q64k64s2": mgpu_k.Tiles(block_q=64, block_kv=64, stages=2),
}

PALLAS_TILES = {
    "q128k128w8s2": dict(block_q=128, block_k=128, num_warps=8, num_stages=2),
    "q64k64w4s3": dict(block_q=64, block_k=64, num_warps=4, num_stages=3),
}


def window_pairs(s, sinks, window):
  """Visible (query, key) pairs of the sink + window rule over s tokens."""
  t = np.arange(s, dtype=np.float64)
  win = np.minimum(t + 1, window)
  extra = np.clip(np.minimum(sinks, t - window + 1), 0, None)
  return float(np.sum(win + extra))


def run_prefill(run, cfg, s, reps, smoke, densities, variants, skip=()):
  log(f"prefill S={s}")
  kernels = run.kernels
  dt = jnp.dtype(cfg.dtype)
  keys = jax.random.split(jax.random.PRNGKey(s), 8)
  b, nb = 1, s // cfg.bs
  q = _normal(keys[0], (b, s, cfg.hq, cfg.d), dt)
  k = _normal(keys[1], (b, s, cfg.hk, cfg.d), dt)
  v = _normal(keys[2], (b, s, cfg.hk, cfg.d), dt)
  nr = len(cfg.retrieval)
  qi = _normal(keys[3], (b, s, nr, cfg.r), jnp.float32)
  ki = _normal(keys[4], (b, s, nr, cfg.r), jnp.float32) * 0.5
  local, ret, kv_of = cfg.local, cfg.retrieval, cfg.kv_of
  kvl = tuple(kv_of[h] for h in local)
  kvr = tuple(kv_of[h] for h in ret)
  ql = q[:, :, jnp.asarray(local)]
  qr = q[:, :, jnp.asarray(ret)]
  d = cfg.d
  rows = np.unique(np.concatenate([
      [0, s - 1, min(s - 1, cfg.window + 3), min(s - 1, cfg.window - 1)],
      np.asarray(jax.random.randint(keys[5], (12,), 0, s))])).astype(np.int32)
  rows_j = jnp.asarray(rows)
  pos_all = jnp.arange(s, dtype=jnp.int32)[None]

  def ref_rows(qh, kvh, key_block_mask=None, **rule):
    """Reference on the sampled rows, 4 heads at a time (fp32 K/V copies stay small)."""
    outs, lses = [], []
    for h0 in range(0, len(kvh), 4):
      sl = slice(h0, min(h0 + 4, len(kvh)))
      kbm = None if key_block_mask is None else key_block_mask[:, sl]
      o, l = ref.masked_attention(qh[:, rows_j][:, :, sl], k, v, rows_j[None], pos_all,
                                  kvh[sl], key_block_mask=kbm, block_size=cfg.bs,
                                  chunk=len(rows), **rule)
      outs.append(o)
      lses.append(l)
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)

  # ---- correctness on sampled rows --------------------------------------------------------
  win_rule = dict(sinks=cfg.sinks, window=cfg.window)
  ro, rl = ro_win, rl_win = ref_rows(ql, kvl, **win_rule)
  impl_names = ["pallas"] + ([] if smoke else ["cudnn", "cudnn_chunked", "mgpu"])
  for name in impl_names:
    try:
      o, l = window_fn(name)(ql, k, v, kvl, **win_rule)
      run.check(f"window_attention_{name}", s, out_rel=rel_err(o[:, rows_j], ro),
                lse_max_abs=float(jnp.max(jnp.abs(l[:, rows_j] - rl))))
    except Exception as e:  # noqa: BLE001
      run.errors.append(dict(name=f"check window_{name}", ctx=s, error=repr(e)[:2000]))
      log(f"  FAIL check window_{name}: {e!r}"[:600])
  ro, rl = ro_ret, rl_ret = ref_rows(qr, kvr)
  try:
    o, l = ops.causal_attention(qr, k, v, kvr, kernels=kernels)
    run.check("causal_attention_dispatch", s, out_rel=rel_err(o[:, rows_j], ro),
              lse_max_abs=float(jnp.max(jnp.abs(l[:, rows_j] - rl))))
  except Exception as e:  # noqa: BLE001
    run.errors.append(dict(name="check causal", ctx=s, error=repr(e)[:2000]))
    log(f"  FAIL check causal: {e!r}"[:600])
  # prefill_select on sampled query blocks (the reference for all blocks is O(S^2 / 64)).
  try:
    sel = prefill_select_k.prefill_select(qi, ki, top_p=cfg.top_p, block_size=cfg.bs)
    qb = np.unique(np.concatenate([[0, nb - 1], rows // cfg.bs]))
    pooled = qi.reshape(b, nb, cfg.bs, nr, cfg.r).mean(axis=2)[:, qb]  # [b, nq, h, r]
    sc = jnp.einsum("bqhr,bkhr->bhqk", pooled, ki, precision="highest")
    kvalid = jnp.arange(s)[None, :] < (jnp.asarray(qb)[:, None] + 1) * cfg.bs
    lm, valid = ref.block_logmass(sc, jnp.broadcast_to(kvalid, sc.shape), cfg.bs)
    want = ref.topp_from_block_logmass(lm, valid, jnp.broadcast_to(jnp.asarray(qb), lm.shape[:-1]),
                                       cfg.top_p)
    got = sel[:, :, jnp.asarray(qb)]
    run.check("prefill_select", s, mismatched_blocks=int(jnp.sum(got != want)),
              selected=int(jnp.sum(want)), rows=int(len(qb) * nr))
  except Exception as e:  # noqa: BLE001
    run.errors.append(dict(name="check prefill_select", ctx=s, error=repr(e)[:2000]))
    log(f"  FAIL check prefill_select: {e!r}"[:600])
  masks = {dens: block_density_mask(jax.random.fold_in(keys[6], int(dens * 1000)), b, nr, nb,
                                    nb, dens) for dens in densities}
  try:
    mask = masks[densities[-1]]
    o, l = sparse_prefill_k.sparse_prefill(qr, k, v, kvr, mask, block_size=cfg.bs)
    ro, rl = ref_rows(qr, kvr, key_block_mask=mask[:, :, jnp.asarray(rows // cfg.bs)])
    run.check("sparse_prefill", s, out_rel=rel_err(o[:, rows_j], ro),
              lse_max_abs=float(jnp.max(jnp.abs(l[:, rows_j] - rl))))
  except Exception as e:  # noqa: BLE001
    run.errors.append(dict(name="check sparse_prefill", ctx=s, error=repr(e)[:2000]))
    log(f"  FAIL check sparse_prefill: {e!r}"[:600])

  # ---- timings -----------------------------------------------------------------------------
  dense_flops = 4.0 * cfg.hq * d * s * (s + 1) / 2
  io = 2.0 * (2 * s * cfg.hq * d + 2 * s * cfg.hk * d)
  wflops = 4.0 * len(local) * d * window_pairs(s, cfg.sinks, cfg.window)
  rflops = 4.0 * nr * d * s * (s + 1) / 2
  ph = dict(phase="prefill")
  if not smoke:
    run.time("dense_prefill_cudnn", s, lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"), (q, k, v), reps=reps,
        flops=dense_flops, bytes_=io, **ph)
  for impl in impl_names:
    if impl in skip:
      continue
    if "paper" in variants:
      run.time(f"layer_paper_window_{impl}", s, prefill_layer_paper(cfg, impl, kernels), (q, k, v),
               reps=reps, flops=wflops + rflops, bytes_=io, layer=True, **ph)
    run.time(f"window_{impl}_27h", s,
             lambda q, k, v, fn=window_fn(impl): fn(q, k, v, kvl, **win_rule),
             (ql, k, v), reps=reps, flops=wflops, **ph)
  if not smoke and "mgpu" not in skip:
    for tag, tiles in MGPU_TILES.items():
      try:
        o, l = mgpu_k.window_attention(ql, k, v, kvl, **win_rule, tiles=tiles)
        run.check(f"window_attention_mgpu_{tag}", s, out_rel=rel_err(o[:, rows_j], ro_win),
                  lse_max_abs=float(jnp.max(jnp.abs(l[:, rows_j] - rl_win))))
      except Exception as e:  # noqa: BLE001
        run.errors.append(dict(name=f"check window_mgpu_{tag}", ctx=s, error=repr(e)[:2000]))
        log(f"  FAIL check window_mgpu_{tag}: {e!r}"[:600])
        continue
      run.time(f"window_mgpu_27h_{tag}", s,
               lambda q, k, v, tiles=tiles: mgpu_k.window_attention(q, k, v, kvl, **win_rule,
                                                                    tiles=tiles),
               (ql, k, v), reps=reps, flops=wflops, **ph)
    try:
      o, l = mgpu_k.causal_attention(qr, k, v, kvr)
      run.check("causal_attention_mgpu", s, out_rel=rel_err(o[:, rows_j], ro_ret),
                lse_max_abs=float(jnp.max(jnp.abs(l[:, rows_j] - rl_ret))))
      run.time("retrieval_dense_mgpu_5h", s,
               lambda q, k, v: mgpu_k.causal_attention(q, k, v, kvr), (qr, k, v), reps=reps,
               flops=rflops, **ph)
    except Exception as e:  # noqa: BLE001
      run.errors.append(dict(name="check causal_mgpu", ctx=s, error=repr(e)[:2000]))
      log(f"  FAIL check causal_mgpu: {e!r}"[:600])
  if not smoke and s <= 128 * 1024 and "tiles" not in skip:  # other Pallas tiles, for the record
    for tag, kw in PALLAS_TILES.items():
      run.time(f"window_pallas_27h_{tag}", s,
               lambda q, k, v, kw=kw: flash_k.window_attention(q, k, v, kvl, **win_rule, **kw),
               (ql, k, v), reps=reps, flops=wflops, **ph)
  if not smoke:
    run.time("retrieval_dense_cudnn_5h", s,
             lambda q, k, v: ops.causal_attention(q, k, v, kvr, kernels=kernels), (qr, k, v),
             reps=reps, flops=rflops, **ph)
  if "retrieval_pallas" not in skip:
    run.time("retrieval_dense_pallas_5h", s,
             lambda q, k, v: flash_k.causal_attention(q, k, v, kvr), (qr, k, v), reps=reps,
             flops=rflops, **ph)
  sel_pairs = nb * (nb + 1) / 2
  run.time("prefill_select_5h", s, lambda a, c: prefill_select_k.prefill_select(
      a, c, top_p=cfg.top_p, block_size=cfg.bs), (qi, ki), reps=reps,
      flops=nr * sel_pairs * cfg.bs * cfg.r * 2.0, flop_rate=FP32_FLOPS,
      bytes_=nr * sel_pairs * 4.0 * 2, **ph)
  # The window implementation the dispatch picks here (measured default or override).
  best = dispatch.impl_for("window_attention", cfg.dtype, kernels) if not smoke else "pallas"
  for dens in densities:
    mask = masks[dens]
    n_sel = float(jnp.sum(mask))
    sflops = 4.0 * d * (n_sel * cfg.bs * cfg.bs - nr * nb * cfg.bs * (cfg.bs - 1) / 2)
    run.time(f"sparse_prefill_5h_d{int(dens * 100)}", s,
             lambda q, k, v, m: sparse_prefill_k.sparse_prefill(q, k, v, kvr, m,
                                                                block_size=cfg.bs),
             (qr, k, v, mask), reps=reps, flops=sflops, density=dens, **ph)
    if "sparse" in variants:
      run.time(f"layer_sparse_d{int(dens * 100)}_window_{best}", s,
               prefill_layer_sparse(cfg, best, kernels), (q, k, v, qi, ki, mask), reps=reps,
               flops=wflops + sflops, density=dens, layer=True, **ph)
  run.save()


# ---------------------------------------------------------------------------
# Decode.

N_COPIES = 2


def run_decode(run, cfg, t, inner, reps, smoke, densities, profile=False):
  log(f"decode T={t}")
  kernels = run.kernels
  dt = jnp.dtype(cfg.dtype)
  nb = t // cfg.bs
  b = 1
  keys = iter(jax.random.split(jax.random.PRNGKey(1000 + t), 64))
  nf, nr_kv, nr = len(cfg.full_kv), len(cfg.ring_kv), len(cfg.retrieval)
  cap = min(cfg.ring_capacity, t)
  lengths = jnp.full((b,), t, jnp.int32)
  q_pos = lengths - 1
  ring_pos = ring_positions(cfg, t - 1, cap)

  def cache_copy():
    return dict(
        full_k=_normal(next(keys), (b, nf, t, cfg.d), dt),
        full_v=_normal(next(keys), (b, nf, t, cfg.d), dt),
        ring_k=_normal(next(keys), (b, nr_kv, cap, cfg.d), dt),
        ring_v=_normal(next(keys), (b, nr_kv, cap, cfg.d), dt),
        ckeys=_normal(next(keys), (b, nr, t, cfg.r), dt))

  copies = [cache_copy() for _ in range(N_COPIES)]
  q0 = _normal(next(keys), (b, cfg.hq, cfg.d), dt)
  qi0 = _normal(next(keys), (b, nr, cfg.r), jnp.float32)
  routing = cfg.routing
  ring_local, full_local = routing.ring_local.heads, routing.full_local.heads
  ring_kvh, full_local_kvh = routing.ring_local.slots, routing.full_local.slots
  ret_kvh = routing.selected.slots
  order = ring_local + full_local + cfg.retrieval
  inv = jnp.asarray(np.argsort(np.asarray(order)))
  rule = dict(sinks=cfg.sinks, window=cfg.window)
  active = jnp.ones((b,), bool)

  def layer(q, qi, c, mask):
    full_pos = jnp.where(jnp.arange(t)[None] < lengths[:, None], jnp.arange(t)[None], -1)
    o1, _ = ops.ring_decode(q[:, jnp.asarray(ring_local)], c["ring_k"], c["ring_v"], ring_pos,
                            ring_kvh, q_pos, sparse_active=active, **rule, kernels=kernels)
    o2, _ = ops.ring_decode(q[:, jnp.asarray(full_local)], c["full_k"], c["full_v"], full_pos,
                            full_local_kvh, q_pos, sparse_active=active, **rule, kernels=kernels)
    sel = ops.topp_select(qi, c["ckeys"], lengths, top_p=cfg.top_p, block_size=cfg.bs,
                          kernels=kernels)
    o3, _ = ops.sparse_decode(q[:, jnp.asarray(cfg.retrieval)], c["full_k"], c["full_v"],
                              ret_kvh, mask, lengths, block_size=cfg.bs, kernels=kernels)
    return jnp.concatenate([o1, o2, o3], axis=1)[:, inv], sel

  heads = ref.DecodeHeads.of(ring=(ring_local, ring_kvh), local=(full_local, full_local_kvh),
                             selected=(cfg.retrieval, ret_kvh))

  def layer_fused(q, qi, c, mask):
    """The same layer step through `ops.layer_decode` (one decode kernel + one merge)."""
    sel = ops.topp_select(qi, c["ckeys"], lengths, top_p=cfg.top_p, block_size=cfg.bs,
                          kernels=kernels)
    o, _ = ops.layer_decode(q, c["ring_k"], c["ring_v"], ring_pos, c["full_k"], c["full_v"],
                            lengths, q_pos, mask, heads=heads, sparse_active=active, **rule,
                            block_size=cfg.bs, kernels=kernels)
    return o, sel

  if profile:  # one layer step between cuProfilerStart/Stop, for `ncu --profile-from-start off`
    import ctypes
    cuda = ctypes.CDLL("libcuda.so.1")
    mask = block_density_mask(next(keys), b, nr, 1, nb, densities[-1],
                              q_block_index=jnp.asarray([nb - 1]))[:, :, 0]
    step = jax.jit(layer)
    for _ in range(3):
      jax.block_until_ready(step(q0, qi0, copies[0], mask))
    cuda.cuProfilerStart()
    jax.block_until_ready(step(q0, qi0, copies[1], mask))
    cuda.cuProfilerStop()
    log(f"profiled one decode layer step at T={t}")
    return

  # ---- correctness (full size, every head) -----------------------------------------------
  c = copies[0]
  mask = block_density_mask(next(keys), b, nr, 1, nb, densities[-1],
                            q_block_index=jnp.asarray([nb - 1]))[:, :, 0]
  try:
    o, l = decode_k.sparse_decode(q0[:, jnp.asarray(cfg.retrieval)], c["full_k"], c["full_v"],
                                  ret_kvh, mask, lengths, block_size=cfg.bs)
    ro, rl = ref.sparse_decode(q0[:, jnp.asarray(cfg.retrieval)], c["full_k"], c["full_v"],
                               ret_kvh, mask, lengths, block_size=cfg.bs)
    run.check("sparse_decode", t, out_rel=rel_err(o, ro),
              lse_max_abs=float(jnp.max(jnp.abs(l - rl))))
    o, l = decode_k.ring_decode(q0[:, jnp.asarray(ring_local)], c["ring_k"], c["ring_v"],
                                ring_pos, ring_kvh, q_pos, sparse_active=active, **rule)
    ro, rl = ref.ring_decode(q0[:, jnp.asarray(ring_local)], c["ring_k"], c["ring_v"],
                             ring_pos, ring_kvh, q_pos, sparse_active=active, **rule)
    run.check("ring_decode_ring", t, out_rel=rel_err(o, ro),
              lse_max_abs=float(jnp.max(jnp.abs(l - rl))))
    full_pos = jnp.where(jnp.arange(t)[None] < lengths[:, None], jnp.arange(t)[None], -1)
    o, l = decode_k.ring_decode(q0[:, jnp.asarray(full_local)], c["full_k"], c["full_v"],
                                full_pos, full_local_kvh, q_pos, sparse_active=active,
                                **rule)
    ro, rl = ref.ring_decode(q0[:, jnp.asarray(full_local)], c["full_k"], c["full_v"],
                             full_pos, full_local_kvh, q_pos, sparse_active=active,
                             **rule)
    run.check("ring_decode_full_cache", t, out_rel=rel_err(o, ro),
              lse_max_abs=float(jnp.max(jnp.abs(l - rl))))
    args = (q0, c["ring_k"], c["ring_v"], ring_pos, c["full_k"], c["full_v"], lengths, q_pos,
            mask)
    o, l = layer_decode_k.layer_decode(*args, heads=heads, sparse_active=active, **rule,
                                       block_size=cfg.bs)
    ro, rl = ref.layer_decode(*args, heads=heads, sparse_active=active, **rule,
                              block_size=cfg.bs)
    run.check("layer_decode", t, out_rel=rel_err(o, ro),
              lse_max_abs=float(jnp.max(jnp.abs(l - rl))))
    o2 = layer(q0, qi0, c, mask)[0]
    run.check("layer_decode_vs_per_set_kernels", t, out_rel=rel_err(o, o2))
    for selector in ("exact", "histogram"):
      got = topp_select_k.topp_select(qi0, c["ckeys"], lengths, top_p=cfg.top_p,
                                      block_size=cfg.bs, selector=selector)
      want = ref.topp_select(qi0, c["ckeys"], lengths, top_p=cfg.top_p, block_size=cfg.bs,
                             selector=selector)
      run.check(f"topp_select_{selector}", t, mismatched_blocks=int(jnp.sum(got != want)),
                selected=int(jnp.sum(want)))
  except Exception as e:  # noqa: BLE001
    run.errors.append(dict(name="check decode", ctx=t, error=traceback.format_exc()[-2000:]))
    log(f"  FAIL check decode: {e!r}"[:600])

  # ---- timings: `inner` steps per call, rotating cache copies and masks -------------------
  masks = [block_density_mask(next(keys), b, nr, 1, nb, dens,
                              q_block_index=jnp.asarray([nb - 1]))[:, :, 0]
           for dens in densities for _ in range(N_COPIES)]

  def looped(step):
    """`inner` dependent steps, unrolled in one program (no host round trips between
    steps, unlike a device loop), cycling over the cache copies."""
    def fn(q, qi, *arrays):
      carry = (q, qi, jnp.zeros((), jnp.float32))
      for i in range(inner):
        carry = step(carry, ci=i % N_COPIES, arrays=arrays)
      return carry
    return fn

  flat = [copies[ci][name] for ci in range(N_COPIES)
          for name in ("full_k", "full_v", "ring_k", "ring_v", "ckeys")]

  def unpack(arrays, ci):
    names = ("full_k", "full_v", "ring_k", "ring_v", "ckeys")
    return dict(zip(names, arrays[ci * 5:(ci + 1) * 5]))

  ph = dict(phase="decode")
  if not smoke:
    dense_k = [_normal(next(keys), (b, t, cfg.hk, cfg.d), dt) for _ in range(N_COPIES)]
    dense_v = [_normal(next(keys), (b, t, cfg.hk, cfg.d), dt) for _ in range(N_COPIES)]

    def dense_step(carry, ci, arrays):
      q, qi, acc = carry
      kk, vv = arrays[ci], arrays[N_COPIES + ci]
      o = jax.nn.dot_product_attention(q[:, None], kk, vv, implementation="cudnn")[:, 0]
      return q + 1e-3 * o, qi, acc

    run.time("dense_decode_cudnn", t, looped(dense_step), (q0, qi0, *dense_k, *dense_v),
             reps=reps, inner=inner, bytes_=2.0 * 2 * cfg.hk * t * cfg.d, **ph)
    del dense_k, dense_v

  visible = min(t, cfg.sinks + cfg.window)
  for di, dens in enumerate(densities):
    dmasks = masks[di * N_COPIES:(di + 1) * N_COPIES]
    sel_bytes = float(jnp.mean(jnp.sum(dmasks[0], axis=-1))) * cfg.bs * cfg.d * 2 * 2

    def layer_step(carry, ci, arrays, dmasks=dmasks):
      q, qi, acc = carry
      out, sel = layer(q, qi, unpack(arrays, ci), dmasks[ci])
      return (q + 1e-3 * out, qi + 1e-3 * out[:, :nr, :cfg.r].astype(jnp.float32),
              acc + jnp.sum(sel))

    byts = (2.0 * 2 * cfg.hk * visible * cfg.d + nr * t * cfg.r * 2 + nr * sel_bytes)
    run.time(f"layer_decode_d{int(dens * 100)}", t, looped(layer_step), (q0, qi0, *flat),
             reps=reps, inner=inner, bytes_=byts, density=dens, layer=True, **ph)

    def fused_step(carry, ci, arrays, dmasks=dmasks):
      q, qi, acc = carry
      out, sel = layer_fused(q, qi, unpack(arrays, ci), dmasks[ci])
      return (q + 1e-3 * out, qi + 1e-3 * out[:, :nr, :cfg.r].astype(jnp.float32),
              acc + jnp.sum(sel))

    run.time(f"layer_fused_decode_d{int(dens * 100)}", t, looped(fused_step),
             (q0, qi0, *flat), reps=reps, inner=inner, bytes_=byts, density=dens, layer=True,
             **ph)

    def sparse_step(carry, ci, arrays, dmasks=dmasks):
      q, qi, acc = carry
      c = unpack(arrays, ci)
      o, _ = ops.sparse_decode(q[:, jnp.asarray(cfg.retrieval)], c["full_k"], c["full_v"],
                               ret_kvh, dmasks[ci], lengths, block_size=cfg.bs,
                               kernels=kernels)
      return q.at[:, jnp.asarray(cfg.retrieval)].add(1e-3 * o), qi, acc

    run.time(f"sparse_decode_5h_d{int(dens * 100)}", t, looped(sparse_step), (q0, qi0, *flat),
             reps=reps, inner=inner, bytes_=nr * sel_bytes, density=dens, **ph)

  def select_step(carry, ci, arrays):
    q, qi, acc = carry
    sel = ops.topp_select(qi, unpack(arrays, ci)["ckeys"], lengths, top_p=cfg.top_p,
                          block_size=cfg.bs, kernels=kernels)
    return q, qi + 1e-3, acc + jnp.sum(sel)

  run.time("topp_select_5h", t, looped(select_step), (q0, qi0, *flat), reps=reps, inner=inner,
           bytes_=nr * t * cfg.r * 2.0, **ph)

  # Its two kernels apart: the block log-mass pass (memory-bound) and the top-p rows.
  def logmass_step(carry, ci, arrays, cb=32):
    q, qi, acc = carry
    lm = topp_select_k.block_logmass(qi, unpack(arrays, ci)["ckeys"], lengths,
                                     block_size=cfg.bs, chunk_blocks=cb,
                                     interpret=kernels.interpret)
    return q, qi + 1e-3, acc + jnp.sum(lm[..., -1])

  run.time("topp_logmass_5h", t, looped(logmass_step), (q0, qi0, *flat), reps=reps,
           inner=inner, bytes_=nr * t * cfg.r * 2.0, **ph)
  lm0 = topp_select_k.block_logmass(qi0, copies[0]["ckeys"], lengths, block_size=cfg.bs,
                                    interpret=kernels.interpret)
  # Blocks per program of the log-mass pass (default 32): fewer, larger programs or more,
  # smaller ones; the same values, checked first.
  for cb in (8, 16, 64, 128):
    got = topp_select_k.block_logmass(qi0, copies[0]["ckeys"], lengths, block_size=cfg.bs,
                                      chunk_blocks=cb, interpret=kernels.interpret)
    same = jnp.where(jnp.isfinite(lm0), jnp.abs(got - lm0) <= 1e-5, got == lm0)
    run.check(f"topp_logmass_cb{cb}", t, mismatched_blocks=int(jnp.sum(~same)))
    run.time(f"topp_logmass_cb{cb}_5h", t, looped(functools.partial(logmass_step, cb=cb)),
             (q0, qi0, *flat), reps=reps, inner=inner, bytes_=nr * t * cfg.r * 2.0, **ph)

  def rows_step(carry, ci, arrays, search="bisect", warps=None):
    q, qi, acc = carry
    keep = topp_rows.select_rows_decode(lm0 + qi[..., :1] + acc * 1e-9, lengths,
                                        block_size=cfg.bs, top_p=cfg.top_p, search=search,
                                        num_warps=warps, interpret=kernels.interpret)
    return q, qi + 1e-3, acc + jnp.sum(keep)

  run.time("topp_rows_5h", t, looped(rows_step), (q0, qi0, *flat), reps=reps, inner=inner,
           bytes_=nr * nb * 4.0, **ph)
  # The rows' options (the same blocks, checked first): the threshold search, and program
  # sizes from 1 to 64 row elements per thread.
  width = 1 << (nb - 1).bit_length()
  for search in topp_rows.SEARCHES:
    for warps in (1, 2, 4, 8, 16, 32):
      if not 1 <= width // (32 * warps) <= 64:
        continue
      got = topp_rows.select_rows_decode(lm0, lengths, block_size=cfg.bs, top_p=cfg.top_p,
                                         search=search, num_warps=warps,
                                         interpret=kernels.interpret)
      want = topp_rows.select_rows_decode(lm0, lengths, block_size=cfg.bs, top_p=cfg.top_p,
                                          interpret=kernels.interpret)
      run.check(f"topp_rows_{search}_w{warps}", t, mismatched_blocks=int(jnp.sum(got != want)))
      run.time(f"topp_rows_{search}_w{warps}_5h", t,
               looped(functools.partial(rows_step, search=search, warps=warps)),
               (q0, qi0, *flat), reps=reps, inner=inner, bytes_=nr * nb * 4.0, **ph)

  def ring_step(carry, ci, arrays):
    q, qi, acc = carry
    c = unpack(arrays, ci)
    full_pos = jnp.where(jnp.arange(t)[None] < lengths[:, None], jnp.arange(t)[None], -1)
    o1, _ = ops.ring_decode(q[:, jnp.asarray(ring_local)], c["ring_k"], c["ring_v"], ring_pos,
                            ring_kvh, q_pos, sparse_active=active, **rule, kernels=kernels)
    o2, _ = ops.ring_decode(q[:, jnp.asarray(full_local)], c["full_k"], c["full_v"], full_pos,
                            full_local_kvh, q_pos, sparse_active=active, **rule,
                            kernels=kernels)
    return q + 1e-3 * jnp.concatenate([o1, o2], 1).mean(), qi, acc

  run.time("ring_decode_27h", t, looped(ring_step), (q0, qi0, *flat), reps=reps, inner=inner,
           bytes_=2.0 * 2 * cfg.hk * visible * cfg.d, **ph)
  run.save()


# ---------------------------------------------------------------------------


def parse_sizes(text):
  out = []
  for tok in text.split(","):
    tok = tok.strip().upper()
    if not tok:
      continue
    mult = {"K": 1024, "M": 1024 * 1024}.get(tok[-1], 1)
    out.append(int(float(tok.rstrip("KM")) * mult))
  return out


def print_table(run):
  log("\n== RTPurbo layer vs cuDNN dense (same GPU, same process) ==")
  log(f"GPU {run.meta['gpu']}  jax {run.meta['jax']}  triton {run.meta['triton']}")
  log(f"{'phase':<8} {'variant':<36} {'ctx':>8} {'ms':>10} {'dense ms':>10} {'speedup':>8}")
  for r in run.table():
    dm = f"{r['dense_ms']:10.3f}" if r["dense_ms"] else f"{'-':>10}"
    sp = f"{r['speedup']:7.2f}x" if r["speedup"] else f"{'-':>8}"
    log(f"{r['phase']:<8} {r['variant']:<36} {r['ctx']:>8} {r['ms']:10.3f} {dm} {sp}")
  bad = [c for c in run.checks if c.get("out_rel", 0) > 2e-2 or c.get("mismatched_blocks", 0)]
  log(f"checks: {len(run.checks)} run, {len(bad)} flagged; errors: {len(run.errors)}")
  for c in bad:
    log(f"  flagged: {c}")
  for e in run.errors:
    log(f"  error: {e['name']} ctx={e['ctx']}: {e['error'][:300]}")


def main(argv=None):
  # References in full fp32 (XLA's default on GPUs lets fp32 dots use TF32).
  jax.config.update("jax_default_matmul_precision", "highest")
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prefill", default="32K,128K,512K,1M")
  p.add_argument("--decode", default="32K,128K,512K,1M")
  p.add_argument("--densities", default="0.03,0.10")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--big-reps", type=int, default=2, help="reps from 512K prefill on")
  p.add_argument("--inner", type=int, default=16, help="decode steps per timed call")
  p.add_argument("--profile-decode", default=None,
                 help="only run one decode layer step at this context (for ncu)")
  p.add_argument("--variants", default="paper,sparse")
  p.add_argument("--skip", default="", help="comma list: pallas, cudnn, cudnn_chunked, mgpu, "
                 "tiles, retrieval_pallas")
  p.add_argument("--window-impl", default=None,
                 help="override the dispatch's window implementation (the run's KernelConfig)")
  p.add_argument("--out", default=os.environ.get("OUT"))
  p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode, CPU")
  p.add_argument("--budget-s", type=float, default=1e9,
                 help="skip contexts that start after this many seconds (results are kept)")
  a = p.parse_args(argv)
  cfg = SMOKE if a.smoke else Cfg()
  # The GPU kernels unless RTPURBO_KERNELS names another backend; RTPURBO_INTERPRET and the
  # RTPURBO_*_ATTN overrides as everywhere, then --window-impl.
  kernels = kernel_config.KernelConfig.from_env({"RTPURBO_KERNELS": "gpu", **os.environ})
  if a.window_impl:
    kernels = kernels.with_impls(window_attention=kernel_config.check_impl(
        "window_attention", a.window_impl, source="--window-impl"))
  dens = [float(x) for x in a.densities.split(",")]
  run = Run(a.out, cfg, a.smoke, kernels)
  log(f"devices: {jax.devices()}  meta: {run.meta}")
  t_start = time.time()
  if a.profile_decode:
    for t in parse_sizes(a.profile_decode):
      run_decode(run, cfg, t, a.inner, a.reps, a.smoke, dens, profile=True)
    return 0
  for t in parse_sizes(a.decode):
    if time.time() - t_start > a.budget_s:
      run.errors.append(dict(name="skipped decode (budget)", ctx=t, error="time budget"))
      continue
    run_decode(run, cfg, t, a.inner, a.reps, a.smoke, dens)
    run.save()  # each context's rows survive a later timeout
    log(f"  [{time.time() - t_start:.0f}s]")
  for s in parse_sizes(a.prefill):
    if time.time() - t_start > a.budget_s:
      run.errors.append(dict(name="skipped prefill (budget)", ctx=s, error="time budget"))
      continue
    reps = a.reps if s < 512 * 1024 else a.big_reps
    run_prefill(run, cfg, s, reps, a.smoke, dens, a.variants.split(","), a.skip.split(","))
    run.save()
    log(f"  [{time.time() - t_start:.0f}s]")
  run.save()
  print_table(run)
  return 0 if not run.errors else 1


if __name__ == "__main__":
  sys.exit(main())
