"""The training loop shared by every stage: a pure, sharded, jitted step with gradient
accumulation, orbax checkpoints with exact resume, and metrics.

The model is split once (`ParamSplit`) into a flat dict of trainable arrays and a flat dict
of frozen arrays; the step merges them back into an nnx module inside `jax.jit`
(nnx.split / nnx.merge around a pure function). Both dicts, the optimiser state and each
batch are placed by the logical-axis table of `rtpurbo_jax.sharding`, and the jitted step
has explicit in/out shardings.

A `Task` says what a stage computes:
  prepare(model, micro_batch, rng) -> aux     outside the gradient (e.g. the stage-1 teacher)
  loss(model, micro_batch, aux, rng) -> (loss_sum, weight, metric_sums)
The step sums loss, weight, metric sums and gradients over the micro-batches of a global
batch and divides by the total weight: accumulation equals one large batch exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rtpurbo_jax import sharding as shd
from rtpurbo_jax.files import atomic_write_json
from rtpurbo_jax.train import checkpoint as ckpt_lib
from rtpurbo_jax.train.metrics import MetricsLogger
from rtpurbo_jax.train.optim import make_optimizer

log = logging.getLogger(__name__)


def _key(path) -> str:
  return "/".join(str(p) for p in path)


class ParamSplit:
  """A model's variables as two flat {name: array} dicts: trainable (matching `wrt`) and
  frozen (everything else), plus the abstract structure to merge them back."""

  def __init__(self, model: nnx.Module, wrt):
    self.graphdef, tr, fr = nnx.split(model, wrt, ...)
    self._tr = {_key(p): (p, _abstract_var(v)) for p, v in nnx.to_flat_state(tr)}
    self._fr = {_key(p): (p, _abstract_var(v)) for p, v in nnx.to_flat_state(fr)}
    if not self._tr:
      raise ValueError("no trainable parameters match this stage's filter")

  def values(self, model) -> tuple[dict, dict]:
    flat = {_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    missing = sorted((set(self._tr) | set(self._fr)) - set(flat))
    if missing:
      raise ValueError(f"model lacks variables {missing[:4]} of the split it was given")
    return ({k: flat[k] for k in self._tr}, {k: flat[k] for k in self._fr})

  def _state(self, table, values):
    return nnx.from_flat_state([(p, v.replace(values[k])) for k, (p, v) in table.items()])

  def merge(self, trainable: dict, frozen: dict) -> nnx.Module:
    return nnx.merge(self.graphdef, self._state(self._tr, trainable),
                     self._state(self._fr, frozen))

  def write_back(self, model: nnx.Module, trainable: dict) -> None:
    """Copy trained values into `model` (same structure as the split one)."""
    nnx.update(model, self._state(self._tr, trainable))

  def axes(self, which: str) -> dict:
    table = self._tr if which == "trainable" else self._fr
    return {k: v.get_metadata().get("out_sharding") for k, (_, v) in table.items()}

  def shardings(self, which: str, mesh, values: dict) -> dict:
    axes = self.axes(which)
    return {k: shd.named_sharding(mesh, axes[k], values[k].shape) for k in values}


def _abstract_var(v: nnx.Variable) -> nnx.Variable:
  x = v.get_value()
  return v.replace(jax.ShapeDtypeStruct(x.shape, x.dtype))


@dataclasses.dataclass
class Task:
  """One stage's computation (see the module docstring)."""

  name: str
  split: ParamSplit
  loss: Callable[..., tuple[jax.Array, jax.Array, dict]]
  prepare: Callable[..., Any] | None = None
  # Logical axes of each batch field per example, e.g. {"ids": ("seq",)}.
  batch_axes: dict = dataclasses.field(default_factory=lambda: {"ids": ("seq",)})
  tokens_per_example: int = 0
  # Extra fingerprint entries (e.g. the teacher data), compared on resume.
  fingerprint_extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunOptions:
  """Loop-level knobs (from `cfg.train` and the stage's section)."""

  ckpt_dir: str
  workdir: str
  seed: int = 0
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  log_every: int = 10
  progress: bool = True
  config_json: str = "{}"


