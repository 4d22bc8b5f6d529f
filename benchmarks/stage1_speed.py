"""Stage-1 step time, before and after the single-pass loss; stage-2 and evaluation step times.

SmolLM2-135M shape (fp32, random weights unless --model names a real one) with the committed
SmolLM2 head plan (assets/smollm2-135m-rtpurbo): 40 retrieval heads over 24 layers.

  stage1/<impl>/<kernels>   one stage-1 step at --seq tokens, every query position: the
                            frozen teacher pass + the indexer KL forward and backward. impl
                            `before` is `benchmarks/stage1_baseline.py` (per-layer LSE pass,
                            per-layer scans over the whole sequence, statistics on every row),
                            `after` is `rtpurbo_jax.train.losses` (all retrieval heads stacked,
                            the teacher row and its log-sum-exp in one pass, causal key bounds,
                            statistics on every 8th row). kernels: the teacher forward through
                            the GPU kernels (`auto`) or the jnp references (`reference`).
  teacher/<impl>, loss/<impl>  the two parts alone.
  stage2/<seq>              one stage-2 micro-batch (one sequence): the sparse student forward
                            (retrieval heads top-p at the last 300 positions) + top-10 KL +
                            backward through every backbone weight.
  eval/...                  a batch of task prompts prefilled in chunks and decoded greedily,
                            and decode-style perplexity of held-out windows (rtpurbo mode).
The loss of `before` and `after` on the same batch is compared (relative difference); the
before/after ratio is the speedup. Compilation is timed separately (first call).

  python benchmarks/stage1_speed.py --out DIR            # on the GPU
  python benchmarks/stage1_speed.py --smoke              # CPU: tiny shapes, asserts equality

Imports only jax / flax / numpy and this repo (no grain, ml_collections or gguf).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import stage1_baseline as before  # noqa: E402
from pallas_kernels.config import KernelConfig  # noqa: E402
from rtpurbo_jax import convert  # noqa: E402
from rtpurbo_jax.attention.plan import HeadPlan, load_headwise_config  # noqa: E402
from rtpurbo_jax.config import ModelConfig, SparseConfig  # noqa: E402
from rtpurbo_jax.models.transformer import Transformer  # noqa: E402
from rtpurbo_jax.train import losses  # noqa: E402

SMOLLM2 = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True,
                      max_position_embeddings=8192)
TINY = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=True)
PLAN = os.path.join(ROOT, "assets", "smollm2-135m-rtpurbo", "rtpurbo_config.json")


def _timed(fn, *args, reps: int):
  """(first-call seconds incl. compilation, median seconds of `reps` later calls, result)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times)), out


def build_model(args):
  if args.smoke:
    plan = HeadPlan.from_mask(((0, 1, 0, 0), (1, 0, 0, 1)), TINY.num_kv_heads)
    sp = SparseConfig(mode="dense", indexer_dim=8, block_size=8, seqlen_threshold=0, window=16)
    return Transformer(TINY, sparse=sp, plan=plan, rngs=nnx.Rngs(0), init_std=0.2)
  plan, _ = HeadPlan.from_headwise_config(load_headwise_config(PLAN), SMOLLM2.num_kv_heads)
  sp = SparseConfig(mode="dense", window=1024, sinks=4, top_p=0.9, block_size=64,
                    seqlen_threshold=0, indexer_dim=16)
  if args.model:
    import rtpurbo_jax
    base = rtpurbo_jax.from_pretrained(args.model)
    return convert.to_rtpurbo(base, plan, mode="dense", window=1024, sinks=4, top_p=0.9,
                              block_size=64, seqlen_threshold=0)
  return Transformer(SMOLLM2, sparse=sp, plan=plan, rngs=nnx.Rngs(0), init_std=0.02)


def stage1_fns(model, seq: int, chunk: int, stats_stride: int):
  """{impl: (step, teacher, loss)} jitted on (state, ids) / (acts, ...)."""
  graphdef, state = nnx.split(model)
  sp = model.sparse
  queries = np.arange(seq, dtype=np.int32)
  layers = [i for i, l in enumerate(model.layers) if l.attn.heads.retrieval]

  def idx_of(m):
    return {i: (m.layers[i].attn.indexer_wq[...], m.layers[i].attn.indexer_wk[...])
            for i in layers}

  def old_teacher(state, ids):
    return before.teacher_acts(nnx.merge(graphdef, state), ids, jnp.asarray(queries),
                               chunk=chunk)

  def old_loss(idx, acts):
    f = lambda idx: before.stage1_loss(idx, acts, jnp.asarray(queries), chunk=chunk,
                                       top_p=sp.top_p, block_size=sp.block_size)[0]
    return jax.value_and_grad(f)(idx)

  def new_teacher(state, ids):
    return losses.teacher_acts(nnx.merge(graphdef, state), ids)

  def new_loss(w, acts):
    f = lambda w: losses.stage1_loss(w[0], w[1], acts, queries, chunk=chunk, top_p=sp.top_p,
                                     block_size=sp.block_size, stats_stride=stats_stride)[0]
    return jax.value_and_grad(f)(w)

  def old_step(state, ids):
    return old_loss(idx_of(nnx.merge(graphdef, state)), old_teacher(state, ids))

  def new_step(state, ids):
    acts = new_teacher(state, ids)
    return new_loss(losses.stacked_indexer(nnx.merge(graphdef, state), acts), acts)

  return state, {
      "before": (jax.jit(old_step), jax.jit(old_teacher), jax.jit(old_loss),
                 lambda st: idx_of(nnx.merge(graphdef, st))),
      "after": (jax.jit(new_step), jax.jit(new_teacher), jax.jit(new_loss),
                None)}


