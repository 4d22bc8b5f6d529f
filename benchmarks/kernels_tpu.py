"""RTPurbo TPU (Mosaic) kernels vs dense attention on one TPU chip, in one process.

Config (Llama-3.1-8B attention layer): 32 query / 8 KV heads, head_dim 128, bf16, batch 1;
5 of 32 query heads are retrieval heads; window 8192 + 4 sinks; block 64, indexer dim 16;
selection density fixed at 3%, 10% and 100% of causal blocks.

For each context (default 32K, 64K, 128K) the script
  1. checks each kernel against `pallas_kernels.reference` (decode: every head; prefill: the
     last 256 queries of two heads, where the reference fits in memory), fresh inputs;
  2. times
       prefill  dense flash (32 heads, causal; jax's TPU flash kernel with KV repeated, and
                ours with window=None), sink+window (27 local heads), paper-mode layer
                (local sink+window + retrieval dense), block-sparse prefill (5 heads),
       decode   XLA dense decode (32 heads over the whole cache), top-p selection,
                sparse decode per density (pipelined grid and DMA loop), ring decode
                (local heads), the decode layer, and the jnp references of selection and
                sparse decode;
  3. prints a table and writes JSON (TPU kind, versions, date, numbers) to --out.

Decode steps run inside one jitted loop (each step's output feeds the next query), so
dispatch overhead is not timed.

  python benchmarks/kernels_tpu.py --out benchmarks/results            # on a TPU VM
  python benchmarks/kernels_tpu.py --smoke --interpret                 # plumbing, on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels import reference as ref  # noqa: E402
from pallas_kernels.tpu import ring_decode as ring_k  # noqa: E402
from pallas_kernels.tpu import sparse_decode as decode_k  # noqa: E402
from pallas_kernels.tpu import sparse_prefill as prefill_k  # noqa: E402
from pallas_kernels.tpu import topp_select as topp_k  # noqa: E402
from pallas_kernels.tpu import window_attention as window_k  # noqa: E402
from rtpurbo_jax.attention.plan import HeadPlan  # noqa: E402
from rtpurbo_jax.attention.routing import head_routing  # noqa: E402


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
  def full_kv(self):  # KV heads read by a retrieval head: full cache
    return self.routing.full_kv

  @property
  def ring_kv(self):
    return self.routing.ring_kv


def log(*a):
  print(*a, flush=True)


def median_ms(fn, args, reps):
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def loop(step, steps):
  """fn(x, *rest) -> x repeated `steps` times in one program: per-step cost, no dispatch."""

  def run(x, *rest):
    return jax.lax.fori_loop(0, steps, lambda _, c: step(c, *rest), x)

  return run


def max_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  fin = np.isfinite(b)
  if not np.array_equal(np.isfinite(a), fin):
    return float("inf")
  return float(np.max(np.abs(a[fin] - b[fin]), initial=0.0))


class Run:
  """Checks and timings; JSON is rewritten after every context, so partial runs count."""

  def __init__(self, out_dir, cfg, smoke):
    import jaxlib
    dev = jax.devices()[0]
    try:
      import libtpu  # noqa: F401
      from importlib.metadata import version
      libtpu_version = version("libtpu")
    except Exception:  # noqa: BLE001 - absent off TPU
      libtpu_version = None
    self.out_dir, self.timings, self.checks, self.errors = out_dir, [], [], []
    self.meta = dict(device=dev.device_kind, platform=dev.platform, devices=jax.device_count(),
                     jax=jax.__version__, jaxlib=jaxlib.__version__, libtpu=libtpu_version,
                     python=platform.python_version(), smoke=smoke,
                     date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds"), config=dataclasses.asdict(cfg))

  def check(self, name, ctx, err, tol):
    self.checks.append(dict(name=name, ctx=ctx, max_abs_err=err, tol=tol, ok=err <= tol))
    log(f"  check {name:<30} ctx={ctx:<8} max|err|={err:.3g} {'ok' if err <= tol else 'FAIL'}")

  def time(self, name, ctx, fn, args, *, reps, per=1, phase, layer=False, **extra):
    try:
      ms = median_ms(fn, args, reps) / per
    except Exception as e:  # noqa: BLE001 - record and carry on (e.g. out of memory)
      self.errors.append(dict(name=name, ctx=ctx, error=f"{type(e).__name__}: {e}"[:2000]))
      log(f"  FAIL  {name} ctx={ctx}: {type(e).__name__}: {str(e)[:300]}")
      return None
    self.timings.append(dict(name=name, ctx=ctx, ms=ms, phase=phase, layer=layer, **extra))
    log(f"  time  {name:<36} ctx={ctx:<8} {ms:10.4f} ms")
    return ms

  def table(self):
    base = {(t["ctx"], t["phase"]): t["ms"] for t in self.timings
            if t["name"] in ("dense_prefill_flash", "dense_decode_xla")}
    rows = []
    for t in self.timings:
      b = base.get((t["ctx"], t["phase"]))
      rows.append(dict(phase=t["phase"], name=t["name"], ctx=t["ctx"], ms=t["ms"],
                       dense_ms=b, speedup=(b / t["ms"]) if b else None))
    return rows

  def save(self):
    if not self.out_dir:
      return
    os.makedirs(self.out_dir, exist_ok=True)
    kind = self.meta["device"].lower().replace(" ", "_")
    path = os.path.join(self.out_dir, f"kernels_tpu_{kind}.json")
    with open(path, "w") as f:
      json.dump(dict(meta=self.meta, checks=self.checks, timings=self.timings,
                     errors=self.errors, table=self.table()), f, indent=1)
    log(f"  wrote {path}")


def normal(key, shape, dtype=jnp.bfloat16):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def density_mask(key, shape, density, own):
  """Random blocks at `density` of the causal blocks below `own`, plus `own` itself."""
  nb = shape[-1]
  j = jnp.arange(nb)
  u = jax.random.uniform(key, shape)
  return ((u < density) & (j <= own[..., None])) | (j == own[..., None])


# ---------------------------------------------------------------------------
# Prefill.


def run_prefill(run, cfg, s, reps, ip, smoke):
  ks = jax.random.split(jax.random.PRNGKey(s), 6)
  q = normal(ks[0], (1, s, cfg.hq, cfg.d))
  k = normal(ks[1], (1, s, cfg.hk, cfg.d))
  v = normal(ks[2], (1, s, cfg.hk, cfg.d))
  local, ret = jnp.asarray(cfg.local), jnp.asarray(cfg.retrieval)
  kv_local = tuple(cfg.kv_of[h] for h in cfg.local)
  kv_ret = tuple(cfg.kv_of[h] for h in cfg.retrieval)
  window = min(cfg.window, s // 2) if smoke else cfg.window

  win = functools.partial(window_k.window_attention, kv_heads=kv_local, sinks=cfg.sinks,
                          window=window, interpret=ip)
  causal = functools.partial(window_k.causal_attention, interpret=ip)

  # Checks on the last 256 queries of two heads (the reference is O(rows x S) in memory).
  rows = min(256, s)
  out, _ = jax.jit(lambda q, k, v: win(q[:, :, local[:2]], k, v, kv_heads=kv_local[:2]))(q, k,
                                                                                         v)
  want, _ = ref.window_attention(q[:, s - rows:, local[:2]], k, v, kv_local[:2],
                                 sinks=cfg.sinks, window=window, q_offset=s - rows)
  run.check("window_attention", s, max_err(out[:, s - rows:], want), 3e-2)

  if not ip:
    try:
      from jax.experimental.pallas.ops.tpu import flash_attention as jax_flash

      def dense(q, k, v):  # [b, h, s, d]; KV repeated to every query head
        rep = jnp.asarray(cfg.kv_of)
        return jax_flash.flash_attention(
            jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2)[:, rep], jnp.swapaxes(v, 1, 2)[:, rep],
            causal=True, sm_scale=1 / math.sqrt(cfg.d))

      run.time("dense_prefill_flash", s, dense, (q, k, v), reps=reps, phase="prefill")
    except ImportError as e:
      log(f"  (no jax TPU flash kernel: {e})")
  run.time("dense_prefill_ours", s, lambda q, k, v: causal(q, k, v, cfg.kv_of)[0], (q, k, v),
           reps=reps, phase="prefill")
  run.time("window_attention_local", s, lambda q, k, v: win(q[:, :, local], k, v)[0], (q, k, v),
           reps=reps, phase="prefill")

  def paper_layer(q, k, v):
    o_local, _ = win(q[:, :, local], k, v)
    o_ret, _ = causal(q[:, :, ret], k, v, kv_ret)
    return o_local, o_ret

  run.time("rtpurbo_prefill_paper", s, paper_layer, (q, k, v), reps=reps, phase="prefill",
           layer=True)
  nb = s // cfg.bs
  own = jnp.broadcast_to(jnp.arange(nb), (1, len(cfg.retrieval), nb))
  for density in (0.03, 0.1):
    mask = density_mask(ks[3], (1, len(cfg.retrieval), nb, nb), density, own)
    fn = lambda q, k, v, m: prefill_k.sparse_prefill(q[:, :, ret], k, v, kv_ret, m,
                                                     interpret=ip)[0]
    run.time(f"sparse_prefill_{int(density * 100)}pct", s, fn, (q, k, v, mask), reps=reps,
             phase="prefill", density=density)


# ---------------------------------------------------------------------------
# Decode.


def run_decode(run, cfg, t, reps, steps, ip):
  ks = jax.random.split(jax.random.PRNGKey(t + 1), 8)
  n_ret, nfull, nring = len(cfg.retrieval), len(cfg.full_kv), len(cfg.ring_kv)
  length = jnp.asarray([t], jnp.int32)
  full_k = normal(ks[0], (1, nfull, t, cfg.d))
  full_v = normal(ks[1], (1, nfull, t, cfg.d))
  dense_k = normal(ks[2], (1, cfg.hk, t, cfg.d))
  dense_v = normal(ks[3], (1, cfg.hk, t, cfg.d))
  cap = min(cfg.ring_capacity, t)
  ring_k_ = normal(ks[4], (1, nring, cap, cfg.d))
  ring_v_ = normal(ks[5], (1, nring, cap, cfg.d))
  ring_pos = (jnp.arange(cap, dtype=jnp.int32) + (t - cap))[None]
  ckeys = normal(ks[6], (1, n_ret, t, cfg.r))
  qi = jax.random.normal(ks[7], (1, n_ret, cfg.r), jnp.float32)
  q = normal(ks[7], (1, cfg.hq, cfg.d))
  routing = cfg.routing
  kv_sel = routing.selected.slots
  ring_local, full_local = routing.ring_local.heads, routing.full_local.heads
  kv_ring, kv_full_local = routing.ring_local.slots, routing.full_local.slots
  nb = t // cfg.bs
  own = jnp.full((1, n_ret), nb - 1)
  rule = dict(sinks=cfg.sinks, window=cfg.window)

  # Checks.
  sel = jax.jit(lambda *a: topp_k.topp_select(*a, top_p=cfg.top_p, interpret=ip))(qi, ckeys,
                                                                                 length)
  want = ref.topp_select(qi, ckeys, length, top_p=cfg.top_p)
  run.check("topp_select", t, float(np.sum(np.asarray(sel) != np.asarray(want))), 0)
  mask = density_mask(ks[0], (1, n_ret, nb), 0.1, own)
  qr = q[:, jnp.asarray(cfg.retrieval)]
  out, _ = jax.jit(lambda *a: decode_k.sparse_decode(*a, interpret=ip), static_argnums=3)(
      qr, full_k, full_v, kv_sel, mask, length)
  want, _ = ref.sparse_decode(qr, full_k, full_v, kv_sel, mask, length)
  run.check("sparse_decode", t, max_err(out, want), 3e-2)

  def timed(name, step, x, *rest, **extra):
    run.time(name, t, loop(step, steps), (x,) + rest, reps=reps, per=steps, phase="decode",
             **extra)

  def dense_step(q, k, v):
    kvh = jnp.asarray(cfg.kv_of)
    s = jnp.einsum("bhd,bhtd->bht", q, k[:, kvh], preferred_element_type=jnp.float32)
    p = jax.nn.softmax(s / math.sqrt(cfg.d), axis=-1)
    return jnp.einsum("bht,bhtd->bhd", p.astype(v.dtype), v[:, kvh])

  timed("dense_decode_xla", dense_step, q, dense_k, dense_v)

  def select_step(qi, ck, impl):
    m = impl(qi, ck, length, top_p=cfg.top_p)
    return qi + 1e-6 * jnp.mean(m, axis=-1, keepdims=True)

  timed("topp_select", functools.partial(select_step, impl=functools.partial(
      topp_k.topp_select, interpret=ip)), qi, ckeys)
  timed("topp_select_reference", functools.partial(select_step, impl=ref.topp_select), qi,
        ckeys)
  for density in (0.03, 0.1, 1.0):
    m = density_mask(ks[1], (1, n_ret, nb), density, own)
    for impl in ("pipeline", "loop"):
      timed(f"sparse_decode_{impl}_{int(density * 100)}pct",
            lambda q, k, v, m, impl=impl: decode_k.sparse_decode(q, k, v, kv_sel, m, length,
                                                                 impl=impl, interpret=ip)[0],
            qr, full_k, full_v, m, density=density)
  m = density_mask(ks[1], (1, n_ret, nb), 0.1, own)
  timed("sparse_decode_10pct_reference",
        lambda q, k, v, m: ref.sparse_decode(q, k, v, kv_sel, m, length)[0], qr, full_k,
        full_v, m)
  timed("ring_decode_local",
        lambda q, k, v, p: ring_k.ring_decode(q, k, v, p, kv_ring, length - 1, interpret=ip,
                                              **rule)[0],
        q[:, jnp.asarray(ring_local)], ring_k_, ring_v_, ring_pos)

  def layer_step(q, ck, fk, fv, rk, rv, rpos, impl):
    """Local heads on rings (and on the full cache where their KV head has one), top-p
    selection and sparse decode for the retrieval heads."""
    o_ring, _ = ring_k.ring_decode(q[:, jnp.asarray(ring_local)], rk, rv, rpos, kv_ring,
                                   length - 1, interpret=ip, **rule)
    full_pos = jnp.arange(t, dtype=jnp.int32)[None]
    o_full, _ = ring_k.ring_decode(q[:, jnp.asarray(full_local)], fk, fv, full_pos,
                                   kv_full_local, length - 1, interpret=ip, **rule)
    mask = topp_k.topp_select(qi, ck, length, top_p=cfg.top_p, interpret=ip)
    o_ret, _ = decode_k.sparse_decode(q[:, jnp.asarray(cfg.retrieval)], fk, fv, kv_sel, mask,
                                      length, impl=impl, interpret=ip)
    out = jnp.zeros_like(q)
    out = out.at[:, jnp.asarray(ring_local)].set(o_ring)
    out = out.at[:, jnp.asarray(full_local)].set(o_full)
    return out.at[:, jnp.asarray(cfg.retrieval)].set(o_ret)

  for impl in ("pipeline", "loop"):
    timed(f"rtpurbo_decode_layer_{impl}", functools.partial(layer_step, impl=impl), q, ckeys,
          full_k, full_v, ring_k_, ring_v_, ring_pos, layer=True)


def parse_sizes(text):
  out = []
  for part in text.split(","):
    part = part.strip().upper()
    mult = 1024 if part.endswith("K") else 1
    out.append(int(part.rstrip("K")) * mult)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ctx", default="32K,64K,128K", help="contexts, e.g. 32K,64K,128K")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--decode_steps", type=int, default=20)
  p.add_argument("--out", default="", help="folder for kernels_tpu_<device>.json")
  p.add_argument("--smoke", action="store_true", help="tiny sizes: plumbing only")
  p.add_argument("--interpret", action="store_true", help="run kernels in the TPU interpreter")
  p.add_argument("--skip", default="", help="comma list of phases to skip: prefill,decode")
  args = p.parse_args(argv)
  cfg = Cfg()
  ctxs, reps, steps = parse_sizes(args.ctx), args.reps, args.decode_steps
  if args.smoke:
    cfg = dataclasses.replace(cfg, window=128, ring_capacity=256)
    ctxs, reps, steps = [512], 1, 2
  ip = pltpu.InterpretParams() if args.interpret else False
  run = Run(args.out, cfg, args.smoke)
  log(f"device {run.meta['device']}  jax {jax.__version__}  contexts {ctxs}")
  skip = set(filter(None, args.skip.split(",")))
  for s in ctxs:
    log(f"context {s}")
    if "prefill" not in skip:
      run_prefill(run, cfg, s, reps, ip, args.smoke)
    if "decode" not in skip:
      run_decode(run, cfg, s, reps, steps, ip)
    run.save()
  bad = [c for c in run.checks if not c["ok"]]
  log(f"{len(run.timings)} timings, {len(run.errors)} errors, {len(bad)} failed checks")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
