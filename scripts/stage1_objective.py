"""Stage-1 objective and indexer width on SmolLM2: token-level KL (the method) against
block-level KL, and the 16-d indexer against a wider one.

Every variant continues from the committed indexer (`assets/smollm2-135m-rtpurbo`, 600 steps
of token KL at 8K) for the same steps on the same training windows, so the only difference is
the objective or the width; the committed indexer is the first row. The teacher is the model
`from_pretrained("smollm2-135m-rtpurbo")` loads (with the stage-2 backbone delta since it was
committed). `token_r32` widens the indexer to 32 dimensions: the committed 16 plus 16 new ones
whose query rows start at zero (so it starts as exactly the committed scorer) and whose key
rows start random, at the committed rows' scale; it asks whether the 16-d fit's plateau is the
dimension's. `token_pos` adds a learned bias per head and log2 block distance to the indexer
score (beyond the method, whose 16-d score is position-free), starting at zero: it asks how
much of the gap to the teacher's own top-p is recency the indexer cannot see. Held-out plays
(never trained on), every query position: recall of the teacher's attention mass inside the
indexer's top-p blocks, the fraction of causal blocks selected, and the fraction the
teacher's own top-p needs, at several top_p values (the recall / budget
trade-off). Intervals: 95% bootstrap over (window, head) pairs of the difference to the
token-KL row.

The teacher activations of the training windows are computed once and kept in host memory
(about 160 MB per 4K window), so a training step is only the indexer's loss.

  python scripts/stage1_objective.py --out results/stage1_objective      # ~20 min, 2 CPU cores
  python scripts/stage1_objective.py --variants token,token_r32 --out results/indexer_width
  python scripts/stage1_objective.py --variants token,token_pos --out /tmp/db   # ~40 min
  python scripts/stage1_objective.py --variants token,token_pos --load /tmp/db \
      --heldout_len 8192 --out /tmp/db8k      # the same indexers on 8K windows
  python scripts/stage1_objective.py --smoke --out /tmp/x                  # seconds
Each run's --out holds its indexer_<variant>.npz, which --load reads; results/ keeps only the
reports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rtpurbo_jax import assets  # noqa: E402
from rtpurbo_jax.train import losses  # noqa: E402
from rtpurbo_jax.train import stages  # noqa: E402

VARIANTS = ("token", "block", "token_r32", "token_pos")
DISTANCE_BUCKETS = 16  # log2 block distance: own block, 1, 2-3, ..., >= 2^14 blocks back


def parse_variant(name: str) -> tuple[str, int | None, bool]:
  """"token" / "block" -> (objective, None: the committed width, False);
  "<objective>_r<dim>" -> (objective, dim, False); a "_pos" suffix on either adds the learned
  distance bias (True)."""
  base = name.removesuffix("_pos")
  objective, _, width = base.partition("_r")
  if objective not in losses.STAGE1_OBJECTIVES or (width and not width.isdigit()):
    raise SystemExit(f"--variants: {name!r} is not one of {VARIANTS} "
                     "(or <objective>[_r<dim>][_pos])")
  return objective, int(width) if width else None, base != name


def widen(wq, wk, dim: int, seed: int):
  """The indexer at `dim` >= r dimensions, scoring exactly as before: the new query rows are
  zero, the new key rows random at the existing key rows' scale. wq, wk: [n_ret, r, head_dim]."""
  n, r, d = wk.shape
  if dim < r:
    raise SystemExit(f"--variants: width {dim} is below the committed {r}")
  scale = np.std(np.asarray(wk), axis=(1, 2), keepdims=True)  # per head
  extra_k = np.random.default_rng(seed).standard_normal((n, dim - r, d)) * scale
  return (np.concatenate([wq, np.zeros((n, dim - r, d), wq.dtype)], axis=1),
          np.concatenate([wk, extra_k.astype(wk.dtype)], axis=1))


