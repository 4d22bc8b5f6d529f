"""The evaluation run: every task x length x mode, perplexity, and decode sparsity.

    results = evaluate(model, codec, plan, settings, sparse=sparse, corpus=corpus,
                       baseline=baseline)

The modes are models rebuilt with `to_rtpurbo`: `dense` and `streaming` from the baseline
weights (`eval.baseline_model`, e.g. the original model), `rtpurbo` and `topk` from the
evaluated weights (`eval.model`, e.g. a stage-2 fine-tuned backbone + indexer); all share
the plan. Per context length, in this order:

  1. selection reports on the held-out windows: rtpurbo's mean tokens per retrieval head sets
     topk's *binding* budget (`eval.topk_budget=binding`: rounded up to whole blocks, so both
     read about the same number of tokens), then topk's own report;
  2. the task prompts, all right-padded to `length` tokens and run in batches of `eval.batch`
     rows (the last batch filled with copies), one prefill per class of modes with the same
     prefill (rtpurbo and topk share theirs) and one compiled decode loop of `decode_steps`
     per mode: a handful of compilations per length;
  3. perplexity on the held-out windows (per-window nll kept for the paired bootstrap).

Results are handed to `on_length` after every length (the CLI writes the files then), so a
killed run keeps what it finished. Task prompts of the next lengths are generated on a
background thread while the device works.

`run_from_config(cfg)` builds the models, tokenizer and head plan from a run config
(configs/*.py + the `eval` section) and calls `evaluate`; `reproduce(cfg, path)` reruns the
settings recorded in a results.json and checks predictions and perplexities against it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import os
import threading
import time

import jax
import numpy as np

from rtpurbo_jax import loading
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ConfigError, SparseConfig, parse_size, run_config
from rtpurbo_jax.eval import perplexity as ppl_lib
from rtpurbo_jax.eval import scoring, sparsity, stats
from rtpurbo_jax.eval.corpus import PPL_TEXTS, ByteCodec, Corpus, HFCodec
from rtpurbo_jax.eval.decode import GreedyDecoder
from rtpurbo_jax.eval.tasks import TASKS, TaskContext, make_examples
from rtpurbo_jax.files import atomic_write_json

MODES = ("dense", "rtpurbo", "streaming", "topk")
DEFAULT_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue",
                 "variable_tracking", "common_words")
# Modes whose prefill (and cache layout) is the same: one prefill serves all of them.
_PREFILL_CLASS = {"dense": "dense", "streaming": "streaming", "rtpurbo": "indexed",
                  "topk": "indexed"}
# Modes run on the baseline weights; the others on the evaluated model's.
BASELINE_MODES = ("dense", "streaming")
N_BOOT = 2000  # bootstrap resamples of the perplexity intervals


def _split(text) -> list[str]:
  if isinstance(text, (list, tuple)):
    return [str(x).strip() for x in text if str(x).strip()]
  return [x.strip() for x in str(text).split(",") if x.strip()]


def parse_topk_budget(value) -> int | str:
  """"binding" (topk reads what rtpurbo reads) or a fixed token count (an int or "4K")."""
  if isinstance(value, str) and value.strip().lower() == "binding":
    return "binding"
  try:
    n = value if isinstance(value, int) else parse_size(str(value))
  except (ConfigError, ValueError):
    raise ConfigError(f"eval.topk_budget={value!r}: expected 'binding' or a token count "
                      "like 2048 or 2K") from None
  if n < 1:
    raise ConfigError(f"eval.topk_budget={value!r} must be >= 1 token")
  return int(n)


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
  ppl_text: str = "plays"  # the held-out text: corpus.PPL_TEXTS
  sparsity_queries: int = 32  # sampled query positions for the selection report
  batch: int = 1
  prefill_chunk: int = 1024  # task prompts are prefilled in chunks (eval/decode.py)
  topk_budget: int | str = "binding"  # "binding" or tokens per retrieval head
  decode_steps: int = 0  # greedy steps per prompt; 0 = the largest max_new_tokens of the tasks

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
    for name in ("ppl_samples", "sparsity_queries", "batch", "prefill_chunk", "decode_steps"):
      if getattr(self, name) < (0 if name in ("ppl_samples", "decode_steps") else 1):
        raise ConfigError(f"eval.{name}={getattr(self, name)} is out of range")
    if not self.modes:
      raise ConfigError("eval.modes is empty")
    if self.ppl_text not in PPL_TEXTS:
      raise ConfigError(f"eval.ppl_text={self.ppl_text!r}: one of {tuple(PPL_TEXTS)}")
    object.__setattr__(self, "topk_budget", parse_topk_budget(self.topk_budget))
    short = [t for t in self.tasks if self.decode_steps and
             TASKS[t].max_new_tokens > self.decode_steps]
    if short:
      raise ConfigError(f"eval.decode_steps={self.decode_steps} is below the answer length of "
                        f"{short}")

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
               ppl_text=str(ec.ppl_text),
               sparsity_queries=int(ec.sparsity_queries), batch=int(ec.batch),
               prefill_chunk=int(ec.prefill_chunk), topk_budget=str(ec.topk_budget),
               decode_steps=int(ec.decode_steps))

  def samples_at(self, length: int) -> int:
    return self.samples[0] if len(self.samples) == 1 else self.samples[
        self.lengths.index(length)]

  def perplexity_at(self, length: int) -> bool:
    return self.ppl_samples > 0 and (not self.ppl_lengths or length in self.ppl_lengths)

  def steps(self) -> int:
    """Greedy steps per prompt: one decode-loop length for every task (one compilation)."""
    return self.decode_steps or max(TASKS[t].max_new_tokens for t in self.tasks)

  def needs_rtpurbo_report(self) -> bool:
    return "rtpurbo" in self.modes or ("topk" in self.modes and self.topk_budget == "binding")


def mode_models(model, plan: HeadPlan, sparse: SparseConfig, modes, **overrides) -> dict:
  """{mode: the model rebuilt in that mode}, same weights, same plan and indexer."""
  from rtpurbo_jax.convert import to_rtpurbo
  fields = dataclasses.asdict(sparse)
  fields.pop("mode")
  fields.update(overrides)
  return {m: to_rtpurbo(model, plan, mode=m, **fields) for m in modes}


def binding_budget(tokens_per_head: float, block_size: int) -> int:
  """topk's tokens per retrieval head at equal cost: rtpurbo's mean rounded up to blocks."""
  return max(1, int(np.ceil(tokens_per_head / block_size - 1e-9))) * block_size


def _completion(codec, toks, eos: set[int]) -> str:
  out = []
  for t in toks:
    if int(t) in eos:
      break
    out.append(int(t))
  return codec.decode(out)


class _LockedCodec:
  """A codec shared by the prompt-generating thread and the main thread: one call at a time
  (a transformers tokenizer is not safe to call concurrently)."""

  def __init__(self, codec):
    self.codec, self.lock = codec, threading.Lock()

  def encode(self, text):
    with self.lock:
      return self.codec.encode(text)

  def encode_batch(self, texts):
    with self.lock:
      return self.codec.encode_batch(texts)

  def decode(self, ids):
    with self.lock:
      return self.codec.decode(ids)


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
    n = len(settings.tasks) * settings.samples_at(length)
    total += -(-n // settings.batch) * len(classes)
    total += len(settings.modes) if settings.perplexity_at(length) else 0
    total += settings.needs_rtpurbo_report() + ("topk" in settings.modes)
  return total


class _Suite:
  """The models of one run (a mode each) and the jitted functions built on them.

  topk's model is rebuilt per length when its budget is binding (`set_topk`)."""

  def __init__(self, model, baseline, codec, plan, settings: EvalSettings, sparse: SparseConfig,
               bar):
    self.settings, self.codec, self.bar, self.plan, self.sparse = (settings, codec, bar, plan,
                                                                   sparse)
    self.source = model
    base_modes = [m for m in settings.modes if m in BASELINE_MODES]
    own_modes = [m for m in settings.modes if m not in BASELINE_MODES and m != "topk"]
    self.models = {**mode_models(baseline, plan, sparse, base_modes),
                   **mode_models(model, plan, sparse, own_modes)}
    self.decoders = {m: GreedyDecoder(self.models[m], settings.prefill_chunk)
                     for m in self.models}
    self.nll_fns = {m: ppl_lib.make_nll_fn(self.models[m], sparse.chunk_size)
                    for m in self.models}
    self.eos = set(loading.eos_ids(None, model.cfg))
    self.topk_tokens = None
    # rtpurbo measures topk's binding budget even when rtpurbo itself is not evaluated.
    self.measure = None
    if settings.needs_rtpurbo_report():
      self.measure = self.models["rtpurbo"] if "rtpurbo" in self.models else mode_models(
          model, plan, sparse, ["rtpurbo"])["rtpurbo"]
    # One prefill per class of modes with the same prefill and cache layout.
    self.owners: dict[str, list[str]] = {}
    for m in settings.modes:
      self.owners.setdefault(_PREFILL_CLASS[m], []).append(m)

  def set_topk(self, tokens: int):
    """(Re)build topk with `tokens` per retrieval head (a static part of its sparse config)."""
    if tokens == self.topk_tokens:
      return
    self.topk_tokens = tokens
    m = mode_models(self.source, self.plan, self.sparse, ["topk"], topk_tokens=int(tokens))["topk"]
    self.models["topk"] = m
    self.decoders["topk"] = GreedyDecoder(m, self.settings.prefill_chunk)
    self.nll_fns["topk"] = ppl_lib.make_nll_fn(m, self.sparse.chunk_size)

  def tasks(self, length: int, examples) -> tuple[list[dict], dict]:
    """Greedy answers of every mode to `examples`; (example records, decode sparsity).

    Every prompt of the length is right-padded to `length` tokens and the batches hold
    `settings.batch` rows (tasks mixed), so each mode compiles one prefill and one decode loop
    per length; the rows that fill the last batch are copies whose answers are dropped.
    """
    codec, modes, batch = self.codec, self.settings.modes, self.settings.batch
    steps = self.settings.steps()
    max_len = length + steps
    encoded = [np.asarray(codec.encode(e.prompt), np.int32) for e in examples]
    for e, x in zip(examples, encoded):
      if len(x) > length:
        raise ValueError(f"{e.task} prompt of {len(x)} tokens exceeds the length {length}")
    frac_sum: dict[str, dict[int, np.ndarray]] = {}
    frac_n: dict[str, int] = {}
    preds: dict[str, list] = {m: [None] * len(examples) for m in modes}
    for b0 in range(0, len(examples), batch):
      real = list(range(b0, min(b0 + batch, len(examples))))
      rows = [real[r % len(real)] for r in range(batch)]  # cycled copies fill the batch
      ids = np.zeros((batch, length), np.int32)
      lens = np.asarray([len(encoded[i]) for i in rows], np.int32)
      for r, i in enumerate(rows):
        ids[r, :lens[r]] = encoded[i]
      for cls_modes in self.owners.values():
        first, cache = self.decoders[cls_modes[0]].prefill(ids, lens, max_len)
        for m in cls_modes:
          toks, fr = self.decoders[m].decode(first, cache, steps)
          for r, i in enumerate(real):
            preds[m][i] = _completion(codec, toks[r, :examples[i].max_new_tokens], self.eos)
          if fr:
            # The sown fraction is a batch mean (fill rows included): weight by real rows.
            acc = frac_sum.setdefault(m, {})
            for layer, f in fr.items():
              acc[layer] = acc.get(layer, 0.0) + f * len(real)
            frac_n[m] = frac_n.get(m, 0) + len(real)
        del cache
        self.bar.step(f"{length} tasks {b0 // batch + 1}/{-(-len(examples) // batch)} "
                      f"{'/'.join(cls_modes)}")
    records = []
    for i, e in enumerate(examples):
      records.append({
          "task": e.task, "length": length, "depth": e.depth, "index": e.index,
          "prompt_tokens": int(len(encoded[i])), "answers": list(e.answers), "rule": e.rule,
          "predictions": {m: preds[m][i] for m in modes},
          "scores": {m: scoring.score(e.rule, preds[m][i], e.answers) for m in modes},
      })
    decode = {m: _decode_summary(self.models[m], acc, frac_n[m]) for m, acc in frac_sum.items()}
    return records, decode

  def perplexity(self, length: int, windows) -> dict:
    """{mode: {ppl, ppl_tail, tokens, windows, window_nll}} on held-out windows [n, length]."""
    out = {}
    for m in self.settings.modes:
      sq = np.ones(windows.shape, bool) if ppl_lib.decode_style(m) else None
      nll = np.asarray(self.nll_fns[m](windows, sq))
      out[m] = {"ppl": ppl_lib.perplexity(nll), "ppl_tail": ppl_lib.perplexity(nll, length // 2),
                "tokens": int(nll.size), "windows": int(windows.shape[0]),
                "window_nll": ppl_lib.window_nll(nll, length)}
      self.bar.step(f"{length} perplexity {m}")
    return out

  def selection(self, length: int, windows) -> tuple[dict, dict | None]:
    """Selection reports on the held-out windows [n, length] and topk's budget at `length`.

    Returns ({mode: report} for the evaluated selecting modes, budget record or None). rtpurbo
    is measured first: its mean tokens per retrieval head sets a binding topk budget.
    """
    st = self.settings
    qpos = sparsity.query_positions(length, st.sparsity_queries, st.seed)
    reports, budget = {}, None
    if st.needs_rtpurbo_report():
      reports["rtpurbo"] = sparsity.selection_report(self.measure, windows, qpos)
      self.bar.step(f"{length} selection rtpurbo")
    if "topk" in st.modes:
      bs = self.sparse.block_size
      if st.topk_budget == "binding":
        measured = reports["rtpurbo"]["tokens_per_head"]
        tokens = binding_budget(measured, bs)
      else:
        measured, tokens = None, int(st.topk_budget)
      self.set_topk(tokens)
      budget = {"tokens": tokens, "blocks": -(-tokens // bs), "rule": (
          "binding" if st.topk_budget == "binding" else "fixed"),
          "rtpurbo_tokens_per_head": measured}
      reports["topk"] = sparsity.selection_report(self.models["topk"], windows, qpos)
      self.bar.step(f"{length} selection topk")
    return {m: r for m, r in reports.items() if m in st.modes}, budget


def evaluate(model, codec, plan: HeadPlan, settings: EvalSettings, *, sparse: SparseConfig,
             corpus: Corpus, baseline=None, progress: bool = True, meta: dict | None = None,
             on_length=None) -> dict:
  """Run the suite; returns the JSON-ready results (see report.py for the layout).

  baseline: the weights of the dense and streaming modes (None = `model`'s); rtpurbo and topk
  run `model`. on_length(results): called with the results so far after every length.
  """
  t_start = time.time()
  bar = _Progress(_work_units(settings), progress)
  suite = _Suite(model, model if baseline is None else baseline, codec, plan, settings, sparse,
                 bar)
  locked = _LockedCodec(codec)
  suite.codec = locked
  ctx = TaskContext(locked, corpus)
  corpus.vocabulary()  # built once before the generating thread reads it
  heldout_ids = np.asarray(codec.encode(corpus.heldout_text()), np.int32)
  acc = {"examples": [], "perplexity": {}, "sparsity": {}, "decode_sparsity": {},
         "topk_budget": {}, "timings": {}, "done": []}

  def generate(length):
    return [e for t in settings.tasks
            for e in make_examples(ctx, t, length, settings.depths, settings.samples_at(length),
                                   settings.seed)]

  def assemble():
    res = {
        "meta": dict(meta or {}),
        "settings": dataclasses.asdict(settings),
        "sparse": dataclasses.asdict(sparse),
        "plan": plan.summary(),
        "plan_mask": plan.mask().astype(int).tolist(),
        "examples": list(acc["examples"]),
        "perplexity": acc["perplexity"],
        "sparsity": acc["sparsity"],
        "decode_sparsity": acc["decode_sparsity"],
        "topk_budget": acc["topk_budget"],
    }
    res["meta"].update(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
        jax=jax.__version__, seconds=round(time.time() - t_start, 1),
        seconds_per_length=dict(acc["timings"]), lengths_done=list(acc["done"]),
        complete=len(acc["done"]) == len(settings.lengths))
    res["accuracy"] = accuracy_table(res["examples"], settings.modes, settings.tasks,
                                     acc["done"])
    res["perplexity_vs_dense"] = ppl_lib.relative_to_dense(res["perplexity"], settings.seed,
                                                           N_BOOT)
    return res

  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eval-prompts")
  try:
    # Prompts of every length are generated in order on one thread, ahead of the device.
    pending = [pool.submit(generate, length) for length in settings.lengths]
    for length, fut in zip(settings.lengths, pending):
      t0 = time.time()
      windows = ppl_lib.windows_from_ids(heldout_ids, length, max(settings.ppl_samples, 1),
                                         settings.seed)
      reports, budget = suite.selection(length, windows)
      for m, r in reports.items():
        acc["sparsity"].setdefault(m, {})[str(length)] = r
      if budget is not None:
        acc["topk_budget"][str(length)] = budget
      records, decode = suite.tasks(length, fut.result())
      acc["examples"] += records
      for m, d in decode.items():
        acc["decode_sparsity"].setdefault(m, {})[str(length)] = d
      if settings.perplexity_at(length):
        for m, r in suite.perplexity(length, windows).items():
          acc["perplexity"].setdefault(m, {})[str(length)] = r
      acc["timings"][str(length)] = round(time.time() - t0, 1)
      acc["done"].append(length)
      if on_length is not None:
        on_length(assemble())
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
    bar.close()
  return assemble()


def _decode_summary(model, acc: dict, n: int) -> dict:
  """Mean selected fraction over the decode steps of the task answers, per head and overall."""
  heads = []
  for layer in sorted(acc):
    for j, h in enumerate(model.layers[layer].attn.routing.selected.heads):
      heads.append({"layer": int(layer), "head": int(h), "fraction": float(acc[layer][j] / n)})
  mean = float(np.mean([h["fraction"] for h in heads])) if heads else 0.0
  return {"selected_fraction": mean, "sparsity": 1.0 - mean, "heads": heads}


PARTIAL_RULES = ("partial",)


def accuracy_table(examples: list[dict], modes, tasks, lengths) -> dict:
  """Mean scores with 95% Wilson intervals.

  Returns {"scores": {mode: {task: {length: mean}}}, "intervals": {mode: {task: {length:
  [lo, hi]}}}, "n": {task: {length: samples}}, "by_depth": {mode: {task: {length: {depth:
  mean}}}}}. Task "average" is the mean over the tasks run at that length with the Wilson
  interval of that mean over all of the length's samples. Partial-score cells (fractions per
  sample) get the Wilson interval of the mean score (see stats.py). An example counts for a
  mode only when it holds that mode's score (merged runs may lack some).
  """
  table: dict = {}
  intervals: dict = {}
  counts: dict = {}
  by_depth: dict = {}
  for m in modes:
    for t in tasks:
      for length in lengths:
        rows = [e for e in examples if e["task"] == t and e["length"] == length
                and m in e["scores"]]
        if not rows:
          continue
        mean = float(np.mean([e["scores"][m] for e in rows]))
        table.setdefault(m, {}).setdefault(t, {})[str(length)] = mean
        intervals.setdefault(m, {}).setdefault(t, {})[str(length)] = list(
            stats.wilson(mean, len(rows)))
        counts.setdefault(t, {})[str(length)] = len(rows)
        for d in sorted({e["depth"] for e in rows if e["depth"] is not None}):
          sel = [e["scores"][m] for e in rows if e["depth"] == d]
          by_depth.setdefault(m, {}).setdefault(t, {}).setdefault(str(length), {})[str(d)] = (
              float(np.mean(sel)))
    if m in table:
      avg, avg_iv = {}, {}
      for length in lengths:
        cells = [(table[m][t][str(length)], counts[t][str(length)]) for t in tasks
                 if t in table[m] and str(length) in table[m][t]]
        if cells:
          mean = float(np.mean([v for v, _ in cells]))
          avg[str(length)] = mean
          avg_iv[str(length)] = list(stats.wilson(mean, sum(n for _, n in cells)))
      table[m]["average"] = avg
      intervals[m]["average"] = avg_iv
  for length in lengths:
    n = sum(counts[t][str(length)] for t in counts if str(length) in counts[t])
    if n:
      counts.setdefault("average", {})[str(length)] = n
  return {"scores": table, "intervals": intervals, "n": counts, "by_depth": by_depth}


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
    return loading.build_model(cfg, name), HFCodec(rtpurbo_jax.load_tokenizer(name))
  from rtpurbo_jax.config import model_config_from
  mc, codec = model_config_from(cfg.model), ByteCodec()
  if mc.vocab_size < codec.offset + 256:
    raise ConfigError(f"model.vocab_size={mc.vocab_size} is too small for the byte-level "
                      f"tokenizer of a random-init model (needs >= {codec.offset + 256})")
  return loading.build_model(cfg, "", model_cfg=mc), codec


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
    from rtpurbo_jax import calibration as calib
  except ImportError:
    raise ConfigError("no head plan: the model has no headwise_config and rtpurbo_jax.calibration "
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


def baseline_name(cfg) -> str:
  """The weights of the dense and streaming modes: `eval.baseline_model`, else `model_name`."""
  return cfg.eval.baseline_model or model_name(cfg)


def load_baseline(cfg, model):
  """The baseline model (None when it is the evaluated model's name: the same weights)."""
  name = baseline_name(cfg)
  if name == model_name(cfg):
    return None
  import rtpurbo_jax
  base = rtpurbo_jax.from_pretrained(name, dtype=cfg.dtype)
  a, b = dataclasses.asdict(base.cfg), dataclasses.asdict(model.cfg)
  diff = sorted(k for k in a if a[k] != b.get(k) and k not in ("eos_token_id", "bos_token_id"))
  if diff:
    raise ConfigError(f"eval.baseline_model={name!r} has another architecture than "
                      f"{model_name(cfg) or 'the random-init model'!r} ({', '.join(diff)})")
  return base


def run_from_config(cfg, *, progress: bool = True, corpus: Corpus | None = None,
                    plan: HeadPlan | None = None, on_length=None) -> dict:
  """Build everything from a validated run config and evaluate.

  plan: a HeadPlan or a retrieval mask [layers, heads] to use instead of resolving one
  (reproduce() passes the recorded mask).
  """
  from rtpurbo_jax.config import sparse_config_from
  settings = EvalSettings.from_config(cfg.eval)
  sparse = sparse_config_from(cfg.sparse)
  corpus = (corpus or Corpus.shakespeare()).with_heldout(settings.ppl_text)
  model, codec = load_model(cfg)
  baseline = load_baseline(cfg, model)
  calibration = None
  if plan is not None:
    if not isinstance(plan, HeadPlan):
      plan = HeadPlan.from_mask(np.asarray(plan, bool), model.cfg.num_kv_heads)
    plan.check(model.cfg)
    source = "the recorded plan (reproduce)"
  else:
    plan, source, calibration = resolve_plan(cfg, model, codec, corpus)
  if calibration is not None:
    # Keep the plan: later runs (other lengths) pass it back with --config.plan.path.
    os.makedirs(settings.out_dir, exist_ok=True)
    atomic_write_json(os.path.join(settings.out_dir, "plan.json"),
                      {"headwise_config": plan.to_headwise_config(sparse),
                       "calibration": calibration, "summary": plan.summary()})
  meta = {"name": cfg.name, "model": model_name(cfg) or "random init (config.model)",
          "baseline_model": (baseline_name(cfg) or "random init (config.model)"),
          "plan_source": source, "dtype": cfg.dtype,
          "indexer": "trained" if _has_trained_indexer(model, plan) else "rotary init"}
  config = json.loads(json.dumps(cfg.to_dict(), default=str))

  def with_config(results):
    results["config"] = config
    return results

  hook = None if on_length is None else (lambda r: on_length(with_config(r)))
  return with_config(evaluate(model, codec, plan, settings, sparse=sparse, corpus=corpus,
                              baseline=baseline, progress=progress, meta=meta, on_length=hook))


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


# ---------------------------------------------------------------------------
# Reproducing a committed run.


def _restore(dst, src: dict, generic=None, path: str = "") -> list[str]:
  """Set the recorded values `src` onto the (locked) config `dst`; returns the recorded keys
  the current schema no longer has (ignored).

  generic: the schema's own defaults (`config.run_config()`) or None. Keys of `dst` the record
  lacks (added to the schema after the run) then take their generic default, not the value a
  config file gives them now: a new setting's generic default is the behaviour the code had
  before it existed (e.g. `sparse.min_blocks` 0, where configs/smollm2_135m.py sets a floor).
  """
  import ml_collections
  is_dict = lambda x: isinstance(x, ml_collections.ConfigDict)
  if generic is not None:
    for k in dst:
      if k not in src and k in generic and not is_dict(dst[k]):
        dst[k] = generic[k]
  missing = []
  for k, v in src.items():
    if k not in dst:
      missing.append(path + k)
      continue
    cur = dst[k]
    if is_dict(cur) and isinstance(v, dict):
      sub = generic[k] if generic is not None and k in generic and is_dict(generic[k]) else None
      missing += _restore(cur, v, sub, f"{path}{k}.")
      continue
    if isinstance(cur, tuple) and isinstance(v, list):
      v = tuple(v)
    elif isinstance(cur, float) and isinstance(v, int):
      v = float(v)
    dst[k] = v
  return missing


def compare_results(ref: dict, fresh: dict, rtol: float = 1e-4) -> dict:
  """Check `fresh` against `ref` where both have data: identical predictions per example
  (task, length, sample index) and mode, perplexities (all and tail) equal to `rtol` relative,
  the same topk budget per length. Returns {"ok", "predictions", "perplexities", "mismatches"}.
  """
  ref_ex = {(e["task"], e["length"], e["index"]): e for e in ref["examples"]}
  bad, n_pred, n_ppl = [], 0, 0
  for e in fresh["examples"]:
    key = (e["task"], e["length"], e["index"])
    r = ref_ex.get(key)
    if r is None:
      bad.append(f"example {key} is not in the reference")
      continue
    for m, p in e["predictions"].items():
      if m not in r["predictions"]:
        bad.append(f"example {key}: the reference has no {m} prediction")
      elif r["predictions"][m] != p:
        bad.append(f"example {key} {m}: {p!r} != reference {r['predictions'][m]!r}")
      n_pred += 1
  for m, per_length in (fresh.get("perplexity") or {}).items():
    for length, f in per_length.items():
      r = (ref.get("perplexity") or {}).get(m, {}).get(length)
      if r is None:
        bad.append(f"perplexity {m} {length}: not in the reference")
        continue
      for k in ("ppl", "ppl_tail"):
        n_ppl += 1
        if abs(f[k] / r[k] - 1) > rtol:
          bad.append(f"perplexity {m} {length} {k}: {f[k]:.6f} vs reference {r[k]:.6f} "
                     f"({f[k] / r[k] - 1:+.2e} relative, allowed {rtol:.0e})")
  for length, b in (fresh.get("topk_budget") or {}).items():
    rb = (ref.get("topk_budget") or {}).get(length)
    if rb is not None and rb["tokens"] != b["tokens"]:
      bad.append(f"topk budget at {length}: {b['tokens']} vs reference {rb['tokens']}")
  if not n_pred and not n_ppl:
    bad.append("nothing was compared")
  return {"ok": not bad, "predictions": n_pred, "perplexities": n_ppl, "rtol": rtol,
          "mismatches": bad}


def reproduce(cfg, path: str, *, lengths=None, modes=None, rtol: float = 1e-4,
              out_dir: str | None = None, progress: bool = False) -> dict:
  """Rerun the run recorded in results.json `path` (its config, plan and settings) and compare.

  cfg: a run config (the schema; the recorded values replace its own). lengths / modes:
  optional subsets of the recorded ones (each length and mode is computed independently of
  the others, with the same shapes). out_dir: where the fresh results go (never the
  reference's own folder). Returns compare_results(...) plus "fresh" (the new results) and
  "ignored_keys" (recorded config keys unknown to this schema).
  """
  with open(path) as f:
    ref = json.load(f)
  if "config" not in ref:
    raise ConfigError(f"{path} records no run config (written before reproduce existed)")
  cfg = cfg.copy_and_resolve_references() if hasattr(cfg, "copy_and_resolve_references") else cfg
  cli_out = out_dir or cfg.eval.out_dir
  ignored = _restore(cfg, ref["config"], run_config())
  cfg.eval.reproduce = ""
  rec = EvalSettings.from_config(cfg.eval)
  if lengths:
    extra = [n for n in lengths if n not in rec.lengths]
    if extra:
      raise ConfigError(f"lengths {extra} are not in the recorded run {list(rec.lengths)}")
    cfg.eval.lengths = ",".join(str(n) for n in lengths)
    if len(rec.samples) > 1:
      cfg.eval.samples = ",".join(str(rec.samples_at(n)) for n in lengths)
  if modes:
    extra = [m for m in modes if m not in rec.modes]
    if extra:
      raise ConfigError(f"modes {extra} are not in the recorded run {list(rec.modes)}")
    cfg.eval.modes = ",".join(modes)
  ref_dir = os.path.realpath(os.path.dirname(os.path.abspath(path)))
  if os.path.realpath(cli_out) == ref_dir:
    cli_out = os.path.join(cli_out, "reproduce")
  cfg.eval.out_dir = cli_out
  fresh = run_from_config(cfg, progress=progress, plan=ref.get("plan_mask"))
  out = compare_results(ref, fresh, rtol)
  out.update(fresh=fresh, ignored_keys=ignored, reference=path)
  return out
