"""Does the retrieval heads' top-p selection keep the needle? A diagnostic on the NIAH prompts.

On the GPU evaluation (eval_results/smollm2_h200/all/) RTPurbo answers single-needle NIAH at 2K
far less often than dense or the binding top-k when the needle sits early (depth 0.1). This
script replays the same prompts (the evaluation's generator, seed and tokenizer) through the
model and, at the last prompt position (the query of the first decode step), applies each
selection rule to every retrieval head's indexer scores:

  top-p        the model's rule (block top-p over the indexer's block masses, own block kept)
  top-k        the k heaviest blocks, k = the budget in blocks (`--topk_blocks`, default the
               binding budget the evaluation recorded at that length: 704 tokens -> 11
               blocks at 2K)
  top-p -sink  block 0 (the attention sinks) always kept and top-p taken over the other
               blocks' mass renormalised (a lever: the sink block's mass no longer counts)
  top-p +floor top-p, and never fewer than the `--floor_blocks` heaviest blocks (a lever: the
               union with a small top-k)

Per (prompt, retrieval head) it records whether the blocks holding the needle sentence are
selected, how many blocks are, and the exact attention mass (full head_dim, RoPE, causal
softmax) on the needle and on block 0. "Reading heads" are the pairs whose exact attention puts
at least --reading_mass on the needle: the heads that do the retrieval. Output: a JSON with
per-depth means and a Markdown table.

  python scripts/topp_needle.py --length 2048 --out results/topp_needle
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RULES = ("top-p", "top-k", "top-p -sink", "top-p +floor")


def needle_token_span(codec, prompt: str, span: tuple[int, int]) -> tuple[int, int]:
  """Token indices [start, end) of the characters `span` of `prompt` (BPE merges across the
  boundary may shift an end by one token)."""
  return len(codec.encode(prompt[:span[0]])), len(codec.encode(prompt[:span[1]]))


def select_rules(lm, valid, own, top_p: float, k_blocks: int, floor_blocks: int):
  """{rule: bool [..., nb]} from indexer block log-masses lm [..., nb]."""
  import jax.numpy as jnp
  from pallas_kernels import reference as ref
  out = {"top-p": ref.topp_from_block_logmass(lm, valid, own, top_p),
         "top-k": ref.topk_from_block_logmass(lm, valid, own, k_blocks)}
  rest = valid.at[..., 0].set(False)
  nosink = ref.topp_from_block_logmass(lm, rest, own, top_p)
  out["top-p -sink"] = nosink | (jnp.arange(lm.shape[-1]) == 0)
  out["top-p +floor"] = out["top-p"] | ref.topk_from_block_logmass(lm, valid, own, floor_blocks)
  return out


def make_probe(model, top_p: float, k_blocks: int, block_size: int, floor_blocks: int):
  """A jitted fn(ids [1, s], t, needle_blocks [nb] bool) -> per retrieval head and rule:
  needle kept, blocks selected; and per head the exact mass on the needle blocks and on block
  0, for the query at position t (ids after t are padding: one compilation for all prompts)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from pallas_kernels import reference as ref
  graphdef, state = nnx.split(model)
  layers = [i for i, l in enumerate(model.layers) if l.attn.routing.selected]

  @jax.jit
  def run(state, ids, t, needle_blocks):
    m = nnx.merge(graphdef, state)
    s = ids.shape[1]
    positions = jnp.arange(s, dtype=jnp.int32)[None]
    x = jnp.take(m.embed[...], ids, axis=0)
    inv_freq = m.inv_freq()
    s_pad = -(-s // block_size) * block_size
    nb = s_pad // block_size
    rows = []
    for i, layer in enumerate(m.layers):
      if i > layers[-1]:
        break
      if i in layers:
        attn = layer.attn
        sel = attn.routing.selected
        q_pre, k_pre, q, k, _ = attn.project_qkv(layer.input_norm(x), positions, inv_freq)
        qi, ki = attn.indexer_qk(q_pre, k_pre)  # [1, s, h, r]
        scores = jnp.einsum("hr,khr->hk", qi[0, t].astype(jnp.float32),
                            ki[0].astype(jnp.float32))
        scores = jnp.pad(scores, ((0, 0), (0, s_pad - s)))
        key_valid = jnp.arange(s_pad) <= t
        lm, valid = ref.block_logmass(scores, key_valid[None], block_size)
        own = jnp.broadcast_to(t // block_size, lm.shape[:-1]).astype(jnp.int32)
        masks = select_rules(lm, valid, own, top_p, k_blocks, floor_blocks)
        qq = q[0, t][jnp.asarray(sel.heads)].astype(jnp.float32)  # [h, d]
        kk = k[0][:, jnp.asarray(sel.kv)].astype(jnp.float32)  # [s, h, d]
        logits = jnp.einsum("hd,khd->hk", qq, kk) / math.sqrt(q.shape[-1])
        probs = jax.nn.softmax(jnp.where(jnp.arange(s) <= t, logits, -jnp.inf), axis=-1)
        probs = jnp.pad(probs, ((0, 0), (0, s_pad - s))).reshape(-1, nb, block_size).sum(-1)
        row = {"needle_mass": jnp.sum(jnp.where(needle_blocks, probs, 0.0), -1),
               "sink_mass": probs[:, 0],
               "indexer_sink_share": jnp.exp(lm[:, 0] - jax.nn.logsumexp(
                   jnp.where(valid, lm, -jnp.inf), axis=-1))}
        for rule, mask in masks.items():
          row[f"{rule}|kept"] = jnp.all(jnp.where(needle_blocks, mask, True), -1)
          row[f"{rule}|blocks"] = jnp.sum(mask, -1)
          row[f"{rule}|recall"] = jnp.sum(jnp.where(mask, probs, 0.0), -1)
        rows.append(row)
      x, _ = layer(x, positions, inv_freq)
    return {k: jnp.concatenate([r[k] for r in rows]) for k in rows[0]}

  return lambda ids, t, needle_blocks: jax.device_get(run(state, ids, jnp.int32(t),
                                                          needle_blocks))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2-135m-rtpurbo-stage1",
                  help="registered name or HF folder with the plan and indexer (default: the "
                  "stage-1 model the committed all/ run evaluated)")
  ap.add_argument("--task", default="niah_single")
  ap.add_argument("--length", type=int, default=2048)
  ap.add_argument("--samples", type=int, default=50)
  ap.add_argument("--depths", default="0.1,0.5,0.9")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--topk_blocks", type=int, default=0,
                  help="top-k budget in blocks (0: the binding budget that --scores records at "
                  "this length, rounded up to blocks)")
  ap.add_argument("--floor_blocks", type=int, default=8,
                  help="the `top-p +floor` rule's minimum, in blocks")
  ap.add_argument("--reading_mass", type=float, default=0.1)
  ap.add_argument("--scores", default="eval_results/smollm2_h200/all/results.json",
                  help="an evaluation's results.json: its per-prompt scores are joined in")
  ap.add_argument("--out", default="results/topp_needle")
  args = ap.parse_args(argv)

  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import jax.numpy as jnp
  import smollm2_135m
  import rtpurbo_jax
  from rtpurbo_jax import loading
  from rtpurbo_jax.eval.corpus import Corpus, HFCodec
  from rtpurbo_jax.eval.tasks import TaskContext, make_examples

  cfg = smollm2_135m.get_config()
  model = loading.build_model(cfg, args.model)
  sp = model.sparse
  codec = HFCodec(rtpurbo_jax.load_tokenizer(args.model))
  depths = [float(d) for d in args.depths.split(",")]
  examples = make_examples(TaskContext(codec, Corpus.shakespeare()), args.task, args.length,
                           depths, args.samples, args.seed)
  recorded, budget = {}, None
  if args.scores and os.path.exists(args.scores):
    with open(args.scores) as f:
      res = json.load(f)
    for e in res["examples"]:
      if e["task"] == args.task and e["length"] == args.length:
        recorded[e["index"]] = e
    budget = (res.get("topk_budget") or {}).get(str(args.length))
  if not args.topk_blocks:
    if budget is None:
      ap.error(f"--topk_blocks: {args.scores} records no top-k budget at {args.length}")
    args.topk_blocks = -(-budget["tokens"] // sp.block_size)
  probe = make_probe(model, sp.top_p, args.topk_blocks, sp.block_size, args.floor_blocks)
  rows, t0 = [], time.time()
  for e in examples:
    ids = np.asarray(codec.encode(e.prompt), np.int32)
    if e.index in recorded:  # the same prompt as the evaluation's
      assert recorded[e.index]["prompt_tokens"] == len(ids), (e.index, len(ids))
      assert tuple(recorded[e.index]["answers"]) == tuple(e.answers)
    a, b = needle_token_span(codec, e.prompt, e.needle_spans[0])
    if len(ids) > args.length:
      raise SystemExit(f"prompt {e.index} has {len(ids)} tokens, over --length")
    nb = -(-args.length // sp.block_size)
    needle = np.zeros(nb, bool)
    needle[a // sp.block_size:(b - 1) // sp.block_size + 1] = True
    padded = np.zeros(args.length, np.int32)
    padded[:len(ids)] = ids
    out = probe(jnp.asarray(padded[None]), len(ids) - 1, jnp.asarray(needle))
    scores = recorded.get(e.index, {}).get("scores", {})
    rows.append({"index": e.index, "depth": e.depth, "tokens": len(ids),
                 "needle_tokens": [a, b], "scores": scores,
                 **{k: np.asarray(v).tolist() for k, v in out.items()}})
    print(f"{e.index:3d} depth {e.depth} needle tokens {a}-{b}: top-p keeps it in "
          f"{np.mean(out['top-p|kept']):.2f} of heads ({time.time() - t0:.0f} s)", flush=True)

  summary = summarise(rows, args.reading_mass)
  os.makedirs(args.out, exist_ok=True)
  meta = {"model": args.model, "task": args.task, "length": args.length, "seed": args.seed,
          "depths": depths, "top_p": sp.top_p, "block_size": sp.block_size,
          "topk_blocks": args.topk_blocks, "floor_blocks": args.floor_blocks,
          "reading_mass": args.reading_mass,
          "scores_from": args.scores, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  stem = os.path.join(args.out, f"{args.task}_{args.length}")
  with open(stem + ".json", "w") as f:
    json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown(meta, summary))
  print(markdown(meta, summary))


def summarise(rows, reading_mass: float) -> dict:
  """Per depth (and all): over (prompt, head) pairs, and over the reading pairs only, the
  fraction with the needle kept and the mean blocks per rule; the indexer's and the exact
  attention's share of block 0; the evaluation's accuracy per mode."""
  out = {}
  for depth in sorted({r["depth"] for r in rows}) + ["all"]:
    rs = [r for r in rows if depth == "all" or r["depth"] == depth]
    needle = np.concatenate([r["needle_mass"] for r in rs])
    reading = needle >= reading_mass
    cell = {"prompts": len(rs), "pairs": int(needle.size), "reading_pairs": int(reading.sum()),
            "exact_sink_mass": float(np.mean(np.concatenate([r["sink_mass"] for r in rs]))),
            "indexer_sink_share": float(np.mean(np.concatenate(
                [r["indexer_sink_share"] for r in rs]))),
            "accuracy": {m: float(np.mean([r["scores"][m] for r in rs if m in r["scores"]]))
                         for m in ("dense", "rtpurbo", "topk", "streaming")
                         if any(m in r["scores"] for r in rs)}}
    for rule in RULES:
      kept = np.concatenate([r[f"{rule}|kept"] for r in rs])
      blocks = np.concatenate([r[f"{rule}|blocks"] for r in rs])
      cell[rule] = {"kept": float(kept.mean()),
                    "kept_reading": float(kept[reading].mean()) if reading.any() else None,
                    "blocks": float(blocks.mean()),
                    "recall": float(np.mean(np.concatenate([r[f"{rule}|recall"] for r in rs])))}
    out[str(depth)] = cell
  return out


def markdown(meta, summary) -> str:
  lines = [f"# Needle kept by the retrieval heads' selection: {meta['task']} at "
           f"{meta['length']} tokens", "",
           f"Model {meta['model']}, top_p {meta['top_p']}, blocks of {meta['block_size']}, "
           f"top-k {meta['topk_blocks']} blocks; query: the last prompt position. `kept`: "
           "fraction of (prompt, retrieval head) pairs whose selection holds every block of the "
           f"needle sentence; `reading`: the same over pairs whose exact attention puts >= "
           f"{meta['reading_mass']} on the needle. Accuracy: the evaluation's "
           f"({meta['scores_from']}).", "",
           "| depth | prompts | reading pairs | block-0 share (indexer / exact) | " +
           " | ".join(f"{r}: kept / reading / blocks / recall" for r in RULES) +
           " | accuracy dense / rtpurbo / topk |",
           "|---|---|---|---|" + "---|" * len(RULES) + "---|"]
  for depth, c in summary.items():
    acc = c["accuracy"]
    lines.append("| " + " | ".join([
        depth, str(c["prompts"]), f"{c['reading_pairs']} / {c['pairs']}",
        f"{c['indexer_sink_share']:.2f} / {c['exact_sink_mass']:.2f}",
        *[f"{c[r]['kept']:.2f} / " + ("-" if c[r]["kept_reading"] is None else
                                      f"{c[r]['kept_reading']:.2f}") +
          f" / {c[r]['blocks']:.1f} / {c[r]['recall']:.3f}" for r in RULES],
        " / ".join(f"{100 * acc[m]:.0f}" if m in acc else "-"
                   for m in ("dense", "rtpurbo", "topk"))]) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
