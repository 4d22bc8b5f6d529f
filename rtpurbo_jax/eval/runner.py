"""The evaluation run: every task x length x mode, perplexity, and decode sparsity.

    results = evaluate(model, codec, plan, settings, sparse=sparse, corpus=corpus)

One set of weights is rebuilt per mode with `to_rtpurbo` (dense / rtpurbo / streaming / topk).
Per context length: the task prompts are right-padded to one length (one compilation per
mode and length); rtpurbo and topk share each prefill (their prefill is identical: local heads
sinks + window, retrieval heads dense) and differ in decode only. Perplexity and the selection
report run on held-out windows of the same length.

`run_from_config(cfg)` builds the model, tokenizer and head plan from a run config
(configs/*.py + the `eval` section) and calls `evaluate`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time

import jax
import numpy as np

from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ConfigError, SparseConfig, parse_size
from rtpurbo_jax.eval import perplexity as ppl_lib
from rtpurbo_jax.eval import scoring, sparsity
from rtpurbo_jax.eval.corpus import ByteCodec, Corpus, HFCodec
from rtpurbo_jax.eval.decode import GreedyDecoder
from rtpurbo_jax.eval.tasks import TASKS, TaskContext, make_examples

MODES = ("dense", "rtpurbo", "streaming", "topk")
DEFAULT_TASKS = ("passkey", "niah_single", "niah_multikey", "variable_tracking", "common_words")
# Modes whose prefill (and cache layout) is the same: one prefill serves all of them.
_PREFILL_CLASS = {"dense": "dense", "streaming": "streaming", "rtpurbo": "indexed",
                  "topk": "indexed"}


def _split(text) -> list[str]:
  if isinstance(text, (list, tuple)):
    return [str(x).strip() for x in text if str(x).strip()]
  return [x.strip() for x in str(text).split(",") if x.strip()]


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What to run. lengths are in tokens (prompt + answer); depths in [0, 1]."""

  lengths: tuple[int, ...] = (2048,)
  modes: tuple[str, ...] = MODES
  tasks: tuple[str, ...] = DEFAULT_TASKS
  # Per task and length: one count, or one per length. Sample i sits at depths[i % len].
  samples: tuple[int, ...] = (2,)
  depths: tuple[float, ...] = (0.1, 0.5, 0.9)
  seed: int = 0
  out_dir: str = "eval_results"
  ppl_lengths: tuple[int, ...] = ()  # () = every length
  ppl_samples: int = 1  # held-out windows per length
  sparsity_queries: int = 32  # sampled query positions for the selection report
  batch: int = 1
  prefill_chunk: int = 1024  # task prompts are prefilled in chunks (eval/decode.py)

  def __post_init__(self):
    if not self.lengths:
      raise ConfigError("eval.lengths is empty")
    for m in self.modes:
      if m not in MODES:
        raise ConfigError(f"eval.modes: unknown mode {m!r}; expected some of {MODES}")
    for t in self.tasks:
      if t not in TASKS:
        raise ConfigError(f"eval.tasks: unknown task {t!r}; expected some of {sorted(TASKS)}")
    for d in self.depths:
      if not 0.0 <= d <= 1.0:
        raise ConfigError(f"eval.depths: {d} is outside [0, 1]")
    if len(self.samples) not in (1, len(self.lengths)) or min(self.samples) < 0:
      raise ConfigError(f"eval.samples={self.samples}: one count >= 0, or one per length "
                        f"({len(self.lengths)})")
    for name in ("ppl_samples", "sparsity_queries", "batch", "prefill_chunk"):
      if getattr(self, name) < (0 if name == "ppl_samples" else 1):
        raise ConfigError(f"eval.{name}={getattr(self, name)} is out of range")
    if not self.modes:
      raise ConfigError("eval.modes is empty")

  @classmethod
  def from_config(cls, ec) -> "EvalSettings":
    """From the `eval` section of a run config (sizes like "4K", comma-separated lists)."""
    lengths = tuple(parse_size(x) for x in _split(ec.lengths))
    ppl = tuple(parse_size(x) for x in _split(ec.ppl_length))
    try:
      depths = tuple(float(x) for x in _split(ec.depths))
    except ValueError:
      raise ConfigError(f"eval.depths={ec.depths!r}: expected numbers like 0.1,0.5,0.9") from None
    try:
      samples = tuple(int(x) for x in _split(ec.samples))
    except ValueError:
      raise ConfigError(f"eval.samples={ec.samples!r}: expected a count or one per length, "
                        "e.g. 4 or 4,2,1") from None
    return cls(lengths=lengths, modes=tuple(_split(ec.modes)), tasks=tuple(_split(ec.tasks)),
               samples=samples, depths=depths, seed=int(ec.seed),
               out_dir=str(ec.out_dir), ppl_lengths=ppl, ppl_samples=int(ec.ppl_samples),
               sparsity_queries=int(ec.sparsity_queries), batch=int(ec.batch))

  def samples_at(self, length: int) -> int:
    return self.samples[0] if len(self.samples) == 1 else self.samples[
        self.lengths.index(length)]

  def perplexity_at(self, length: int) -> bool:
    return self.ppl_samples > 0 and (not self.ppl_lengths or length in self.ppl_lengths)