def windows_of(tok, names, length: int, count: int) -> np.ndarray:
  """`count` windows of `length` tokens spread evenly over the concatenated plays."""
  ids = np.asarray(tok(assets.shakespeare_text(tuple(names)))["input_ids"], np.int32)
  if len(ids) < length:
    raise SystemExit(f"{len(ids)} tokens of text, fewer than one {length}-token window")
  starts = np.linspace(0, len(ids) - length, count).astype(int)
  return np.stack([ids[s:s + length] for s in starts])


def play_names(split: str) -> list[str]:
  return [os.path.basename(f).removesuffix("_gut.txt") for f in assets.shakespeare_files(split)]


def collect_acts(model, windows: np.ndarray) -> list:
  """Teacher activations of each window (host arrays), computed once."""
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda st, ids: losses.teacher_acts(nnx.merge(graphdef, st), ids))
  return [jax.device_get(run(state, jnp.asarray(w)[None])) for w in windows]


def train(wq, wk, bias, acts: list, *, objective: str, steps: int, lr: float, chunk: int,
          top_p: float, block_size: int, log_every: int, label: str = "",
          bias_lr: float = 0.03, query_stride: int = 1) -> tuple:
  """AdamW (as stage 1: warmup then cosine, weight decay 0.01, clip 1.0), one window a step.
  bias: None, or the [n_ret, buckets] distance bias trained with the indexer, by Adam at its
  own rate `bias_lr` (it starts at zero and is measured in units of log-mass, where the
  indexer's rate would move it by at most ~lr per step). query_stride: the loss reads every
  k-th query position (the stage-1 recipe's `query_fraction` in a fixed form)."""
  def adamw_at(rate, decay):
    sched = optax.warmup_cosine_decay_schedule(0.0, rate, max(steps // 10, 1), steps)
    return optax.adamw(sched, weight_decay=decay)

  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
      {"indexer": adamw_at(lr, 0.01), "bias": adamw_at(bias_lr, 0.0)},
      lambda p: ("indexer", "indexer", None if p[2] is None else "bias")))
  params = (jnp.asarray(wq), jnp.asarray(wk), None if bias is None else jnp.asarray(bias))
  opt = tx.init(params)
  queries = np.arange(acts[0].q.shape[1] - 1, -1, -query_stride, dtype=np.int32)[::-1].copy()

  @jax.jit
  def step(params, opt, a):
    def loss(p):
      value, _, metrics = losses.stage1_loss(p[0], p[1], a, queries, chunk=chunk, top_p=top_p,
                                             block_size=block_size, stats_stride=16,
                                             objective=objective, distance_bias=p[2])
      return value, metrics
    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value, metrics

  log = []
  for i in range(steps):
    params, opt, value, metrics = step(params, opt, acts[i % len(acts)])
    if (i + 1) % log_every == 0 or i + 1 == steps:
      rec = {"step": i + 1, "loss": float(value),
             **{k: round(float(v), 4) for k, v in metrics.items()}}
      log.append(rec)
      print(f"  {label or objective} {rec}", flush=True)
  return params, log


def heldout(wq, wk, bias, acts: list, *, top_ps, chunk: int, block_size: int) -> dict:
  """Per top_p: [windows, heads] arrays of token KL, recall, fraction, oracle fraction.

  The query positions are traced, so the chunks run as one scan (one chunk's scores live at a
  time; unrolled causal chunks of an 8K window outgrow a 24 GB host)."""
  queries = jnp.arange(acts[0].q.shape[1], dtype=jnp.int32)
  out = {}
  for p in top_ps:
    f = jax.jit(lambda wq, wk, bias, a, p=p: losses.per_head_means(losses.stage1_sums(
        wq, wk, a, queries, chunk=chunk, top_p=p, block_size=block_size,
        distance_bias=bias)))
    rows = [jax.device_get(f(wq, wk, bias, a)) for a in acts]
    out[p] = {k: np.concatenate([np.asarray(r[k]) for r in rows], axis=0)
              for k in ("kl", "recall", "fraction", "oracle_fraction")}
  return out