def run_stage1(model, args, rows: dict, kernels: tuple[str, ...]):
  seq = args.seq
  ids = jax.random.randint(jax.random.key(1), (1, seq), 0, model.cfg.vocab_size)
  loss_of = {}
  for kern in kernels:
    # The model rebuilt with that backend (RTPURBO_KERNELS=kern, the other RTPURBO_* settings
    # from the environment): its graph definition differs, so the jits trace afresh.
    kmodel = convert.rebuild(model, kernels=KernelConfig.from_env(
        {**os.environ, "RTPURBO_KERNELS": kern}))
    state, fns = stage1_fns(kmodel, seq, args.chunk, args.stats_stride)
    for impl, (step, teacher, loss, idx_fn) in fns.items():
      name = f"stage1/{impl}/{kern}"
      try:
        first, t, (loss_val, _) = _timed(step, state, ids, reps=args.reps)
        rows[name] = {"ms": 1e3 * t, "first_call_s": first, "loss": float(loss_val)}
        loss_of[(impl, kern)] = float(loss_val)
        if kern == kernels[0]:
          f1, tt, acts = _timed(teacher, state, ids, reps=args.reps)
          rows[f"teacher/{impl}"] = {"ms": 1e3 * tt, "first_call_s": f1}
          w = idx_fn(state) if idx_fn else losses.stacked_indexer(nnx.merge(*nnx.split(model)),
                                                                  acts)
          f2, tl, _ = _timed(loss, w, acts, reps=args.reps)
          rows[f"loss/{impl}"] = {"ms": 1e3 * tl, "first_call_s": f2}
          del acts
      except Exception as e:  # record and go on: one failing variant must not lose the rest
        rows[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        traceback.print_exc()
      print(name, rows[name], flush=True)
  for kern in kernels:
    if ("before", kern) in loss_of and ("after", kern) in loss_of:
      a, b = loss_of[("before", kern)], loss_of[("after", kern)]
      rows[f"stage1/loss_rel_diff/{kern}"] = {"before": a, "after": b,
                                              "rel_diff": abs(a - b) / abs(a)}
  return loss_of


def run_stage2(model, args, rows: dict):
  """One stage-2 micro-batch (forward + backward of every backbone weight) per length."""
  student = convert.rebuild(model, sparse=dataclasses.replace(model.sparse, mode="rtpurbo"))
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)
  for seq in args.stage2_seq:
    ids = jax.random.randint(jax.random.key(2), (1, seq), 0, model.cfg.vocab_size)
    labels = jnp.zeros((1, seq), bool).at[:, -min(300, seq // 2):].set(True)
    t_ids = jax.random.randint(jax.random.key(3), (1, seq, 10), 0, model.cfg.vocab_size)
    t_logits = jax.random.normal(jax.random.key(4), (1, seq, 10))

    def loss(params, rest, ids, labels, t_ids, t_logits):
      m = nnx.merge(graphdef, params, rest)
      h = losses.hidden_states(m, ids, sparse_queries=labels, remat=True)
      w, tied = losses.output_rows(m)
      kl, n = losses.topk_kl(h, w, tied, t_ids, t_logits, labels)
      return kl / n

    fn = jax.jit(jax.value_and_grad(loss))
    name = f"stage2/{seq}"
    try:
      first, t, _ = _timed(fn, params, rest, ids, labels, t_ids, t_logits, reps=args.reps)
      rows[name] = {"ms_per_sequence": 1e3 * t, "first_call_s": first}
    except Exception as e:
      rows[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
      traceback.print_exc()
    print(name, rows[name], flush=True)


def run_eval(model, args, rows: dict):
  """Greedy task decoding and decode-style perplexity in rtpurbo mode."""
  from rtpurbo_jax.eval import perplexity as ppl_lib
  from rtpurbo_jax.eval.decode import GreedyDecoder
  sparse = convert.rebuild(model, sparse=dataclasses.replace(model.sparse, mode="rtpurbo"))
  seq, batch, steps = args.eval_seq, args.eval_batch, 16
  rng = np.random.default_rng(5)
  ids = rng.integers(0, model.cfg.vocab_size, (batch, seq - steps)).astype(np.int32)
  lens = np.full((batch,), seq - steps, np.int32)
  dec = GreedyDecoder(sparse, prefill_chunk=min(1024, seq))
  try:
    t0 = time.perf_counter()
    first, cache = dec.prefill(ids, lens, seq)
    jax.block_until_ready(cache)
    t1 = time.perf_counter()
    dec.decode(first, cache, steps)
    t2 = time.perf_counter()
    first, cache = dec.prefill(ids, lens, seq)
    jax.block_until_ready(cache)
    t3 = time.perf_counter()
    dec.decode(first, cache, steps)
    t4 = time.perf_counter()
    rows[f"eval/tasks/{seq}x{batch}"] = {
        "prefill_first_s": t1 - t0, "decode_first_s": t2 - t1, "prefill_s": t3 - t2,
        "decode_s_per_step": (t4 - t3) / (steps - 1)}
  except Exception as e:
    rows[f"eval/tasks/{seq}x{batch}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    traceback.print_exc()
  print(f"eval/tasks/{seq}x{batch}", rows[f"eval/tasks/{seq}x{batch}"], flush=True)
  nll = ppl_lib.make_nll_fn(sparse, 512)
  win = rng.integers(0, model.cfg.vocab_size, (args.ppl_batch, seq)).astype(np.int32)
  try:
    first, t, _ = _timed(nll, win, np.ones(win.shape, bool), reps=2)
    rows[f"eval/ppl/{seq}x{args.ppl_batch}"] = {"s": t, "first_call_s": first}
  except Exception as e:
    rows[f"eval/ppl/{seq}x{args.ppl_batch}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    traceback.print_exc()
  print(f"eval/ppl/{seq}x{args.ppl_batch}", rows[f"eval/ppl/{seq}x{args.ppl_batch}"],
        flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="", help="folder for stage1_speed.json")
  ap.add_argument("--seq", type=int, default=8192)
  ap.add_argument("--chunk", type=int, default=512, help="stage-1 query chunk")
  ap.add_argument("--stats_stride", type=int, default=8)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--model", default="", help="real weights (registered name / HF folder)")
  ap.add_argument("--kernels", default="auto,reference")
  ap.add_argument("--stage2_seq", default="4096,8192")
  ap.add_argument("--eval_seq", type=int, default=8192)
  ap.add_argument("--eval_batch", type=int, default=16)
  ap.add_argument("--ppl_batch", type=int, default=4)
  ap.add_argument("--parts", default="stage1,stage2,eval")
  ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes; checks the losses")
  args = ap.parse_args()
  if args.smoke:
    args.seq, args.chunk, args.reps, args.kernels = 64, 16, 1, "reference"
    args.stage2_seq, args.eval_seq, args.eval_batch, args.ppl_batch = "64", 64, 2, 1
  args.stage2_seq = [int(x) for x in args.stage2_seq.split(",") if x]
  parts = set(args.parts.split(","))
  model = build_model(args)
  rows: dict = {}
  t0 = time.time()
  if "stage1" in parts:
    loss_of = run_stage1(model, args, rows, tuple(args.kernels.split(",")))
    if args.smoke:  # the rewrite must give the same loss as before on this fixed batch
      a, b = loss_of[("before", "reference")], loss_of[("after", "reference")]
      assert abs(a - b) <= 1e-3 * abs(a), (a, b)
  if "stage2" in parts:
    run_stage2(model, args, rows)
  if "eval" in parts:
    run_eval(model, args, rows)
  dev = jax.devices()[0]
  result = {"device": str(dev.device_kind), "platform": dev.platform, "jax": jax.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "model": args.model or ("tiny random" if args.smoke else "SmolLM2-135M shape, random"),
            "seq": args.seq, "query_chunk": args.chunk, "stats_stride": args.stats_stride,
            "seconds": round(time.time() - t0, 1), "rows": rows}
  for k in ("auto", "reference"):
    b, a = rows.get(f"stage1/before/{k}", {}), rows.get(f"stage1/after/{k}", {})
    if "ms" in b and "ms" in a:
      result[f"speedup_{k}"] = b["ms"] / a["ms"]
  print("\n%-34s %12s %12s" % ("row", "ms", "first call s"))
  for name, r in rows.items():
    ms = r.get("ms", r.get("ms_per_sequence", 1e3 * r.get("s", r.get("prefill_s", 0.0))))
    print("%-34s %12.1f %12.1f %s" % (name, ms, r.get("first_call_s", r.get("prefill_first_s", 0)),
                                      r.get("error", "")[:60]))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stage1_speed.json"), "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
