"""End-to-end inference benchmark: Llama-3.1-8B shape, random weights, bf16, batch 1.

Variants (one process, one model; modes share its weights):
  rtpurbo at 128K, 512K and 1M tokens (a random plan with 15% retrieval heads);
  dense at the largest of those contexts that the memory planner accepts;
  the planner's verdict on dense at 1M (refused: weights + KV cache exceed one H200).
Each run prefills a random prompt of ctx - new_tokens tokens in chunks and decodes
new_tokens tokens; reported: time to first token, prefill tok/s, decode tok/s, KV cache
bytes, mean selected-block fraction of the retrieval heads, compile time, and the planner's
numbers. Compilation is done ahead and not counted in the timings.

`--sparse_prefill` runs the rtpurbo variants with indexer-sparse retrieval heads in prefill
(recorded as `rtpurbo@<ctx>/sparse_prefill[/x<indexer_scale>]`). Random weights give a flat
indexer (top-p 0.9 keeps ~89% of blocks), so `--indexer_scale` multiplies every W_q of the
indexer to make the synthetic selection sharper, in decode and, with --sparse_prefill, in
prefill (`rtpurbo@<ctx>/x<scale>` in paper mode); a comma list runs each rtpurbo variant once
per scale (one compilation: only the weights differ). The selected fractions that result
(prefill and decode) are measured and recorded with the timings.

Results go to --out (default benchmarks/results/e2e_<device>.json), merged by variant name, so
variants can run in separate processes:
  python benchmarks/e2e.py                           # all variants (long at 1M)
  python benchmarks/e2e.py --only=rtpurbo@1M         # the README's 1M row
  python benchmarks/e2e.py --only=rtpurbo@128K,dense@128K
  python benchmarks/e2e.py --tiny                    # CPU smoke run with tiny shapes

Kernel implementations are the GPU dispatch's defaults (`pallas_kernels/gpu/dispatch.py`:
the faster measured one for the device; on Hopper cuDNN for the cache attention of prefill
chunks); RTPURBO_CACHE_ATTN / RTPURBO_WINDOW_ATTN / RTPURBO_CAUSAL_ATTN override them (read
once, into the process's `KernelConfig`). Each variant's model carries its own kernel config
(dense variants: `--dense_cache_attn` for the cache attention), so each variant's programs
are traced with its own kernels. The choices are recorded per variant (`kernels`).

Imports only jax / flax / numpy and this repo (no grain, ml_collections or gguf).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback

# Leave room for the cache: XLA's default pool is 75% of the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pallas_kernels import config as kernel_config  # noqa: E402
from pallas_kernels.config import KernelConfig  # noqa: E402
from rtpurbo_jax import convert  # noqa: E402
from rtpurbo_jax.config import (  # noqa: E402
    ModelConfig, RopeScaling, SparseConfig, parse_size)
from rtpurbo_jax.infer import memory  # noqa: E402
from rtpurbo_jax.infer.engine import Engine, Sampling  # noqa: E402
from rtpurbo_jax.models.transformer import Transformer  # noqa: E402

K, M = 1 << 10, 1 << 20

LLAMA8B = ModelConfig(
    family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
    rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    rms_norm_eps=1e-5, max_position_embeddings=131072, eos_token_id=128009)
LLAMA8B_SPARSE = SparseConfig(mode="rtpurbo", window=8192, sinks=4, top_p=0.9, block_size=64,
                              seqlen_threshold=16384, indexer_dim=16)

# Many KV heads so that, even at tiny scale, the dense cache dominates the memory plan.
TINY = ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=8, num_kv_heads=8, head_dim=16,
                   max_position_embeddings=65536)
TINY_SPARSE = SparseConfig(mode="rtpurbo", window=64, sinks=4, top_p=0.9, block_size=64,
                           seqlen_threshold=0, indexer_dim=8)


@dataclasses.dataclass(frozen=True)
class Setup:
  cfg: ModelConfig
  sparse: SparseConfig
  dtype: str
  contexts: tuple[int, ...]  # rtpurbo contexts; dense runs at the largest that fits
  refuse_ctx: int  # the context at which the planner's dense verdict is recorded
  prefill_chunk: int
  new_tokens: int


def setups(tiny: bool, prefill_chunk: int | None, new_tokens: int | None) -> Setup:
  if tiny:
    return Setup(TINY, TINY_SPARSE, "float32", (2 * K, 4 * K, 8 * K), 8 * K,
                 prefill_chunk or 256, new_tokens or 8)
  return Setup(LLAMA8B, LLAMA8B_SPARSE, "bfloat16", (128 * K, 512 * K, 1 * M), 1 * M,
               prefill_chunk or 16384, new_tokens or 33)


def environment() -> dict:
  dev = jax.devices()[0]
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  import flax
  return {
      "device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
      "device_count": jax.device_count(), "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
      "flax": flax.__version__, "python": platform.python_version(),
      "kernels": kernel_config.default().backend,
      "date": datetime.datetime.now(datetime.UTC).isoformat(),
      "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), "commit": commit,
  }


def plan_for(setup: Setup, plan, mode: str, ctx: int, device_memory: int):
  sparse = dataclasses.replace(setup.sparse, mode=mode)
  return memory.plan_memory(setup.cfg, sparse, plan, ctx, batch=1, dtype=setup.dtype,
                            device_memory=device_memory, prefill_chunk=setup.prefill_chunk,
                            n_devices=1)


def build_model(setup: Setup, plan, seed: int, kernels: KernelConfig):
  """The random model (with `kernels`), built eagerly on the default device.

  Each initialiser is a jitted `jax.random` call compiled once per distinct (shape, dtype), a
  dozen small programs for the 8B shape. One jitted constructor instead (the earlier way)
  is a single program with ~300 inlined RNG expansions: tens of seconds of compile alone.
  """
  model = Transformer(setup.cfg, sparse=setup.sparse, plan=plan, dtype=setup.dtype,
                      rngs=nnx.Rngs(seed), kernels=kernels)
  jax.block_until_ready(nnx.state(model))
  return model


def kernel_choices(kernels: KernelConfig, dtype: str) -> dict:
  """The kernel settings a variant runs with (recorded per variant): the backend, on the GPU
  the implementation the dispatch picks per switchable operation (its measured default or an
  override), the config's overrides and every RTPURBO_* variable set."""
  out = {"backend": kernels.backend, "overrides": dict(kernels.impls)}
  if kernels.backend == "gpu":
    from pallas_kernels.gpu import dispatch
    picks = dispatch.current_impls(dtype, kernels)
    out.update(cache_attn=picks["cache_causal_attention"], window_impl=picks["window_attention"],
               causal_attn=picks["causal_attention"])
  out["environment"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RTPURBO_")}
  return out


def run_variant(model, setup: Setup, ctx: int, seed: int, on_prefill_chunk=None) -> dict:
  """One generate() at `ctx` total tokens (prompt + new); the engine's summary.

  on_prefill_chunk(done, total, seconds): progress after each prefill chunk.
  """
  rng = np.random.default_rng(seed)
  prompt = rng.integers(0, setup.cfg.vocab_size, (1, ctx - setup.new_tokens), dtype=np.int32)
  eng = Engine(model, progress=sys.stderr.isatty())
  res = eng.generate(prompt, setup.new_tokens, sampling=Sampling(), max_len=ctx,
                     prefill_chunk=setup.prefill_chunk, seed=seed,
                     on_prefill_chunk=on_prefill_chunk)
  s = dict(res.summary)
  s["first_tokens"] = res.tokens[0, :4].tolist()
  del res, eng
  return s


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tiny", action="store_true", help="tiny shapes, CPU-sized (smoke run)")
  ap.add_argument("--only", default="", help="comma list of variants, e.g. rtpurbo@128K,"
                  "dense@512K (dense@auto = the largest fitting context)")
  ap.add_argument("--out", default=None, help="results JSON (merged by variant name)")
  ap.add_argument("--prefill_chunk", type=int, default=None)
  ap.add_argument("--new_tokens", type=int, default=None)
  ap.add_argument("--device_memory", default=None,
                  help="bytes per device for the planner, e.g. 141G (default: detected)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dense_cache_attn", default="cudnn", choices=("cudnn", "pallas"),
                  help="cache attention implementation of dense variants: the baseline is "
                  "cuDNN (rtpurbo variants use the dispatch's choice: its measured default, "
                  "cudnn on Hopper, or RTPURBO_CACHE_ATTN if set)")
  ap.add_argument("--sparse_prefill", action="store_true",
                  help="rtpurbo variants select key blocks in prefill too (beyond the paper)")
  ap.add_argument("--indexer_scale", default="1",
                  help="multiply the indexer's W_q of the rtpurbo variants (a sharper "
                  "synthetic selection for random weights: decode, and prefill with "
                  "--sparse_prefill); a comma list runs each rtpurbo variant once per scale")
  ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                  help="run the process's first variant once untimed before its timed run: the "
                  "first generate of a process pays one-time costs (about 1.2 s more TTFT and "
                  "10-30%% fewer decode tok/s on an H100 at 128K) that later variants do not")
  args = ap.parse_args(argv)
  try:
    scales = [float(x) for x in args.indexer_scale.split(",") if x.strip()]
  except ValueError:
    raise SystemExit(f"--indexer_scale: cannot read {args.indexer_scale!r}; use e.g. 8,16")
  if not scales or min(scales) <= 0:
    raise SystemExit(f"--indexer_scale: positive scales needed, got {args.indexer_scale!r}")

  setup = setups(args.tiny, args.prefill_chunk, args.new_tokens)
  env = environment()
  plan = memory.synthetic_plan(setup.cfg, 0.15, args.seed)
  if args.device_memory:
    dev_mem = memory.parse_bytes(args.device_memory)
  elif args.tiny:
    # A made-up device on which dense at the largest context does not fit but rtpurbo does,
    # so that the smoke run exercises the refusal too.
    a = plan_for(setup, plan, "rtpurbo", setup.refuse_ctx, 0).total_per_device
    b = plan_for(setup, plan, "dense", setup.refuse_ctx, 0).total_per_device
    dev_mem = (a + b) // 2
    assert a < dev_mem < b, "tiny setup: dense must need more memory than rtpurbo"
  else:
    dev_mem = memory.device_memory_bytes()
  name = "tiny" if args.tiny else env["device"].replace(" ", "_").lower()
  out = args.out or os.path.join(ROOT, "benchmarks", "results", f"e2e_{name}.json")

  # What every variant shares; the prefill chunk and kernel choices are per variant.
  same = dict(model="tiny" if args.tiny else "llama-3.1-8b (random weights)",
              dtype=setup.dtype, batch=1, device_memory=dev_mem, plan=plan.summary(),
              sparse=dataclasses.asdict(setup.sparse), new_tokens=setup.new_tokens,
              device=env["device"])
  results = {}
  if os.path.exists(out):
    with open(out) as f:
      results = json.load(f)
    if results.get("setup") != json.loads(json.dumps(same)):
      results = {}  # another setup: start over rather than mix numbers
  results.update(setup=same, environment=env)
  variants = results.setdefault("variants", {})

  def save():
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".partial"
    with open(tmp, "w") as f:
      json.dump(results, f, indent=1, default=str)
    os.replace(tmp, out)

  # The planner's verdict on dense at the largest context (no allocation).
  refusal = plan_for(setup, plan, "dense", setup.refuse_ctx, dev_mem)
  verdict = {"planner": refusal.as_dict(), "fits": refusal.fits}
  try:
    memory.check_memory(refusal)
  except memory.MemoryPlanError as e:
    verdict["message"] = str(e)
  variants[f"dense@{memory.format_tokens(setup.refuse_ctx)}:planner"] = verdict
  print(f"planner, dense at {memory.format_tokens(setup.refuse_ctx)}: "
        f"{verdict.get('message', 'fits')}", flush=True)
  save()

  fitting = [c for c in setup.contexts if plan_for(setup, plan, "dense", c, dev_mem).fits]
  dense_ctx = max(fitting) if fitting else None
  todo = [("rtpurbo", c) for c in setup.contexts] + ([("dense", dense_ctx)] if dense_ctx else [])
  if args.only:
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    todo = [(m, c) for m, c in todo
            if f"{m}@{memory.format_tokens(c)}" in wanted or (m == "dense" and "dense@auto"
                                                              in wanted)]
    for w in sorted(wanted):  # explicit contexts, e.g. dense@256K
      m, _, c = w.partition("@")
      if m not in ("rtpurbo", "dense", "streaming", "topk") or not c:
        raise SystemExit(f"--only: cannot read {w!r}; use mode@ctx, e.g. rtpurbo@128K")
      if c != "auto" and (m, parse_size(c)) not in todo:
        todo.append((m, parse_size(c)))

  kernels = kernel_config.default()
  t = time.perf_counter()
  base = build_model(setup, plan, args.seed, kernels)
  build_s = time.perf_counter() - t
  print(f"random {setup.cfg.num_params() / 1e6:.1f}M-parameter model built in "
        f"{build_s:.1f}s; device memory {memory.fmt(dev_mem)}", flush=True)

  runs = [(m, c, x) for m, c in todo for x in (scales if m == "rtpurbo" else [1.0])]
  warmed = False
  for mode, ctx, scale in runs:
    sparse_prefill = args.sparse_prefill and mode == "rtpurbo"
    key = f"{mode}@{memory.format_tokens(ctx)}"
    key += "/sparse_prefill" * sparse_prefill + (f"/x{scale:g}" if scale != 1 else "")
    mem = plan_for(setup, plan, mode, ctx, dev_mem)
    entry = {"mode": mode, "ctx": ctx, "planner": mem.as_dict()}
    if sparse_prefill:
      entry.update(sparse_prefill=True)
    if scale != 1:
      entry.update(indexer_scale=scale)
    if not mem.fits:
      entry["skipped"] = "the planner says it does not fit"
      variants[key] = entry
      print(f"{key}: skipped ({mem.describe()})", flush=True)
      save()
      continue
    if sparse_prefill or scale != 1:
      # A rebuilt model has its own indexer variables: the base keeps its W_q.
      model = convert.scale_indexer_queries(convert.rebuild(
          base, sparse=dataclasses.replace(setup.sparse, sparse_prefill=sparse_prefill)),
          scale)
    else:
      # Dense variants read the cache with `--dense_cache_attn` (the model's own config: its
      # programs are traced with it, whatever ran before in this process).
      model = base if mode == setup.sparse.mode else convert.rebuild(
          base, sparse=dataclasses.replace(setup.sparse, mode=mode),
          kernels=kernels.with_impls(cache_causal_attention=args.dense_cache_attn)
          if mode == "dense" else None)
    print(f"{key}: running ...", flush=True)
    entry.update(build_s=build_s, prefill_chunk=setup.prefill_chunk,
                 kernels=kernel_choices(model.kernels, setup.dtype))
    variants[key] = entry

    def progress(done, total, seconds, entry=entry, key=key):
      # Saved as it goes: a run cut short by a time limit still leaves its prefill rate.
      entry["prefill_progress"] = {"chunks": done, "of": total, "seconds": seconds}
      save()
      if done % max(1, total // 8) == 0 or done == total:
        print(f"{key}: prefill chunk {done}/{total} at {seconds:.1f}s", flush=True)

    try:
      if args.warmup and not warmed:
        w = run_variant(model, setup, ctx, args.seed)
        entry["warmup"] = {k: w[k] for k in ("ttft_s", "decode_tok_s", "compile_s")}
        print(f"{key}: warm-up TTFT {w['ttft_s']:.2f}s, decode {w['decode_tok_s']:.2f} tok/s, "
              f"compile {w['compile_s']:.1f}s (not the result)", flush=True)
        warmed = True
      s = run_variant(model, setup, ctx, args.seed, progress)
      entry.pop("prefill_progress", None)
      entry.update(s)
      frac, pfrac = s["selected_fraction"], s.get("prefill_selected_fraction")
      print(f"{key}: TTFT {s['ttft_s']:.2f}s, prefill {s['prefill_tok_s']:.0f} tok/s, decode "
            f"{s['decode_tok_s']:.2f} tok/s, cache {memory.fmt(s['cache_bytes'])}, compile "
            f"{s['compile_s']:.1f}s" + (f", selected {frac:.4f}" if frac is not None else "")
            + (f", prefill selected {pfrac:.4f}" if pfrac is not None else ""), flush=True)
    except Exception as e:  # record (e.g. out of memory) and go on with the next variant
      entry["error"] = f"{type(e).__name__}: {e}"[:2000]
      entry["traceback"] = traceback.format_exc()[-4000:]
      print(f"{key}: FAILED {entry['error'][:300]}", flush=True)
    variants[key] = entry
    del model
    gc.collect()
    save()
  print(f"results: {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
