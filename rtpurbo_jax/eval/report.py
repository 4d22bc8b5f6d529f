"""Write an evaluation's results: JSON (everything), a Markdown summary, PNG plots.

Files in `out_dir`:
  results.json            meta, settings, sparse config, plan summary, accuracy tables,
                          perplexity, selection reports, decode sparsity, every example's
                          predictions and scores
  results.md              accuracy per task x length x mode, perplexity, sparsity
  accuracy_vs_length.png  one panel per task (+ average): accuracy vs length, a line per mode
  sparsity_vs_length.png  selected-block sparsity, tokens per retrieval head, attention recall
  head_budget.png         tokens attended per retrieval head at the longest length

Every file is written to a temporary name and renamed, so a failure never leaves half a file.

Runs over different lengths (e.g. a long length run separately) combine with
  python -m rtpurbo_jax.eval.report --out_dir=eval_results a/results.json b/results.json
which merges them and re-renders the Markdown and plots (one file: just re-renders).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

FILES = ("results.json", "results.md", "accuracy_vs_length.png", "sparsity_vs_length.png",
         "head_budget.png")


def _atomic_write(path: str, data: bytes) -> None:
  tmp = path + ".partial"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _size(n: int) -> str:
  return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _samples(st) -> str:
  n = st["samples"]
  if len(n) == 1:
    return f"{n[0]}"
  return ", ".join(f"{k} at {_size(l)}" for k, l in zip(n, st["lengths"]))


def _lengths(results) -> list[int]:
  return [int(x) for x in results["settings"]["lengths"]]


# ---------------------------------------------------------------------------
# Markdown.


def markdown(results: dict) -> str:
  meta, st, sp = results["meta"], results["settings"], results["sparse"]
  modes, lengths = st["modes"], _lengths(results)
  scores = results["accuracy"]["scores"]
  out = [f"# Evaluation: {meta.get('name', '')}", ""]
  plan = results["plan"]
  out += [
      f"- model: {meta.get('model', '?')} ({meta.get('dtype', '?')}), head plan from "
      f"{meta.get('plan_source', '?')}, indexer: {meta.get('indexer', '?')}",
      f"- plan: {plan['retrieval_heads']} of {plan['query_heads']} query heads are retrieval "
      f"heads ({plan['retrieval_fraction']:.1%}); {plan['full_kv_heads']} of {plan['kv_heads']} "
      f"KV heads keep a full cache",
      f"- sparse: window {sp['window']}, sinks {sp['sinks']}, top_p {sp['top_p']}, block "
      f"{sp['block_size']}, top-k {sp['topk_tokens']} tokens, threshold "
      f"{sp['seqlen_threshold']}, selector {sp['selector']}",
      f"- run: {_samples(st)} samples per task (depths {st['depths']}), seed "
      f"{st['seed']}; {meta.get('backend', '?')} ({meta.get('device', '?')}), jax "
      f"{meta.get('jax', '?')}, {meta.get('seconds', 0):.0f} s, {meta.get('date', '')}",
      "",
      "## Accuracy (%)", "",
  ]
  head = "| task | length | " + " | ".join(modes) + " |"
  out += [head, "|" + "---|" * (2 + len(modes))]
  tasks = list(st["tasks"]) + ["average"]
  for t in tasks:
    for length in lengths:
      cells = []
      for m in modes:
        v = scores.get(m, {}).get(t, {}).get(str(length))
        cells.append("-" if v is None else f"{100 * v:.1f}")
      if all(c == "-" for c in cells):
        continue  # no samples at this length
      name = f"**{t}**" if t == "average" else t
      out.append(f"| {name} | {_size(length)} | " + " | ".join(cells) + " |")
  ppl = results.get("perplexity") or {}
  if ppl:
    out += ["", "## Perplexity (held-out text)", "",
            "`ppl`: all positions; `tail`: positions in the second half of the window. Sparse "
            "modes are scored decode-style (every query selects its blocks).", ""]
    out += ["| length | " + " | ".join(f"{m} ppl | {m} tail" for m in modes) + " |",
            "|" + "---|" * (1 + 2 * len(modes))]
    for length in lengths:
      cells = []
      for m in modes:
        r = ppl.get(m, {}).get(str(length))
        cells += ["-", "-"] if r is None else [f"{r['ppl']:.3f}", f"{r['ppl_tail']:.3f}"]
      if any(c != "-" for c in cells):
        out.append(f"| {_size(length)} | " + " | ".join(cells) + " |")
    dense = ppl.get("dense", {})
    rel = []
    for m in modes:
      if m == "dense":
        continue
      for length in lengths:
        a, b = ppl.get(m, {}).get(str(length)), dense.get(str(length))
        if a and b:
          rel.append(f"{m} {_size(length)}: {100 * (a['ppl'] / b['ppl'] - 1):+.2f}% "
                     f"(tail {100 * (a['ppl_tail'] / b['ppl_tail'] - 1):+.2f}%)")
    if rel:
      out += ["", "Relative to dense: " + "; ".join(rel) + "."]
  rep, dec = results.get("sparsity") or {}, results.get("decode_sparsity") or {}
  if rep or dec:
    out += ["", "## Decode sparsity of the retrieval heads", "",
            "Selection report on a held-out window (sampled queries in its second half): "
            "selected fraction of causal blocks, tokens attended per retrieval head, recall of "
            "the exact attention mass inside the selected blocks, and compute sparsity over all "
            "query heads. `decode sel.`: mean selected fraction sown by the task answers' "
            "decode steps.", "",
            "| mode | length | selected | tokens/head | recall | recall p10 | compute sparsity | "
            "decode sel. |", "|---|---|---|---|---|---|---|---|"]
    for m in modes:
      for length in lengths:
        r = rep.get(m, {}).get(str(length))
        d = dec.get(m, {}).get(str(length))
        if r is None and d is None:
          continue
        cells = ["-"] * 5 if r is None else [
            f"{100 * r['selected_fraction']:.1f}%", f"{r['tokens_per_head']:.0f} / "
            f"{r['mean_context']:.0f}", f"{r['recall']:.3f}", f"{r['recall_p10']:.3f}",
            f"{100 * r['compute_sparsity']:.1f}%"]
        cells.append("-" if d is None else f"{100 * d['selected_fraction']:.1f}%")
        out.append(f"| {m} | {_size(length)} | " + " | ".join(cells) + " |")
  if meta.get("notes"):
    out += ["", "## Notes", "", meta["notes"]]
  return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# Plots.


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _png(fig) -> bytes:
  import io
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  return buf.getvalue()


# Marker, line style and size per mode: larger markers first, so equal values stay visible.
_STYLE = {"dense": ("o", "-", 9), "rtpurbo": ("s", "-", 7), "streaming": ("^", "--", 6),
          "topk": ("D", ":", 4)}


def _style(mode: str) -> dict:
  marker, ls, size = _STYLE.get(mode, ("o", "-", 5))
  return {"marker": marker, "ls": ls, "markersize": size}


def plot_accuracy(results: dict) -> bytes:
  plt = _plt()
  st, scores = results["settings"], results["accuracy"]["scores"]
  lengths = _lengths(results)
  tasks = list(st["tasks"]) + ["average"]
  cols = min(3, len(tasks))
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, t in zip(axes.flat, tasks):
    for m in st["modes"]:
      ys = [scores.get(m, {}).get(t, {}).get(str(n)) for n in lengths]
      ax.plot(lengths, [np.nan if y is None else 100 * y for y in ys], label=m, **_style(m))
    ax.set_title(t)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_size(n) for n in lengths])
    ax.set_ylim(-5, 105)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=8)
  fig.suptitle(f"{results['meta'].get('name', '')}: accuracy vs context length")
  fig.tight_layout()
  data = _png(fig)
  plt.close(fig)
  return data


def plot_sparsity(results: dict) -> bytes:
  plt = _plt()
  rep, dec = results.get("sparsity") or {}, results.get("decode_sparsity") or {}
  lengths = _lengths(results)
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
  for m in results["settings"]["modes"]:
    r = rep.get(m, {})
    if r:
      xs = [n for n in lengths if str(n) in r]
      axes[0].plot(xs, [100 * r[str(n)]["sparsity"] for n in xs], marker="o",
                   label=f"{m} (report)")
      axes[1].plot(xs, [r[str(n)]["tokens_per_head"] for n in xs], marker="o", label=m)
      axes[2].plot(xs, [r[str(n)]["recall"] for n in xs], marker="o", label=m)
    d = dec.get(m, {})
    if d:
      xs = [n for n in lengths if str(n) in d]
      axes[0].plot(xs, [100 * d[str(n)]["sparsity"] for n in xs], marker="x", ls="--",
                   label=f"{m} (task decode)")
  for ax, title, ylabel in zip(
      axes, ("retrieval-head block sparsity", "tokens attended per retrieval head",
             "recall of exact attention mass"), ("1 - selected fraction (%)", "tokens", "recall")):
    ax.set_title(title)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_size(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  data = _png(fig)
  plt.close(fig)
  return data


def plot_head_budget(results: dict) -> bytes:
  plt = _plt()
  rep = results.get("sparsity") or {}
  lengths = _lengths(results)
  fig, ax = plt.subplots(figsize=(11, 3.6))
  longest = None
  for i, m in enumerate(k for k in results["settings"]["modes"] if k in rep):
    longest = max((n for n in lengths if str(n) in rep[m]), default=None)
    if longest is None:
      continue
    heads = rep[m][str(longest)]["heads"]
    x = np.arange(len(heads))
    ax.bar(x + 0.4 * i, [h["tokens"] for h in heads], width=0.4, label=m)
    ax.set_xticks(x + 0.2, [f"L{h['layer']}H{h['head']}" for h in heads], rotation=90,
                  fontsize=7)
  if longest is not None:
    ax.set_title(f"tokens attended per retrieval head at {_size(longest)} (sampled decode "
                 f"queries)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  else:
    ax.set_title("no selecting mode (rtpurbo / topk) in this run")
  ax.set_ylabel("tokens")
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  data = _png(fig)
  plt.close(fig)
  return data


def write(results: dict, out_dir: str) -> list[str]:
  """Write every file of `FILES` into `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  payloads = {
      "results.json": (json.dumps(results, indent=1, sort_keys=False) + "\n").encode(),
      "results.md": markdown(results).encode(),
      "accuracy_vs_length.png": plot_accuracy(results),
      "sparsity_vs_length.png": plot_sparsity(results),
      "head_budget.png": plot_head_budget(results),
  }
  paths = []
  for name in FILES:
    path = os.path.join(out_dir, name)
    _atomic_write(path, payloads[name])
    paths.append(path)
  return paths


# ---------------------------------------------------------------------------
# Merging runs.


def merge(parts: list[dict]) -> dict:
  """One results dict from runs of the same model, plan, modes and sparse settings over
  disjoint lengths (tasks may differ; the union is kept)."""
  if not parts:
    raise ValueError("nothing to merge")
  first = parts[0]
  for p in parts[1:]:
    for key in ("sparse", "plan"):
      if p[key] != first[key]:
        raise ValueError(f"cannot merge runs with different {key} settings")
    if p["settings"]["modes"] != first["settings"]["modes"]:
      raise ValueError("cannot merge runs with different modes")
  seen: dict[int, int] = {}
  for i, p in enumerate(parts):
    for n, length in enumerate(p["settings"]["lengths"]):
      if length in seen:
        raise ValueError(f"length {length} appears in runs {seen[length]} and {i}")
      seen[length] = i
  lengths = sorted(seen)

  def samples_of(p, length):
    st = p["settings"]
    k = st["samples"]
    return k[0] if len(k) == 1 else k[st["lengths"].index(length)]

  tasks: list[str] = []
  for p in parts:
    tasks += [t for t in p["settings"]["tasks"] if t not in tasks]
  settings = dict(first["settings"], lengths=lengths, tasks=tasks,
                  samples=[samples_of(parts[seen[n]], n) for n in lengths])
  meta = dict(first["meta"])
  meta["seconds"] = round(sum(p["meta"].get("seconds", 0) for p in parts), 1)
  meta["seconds_per_length"] = {}
  for p in parts:
    meta["seconds_per_length"].update(p["meta"].get("seconds_per_length", {}))
  meta["date"] = ", ".join(dict.fromkeys(p["meta"].get("date", "") for p in parts))
  out = {"meta": meta, "settings": settings, "sparse": first["sparse"], "plan": first["plan"],
         "examples": [e for p in parts for e in p["examples"]]}
  for key in ("perplexity", "sparsity", "decode_sparsity"):
    merged: dict = {}
    for p in parts:
      for mode, per_length in (p.get(key) or {}).items():
        merged.setdefault(mode, {}).update(per_length)
    out[key] = merged
  from rtpurbo_jax.eval.runner import accuracy_table
  out["accuracy"] = accuracy_table(out["examples"], settings["modes"], tasks, lengths)
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description="Merge evaluation runs and re-render the report.")
  ap.add_argument("results", nargs="+", help="results.json files")
  ap.add_argument("--out_dir", required=True)
  ap.add_argument("--notes", default="", help="a Markdown file appended as the Notes section")
  args = ap.parse_args(argv)
  parts = []
  for path in args.results:
    with open(path) as f:
      parts.append(json.load(f))
  results = merge(parts) if len(parts) > 1 else parts[0]
  if args.notes:
    with open(args.notes) as f:
      results["meta"]["notes"] = f.read().strip()
  for path in write(results, args.out_dir):
    print(path)


if __name__ == "__main__":
  main()