def mode_models(model, plan: HeadPlan, sparse: SparseConfig, modes) -> dict:
  """{mode: the model rebuilt in that mode}, same weights, same plan and indexer."""
  from rtpurbo_jax.convert import to_rtpurbo
  fields = dataclasses.asdict(sparse)
  fields.pop("mode")
  return {m: to_rtpurbo(model, plan, mode=m, **fields) for m in modes}


def _eos_ids(model) -> set[int]:
  eos = model.cfg.eos_token_id
  if eos is None:
    return set()
  return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _completion(codec, toks, eos: set[int]) -> str:
  out = []
  for t in toks:
    if int(t) in eos:
      break
    out.append(int(t))
  return codec.decode(out)


class _Progress:
  def __init__(self, total: int, enabled: bool):
    self.bar = None
    if enabled:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

  def step(self, desc: str, n: int = 1):
    if self.bar is not None:
      self.bar.set_description(desc, refresh=False)
      self.bar.update(n)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _work_units(settings: EvalSettings) -> int:
  classes = {_PREFILL_CLASS[m] for m in settings.modes}
  total = 0
  for length in settings.lengths:
    total += len(settings.tasks) * -(-settings.samples_at(length) // settings.batch) * len(
        classes)
    total += len(settings.modes) if settings.perplexity_at(length) else 0
    total += any(m in sparsity.SELECTING_MODES for m in settings.modes)
  return total