def bootstrap_diff(x: np.ndarray, y: np.ndarray, seed: int, n_boot: int = 2000):
  """Mean of x - y over paired units and its 95% bootstrap interval."""
  d = (np.asarray(x) - np.asarray(y)).ravel()
  rng = np.random.default_rng(seed)
  means = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
  return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def markdown(rep: dict) -> str:
  st = rep["settings"]
  stride = st.get("query_stride", 1)
  queries = "every query" if stride == 1 else f"one query in {stride}"
  lines = [
      "# Stage-1 indexer variants on SmolLM2-135M: " + ", ".join(st["variants"]),
      "",
      f"Every variant continues from the committed indexer for {st['steps']} steps "
      f"(lr {st['lr']}, "
      f"one {st['train_len']}-token window per step, {st['train_windows']} windows of the "
      f"training plays, {queries}); held out: {st['heldout_windows']} windows of "
      f"{st['heldout_len']} tokens of {', '.join(st['heldout_plays'])}, every query. Means over "
      f"{rep['units']} (window, head) pairs; [95% bootstrap interval] of the difference to "
      "`token`. Produced by `scripts/stage1_objective.py`; "
      f"{rep['device']}, jax {rep['jax']}, {rep['date']}.",
      "",
      "| indexer | top_p | recall | selected blocks | teacher's own top-p | held-out token KL |",
      "|---|---|---|---|---|---|",
  ]
  for p, rows in rep["heldout"].items():
    for name, r in rows.items():
      def cell(key, r=r):
        v = f"{r[key]['mean']:.3f}"
        if "diff" in r[key]:
          d, lo, hi = r[key]["diff"]
          v += f" ({d:+.3f} [{lo:+.3f}, {hi:+.3f}])"
        return v
      lines.append(f"| {name} | {p} | {cell('recall')} | {cell('fraction')} | "
                   f"{r['oracle_fraction']['mean']:.3f} | {cell('kl')} |")
  lines += ["", f"Seconds: {rep['seconds']}.", ""]
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n\n", 1)[1])
  ap.add_argument("--out", required=True)
  ap.add_argument("--train_len", type=int, default=4096)
  ap.add_argument("--train_windows", type=int, default=12)
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--lr", type=float, default=3e-4)
  ap.add_argument("--bias_lr", type=float, default=0.03,
                  help="Adam rate of the _pos variants' distance bias")
  ap.add_argument("--heldout_len", type=int, default=4096)
  ap.add_argument("--heldout_windows", type=int, default=4)
  ap.add_argument("--top_p", default="0.8,0.9,0.95")
  ap.add_argument("--chunk", type=int, default=256)
  ap.add_argument("--query_stride", type=int, default=1,
                  help="train on every k-th query position (the last one always); the "
                  "held-out evaluation reads every query")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--variants", default="token,block",
                  help="comma-separated: token, block (the stage-1 objectives at the committed "
                       "width) or <objective>_r<dim> (a wider indexer), either with _pos (a "
                       "learned bias per log2 block distance added to the indexer score, "
                       "beyond the method); token is the reference row and must be included")
  ap.add_argument("--load", default=None,
                  help="a folder of a run's indexer_<variant>.npz: evaluate those instead of "
                       "training (the settings' steps and lr then describe that run)")
  ap.add_argument("--smoke", action="store_true", help="a tiny random model: checks the script")
  args = ap.parse_args(argv)
  t0 = time.time()
  top_ps = [float(x) for x in args.top_p.split(",")]
  variants = args.variants.split(",")
  if "token" not in variants:
    raise SystemExit("--variants must include token (the reference row)")
  variants = {v: parse_variant(v) for v in variants}
  if args.smoke:
    from rtpurbo_jax.attention.plan import HeadPlan
    from rtpurbo_jax.config import ModelConfig, SparseConfig
    from rtpurbo_jax.models.transformer import Transformer
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    model = Transformer(cfg, sparse=SparseConfig(mode="dense", indexer_dim=8, block_size=8,
                                                 seqlen_threshold=0),
                        plan=HeadPlan.from_mask([[1, 0, 0, 0], [0, 0, 1, 1]], 2),
                        rngs=nnx.Rngs(args.seed), init_std=0.3)
    rng = np.random.default_rng(args.seed)
    train_w = rng.integers(0, 97, (args.train_windows, args.train_len)).astype(np.int32)
    held_w = rng.integers(0, 97, (args.heldout_windows, args.heldout_len)).astype(np.int32)
    held_plays = ["random"]
  else:
    import rtpurbo_jax as rj
    model = stages.with_mode(rj.from_pretrained("smollm2-135m-rtpurbo"), "dense")
    tok = rj.load_tokenizer("smollm2-135m")
    held_plays = play_names("heldout")
    train_w = windows_of(tok, play_names("train"), args.train_len, args.train_windows)
    held_w = windows_of(tok, held_plays, args.heldout_len, args.heldout_windows)
  bs = model.sparse.block_size
  print(f"teacher activations: {len(train_w)} training + {len(held_w)} held-out windows",
        flush=True)
  train_acts = [] if args.load else collect_acts(model, train_w)
  held_acts = collect_acts(model, held_w)
  wq0, wk0 = jax.device_get(losses.stacked_indexer(model, held_acts[0]))
  indexers = {"committed": (wq0, wk0, None)}
  logs = {}
  for name, (objective, width, pos) in variants.items():
    if args.load:  # a trained variant, evaluated again (e.g. at another held-out length)
      z = np.load(os.path.join(args.load, f"indexer_{name}.npz"))
      indexers[name] = (z["wq"], z["wk"], z["distance_bias"] if pos else None)
      logs[name] = []
      continue
    print(f"training ({name})", flush=True)
    start = (wq0, wk0) if width is None else widen(wq0, wk0, width, args.seed)
    bias = np.zeros((wq0.shape[0], DISTANCE_BUCKETS), np.float32) if pos else None
    indexers[name], logs[name] = train(*start, bias, train_acts, objective=objective,
                                       steps=args.steps, lr=args.lr, bias_lr=args.bias_lr,
                                       chunk=args.chunk,
                                       top_p=model.sparse.top_p, block_size=bs,
                                       log_every=max(args.steps // 10, 1), label=name,
                                       query_stride=args.query_stride)
    os.makedirs(args.out, exist_ok=True)  # kept, so a failed evaluation loses no training
    np.savez(os.path.join(args.out, f"indexer_{name}.npz"),
             **{k: np.asarray(v) for k, v in zip(("wq", "wk", "distance_bias"),
                                                 indexers[name]) if v is not None})
  del train_acts
  print("held-out evaluation", flush=True)
  metrics = {name: heldout(*ix, held_acts, top_ps=top_ps, chunk=args.chunk, block_size=bs)
             for name, ix in indexers.items()}
  rep_held = {}
  for p in top_ps:
    rows = {}
    for name in indexers:
      m = metrics[name][p]
      row = {k: {"mean": float(np.mean(v))} for k, v in m.items()}
      if name != "token":
        for k in ("recall", "fraction", "kl"):
          row[k]["diff"] = bootstrap_diff(m[k], metrics["token"][p][k], args.seed)
      rows[name] = row
    rep_held[str(p)] = rows
  rep = {
      "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
      "jax": jax.__version__, "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "settings": {"train_len": args.train_len, "train_windows": args.train_windows,
                   "steps": args.steps, "lr": args.lr, "bias_lr": args.bias_lr,
                   "heldout_len": args.heldout_len,
                   "heldout_windows": args.heldout_windows, "heldout_plays": held_plays,
                   "chunk": args.chunk, "seed": args.seed, "smoke": args.smoke,
                   "query_stride": args.query_stride,
                   "loaded_from": args.load,
                   "variants": list(variants)},
      "units": int(np.prod(metrics["token"][top_ps[0]]["kl"].shape)),
      "heldout": rep_held,
      "per_head": {name: {str(p): {k: np.round(v, 4).tolist() for k, v in m.items()}
                          for p, m in metrics[name].items()} for name in indexers},
      "train_log": logs,
      "seconds": round(time.time() - t0, 1),
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "stage1_objective.json"), "w") as f:
    json.dump(rep, f, indent=1)
  with open(os.path.join(args.out, "stage1_objective.md"), "w") as f:
    f.write(markdown(rep))
  print(markdown(rep))


if __name__ == "__main__":
  main()
