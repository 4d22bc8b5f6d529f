"""The conversion pipeline: calibrate -> stage1 -> stage2 (and plain `lm` fine-tuning).

Each stage is a function of the run config, the model and the workdir, and is restartable:
  calibrate  needle document -> head scores -> HeadPlan, saved as <workdir>/plan.json (skipped
             when that file exists);
  stage1     indexer distillation (backbone frozen, teacher = the dense model); checkpoints in
             <workdir>/ckpt/stage1;
  stage2     self-distillation in sparse mode (indexer frozen) against the dense model's top-k
             logits, precomputed once into <workdir>/teacher_top<k>/; checkpoints in
             <workdir>/ckpt/stage2;
  lm         next-token fine-tuning of every non-indexer weight; <workdir>/ckpt/lm.
A stage whose checkpoint already reached its step count only restores its weights.

Workdir layout: config.json, plan.json, calibration/, metrics/*.jsonl, tb/, ckpt/<stage>/,
teacher_top<k>/, final/ (HF format with headwise_config and the indexer).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtpurbo_jax import loading, lowrank
from rtpurbo_jax import sharding as shd
from rtpurbo_jax.attention import routing as routing_lib
from rtpurbo_jax.attention.indexer import IndexerParam
from rtpurbo_jax.attention.plan import HeadPlan, read_plan
from rtpurbo_jax.config import (ConfigError, SparseConfig, sparse_config_from,
                                validate)
from rtpurbo_jax.convert import rebuild
from rtpurbo_jax.files import atomic_write_json
from rtpurbo_jax.train import data as data_lib
from rtpurbo_jax.train import losses
from rtpurbo_jax.train.trainer import ParamSplit, RunOptions, Task, Trainer, write_run_config

log = logging.getLogger(__name__)

STAGES = ("calibrate", "stage1", "stage2", "lm")
BACKBONE = nnx.All(nnx.Param, nnx.Not(IndexerParam))


# ---------------------------------------------------------------------------
# Config helpers.


def parse_stages(spec: str) -> list[str]:
  names = [s.strip() for s in spec.split(",") if s.strip()]
  bad = [s for s in names if s not in STAGES]
  if bad or not names:
    raise ConfigError(f"train.stages={spec!r}: unknown stage(s) {bad}; use a comma-separated "
                      f"list of {STAGES}")
  return names


def validate_train(cfg) -> None:
  """One clear error for an invalid training value (beyond `config.validate`)."""
  stages = parse_stages(cfg.train.stages)
  for name in ("stage1", "stage2", "lm"):
    o = cfg.train[name]
    if name not in stages:
      continue
    for key in ("steps", "batch_size", "micro_batch", "seq_len"):
      if o[key] < 1:
        raise ConfigError(f"train.{name}.{key}={o[key]} must be >= 1")
    if o.batch_size % o.micro_batch:
      raise ConfigError(f"train.{name}.batch_size={o.batch_size} must be a multiple of "
                        f"train.{name}.micro_batch={o.micro_batch}")
    if o.batch_size % jax.process_count():
      raise ConfigError(f"train.{name}.batch_size={o.batch_size} must be a multiple of the "
                        f"{jax.process_count()} processes")
    if o.schedule not in ("cosine", "constant", "linear"):
      raise ConfigError(f"train.{name}.schedule={o.schedule!r}: cosine, constant or linear")
    if o.lr <= 0 or o.warmup < 0:
      raise ConfigError(f"train.{name}: lr must be > 0 and warmup >= 0")
  o = cfg.train.stage1
  if not 0.0 < o.query_fraction <= 1.0:
    raise ConfigError(f"train.stage1.query_fraction={o.query_fraction} must be in (0, 1]")
  if not 0 <= o.query_min_pos < o.seq_len:
    raise ConfigError(f"train.stage1.query_min_pos={o.query_min_pos} must be in "
                      f"[0, seq_len={o.seq_len})")
  if o.query_chunk < 1:
    raise ConfigError("train.stage1.query_chunk must be >= 1")
  if o.stats_stride < 1:
    raise ConfigError("train.stage1.stats_stride must be >= 1")
  if o.get("bias_lr") is not None and o.bias_lr <= 0:
    raise ConfigError(f"train.stage1.bias_lr={o.bias_lr} must be > 0 (the distance bias's "
                      "peak rate)")
  if o.objective not in losses.STAGE1_OBJECTIVES:
    raise ConfigError(f"train.stage1.objective={o.objective!r}: one of "
                      f"{', '.join(losses.STAGE1_OBJECTIVES)}")
  o = cfg.train.stage2
  if o.topk < 1:
    raise ConfigError("train.stage2.topk must be >= 1")
  lowrank.check_lora_config(o)
  needs_data = [s for s in stages if s in ("stage1", "lm")]
  if needs_data and not cfg.data.train_files:
    raise ConfigError(f"stages {needs_data} need data: set --config.data.train_files")
  if "stage2" in stages and not (cfg.data.stage2_files or cfg.data.train_files):
    raise ConfigError("stage2 needs data: set --config.data.stage2_files or data.train_files")


def pipeline_sparse(cfg) -> SparseConfig:
  """The sparse config of the converted model (mode rtpurbo unless the config says topk)."""
  sp = sparse_config_from(cfg.sparse)
  mode = sp.mode if routing_lib.selects_blocks(sp.mode) else "rtpurbo"
  return dataclasses.replace(sp, mode=mode)


def with_mode(model, mode: str, plan: HeadPlan | None = None, sparse: SparseConfig | None = None):
  sp = dataclasses.replace(sparse or model.sparse, mode=mode)
  return rebuild(model, plan=plan, sparse=sp)


def run_options(cfg, stage: str) -> RunOptions:
  t = cfg.train
  return RunOptions(ckpt_dir=os.path.join(t.workdir, "ckpt", stage), workdir=t.workdir,
                    seed=cfg.seed, checkpoint_every=t.checkpoint_every,
                    keep_checkpoints=t.keep_checkpoints, async_checkpoint=t.async_checkpoint,
                    log_every=t.log_every, progress=t.progress,
                    config_json=cfg.to_json_best_effort())


# ---------------------------------------------------------------------------
# Model, mesh, plan.


def load_model(cfg):
  """From `cfg.model_path` (HF folder or registered name) or random init from `cfg.model`."""
  return loading.build_model(cfg, cfg.model_path, sparse=sparse_config_from(cfg.sparse))


def make_mesh(cfg):
  return shd.make_mesh(dict(cfg.mesh.to_dict()))


def plan_path(cfg) -> str:
  return os.path.join(cfg.train.workdir, "plan.json")


def resolve_plan(cfg, model) -> HeadPlan:
  """The head plan: plan.path when set, else <workdir>/plan.json, else the model's own.

  Never silently another one: plan.path is refused when the workdir holds a different
  calibrated plan, and plan.json when it has another number of retrieval heads than
  plan.retrieval_ratio asks for.
  """
  calibrated = plan_path(cfg)
  if cfg.plan.path:
    if not os.path.exists(cfg.plan.path):
      raise ConfigError(f"plan.path={cfg.plan.path!r} does not exist")
    plan = _plan_file(cfg.plan.path, model)
    if os.path.exists(calibrated) and _plan_file(calibrated, model) != plan:
      raise ConfigError(f"plan.path={cfg.plan.path!r} differs from the plan calibrated in "
                        f"{calibrated}: use another train.workdir, or delete {calibrated}")
    return plan
  if os.path.exists(calibrated):
    plan = _plan_file(calibrated, model)
    _check_ratio(plan, cfg.plan.retrieval_ratio, calibrated)
    return plan
  if model.plan.mask().any():
    return model.plan
  raise ConfigError("no head plan: add 'calibrate' to train.stages, or set plan.path to a "
                    "headwise_config JSON / RTPurbo model folder")


def _plan_file(path: str, model) -> HeadPlan:
  plan, _ = read_plan(path, model.cfg.num_kv_heads)
  try:
    plan.check(model.cfg)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  return plan


def _check_ratio(plan: HeadPlan, ratio: float, path: str) -> None:
  """The calibrated plan must have the head count `HeadPlan.from_scores` gives `ratio`."""
  m = plan.mask()
  want = max(1, int(np.floor(ratio * m.size + 1e-9)))
  if int(m.sum()) != want:
    raise ConfigError(f"{path} has {int(m.sum())} of {m.size} retrieval heads but "
                      f"plan.retrieval_ratio={ratio} asks for {want}: delete {path} to "
                      "calibrate again, or use another train.workdir")


# ---------------------------------------------------------------------------
# Calibration.


def filler_text(cfg) -> str:
  if cfg.data.filler_files:
    src = data_lib.TextSource(cfg.data.filler_files, text_key=cfg.data.text_key)
    return "\n\n".join(data_lib.record_text(src[i]) for i in range(len(src)))
  from rtpurbo_jax import assets
  return assets.shakespeare_text()


def run_calibrate(cfg, model, tok) -> HeadPlan:
  """Needle-score calibration of the dense model -> HeadPlan (saved to plan.json)."""
  path = plan_path(cfg)
  if os.path.exists(path) or cfg.plan.path:
    log.info("calibrate: using %s", cfg.plan.path or path)
    return resolve_plan(cfg, model)
  c = cfg.train.calibrate
  text = filler_text(cfg)
  # The needle is a passage of the filler text from another seeded offset.
  doc = data_lib.filler_tokens(tok, text, c.length, c.seed)
  needle = data_lib.filler_tokens(tok, text, c.needle_len, c.seed + 7919)
  from rtpurbo_jax import calibration
  ids, span = calibration.make_needle_document(doc, needle, c.length)
  dense = with_mode(model, "dense")
  out_dir = os.path.join(cfg.train.workdir, "calibration")
  plan, scores = calibration.calibrate(dense, jnp.asarray(ids)[None], span,
                                       cfg.plan.retrieval_ratio, out_dir=out_dir)
  sparse = pipeline_sparse(cfg)
  atomic_write_json(path, {"headwise_config": plan.to_headwise_config(sparse),
                     "scores": np.asarray(scores).tolist(), "needle_span": list(span),
                     "length": int(c.length), "summary": plan.summary()})
  log.info("calibrate: %s", plan.summary())
  return plan


# ---------------------------------------------------------------------------
# Stage 1.


def stage1_task(split: ParamSplit, o, sparse: SparseConfig) -> Task:
  """Indexer KL against the frozen dense model (teacher pass outside the gradient)."""

  def prepare(model, mb, rng):
    queries = losses.query_positions(mb["ids"].shape[1], o.query_fraction, o.query_min_pos, rng)
    return losses.teacher_acts(model, mb["ids"]), queries

  def loss(model, mb, aux, rng):
    acts, queries = aux
    wq, wk = losses.stacked_indexer(model, acts)
    return losses.stage1_loss(wq, wk, acts, queries, chunk=o.query_chunk, top_p=sparse.top_p,
                              block_size=sparse.block_size, stats_stride=o.stats_stride,
                              objective=o.objective,
                              distance_bias=losses.stacked_distance_bias(model, acts))

  return Task("stage1", split, loss, prepare, batch_axes={"ids": ("seq",)},
              tokens_per_example=o.seq_len)


def packed_data(cfg, o, tok, files: str):
  src = data_lib.TextSource(files, text_key=cfg.data.text_key, prompt_key=cfg.data.prompt_key,
                            response_key=cfg.data.response_key)
  ds = data_lib.packed_dataset(src, tok, o.seq_len, o.batch_size // jax.process_count(),
                               seed=cfg.data.seed, add_eos=cfg.data.add_eos)
  return iter(ds)


def run_stage1(cfg, model, plan: HeadPlan, tok, mesh, *, on_step=None):
  """Train the indexer of `plan` on the model; returns the RTPurbo model (trained indexer)."""
  o = cfg.train.stage1
  sparse = pipeline_sparse(cfg)
  teacher = with_mode(model, "dense", plan=plan, sparse=sparse)
  task = stage1_task(ParamSplit(teacher, IndexerParam), o, sparse)
  trainer = Trainer(task, teacher, o, run_options(cfg, "stage1"), mesh)
  data = packed_data(cfg, o, tok, cfg.data.train_files) if _needs_training(trainer) else None
  trainer.fit(data, on_step=on_step)
  return with_mode(trainer.finish(), sparse.mode, sparse=sparse)


def _latest_step(ckpt_dir: str) -> int:
  from rtpurbo_jax.train.checkpoint import Checkpointer
  if not os.path.isdir(ckpt_dir):
    return 0
  ck = Checkpointer(ckpt_dir, async_save=False)
  try:
    return ck.latest_step() or 0
  finally:
    ck.close()


def _needs_training(trainer: Trainer) -> bool:
  return _latest_step(trainer.run.ckpt_dir) < trainer.opts.steps


def _stage_done(cfg, stage: str) -> bool:
  return _latest_step(run_options(cfg, stage).ckpt_dir) >= cfg.train[stage].steps


# ---------------------------------------------------------------------------
# Stage 2.


class TeacherStore:
  """The dense teacher's top-k logits at label positions, one .npz per shard of examples.

  Shard files are written atomically, so a killed precomputation resumes at the first
  missing shard. `meta.json` fingerprints the model and data; a mismatch is an error.
  """

  def __init__(self, directory: str, num: int, k: int, fp: dict, shard_size: int = 64):
    self.dir, self.num, self.k, self.shard_size = directory, num, k, shard_size
    os.makedirs(directory, exist_ok=True)
    meta_path = os.path.join(directory, "meta.json")
    meta = {"num": num, "k": k, "shard_size": shard_size, "fingerprint": fp}
    meta = json.loads(json.dumps(meta, default=str))
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        old = json.load(f)
      if old != meta:
        raise ConfigError(f"{directory} holds teacher logits of another model or data "
                          f"({old.get('fingerprint')} vs {meta['fingerprint']}); delete it or "
                          "use another train.workdir")
    else:
      atomic_write_json(meta_path, meta)

  def shard_path(self, s: int) -> str:
    return os.path.join(self.dir, f"shard_{s:05d}.npz")

  @property
  def num_shards(self) -> int:
    return -(-self.num // self.shard_size)

  def missing(self) -> list[int]:
    return [s for s in range(self.num_shards) if not os.path.exists(self.shard_path(s))]

  def build(self, model, examples, *, batch: int = 1, chunk: int = 512, progress: bool = True):
    """Compute the missing shards with the dense `model`."""
    todo = self.missing()
    if not todo:
      return
    graphdef, state = nnx.split(model)
    k = self.k

    @jax.jit
    def topk(state, ids, valid):
      return losses.teacher_topk(nnx.merge(graphdef, state), ids, valid=valid, k=k, chunk=chunk)

    bar = None
    if progress and jax.process_index() == 0:
      from tqdm.auto import tqdm
      total = sum(min(self.shard_size, self.num - s * self.shard_size) for s in todo)
      bar = tqdm(total=total, desc="teacher top-k", dynamic_ncols=True)
    for s in todo:
      idx = list(range(s * self.shard_size, min((s + 1) * self.shard_size, self.num)))
      pos, ids_out, logits_out, offsets = [], [], [], [0]
      for b0 in range(0, len(idx), batch):
        exs = [examples[i] for i in idx[b0:b0 + batch]]
        while len(exs) < batch:  # pad the last batch with a copy (results dropped)
          exs.append(exs[-1])
        ids = jnp.asarray(np.stack([e["ids"] for e in exs]))
        valid = np.stack([e["valid"] for e in exs])
        valid = None if valid.all() else jnp.asarray(valid)
        t_ids, t_logits = jax.device_get(topk(state, ids, valid))
        for j, e in enumerate(exs[:min(batch, len(idx) - b0)]):
          p = np.nonzero(e["labels"])[0]
          pos.append(p)
          ids_out.append(t_ids[j, p])
          logits_out.append(t_logits[j, p].astype(np.float32))
          offsets.append(offsets[-1] + len(p))
        if bar is not None:
          bar.update(min(batch, len(idx) - b0))
      if jax.process_index() == 0:
        tmp = self.shard_path(s) + ".tmp.npz"
        np.savez(tmp, positions=np.concatenate(pos).astype(np.int32),
                 ids=np.concatenate(ids_out).astype(np.int32),
                 logits=np.concatenate(logits_out), offsets=np.asarray(offsets, np.int64))
        os.replace(tmp, self.shard_path(s))
    if bar is not None:
      bar.close()

  @functools.lru_cache(maxsize=16)
  def _shard(self, s: int) -> dict:
    with np.load(self.shard_path(s)) as z:
      return {k: z[k] for k in z.files}

  def load(self, i: int, seq_len: int, labels: np.ndarray) -> dict:
    """Dense per-position arrays for example i: t_ids int32 [S, k], t_logits f32 [S, k]."""
    sh = self._shard(i // self.shard_size)
    j = i % self.shard_size
    a, b = sh["offsets"][j], sh["offsets"][j + 1]
    pos = sh["positions"][a:b]
    if not np.array_equal(pos, np.nonzero(labels)[0]):
      raise ConfigError(f"teacher logits in {self.dir} do not match example {i}'s labels "
                        "(the data changed?): delete the folder to recompute")
    t_ids = np.zeros((seq_len, self.k), np.int32)
    t_logits = np.zeros((seq_len, self.k), np.float32)
    t_ids[pos], t_logits[pos] = sh["ids"][a:b], sh["logits"][a:b]
    return {"t_ids": t_ids, "t_logits": t_logits}


def stage2_task(split: ParamSplit, o, *, remat: bool) -> Task:
  """Top-k KL on label positions; the student runs in sparse mode on those positions."""

  def loss(model, mb, aux, rng):
    # No `valid` field: no example of the batch is padded (the contiguous, faster path).
    valid = mb.get("valid")
    labels = mb["labels"] if valid is None else mb["labels"] & valid
    h = losses.hidden_states(model, mb["ids"], valid=valid, sparse_queries=labels,
                             remat=remat)
    w, tied = losses.output_rows(model)
    kl, n = losses.topk_kl(h, w, tied, mb["t_ids"], mb["t_logits"], labels,
                           chunk=o.position_chunk)
    return kl, n, {"kl": kl}

  axes = {"ids": ("seq",), "valid": ("seq",), "labels": ("seq",), "t_ids": ("seq", None),
          "t_logits": ("seq", None)}
  return Task("stage2", split, loss, None, batch_axes=axes, tokens_per_example=o.seq_len)


def drop_full_valid(batch: dict) -> dict:
  """Remove `valid` from a batch without padding, so the model takes its contiguous path."""
  if "valid" in batch and np.all(batch["valid"]):
    batch = {k: v for k, v in batch.items() if k != "valid"}
  return batch


def stage2_examples(cfg, tok):
  o = cfg.train.stage2
  files = cfg.data.stage2_files or cfg.data.train_files
  src = data_lib.TextSource(files, text_key=cfg.data.text_key, prompt_key=cfg.data.prompt_key,
                            response_key=cfg.data.response_key)
  ex = data_lib.ExampleSource(src, tok, o.seq_len, o.label_tokens, windows=o.windows)
  if o.max_examples and o.max_examples < len(ex):
    ex = data_lib.SpreadSubset(ex, o.max_examples)
  return ex, len(ex), files


def run_stage2(cfg, model, tok, mesh, *, on_step=None):
  """Self-distil the RTPurbo model (indexer frozen) from the dense `model`'s top-k logits."""
  o = cfg.train.stage2
  sparse = pipeline_sparse(cfg)
  examples, n, files = stage2_examples(cfg, tok)
  fp = {"model": dataclasses.asdict(model.cfg), "model_path": cfg.model_path,
        "dtype": cfg.dtype, "seed": cfg.seed, "files": data_lib.expand_files(files),
        "seq_len": o.seq_len, "label_tokens": o.label_tokens, "windows": o.windows,
        "tokenizer": cfg.data.tokenizer}
  store = TeacherStore(os.path.join(cfg.train.workdir, f"teacher_top{o.topk}"), n, o.topk, fp)
  student = with_mode(model, sparse.mode, sparse=sparse)
  # lora_rank > 0: train rank-r factors over the frozen model (a small backbone delta).
  split = (lowrank.LoraSplit(student, o.lora_rank, o.lora_alpha, norms=o.lora_norms,
                             seed=cfg.seed) if o.lora_rank else ParamSplit(student, BACKBONE))
  task = stage2_task(split, o, remat=cfg.train.remat)
  task.fingerprint_extra = {"teacher": json.loads(json.dumps(fp, default=str))}
  if o.lora_rank:  # the scale is not in the trainable shapes: a resume must match it too
    task.fingerprint_extra["lora"] = {"alpha": float(o.lora_alpha), "norms": bool(o.lora_norms)}
  trainer = Trainer(task, student, o, run_options(cfg, "stage2"), mesh)
  data = None
  if _needs_training(trainer):
    store.build(with_mode(model, "dense"), examples, batch=o.teacher_batch,
                chunk=o.position_chunk, progress=cfg.train.progress)

    def load(i):
      ex = examples[i]
      return {**ex, **store.load(int(i), o.seq_len, ex["labels"])}

    ds = data_lib.indexed_dataset(n, load, o.batch_size // jax.process_count(),
                                  seed=cfg.data.seed)
    data = iter(ds.map(drop_full_valid))
  trainer.fit(data, on_step=on_step)
  return trainer.finish()