def write_run_config(workdir: str, config_json: str) -> None:
  """<workdir>/config.json (process 0, atomically). Written once a run is accepted (its
  checkpoints match), so a refused run leaves the config of the run that wrote them."""
  if jax.process_index():
    return
  atomic_write_json(os.path.join(workdir, "config.json"), json.loads(config_json))


class Trainer:
  """Builds the sharded step for a task and runs it with checkpoints and metrics."""

  def __init__(self, task: Task, model: nnx.Module, opts, run: RunOptions, mesh):
    self.task, self.model, self.opts, self.run, self.mesh = task, model, opts, run, mesh
    if opts.batch_size % opts.micro_batch:
      raise ValueError(f"{task.name}.batch_size={opts.batch_size} is not a multiple of "
                       f"micro_batch={opts.micro_batch}")
    self.accum = opts.batch_size // opts.micro_batch
    split = task.split
    tr, fr = split.values(model)
    self.tx, self.schedule = make_optimizer(opts, tr)
    self.tr_sh = split.shardings("trainable", mesh, tr)
    self.fr_sh = split.shardings("frozen", mesh, fr)
    self.repl = NamedSharding(mesh, P())
    opt_shape = jax.eval_shape(self.tx.init, tr)
    self.opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, opt_shape, self.tr_sh,
                                        transform_non_params=lambda _: self.repl)
    # A copy: the step donates its trainable buffers, which must not be the model's own.
    self.trainable = jax.device_put(tr, self.tr_sh, may_alias=False)
    self.frozen = jax.device_put(fr, self.fr_sh)
    self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sh)(self.trainable)
    self.fingerprint = ckpt_lib.fingerprint(task.name, model, tr)
    self.fingerprint.update(task.fingerprint_extra)
    self._step_fns: dict = {}

  # -- the step ----------------------------------------------------------------

  def _build(self, batch_shardings):
    task, split, tx, sched, accum = self.task, self.task.split, self.tx, self.schedule, self.accum
    base = jax.random.key(self.run.seed)

    def step_fn(tr, opt_state, fr, batch, step):
      rng = jax.random.fold_in(base, step)

      def micro(gsum, xs):
        mb, i = xs
        r = jax.random.fold_in(rng, i)
        aux = task.prepare(split.merge(tr, fr), mb, r) if task.prepare else None

        def f(t):
          l, w, ms = task.loss(split.merge(t, fr), mb, aux, r)
          return l, (w, ms)

        (l, (w, ms)), g = jax.value_and_grad(f, has_aux=True)(tr)
        gsum = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), gsum, g)
        return gsum, (l, w, ms)

      g0 = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tr)
      gsum, (ls, ws, ms) = jax.lax.scan(micro, g0, (batch, jnp.arange(accum)))
      total = jnp.maximum(jnp.sum(ws), 1e-9)
      grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), gsum, tr)
      updates, opt_state = tx.update(grads, opt_state, tr)
      tr = optax.apply_updates(tr, updates)
      metrics = {"loss": jnp.sum(ls) / total, "grad_norm": optax.tree.norm(grads),
                 "lr": sched(step), "weight": total}
      metrics.update({k: jnp.sum(v) / total for k, v in ms.items()})
      return tr, opt_state, metrics

    return jax.jit(step_fn,
                   in_shardings=(self.tr_sh, self.opt_sh, self.fr_sh, batch_shardings,
                                 self.repl),
                   out_shardings=(self.tr_sh, self.opt_sh, self.repl),
                   donate_argnums=(0, 1))

  def to_device(self, batch: dict) -> dict:
    """Host batch {name: [batch_size, ...]} -> global arrays [accum, micro_batch, ...]."""
    out = {}
    pc = jax.process_count()
    for k, v in batch.items():
      v = np.asarray(v)
      if v.shape[0] * pc != self.opts.batch_size:
        raise ValueError(f"batch field {k!r} has {v.shape[0]} rows per process; expected "
                         f"{self.opts.batch_size // pc}")
      global_shape = (self.accum, self.opts.micro_batch) + v.shape[1:]
      axes = self.task.batch_axes.get(k, (None,) * (v.ndim - 1))
      sh = shd.named_sharding(self.mesh, (None, "batch") + tuple(axes), global_shape)
      local = v.reshape((self.accum, -1) + v.shape[1:])
      out[k] = jax.make_array_from_process_local_data(sh, local, global_shape)
    return out

  def step(self, batch: dict, step: int) -> dict:
    """One optimiser step on a host batch; returns the metrics (device arrays).

    One compiled step per batch structure: a stage may omit a field (e.g. `valid` when no
    example is padded) to take a faster path.
    """
    dev = self.to_device(batch)
    key = tuple(sorted((k, v.shape) for k, v in dev.items()))
    fn = self._step_fns.get(key)
    if fn is None:
      fn = self._step_fns[key] = self._build({k: v.sharding for k, v in dev.items()})
    self.trainable, self.opt_state, metrics = fn(
        self.trainable, self.opt_state, self.frozen, dev, jnp.asarray(step, jnp.int32))
    return metrics

  # -- the loop ------------------------------------------------------------------

  def meta(self) -> dict:
    return {"fingerprint": self.fingerprint, "stage": self.task.name,
            "fingerprint_hash": ckpt_lib.fingerprint_hash(self.fingerprint),
            "config": json.loads(self.run.config_json)}

  def fit(self, data_iter, *, on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train to `opts.steps`, resuming from the latest checkpoint of `run.ckpt_dir`.

    data_iter: a grain iterator (get_state / set_state) of host batches.
    on_step(step, metrics): called after every step (1-based step count).
    Returns the per-step metrics (floats) of the steps run in this call.
    """
    run, steps = self.run, self.opts.steps
    ck = ckpt_lib.Checkpointer(run.ckpt_dir, keep=run.keep_checkpoints,
                               async_save=run.async_checkpoint)
    history: list[dict] = []
    try:
      got = ck.restore_latest(expected=self.fingerprint, trainable_like=self.trainable,
                              opt_state_like=self.opt_state, steps=steps)
      start = got[0] if got else 0
      if start:
        _, tr, opt_state, data_state, _ = got
        self.trainable, self.opt_state = tr, opt_state
        if start < steps and data_iter is None:
          raise ckpt_lib.CheckpointCorrupt(
              f"{self.task.name}: the last checkpoint was corrupt; run again to continue from "
              f"step {start}")
        if data_state is not None and hasattr(data_iter, "set_state"):
          data_iter.set_state(data_state)
        log.info("%s: resumed from step %d (%s)", self.task.name, start, run.ckpt_dir)
      write_run_config(run.workdir, run.config_json)
      if start >= steps:
        log.info("%s: already trained (%d steps)", self.task.name, start)
        return history
      logger = MetricsLogger(run.workdir, self.task.name, total_steps=steps, start_step=start,
                             tokens_per_step=self.task.tokens_per_example * self.opts.batch_size,
                             log_every=run.log_every, progress=run.progress)
      try:
        for step in range(start, steps):
          t_data = time.perf_counter()
          batch = next(data_iter)
          t_data = time.perf_counter() - t_data
          metrics = jax.device_get(self.step(batch, step))
          metrics = {k: float(v) for k, v in metrics.items()}
          if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"{self.task.name}: loss is {metrics['loss']} at step "
                                     f"{step + 1}; last good checkpoint is kept in "
                                     f"{run.ckpt_dir}")
          history.append(metrics)
          done = step + 1
          logger.step(done, metrics, data_seconds=t_data)
          if done % max(run.checkpoint_every, 1) == 0 or done == steps:
            state = data_iter.get_state() if hasattr(data_iter, "get_state") else None
            ck.save(done, trainable=self.trainable, opt_state=self.opt_state,
                    data_state=state, meta=self.meta())
          if on_step is not None:
            on_step(done, metrics)
      finally:
        logger.close()
    finally:
      ck.close()
    return history

  def finish(self) -> nnx.Module:
    """Write the trained values back into the model and return it."""
    self.task.split.write_back(self.model, self.trainable)
    return self.model
