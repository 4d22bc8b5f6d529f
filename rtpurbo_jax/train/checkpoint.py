"""Training checkpoints (orbax CheckpointManager): periodic, keep-N, atomic.

One checkpoint holds, per step: the trainable parameters (a flat {name: array} dict: the
indexer in stage 1, the backbone in stage 2), the optimiser state, the data iterator's state
(grain `get_state()`, JSON), and `meta` (step, stage, the run config, and a fingerprint of
the model architecture, head plan and trainable shapes). Orbax writes each step to a
temporary folder and renames it when complete, so a run killed mid-save leaves the previous
checkpoints intact.

Before restoring anything the fingerprint is compared with the current run's: a checkpoint
of another model, plan or stage raises `CheckpointMismatch` naming what differs.

Integrity: orbax 0.12 verifies no array data on restore (its zarr3 layout checksums only the
shard index), so `meta` also holds a digest of every saved array (`digests`), recomputed on
restore. `restore_latest` moves a step that fails it, or cannot be read, aside
(`<step>.corrupt`) with a warning and restores the previous step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.config import ConfigError
from rtpurbo_jax.train import data as data_lib


log = logging.getLogger(__name__)


class CheckpointMismatch(ConfigError):
  """The checkpoint on disk was written for another model, plan or stage."""


class CheckpointCorrupt(CheckpointMismatch):
  """A checkpoint step cannot be read, or its arrays differ from the digests saved with it."""


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def _digest(x):
  """uint32 [] = sum_i bits(x_i) * (2 k i + 1) mod 2**32 over the flattened array.

  The weights are odd, so changing any one element always changes the digest, and a
  position-dependent weight catches moved elements; jitted, it runs where the (possibly
  sharded) array lives, without a copy to the host.
  """
  x = x.reshape(-1)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 8:  # x64: two uint32 words per element
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  else:
    bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
  w = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435762) + jnp.uint32(1)
  return jnp.sum(bits * w, dtype=jnp.uint32)


def digests(tree) -> dict[str, str]:
  """{key path: digest hex} of every array leaf of `tree` (see `_digest`)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  out = jax.device_get([_digest(jnp.asarray(x)) for _, x in leaves])
  return {jax.tree_util.keystr(p): f"{int(d):08x}" for (p, _), d in zip(leaves, out)}


def _bad_digests(saved: dict, tree) -> list[str]:
  now = digests(tree)
  return sorted(k for k in saved if now.get(k) != saved[k])


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
    sums = {"trainable": digests(trainable), "opt_state": digests(opt_state)}
    args = dict(trainable=ocp.args.StandardSave(trainable),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave({**meta, "step": int(step), "digests": sums}))
    if data_state is not None:
      args["data"] = ocp.args.JsonSave(_jsonable(data_state))
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def read_meta(self, step: int) -> dict:
    ocp = self.ocp
    try:
      got = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable folders
      raise CheckpointCorrupt(f"checkpoint step {step} in {self.directory} cannot be read "
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
      raise CheckpointCorrupt(f"checkpoint step {step} in {self.directory} cannot be restored "
                              f"({type(e).__name__}: {e})") from e
    saved = meta.get("digests") or {}
    bad = [f"{part}{k}" for part, tree in (("trainable", got.trainable),
                                           ("opt_state", got.opt_state))
           for k in _bad_digests(saved.get(part, {}), tree)]
    if bad:
      raise CheckpointCorrupt(f"checkpoint step {step} in {self.directory} is corrupt: "
                              f"{len(bad)} array(s) differ from their saved digest "
                              f"({', '.join(bad[:3])})")
    data_state = data_lib.state_from_json(dict(got.data)) if has_data else None
    return got.trainable, got.opt_state, data_state, meta

  def restore_latest(self, *, expected: dict, trainable_like: dict, opt_state_like,
                     steps: int):
    """(step, trainable, opt_state, data_state, meta) of the newest intact step, or None
    when there is no checkpoint.

    Corrupt steps (unreadable, or failing their digests) newer than an intact one are moved
    aside with a warning; when every step is corrupt the newest one's error is raised and
    nothing is moved (no silent restart from scratch). Another run's checkpoint is refused
    (CheckpointMismatch). The data state is restored only for a step below `steps`.
    """
    corrupt: list[tuple[int, CheckpointCorrupt]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        got = self.restore(step, expected=expected, trainable_like=trainable_like,
                           opt_state_like=opt_state_like, with_data=step < steps)
      except CheckpointCorrupt as e:
        corrupt.append((step, e))
        continue
      for bad, e in corrupt:
        log.warning("%s; restoring step %d instead (the corrupt step is kept as %s)", e, step,
                    self._set_aside(bad))
      return (step, *got)
    if corrupt:
      raise corrupt[0][1]
    return None

  def _set_aside(self, step: int) -> str:
    """Rename a corrupt step to `<step>.corrupt[-n]` (not a step name for orbax), so later
    saves of that step number succeed and the files stay for inspection."""
    src = os.path.join(self.directory, str(step))
    dst, n = src + ".corrupt", 1
    if jax.process_index() == 0:
      while os.path.exists(dst):
        dst, n = f"{src}.corrupt-{n}", n + 1
      os.rename(src, dst)
    self.manager.reload()
    return dst

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