# ---------------------------------------------------------------------------
# Plain LM fine-tuning.


def lm_task(split: ParamSplit, o, *, remat: bool) -> Task:

  def loss(model, mb, aux, rng):
    h = losses.hidden_states(model, mb["ids"], remat=remat)
    w, tied = losses.output_rows(model)
    nll, n = losses.lm_loss(h, w, tied, mb["ids"], None, chunk=o.position_chunk)
    return nll, n, {"nll": nll}

  return Task("lm", split, loss, None, batch_axes={"ids": ("seq",)},
              tokens_per_example=o.seq_len)


def run_lm(cfg, model, tok, mesh, *, on_step=None):
  o = cfg.train.lm
  trainer = Trainer(lm_task(ParamSplit(model, BACKBONE), o, remat=cfg.train.remat), model, o,
                    run_options(cfg, "lm"), mesh)
  data = packed_data(cfg, o, tok, cfg.data.train_files) if _needs_training(trainer) else None
  trainer.fit(data, on_step=on_step)
  return trainer.finish()


# ---------------------------------------------------------------------------
# The pipeline.


def run_pipeline(cfg, *, on_step=None):
  """Run `cfg.train.stages` in order; returns the final model (and writes <workdir>/final)."""
  validate(cfg)
  validate_train(cfg)
  stages = parse_stages(cfg.train.stages)
  workdir = cfg.train.workdir
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(cfg)
  model = shd.shard_model(load_model(cfg), mesh)
  tok = data_lib.get_tokenizer(cfg.data.tokenizer, cfg.model_path, model.cfg.vocab_size)
  sparse = pipeline_sparse(cfg)
  for stage in stages:
    log.info("stage %s", stage)
    if stage == "calibrate":
      plan = run_calibrate(cfg, model, tok)
      model = with_mode(model, sparse.mode, plan=plan, sparse=sparse)
    elif stage == "stage1":
      model = run_stage1(cfg, model, resolve_plan(cfg, model), tok, mesh, on_step=on_step)
    elif stage == "stage2":
      plan = resolve_plan(cfg, model)
      if "stage1" not in stages and _stage_done(cfg, "stage1"):
        # A stage-1 run finished in this workdir earlier: take its indexer.
        log.info("stage2: using the indexer of %s", run_options(cfg, "stage1").ckpt_dir)
        model = run_stage1(cfg, model, plan, tok, mesh)
      elif plan != model.plan:
        model = with_mode(model, sparse.mode, plan=plan, sparse=sparse)
      model = run_stage2(cfg, model, tok, mesh, on_step=on_step)
    elif stage == "lm":
      model = run_lm(cfg, model, tok, mesh, on_step=on_step)
  write_run_config(workdir, cfg.to_json_best_effort())  # the run was accepted
  if cfg.train.save_final and jax.process_index() == 0:
    final = os.path.join(workdir, "final")
    import rtpurbo_jax
    rtpurbo_jax.save_pretrained(model, final)
    log.info("saved %s", final)
  return model
