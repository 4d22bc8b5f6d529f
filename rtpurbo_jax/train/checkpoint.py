"""Training checkpoints (orbax CheckpointManager): periodic, keep-N, atomic.

One checkpoint holds, per step: the trainable parameters (a flat {name: array} dict: the
indexer in stage 1, the backbone in stage 2), the optimiser state, the data iterator's state
(grain `get_state()`, JSON), and `meta` (step, stage, the run config, and a fingerprint of
the model architecture, head plan and trainable shapes). Orbax writes each step to a
temporary folder and renames it when complete, so a run killed mid-save leaves the previous
checkpoints intact.

Before restoring anything the fingerprint is compared with the current run's: a checkpoint
of another model, plan or stage raises `CheckpointMismatch` naming what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np

from rtpurbo_jax.config import ConfigError
from rtpurbo_jax.train import data as data_lib


class CheckpointMismatch(ConfigError):
  """The checkpoint on disk was written for another model, plan or stage."""


def fingerprint(stage: str, model, trainable: dict) -> dict:
  """What must match for a checkpoint to be restored into this run."""
  return {
      "stage": stage,
      "model": _jsonable(dataclasses.asdict(model.cfg)),
      "plan": [[int(x) for x in row] for row in model.plan.retrieval],
      "indexer_dim": int(model.sparse.indexer_dim),
      "trainable": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(trainable.items())},
  }


def fingerprint_hash(fp: dict) -> str:
  return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(x):
  return json.loads(json.dumps(x, default=str))


def _diff(saved: dict, now: dict) -> list[str]:
  out = []
  for key in sorted(set(saved) | set(now)):
    a, b = saved.get(key), now.get(key)
    if a == b:
      continue
    if key == "trainable" and isinstance(a, dict) and isinstance(b, dict):
      names = sorted(set(a) ^ set(b))
      shapes = [f"{n}: {a[n]} vs {b[n]}" for n in sorted(set(a) & set(b)) if a[n] != b[n]]
      detail = "; ".join(shapes[:3] + ([f"params only in one: {names[:4]}"] if names else []))
      out.append(f"trainable parameters differ ({detail})")
    elif key == "model" and isinstance(a, dict) and isinstance(b, dict):
      fields = [f"{k}={a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
      out.append(f"model config differs ({', '.join(fields[:5])})")
    elif key == "plan":
      out.append("head plan differs (another set of retrieval heads)")
    else:
      out.append(f"{key} differs (checkpoint: {a}, now: {b})")
  return out


class Checkpointer:
  """Thin wrapper over `orbax.checkpoint.CheckpointManager` for one training stage."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    import orbax.checkpoint as ocp
    self.ocp = ocp
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    opts = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True,
                                        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=opts)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, trainable: dict, opt_state, data_state: dict | None,
           meta: dict) -> None:
    ocp = self.ocp
    args = dict(trainable=ocp.args.StandardSave(trainable),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave({**meta, "step": int(step)}))
    if data_state is not None:
      args["data"] = ocp.args.JsonSave(_jsonable(data_state))
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def read_meta(self, step: int) -> dict:
    ocp = self.ocp
    try:
      got = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable folders
      raise CheckpointMismatch(f"checkpoint step {step} in {self.directory} cannot be read "
                               f"({type(e).__name__}: {e}); delete it to start over") from e
    return dict(got.meta)

  def check(self, step: int, expected: dict) -> dict:
    """Compare the saved fingerprint with `expected`; returns the meta on success."""
    meta = self.read_meta(step)
    saved = meta.get("fingerprint")
    if saved is None:
      raise CheckpointMismatch(f"checkpoint step {step} in {self.directory} has no fingerprint")
    diffs = _diff(saved, _jsonable(expected))
    if diffs:
      raise CheckpointMismatch(
          f"checkpoint in {self.directory} (step {step}) does not belong to this run: "
          + "; ".join(diffs) + ". Use another train.workdir, or delete the folder to start over.")
    return meta

  def restore(self, step: int, *, expected: dict, trainable_like: dict, opt_state_like,
              with_data: bool = True):
    """Check the fingerprint, then restore (trainable, opt_state, data_state or None, meta).

    `*_like` are trees of arrays or jax.ShapeDtypeStruct (with shardings) giving structure,
    shapes, dtypes and placement of the restored arrays.
    """
    ocp = self.ocp
    meta = self.check(step, expected)
    abstract = lambda t: jax.tree.map(_abstract, t)
    args = dict(trainable=ocp.args.StandardRestore(abstract(trainable_like)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state_like)))
    has_data = with_data and os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if has_data:
      args["data"] = ocp.args.JsonRestore()
    try:
      got = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:
      raise CheckpointMismatch(f"checkpoint step {step} in {self.directory} cannot be restored "
                               f"({type(e).__name__}: {e})") from e
    data_state = data_lib.state_from_json(dict(got.data)) if has_data else None
    return got.trainable, got.opt_state, data_state, meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  x = np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)