class _Suite:
  """The models of one run (a mode each) and the jitted functions built on them."""

  def __init__(self, model, codec, plan, settings: EvalSettings, sparse: SparseConfig, bar):
    self.settings, self.codec, self.bar = settings, codec, bar
    self.models = mode_models(model, plan, sparse, settings.modes)
    self.decoders = {m: GreedyDecoder(self.models[m], settings.prefill_chunk)
                     for m in settings.modes}
    self.nll_fns = {m: ppl_lib.make_nll_fn(self.models[m], sparse.chunk_size)
                    for m in settings.modes}
    self.eos = _eos_ids(model)
    # One prefill per class of modes with the same prefill and cache layout.
    self.owners: dict[str, list[str]] = {}
    for m in settings.modes:
      self.owners.setdefault(_PREFILL_CLASS[m], []).append(m)

  def tasks(self, length: int, examples) -> tuple[list[dict], dict]:
    """Greedy answers of every mode to `examples`; (example records, decode sparsity)."""
    codec, modes, batch = self.codec, self.settings.modes, self.settings.batch
    encoded = [np.asarray(codec.encode(e.prompt), np.int32) for e in examples]
    pad_to = max((len(x) for x in encoded), default=0)
    frac_sum: dict[str, dict[int, np.ndarray]] = {}
    frac_n: dict[str, int] = {}
    records = []
    for task in self.settings.tasks:
      idx = [i for i, e in enumerate(examples) if e.task == task]
      for b0 in range(0, len(idx), batch):
        rows = idx[b0:b0 + batch]
        ids = np.zeros((len(rows), pad_to), np.int32)
        lens = np.asarray([len(encoded[i]) for i in rows], np.int32)
        for r, i in enumerate(rows):
          ids[r, :lens[r]] = encoded[i]
        steps = max(examples[i].max_new_tokens for i in rows)
        max_len = max(length, int(lens.max()) + steps)
        preds = {}
        for cls_modes in self.owners.values():
          first, cache = self.decoders[cls_modes[0]].prefill(ids, lens, max_len)
          for m in cls_modes:
            toks, fr = self.decoders[m].decode(first, cache, steps)
            preds[m] = [_completion(codec, toks[r, :examples[i].max_new_tokens], self.eos)
                        for r, i in enumerate(rows)]
            if fr:
              acc = frac_sum.setdefault(m, {})
              for layer, f in fr.items():
                acc[layer] = acc.get(layer, 0.0) + f * len(rows)
              frac_n[m] = frac_n.get(m, 0) + len(rows)
          self.bar.step(f"{length} {task} {'/'.join(cls_modes)}")
        for r, i in enumerate(rows):
          e = examples[i]
          records.append({
              "task": e.task, "length": length, "depth": e.depth, "index": e.index,
              "prompt_tokens": int(lens[r]), "answers": list(e.answers), "rule": e.rule,
              "predictions": {m: preds[m][r] for m in modes},
              "scores": {m: scoring.score(e.rule, preds[m][r], e.answers) for m in modes},
          })
    decode = {m: _decode_summary(self.models[m], acc, frac_n[m]) for m, acc in frac_sum.items()}
    return records, decode

  def perplexity(self, length: int, windows) -> dict:
    """{mode: {ppl, ppl_tail, tokens, windows}} on held-out windows [n, length]."""
    out = {}
    for m in self.settings.modes:
      sq = np.ones(windows.shape, bool) if ppl_lib.decode_style(m) else None
      nll = np.asarray(self.nll_fns[m](windows, sq))
      out[m] = {"ppl": ppl_lib.perplexity(nll), "ppl_tail": ppl_lib.perplexity(nll, length // 2),
                "tokens": int(nll.size), "windows": int(windows.shape[0])}
      self.bar.step(f"{length} perplexity {m}")
    return out

  def sparsity(self, length: int, window) -> dict:
    """{mode: selection report} for the selecting modes, on one window [1, length]."""
    selecting = {m: self.models[m] for m in self.settings.modes
                 if m in sparsity.SELECTING_MODES}
    if not selecting:
      return {}
    qpos = sparsity.query_positions(length, self.settings.sparsity_queries, self.settings.seed)
    # rtpurbo and topk share the prefill: one forward pass serves both reports.
    reports = sparsity.selection_reports(selecting, window, qpos)
    self.bar.step(f"{length} sparsity {'/'.join(selecting)}")
    return reports


def evaluate(model, codec, plan: HeadPlan, settings: EvalSettings, *, sparse: SparseConfig,
             corpus: Corpus, progress: bool = True, meta: dict | None = None) -> dict:
  """Run the suite; returns the JSON-ready results (see report.py for the layout)."""
  t_start = time.time()
  bar = _Progress(_work_units(settings), progress)
  suite = _Suite(model, codec, plan, settings, sparse, bar)
  ctx = TaskContext(codec, corpus)
  examples_out, ppl_out, sparsity_out, decode_out = [], {}, {}, {}
  timings: dict[str, float] = {}
  try:
    for length in settings.lengths:
      t0 = time.time()
      examples = [e for t in settings.tasks
                  for e in make_examples(ctx, t, length, settings.depths,
                                         settings.samples_at(length), settings.seed)]
      records, decode = suite.tasks(length, examples)
      examples_out += records
      for m, d in decode.items():
        decode_out.setdefault(m, {})[str(length)] = d
      windows = ppl_lib.heldout_windows(codec, corpus.heldout_text(), length,
                                        max(settings.ppl_samples, 1), settings.seed)
      if settings.perplexity_at(length):
        for m, r in suite.perplexity(length, windows).items():
          ppl_out.setdefault(m, {})[str(length)] = r
      for m, r in suite.sparsity(length, windows[:1]).items():
        sparsity_out.setdefault(m, {})[str(length)] = r
      timings[str(length)] = round(time.time() - t0, 1)
  finally:
    bar.close()
  results = {
      "meta": dict(meta or {}),
      "settings": dataclasses.asdict(settings),
      "sparse": dataclasses.asdict(sparse),
      "plan": plan.summary(),
      "examples": examples_out,
      "perplexity": ppl_out,
      "sparsity": sparsity_out,
      "decode_sparsity": decode_out,
  }
  results["meta"].update(
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
      jax=jax.__version__, seconds=round(time.time() - t_start, 1), seconds_per_length=timings)
  results["accuracy"] = accuracy_table(examples_out, settings.modes, settings.tasks,
                                       settings.lengths)
  return results


def _decode_summary(model, acc: dict, n: int) -> dict:
  """Mean selected fraction over the decode steps of the task answers, per head and overall."""
  heads = []
  for layer in sorted(acc):
    for j, h in enumerate(model.layers[layer].attn.heads.retrieval):
      heads.append({"layer": int(layer), "head": int(h), "fraction": float(acc[layer][j] / n)})
  mean = float(np.mean([h["fraction"] for h in heads])) if heads else 0.0
  return {"selected_fraction": mean, "sparsity": 1.0 - mean, "heads": heads}


def accuracy_table(examples: list[dict], modes, tasks, lengths) -> dict:
  """{"scores": {mode: {task: {length: mean score}}}} with task "average" (the mean over the
  tasks run at that length), and {mode: {task: {length: {depth: mean}}}} under "by_depth"."""
  table: dict = {}
  by_depth: dict = {}
  for m in modes:
    for t in tasks:
      for length in lengths:
        rows = [e for e in examples if e["task"] == t and e["length"] == length]
        if not rows:
          continue
        table.setdefault(m, {}).setdefault(t, {})[str(length)] = float(
            np.mean([e["scores"][m] for e in rows]))
        for d in sorted({e["depth"] for e in rows if e["depth"] is not None}):
          sel = [e["scores"][m] for e in rows if e["depth"] == d]
          by_depth.setdefault(m, {}).setdefault(t, {}).setdefault(str(length), {})[str(d)] = (
              float(np.mean(sel)))
    if m in table:
      avg = {}
      for length in lengths:
        vals = [table[m][t][str(length)] for t in table[m] if str(length) in table[m][t]]
        if vals:
          avg[str(length)] = float(np.mean(vals))
      table[m]["average"] = avg
  return {"scores": table, "by_depth": by_depth}


# ---------------------------------------------------------------------------
# From a run config.


def model_name(cfg) -> str:
  """What the evaluation runs: `eval.model`, else `model_path` ("" = random init)."""
  return cfg.eval.model or cfg.model_path


def load_model(cfg):
  """(model, codec) from `model_name(cfg)` (HF folder or registered name) or random init."""
  name = model_name(cfg)
  if name:
    import rtpurbo_jax
    model = rtpurbo_jax.from_pretrained(name, dtype=cfg.dtype)
    return model, HFCodec(rtpurbo_jax.load_tokenizer(name))
  from flax import nnx

  from rtpurbo_jax.config import model_config_from
  from rtpurbo_jax.models.transformer import Transformer
  mc = model_config_from(cfg.model)
  codec = ByteCodec()
  if mc.vocab_size < codec.offset + 256:
    raise ConfigError(f"model.vocab_size={mc.vocab_size} is too small for the byte-level "
                      f"tokenizer of a random-init model (needs >= {codec.offset + 256})")
  return Transformer(mc, dtype=cfg.dtype, rngs=nnx.Rngs(cfg.seed)), codec


def resolve_plan(cfg, model, codec, corpus: Corpus) -> tuple[HeadPlan, str, dict | None]:
  """(plan, where it came from, calibration record or None): plan.path, else the model's
  headwise_config, else a needle calibration of the dense model (`rtpurbo_jax.calibrate` on a
  document of haystack text, `train.calibrate` settings)."""
  from rtpurbo_jax.attention.plan import load_headwise_config
  if cfg.plan.path:
    plan, _ = HeadPlan.from_headwise_config(load_headwise_config(cfg.plan.path),
                                            model.cfg.num_kv_heads)
    plan.check(model.cfg)
    return plan, f"plan.path ({os.path.basename(cfg.plan.path.rstrip(os.sep))})", None
  if model.plan.mask().any():
    return model.plan, "the model's headwise_config", None
  import jax.numpy as jnp
  try:
    from rtpurbo_jax import calibrate as calib
  except ImportError:
    raise ConfigError("no head plan: the model has no headwise_config and rtpurbo_jax.calibrate "
                      "is unavailable; set plan.path to a headwise_config JSON") from None
  c = cfg.train.calibrate
  length, n, seed = int(c.length), int(c.needle_len), int(c.seed)
  rng = np.random.default_rng([seed, length])
  doc = codec.encode("\n".join(corpus.haystack_lines(rng, codec, length + 64)[0]))
  needle = codec.encode("\n".join(corpus.haystack_lines(rng, codec, n + 64)[0]))[:n]
  ids, span = calib.make_needle_document(doc, needle, length)
  plan, scores = calib.calibrate(model, jnp.asarray(ids)[None], span, cfg.plan.retrieval_ratio)
  record = {"length": length, "needle_len": n, "seed": seed, "needle_span": [int(x) for x in span],
            "retrieval_ratio": cfg.plan.retrieval_ratio,
            "scores": np.asarray(scores).round(6).tolist()}
  return plan, (f"needle calibration ({length} tokens of haystack text, ratio "
                f"{cfg.plan.retrieval_ratio})"), record


def run_from_config(cfg, *, progress: bool = True, corpus: Corpus | None = None) -> dict:
  """Build everything from a validated run config and evaluate."""
  from rtpurbo_jax.config import sparse_config_from
  settings = EvalSettings.from_config(cfg.eval)
  sparse = sparse_config_from(cfg.sparse)
  corpus = corpus or Corpus.shakespeare()
  model, codec = load_model(cfg)
  plan, source, calibration = resolve_plan(cfg, model, codec, corpus)
  if calibration is not None:
    # Keep the plan: later runs (other lengths) pass it back with --config.plan.path.
    os.makedirs(settings.out_dir, exist_ok=True)
    path = os.path.join(settings.out_dir, "plan.json")
    with open(path + ".partial", "w") as f:
      json.dump({"headwise_config": plan.to_headwise_config(sparse), "calibration": calibration,
                 "summary": plan.summary()}, f, indent=1)
    os.replace(path + ".partial", path)
  meta = {"name": cfg.name, "model": model_name(cfg) or "random init (config.model)",
          "plan_source": source, "dtype": cfg.dtype,
          "indexer": "trained" if _has_trained_indexer(model, plan) else "rotary init"}
  return evaluate(model, codec, plan, settings, sparse=sparse, corpus=corpus, progress=progress,
                  meta=meta)


def _has_trained_indexer(model, plan: HeadPlan) -> bool:
  """True when the model carries indexer weights for this plan that differ from rotary init."""
  from rtpurbo_jax.attention.indexer import rotary_init
  if model.plan != plan:
    return False
  for layer in model.layers:
    n = len(layer.attn.heads.retrieval)
    if n:
      w = np.asarray(layer.attn.indexer_wq[...])
      init = rotary_init(n, w.shape[1], w.shape[2])
      if not np.allclose(w, init):
        return True
  return False
