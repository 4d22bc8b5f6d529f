"""Write an evaluation's results: JSON (everything), a Markdown summary, PNG plots.

Files in `out_dir`:
  results.json            meta, settings, sparse config, plan, accuracy tables with 95% Wilson
                          intervals, perplexity (per-window nll) and its change against dense
                          with a paired-bootstrap interval, topk's budget per length, selection
                          reports, decode sparsity, every example's predictions and scores
  results.md              the same as tables ("62.0 [48.2, 74.1]", "+0.8% [+0.5, +1.1]")
  accuracy_vs_length.png  one panel per task (+ average): accuracy vs length per mode with the
                          Wilson intervals as error bars
  sparsity_vs_length.png  selected fraction of causal blocks (rtpurbo, topk), tokens per
                          retrieval head, recall of the attention mass
  head_budget.png         tokens attended per retrieval head at the longest length

Every file is written to a temporary name and renamed, so a failure never leaves half a file.

Runs combine by (length, mode): other lengths, or a subset of modes (e.g. a variant run with
--config.eval.modes=rtpurbo,topk next to a baseline run with dense,streaming):
  python -m rtpurbo_jax.eval.report --out_dir=eval_results a/results.json b/results.json
merges them and re-renders (one file: just re-renders). RTPurbo variants against the dense
baseline (a variants table, Markdown + JSON):
  python -m rtpurbo_jax.eval.report --compare stage1=runs/s1 stage2=runs/s2 \
      --baseline=runs/base --reference=stage1 --out_dir=eval_results/variants
Accuracy differences are paired over the same prompts (every run of one seed draws the same
ones), perplexity changes over the same held-out windows, both with bootstrap intervals.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from rtpurbo_jax.eval import stats
from rtpurbo_jax.eval.corpus import PPL_TEXTS
from rtpurbo_jax.files import atomic_write

FILES = ("results.json", "results.md", "accuracy_vs_length.png", "sparsity_vs_length.png",
         "head_budget.png")
MODE_ORDER = ("dense", "rtpurbo", "streaming", "topk")
# The retrieval group of the variants table: the key lookups (partial score for multi-value).
NIAH_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue")
PARTIAL_NOTE = ("Partial-score tasks (variable tracking, common words, multi-value NIAH) score "
                "the fraction of expected answers found per sample; their interval is the "
                "Wilson interval of the mean score with n = samples (normal approximation for "
                "a bounded mean).")


def _size(n: int) -> str:
  return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _samples(st) -> str:
  n = st["samples"]
  if len(n) == 1:
    return f"{n[0]}"
  return ", ".join(f"{k} at {_size(l)}" for k, l in zip(n, st["lengths"]))


def _lengths(results) -> list[int]:
  """The lengths with results: those finished (a run writes after every length)."""
  done = results.get("meta", {}).get("lengths_done")
  return sorted(int(x) for x in (results["settings"]["lengths"] if done is None else done))


def accuracy(results: dict) -> dict:
  """The accuracy tables (runner.accuracy_table) of `results`, recomputed from the examples
  when missing or without intervals (older files)."""
  acc = results.get("accuracy") or {}
  if "intervals" in acc:
    return acc
  from rtpurbo_jax.eval.runner import accuracy_table
  st = results["settings"]
  return accuracy_table(results["examples"], st["modes"], st["tasks"], _lengths(results))


def ppl_vs_dense(results: dict) -> dict:
  if "perplexity_vs_dense" in results:
    return results["perplexity_vs_dense"]
  from rtpurbo_jax.eval.perplexity import relative_to_dense
  return relative_to_dense(results.get("perplexity") or {}, results["settings"]["seed"])


def group_accuracy(results: dict, mode: str, length: int, tasks) -> dict | None:
  """Mean over `tasks` (those present) of the per-task mean score of `mode` at `length`, with
  the Wilson interval over all their samples: {"mean", "lo", "hi", "n", "tasks"}."""
  means, n, used = [], 0, []
  for t in tasks:
    rows = [e["scores"][mode] for e in results["examples"]
            if e["task"] == t and e["length"] == length and mode in e["scores"]]
    if rows:
      means.append(float(np.mean(rows)))
      n += len(rows)
      used.append(t)
  if not means:
    return None
  mean = float(np.mean(means))
  lo, hi = stats.wilson(mean, n)
  return {"mean": mean, "lo": lo, "hi": hi, "n": n, "tasks": used}


# ---------------------------------------------------------------------------
# Markdown.


def _acc_cell(acc, m, t, length) -> str:
  v = acc["scores"].get(m, {}).get(t, {}).get(str(length))
  if v is None:
    return "-"
  iv = acc.get("intervals", {}).get(m, {}).get(t, {}).get(str(length))
  return f"{100 * v:.1f}" if iv is None else stats.fmt_acc_interval(v, *iv)


def markdown(results: dict) -> str:
  meta, st, sp = results["meta"], results["settings"], results["sparse"]
  modes, lengths = st["modes"], _lengths(results)
  acc = accuracy(results)
  out = [f"# Evaluation: {meta.get('name', '')}", ""]
  plan = results["plan"]
  base = meta.get("baseline_model", meta.get("model", "?"))
  out += [
      f"- model: {meta.get('model', '?')} (rtpurbo, topk); baseline {base} (dense, streaming); "
      f"{meta.get('dtype', '?')}; head plan from {meta.get('plan_source', '?')}, indexer: "
      f"{meta.get('indexer', '?')}",
      f"- plan: {plan['retrieval_heads']} of {plan['query_heads']} query heads are retrieval "
      f"heads ({plan['retrieval_fraction']:.1%}); {plan['full_kv_heads']} of {plan['kv_heads']} "
      f"KV heads keep a full cache",
      f"- sparse: window {sp['window']}, sinks {sp['sinks']}, top_p {sp['top_p']}, block "
      f"{sp['block_size']}, threshold {sp['seqlen_threshold']}, selector {sp['selector']}"
      f"{', min_blocks ' + str(sp['min_blocks']) if sp.get('min_blocks') else ''}"
      f"{', distance_buckets ' + str(sp['distance_buckets']) if sp.get('distance_buckets') else ''}"
      f"; topk "
      f"budget {st.get('topk_budget', sp['topk_tokens'])}",
      f"- run: {_samples(st)} samples per task (depths {st['depths']}), seed "
      f"{st['seed']}, {st.get('ppl_samples', 1)} held-out windows per length "
      f"({PPL_TEXTS[st.get('ppl_text', 'plays')]}); "
      f"{meta.get('backend', '?')} ({meta.get('device', '?')}), jax {meta.get('jax', '?')}, "
      f"{meta.get('seconds', 0):.0f} s, {meta.get('date', '')}",
  ]
  if meta.get("complete") is False:
    out.append(f"- **incomplete run**: lengths {lengths} of {st['lengths']} finished")
  if results.get("mode_sources"):
    srcs = "; ".join(f"{m}: {s['run']}" for m, s in results["mode_sources"].items())
    out.append(f"- merged runs, modes from: {srcs}")
  out += ["", "## Accuracy (%) with 95% Wilson intervals", "",
          "Contains-rule tasks score 0/1 per sample. " + PARTIAL_NOTE + " `average`: mean over "
          "the tasks, interval with n = all samples of that length.", ""]
  out += ["| task | length | n | " + " | ".join(modes) + " |", "|" + "---|" * (3 + len(modes))]
  for t in list(st["tasks"]) + ["average"]:
    for length in lengths:
      cells = [_acc_cell(acc, m, t, length) for m in modes]
      if all(c == "-" for c in cells):
        continue  # no samples at this length
      n = acc.get("n", {}).get(t, {}).get(str(length), "?")
      name = f"**{t}**" if t == "average" else t
      out.append(f"| {name} | {_size(length)} | {n} | " + " | ".join(cells) + " |")
  budgets = results.get("topk_budget") or {}
  if budgets:
    out += ["", "## topk budget", "",
            "Tokens per retrieval head that topk may read (whole blocks; its own block is "
            "always added). `binding`: rtpurbo's mean tokens per retrieval head on the held-out "
            "windows of that length (the selection report below), rounded up to blocks.", "",
            "| length | rule | rtpurbo tokens/head | topk budget (tokens) | blocks |",
            "|---|---|---|---|---|"]
    for length in lengths:
      b = budgets.get(str(length))
      if b:
        measured = b.get("rtpurbo_tokens_per_head")
        out.append(f"| {_size(length)} | {b['rule']} | "
                   f"{'-' if measured is None else f'{measured:.0f}'} | {b['tokens']} | "
                   f"{b['blocks']} |")
  ppl = results.get("perplexity") or {}
  if ppl:
    rel = ppl_vs_dense(results)
    windows = {r.get("windows", 1) for per in ppl.values() for r in per.values()}
    out += ["", "## Perplexity (held-out text)", "",
            "`ppl`: all positions; Δ: relative to dense with a 95% paired bootstrap interval "
            f"over the held-out windows ({'/'.join(str(w) for w in sorted(windows))} per "
            "length, resampled together for both modes; seeded). Sparse modes are scored "
            "decode-style (every query selects its blocks). `tail`: positions in the second "
            "half of each window.", ""]
    others = [m for m in modes if m != "dense"]
    out += ["| length | " + " | ".join(f"{m} ppl" for m in modes) + " | " + " | ".join(
        f"{m} Δ | {m} tail Δ" for m in others) + " |",
            "|" + "---|" * (1 + len(modes) + 2 * len(others))]
    for length in lengths:
      cells = []
      for m in modes:
        r = ppl.get(m, {}).get(str(length))
        cells.append("-" if r is None else f"{r['ppl']:.3f}")
      for m in others:
        c = rel.get(m, {}).get(str(length))
        cells += ["-", "-"] if c is None else [
            stats.fmt_pct_interval(c["ppl"]["rel"], c["ppl"]["lo"], c["ppl"]["hi"], 2),
            stats.fmt_pct_interval(c["tail"]["rel"], c["tail"]["lo"], c["tail"]["hi"], 2)]
      if any(c != "-" for c in cells):
        out.append(f"| {_size(length)} | " + " | ".join(cells) + " |")
  rep, dec = results.get("sparsity") or {}, results.get("decode_sparsity") or {}
  if rep or dec:
    out += ["", "## Decode sparsity of the retrieval heads", "",
            "Selection report on the held-out windows (sampled queries in their second half): "
            "selected fraction of causal blocks, tokens attended per retrieval head (/ mean "
            "context), recall of the exact attention mass inside the selected blocks, and "
            "compute sparsity over all query heads. `decode sel.`: mean selected fraction sown "
            "by the task answers' decode steps.", "",
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
  # Small files: they are committed with every run.
  fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
  return buf.getvalue()


# Marker, line style and size per mode: larger markers first, so equal values stay visible.
_STYLE = {"dense": ("o", "-", 8), "rtpurbo": ("s", "-", 6), "streaming": ("^", "--", 6),
          "topk": ("D", ":", 4)}


def _style(mode: str) -> dict:
  marker, ls, size = _STYLE.get(mode, ("o", "-", 5))
  return {"marker": marker, "ls": ls, "markersize": size}


def plot_accuracy(results: dict) -> bytes:
  plt = _plt()
  st, acc = results["settings"], accuracy(results)
  scores, ivs = acc["scores"], acc.get("intervals", {})
  lengths = _lengths(results) or [int(x) for x in st["lengths"]]
  tasks = list(st["tasks"]) + ["average"]
  cols = min(4, len(tasks))
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
  modes = list(st["modes"])
  for ax, t in zip(axes.flat, tasks):
    for j, m in enumerate(modes):
      # Modes side by side around each length (log axis), so the error bars do not overlap.
      shift = 2 ** (0.05 * (j - (len(modes) - 1) / 2))
      xs, ys, lo, hi = [], [], [], []
      for n in lengths:
        y = scores.get(m, {}).get(t, {}).get(str(n))
        if y is None:
          continue
        iv = ivs.get(m, {}).get(t, {}).get(str(n), [y, y])
        xs.append(n * shift)
        ys.append(100 * y)
        lo.append(100 * (y - iv[0]))
        hi.append(100 * (iv[1] - y))
      if xs:
        ax.errorbar(xs, ys, yerr=[lo, hi], label=m, capsize=2, lw=1, **_style(m))
    ax.set_title(t, fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_size(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(-5, 105)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in axes[:, 0]:
    ax.set_ylabel("accuracy (%)", fontsize=8)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle(f"{results['meta'].get('name', '')}: accuracy vs context length "
               "(95% Wilson intervals)", fontsize=10)
  fig.tight_layout()
  data = _png(fig)
  plt.close(fig)
  return data


def plot_sparsity(results: dict) -> bytes:
  plt = _plt()
  rep, dec = results.get("sparsity") or {}, results.get("decode_sparsity") or {}
  lengths = _lengths(results) or [int(x) for x in results["settings"]["lengths"]]
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.0))
  for m in results["settings"]["modes"]:
    r = rep.get(m, {})
    if r:
      xs = [n for n in lengths if str(n) in r]
      axes[0].plot(xs, [100 * r[str(n)]["selected_fraction"] for n in xs], label=f"{m} (report)",
                   **_style(m))
      axes[1].plot(xs, [r[str(n)]["tokens_per_head"] for n in xs], label=m, **_style(m))
      axes[2].plot(xs, [r[str(n)]["recall"] for n in xs], label=m, **_style(m))
    d = dec.get(m, {})
    if d:
      xs = [n for n in lengths if str(n) in d]
      axes[0].plot(xs, [100 * d[str(n)]["selected_fraction"] for n in xs], marker="x", ls="--",
                   label=f"{m} (task decode)")
  for ax, title, ylabel in zip(
      axes, ("selected fraction of causal blocks", "tokens attended per retrieval head",
             "recall of exact attention mass"), ("selected blocks (%)", "tokens", "recall")):
    ax.set_title(title, fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_size(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
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
    atomic_write(path, payloads[name])
    paths.append(path)
  return paths


# ---------------------------------------------------------------------------
# Merging runs.


def _weights(results: dict, mode: str) -> str:
  """The weights a mode ran on: the baseline's for dense / streaming, else the model's."""
  meta = results.get("meta", {})
  if mode in ("dense", "streaming"):
    return meta.get("baseline_model", meta.get("model", "?"))
  return meta.get("model", "?")


# Settings that must agree for examples and held-out windows of two runs to be the same ones.
_SHARED_SETTINGS = ("seed", "depths", "ppl_samples", "ppl_text", "sparsity_queries")
# The value of a shared setting in runs recorded before it existed.
_SETTING_BEFORE = {"ppl_text": "plays"}
# Modes in which every head is treated alike (dense: all full; streaming: all local).
_PLAN_FREE_MODES = ("dense", "streaming")


def merge(parts: list[dict]) -> dict:
  """One results dict from runs that cover disjoint (length, mode) cells.

  Runs over other lengths (same modes), runs of a subset of modes over the same lengths (a
  variant's rtpurbo,topk next to a baseline's dense,streaming), or both. A mode taken from
  several runs must have the same weights, sparse settings and plan in each; examples present
  in several runs (same task, length, sample index) must be the same prompts (answers and
  prompt length); seed, depths and held-out windows (count and text) must agree, so
  intervals stay paired.
  The merged `sparse` / `plan` / `meta` are those of the run providing rtpurbo (else the
  first); `mode_sources` says where each mode came from.
  """
  if not parts:
    raise ValueError("nothing to merge")
  first = parts[0]
  for key in _SHARED_SETTINGS:
    # The held-out windows only need to agree between runs that scored some.
    holders = [p for p in parts
               if key not in ("ppl_samples", "ppl_text")
               or any((p.get("perplexity") or {}).values())]
    if len({json.dumps(p["settings"].get(key, _SETTING_BEFORE.get(key)))
            for p in holders}) > 1:
      raise ValueError(f"cannot merge runs with different {key} settings")
  cover: dict[tuple[int, str], int] = {}
  identity: dict[str, tuple] = {}
  for i, p in enumerate(parts):
    for m in p["settings"]["modes"]:
      # dense and streaming treat every head alike: the plan does not change them.
      ident = (_weights(p, m), json.dumps(p["sparse"], sort_keys=True),
               json.dumps(p["plan"], sort_keys=True) if m not in _PLAN_FREE_MODES else "")
      if m in identity and identity[m] != ident:
        what = ("weights", "sparse", "plan")[[a != b for a, b in zip(identity[m], ident)].index(
            True)]
        raise ValueError(f"cannot merge runs with different {what} settings for mode {m}")
      identity.setdefault(m, ident)
      for length in _lengths(p):
        if (length, m) in cover:
          raise ValueError(f"length {length} (mode {m}) appears in runs {cover[(length, m)]} "
                           f"and {i}")
        cover[(length, m)] = i
  lengths = sorted({n for n, _ in cover})
  modes = [m for m in MODE_ORDER if m in identity] + [m for m in identity
                                                      if m not in MODE_ORDER]
  tasks: list[str] = []
  for p in parts:
    tasks += [t for t in p["settings"]["tasks"] if t not in tasks]

  def samples_of(length):
    for p in parts:
      st = p["settings"]
      if length in _lengths(p):
        k = st["samples"]
        return k[0] if len(k) == 1 else k[st["lengths"].index(length)]
    return 0

  owner = next((p for p in parts if "rtpurbo" in p["settings"]["modes"]), first)
  settings = dict(owner["settings"], lengths=lengths, tasks=tasks, modes=modes,
                  samples=[samples_of(n) for n in lengths])
  meta = dict(owner["meta"])
  if "baseline_model" not in meta or "dense" not in owner["settings"]["modes"]:
    dense_run = next((p for p in parts if "dense" in p["settings"]["modes"]), None)
    if dense_run is not None:
      meta["baseline_model"] = _weights(dense_run, "dense")
  meta["seconds"] = round(sum(p["meta"].get("seconds", 0) for p in parts), 1)
  meta["seconds_per_length"] = {}
  for p in parts:
    for k, v in p["meta"].get("seconds_per_length", {}).items():
      meta["seconds_per_length"][k] = round(meta["seconds_per_length"].get(k, 0) + v, 1)
  meta["date"] = ", ".join(dict.fromkeys(p["meta"].get("date", "") for p in parts))
  meta["lengths_done"] = lengths
  # A run cut short is complete once the others cover the lengths it missed.
  requested = {n for p in parts for n in p["settings"]["lengths"]}
  meta["complete"] = requested <= set(lengths)
  examples: dict[tuple, dict] = {}
  for p in parts:
    for e in p["examples"]:
      key = (e["task"], e["length"], e["index"])
      have = examples.get(key)
      if have is None:
        examples[key] = json.loads(json.dumps(e))
        continue
      if have["answers"] != e["answers"] or have["prompt_tokens"] != e["prompt_tokens"]:
        raise ValueError(f"example {key} differs between the runs (other prompts): merge runs "
                         "of the same seed, tasks and tokenizer")
      have["predictions"].update(e["predictions"])
      have["scores"].update(e["scores"])
  out = {"meta": meta, "settings": settings, "sparse": owner["sparse"], "plan": owner["plan"],
         "examples": list(examples.values())}
  for key in ("plan_mask", "config"):
    if key in owner:
      out[key] = owner[key]
  out["mode_sources"] = {}
  for m in modes:
    runs = sorted({i for (n, mm), i in cover.items() if mm == m})
    p = parts[runs[0]]
    out["mode_sources"][m] = {"run": ", ".join(str(parts[i]["meta"].get("name", i)) + f" #{i}"
                                               for i in runs),
                              "weights": _weights(p, m), "sparse": p["sparse"], "plan": p["plan"]}
  for key in ("perplexity", "sparsity", "decode_sparsity"):
    merged: dict = {}
    for p in parts:
      for mode, per_length in (p.get(key) or {}).items():
        merged.setdefault(mode, {}).update(per_length)
    out[key] = merged
  out["topk_budget"] = {}
  for p in parts:
    out["topk_budget"].update(p.get("topk_budget") or {})
  from rtpurbo_jax.eval.perplexity import relative_to_dense
  from rtpurbo_jax.eval.runner import accuracy_table
  out["accuracy"] = accuracy_table(out["examples"], modes, tasks, lengths)
  out["perplexity_vs_dense"] = relative_to_dense(out["perplexity"], settings["seed"])
  return out


# ---------------------------------------------------------------------------
# Variants table.


def load_run(path: str) -> dict:
  """results.json of a run folder (or the file itself)."""
  if os.path.isdir(path):
    path = os.path.join(path, "results.json")
  with open(path) as f:
    return json.load(f)


def paired_accuracy(res_a: dict, mode_a: str, res_b: dict, mode_b: str, length: int, tasks,
                    seed: int) -> dict | None:
  """`mode_a` of run `res_a` minus `mode_b` of run `res_b` in task-averaged accuracy at
  `length`, paired over the prompts both scored (`stats.paired_bootstrap_diff`), or None when
  they share no task. The runs must hold the same prompts (same seed, tasks and tokenizer:
  answers and prompt lengths are checked), else ValueError."""
  def scored(res, m):
    return {(e["task"], e["index"]): e for e in res["examples"]
            if e["length"] == length and m in e["scores"]}
  a, b = scored(res_a, mode_a), scored(res_b, mode_b)
  groups_a, groups_b, used = [], [], []
  for t in tasks:
    keys = sorted(k for k in a if k[0] == t and k in b)
    if not keys:
      continue
    for k in keys:
      if (a[k]["answers"], a[k]["prompt_tokens"]) != (b[k]["answers"], b[k]["prompt_tokens"]):
        raise ValueError(f"prompt {k} at {length} differs between the runs: pair runs of the "
                         "same seed, tasks and tokenizer")
    groups_a.append([a[k]["scores"][mode_a] for k in keys])
    groups_b.append([b[k]["scores"][mode_b] for k in keys])
    used.append(t)
  if not used:
    return None
  out = stats.paired_bootstrap_diff(groups_a, groups_b, [int(seed), int(length)])
  return dict(out, tasks=used)


def paired_ppl(res_a: dict, mode_a: str, res_b: dict, mode_b: str, length: int,
               seed: int) -> dict | None:
  """Relative perplexity change of `mode_a` of `res_a` against `mode_b` of `res_b` at `length`
  over the same held-out windows (`stats.paired_bootstrap_rel`), or None without per-window
  nlls for both."""
  nll = [((r.get("perplexity") or {}).get(m, {}).get(str(length)) or {}).get("window_nll")
         for r, m in ((res_a, mode_a), (res_b, mode_b))]
  if not all(n and n.get("all") for n in nll) or len(nll[0]["all"]) != len(nll[1]["all"]):
    return None
  return stats.paired_bootstrap_rel(nll[0]["all"], nll[1]["all"], [int(seed), int(length), 3])


def compare(variants: dict[str, dict], baseline: dict | None = None,
            mode: str = "rtpurbo", reference: str | None = None) -> dict:
  """The variants table: each variant's `mode` (and its topk, when run) against dense.

  variants: {name: results}; baseline: results holding dense (and streaming / topk), merged
  into each variant by mode when the variant lacks dense (a --config.eval.modes=rtpurbo,topk
  run). Per row and length: perplexity and its change against dense with the paired bootstrap
  interval, mean task accuracy and NIAH accuracy (passkey + niah_*) with Wilson intervals,
  the selected fraction and tokens per retrieval head (selection report), topk's budget;
  `acc_vs_dense`: the task accuracy minus dense's, paired over the same prompts
  (`paired_accuracy`). With `reference` (a variant's name), every other variant row also
  gets `acc_vs_ref` and `ppl_vs_ref`: paired against the reference's `mode` on the same
  prompts and held-out windows (is a lever better than the run it changes?).
  Returns {"lengths", "rows": [{"name", "mode", "weights", "length", ...}], "niah_tasks",
  "mode", "reference"}.
  """
  if reference is not None and reference not in variants:
    raise ValueError(f"reference {reference!r} is not one of the variants {sorted(variants)}")
  rows, lengths = [], set()

  def with_baseline(res):
    if "dense" in res["settings"]["modes"] or baseline is None:
      return res
    keep = [m for m in baseline["settings"]["modes"] if m not in res["settings"]["modes"]]
    return merge([res, _only_modes(baseline, keep)])

  ref = None if reference is None else with_baseline(variants[reference])

  def add(name, res, m, variant=None):
    ppl, rel = res.get("perplexity") or {}, ppl_vs_dense(res)
    seed = res["settings"]["seed"]
    for length in _lengths(res):
      if not any(m in e["scores"] for e in res["examples"] if e["length"] == length) and \
          str(length) not in ppl.get(m, {}):
        continue
      lengths.add(length)
      rep = (res.get("sparsity") or {}).get(m, {}).get(str(length)) or {}
      r = ppl.get(m, {}).get(str(length))
      rows.append({
          "name": name, "mode": m, "weights": _weights(res, m), "length": length,
          "ppl": None if r is None else r["ppl"],
          "ppl_vs_dense": (rel.get(m, {}).get(str(length)) or {}).get("ppl"),
          "accuracy": group_accuracy(res, m, length, res["settings"]["tasks"]),
          "niah": group_accuracy(res, m, length, NIAH_TASKS),
          "selected_fraction": rep.get("selected_fraction"),
          "tokens_per_head": rep.get("tokens_per_head"),
          "compute_sparsity": rep.get("compute_sparsity"),
          "topk_budget": ((res.get("topk_budget") or {}).get(str(length)) or {}).get("tokens")
          if m == "topk" else None,
          "acc_vs_dense": None if m == "dense" else paired_accuracy(
              res, m, res, "dense", length, res["settings"]["tasks"], seed),
      })
      if ref is not None and variant is not None and variant != reference:
        rows[-1]["acc_vs_ref"] = paired_accuracy(res, m, ref, mode, length,
                                                 res["settings"]["tasks"], seed)
        rows[-1]["ppl_vs_ref"] = paired_ppl(res, m, ref, mode, length, seed)

  base = baseline
  if base is None:
    base = next((v for v in variants.values() if "dense" in v["settings"]["modes"]), None)
  if base is not None:
    for m in ("dense", "streaming"):
      if m in base["settings"]["modes"]:
        add(f"baseline {m}", base, m)
  for name, res in variants.items():
    # Rows only for the variant's own modes: a mode merged in from the baseline (another
    # model's rtpurbo or topk) is not this variant's.
    own = res["settings"]["modes"]
    res = with_baseline(res)
    for m in dict.fromkeys((mode, "topk")):
      if m in own:
        add(name if m == mode else f"{name} topk", res, m, variant=name)
  return {"lengths": sorted(lengths), "rows": rows, "niah_tasks": list(NIAH_TASKS),
          "mode": mode, "reference": reference}


def _only_modes(results: dict, modes) -> dict:
  """A copy of `results` restricted to `modes` (to merge a baseline's modes into a variant)."""
  out = json.loads(json.dumps(results))
  out["settings"]["modes"] = [m for m in out["settings"]["modes"] if m in modes]
  for e in out["examples"]:
    e["predictions"] = {m: v for m, v in e["predictions"].items() if m in modes}
    e["scores"] = {m: v for m, v in e["scores"].items() if m in modes}
  for key in ("perplexity", "sparsity", "decode_sparsity"):
    out[key] = {m: v for m, v in (out.get(key) or {}).items() if m in modes}
  if "topk" not in modes:
    out["topk_budget"] = {}
  out.pop("accuracy", None)
  out.pop("perplexity_vs_dense", None)
  return out


def compare_markdown(table: dict, title: str = "RTPurbo variants") -> str:
  def acc(c):
    return "-" if c is None else stats.fmt_acc_interval(c["mean"], c["lo"], c["hi"])

  def diff(c):
    if c is None:
      return "-"
    return f"{stats.fmt_points_interval(c['diff'], c['lo'], c['hi'])} ({c['changed']}/{c['n']})"

  ref = table.get("reference")

  out = [f"# {title}", "",
         "Each variant's rtpurbo (and topk, when run) against the dense baseline, per length. "
         "Δppl: relative to dense on the same held-out windows, 95% paired bootstrap interval. "
         "Accuracy: mean over tasks with the 95% Wilson interval over all samples (" +
         PARTIAL_NOTE.rstrip(".") + "). NIAH: " + ", ".join(table["niah_tasks"]) +
         ". Selected: fraction "
         "of causal blocks the retrieval heads read (selection report), with tokens per "
         "retrieval head. Compute sparsity: 1 - keys attended / (query heads x context) over "
         "all query heads, local and retrieval (the selection report's queries; the attention "
         "cost relative to dense is 1 - sparsity). Δacc: task accuracy minus the other "
         "mode's on the same prompts, in points, with the 95% paired bootstrap interval "
         "(prompts resampled within each task; n prompts, of which `changed` score "
         "differently)." + (f" `vs {ref}`: against the variant {ref}'s {table['mode']} on the "
                            "same prompts and held-out windows." if ref else ""), "",
         "| variant | weights | length | ppl | Δppl vs dense | task acc (%) | Δacc vs dense | "
         + (f"Δppl vs {ref} | Δacc vs {ref} | " if ref else "") +
         "NIAH acc (%) | selected | tokens/head | compute sparsity |",
         "|---|---|---|---|---|---|---|" + ("---|---|" if ref else "") + "---|---|---|---|"]
  for r in sorted(table["rows"], key=lambda r: (r["length"],)):
    d = r["ppl_vs_dense"]
    by_ref = []
    if ref:
      p = r.get("ppl_vs_ref")
      by_ref = ["-" if p is None else stats.fmt_pct_interval(p["rel"], p["lo"], p["hi"], 2),
                diff(r.get("acc_vs_ref"))]
    out.append(" | ".join([
        f"| {r['name']}", r["weights"], _size(r["length"]),
        "-" if r["ppl"] is None else f"{r['ppl']:.3f}",
        "-" if d is None else stats.fmt_pct_interval(d["rel"], d["lo"], d["hi"], 2),
        acc(r["accuracy"]), diff(r.get("acc_vs_dense")), *by_ref, acc(r["niah"]),
        "-" if r["selected_fraction"] is None else f"{100 * r['selected_fraction']:.1f}%",
        ("-" if r["tokens_per_head"] is None else f"{r['tokens_per_head']:.0f}") + (
            f" (budget {r['topk_budget']})" if r.get("topk_budget") else ""),
        "-" if r.get("compute_sparsity") is None else f"{100 * r['compute_sparsity']:.1f}%",
    ]) + " |")
  return "\n".join(out) + "\n"


def write_compare(table: dict, out_dir: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "variants.json"), os.path.join(out_dir, "variants.md")]
  atomic_write(paths[0], (json.dumps(table, indent=1) + "\n").encode())
  atomic_write(paths[1], compare_markdown(table).encode())
  return paths


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(
      description="Merge evaluation runs and re-render the report, or compare variants.")
  ap.add_argument("results", nargs="*", help="results.json files (or run folders) to merge")
  ap.add_argument("--out_dir", "--out", dest="out_dir", required=True)
  ap.add_argument("--notes", default="", help="a Markdown file appended as the Notes section")
  ap.add_argument("--compare", nargs="+", metavar="NAME=DIR", default=None,
                  help="variants table: name=run folder (or results.json) per variant")
  ap.add_argument("--baseline", default="",
                  help="with --compare: the run holding dense (and streaming), merged into "
                  "variants run without it")
  ap.add_argument("--reference", default=None, metavar="NAME",
                  help="with --compare: a variant the others are also paired against "
                  "(perplexity on the same windows, accuracy on the same prompts)")
  args = ap.parse_args(argv)
  if args.compare:
    variants = {}
    for item in args.compare:
      name, sep, path = item.partition("=")
      if not sep or not name or not path:
        ap.error(f"--compare takes NAME=DIR, got {item!r}")
      variants[name] = load_run(path)
    if args.reference is not None and args.reference not in variants:
      ap.error(f"--reference {args.reference!r} is not one of the --compare names "
               f"{sorted(variants)}")
    table = compare(variants, load_run(args.baseline) if args.baseline else None,
                    reference=args.reference)
    for path in write_compare(table, args.out_dir):
      print(path)
    return
  if not args.results:
    ap.error("give results.json files to merge, or --compare")
  parts = [load_run(p) for p in args.results]
  results = merge(parts) if len(parts) > 1 else parts[0]
  if args.notes:
    with open(args.notes) as f:
      results["meta"]["notes"] = f.read().strip()
  for path in write(results, args.out_dir):
    print(path)


if __name__ == "__main__":
  main()
