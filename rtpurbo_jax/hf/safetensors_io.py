"""Weight files of an HF model folder: read (single or sharded safetensors), write atomically.

Reading is lazy and per tensor (memory-mapped by safetensors), so a large checkpoint is never
held twice. Writing stages everything in a hidden temporary folder beside the target and then
publishes it with `os.replace`: a new folder appears whole or not at all; in an existing folder
each file is replaced atomically, other files (tokenizer, ...) are kept, and stale weight files
of an earlier save are removed only after the new ones are in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class WeightReader:
  """Tensors of an HF folder by name. Use as a context manager (closes the files)."""

  def __init__(self, folder: str):
    from safetensors import safe_open

    single, index = os.path.join(folder, SINGLE), os.path.join(folder, INDEX)
    if os.path.isfile(single):
      files = {SINGLE: single}
      names = None
    elif os.path.isfile(index):
      with open(index) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
          raise ValueError(f"{index} is not a safetensors index (needs a 'weight_map')") from None
      files = {}
      for shard in sorted(set(weight_map.values())):
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
          raise FileNotFoundError(f"shard {path} named in {index} does not exist")
        files[shard] = path
      names = dict(weight_map)
    else:
      other = [n for n in ("pytorch_model.bin", "model.pt") if os.path.exists(
          os.path.join(folder, n))]
      hint = f" (found {other[0]}: convert it to safetensors)" if other else ""
      raise FileNotFoundError(f"no weights in {folder}: expected {SINGLE} or {INDEX}{hint}")
    self.folder = folder
    self._handles = {k: safe_open(p, framework="numpy") for k, p in files.items()}
    if names is None:
      names = {n: SINGLE for n in self._handles[SINGLE].keys()}
    else:
      for n, shard in names.items():
        if n not in self._handles[shard].keys():
          raise ValueError(f"tensor {n!r} is listed in {INDEX} but missing from {shard}")
    self._where = names

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    for h in self._handles.values():
      close = getattr(h, "__exit__", None)
      if close is not None:
        close(None, None, None)
    self._handles = {}

  def names(self) -> set[str]:
    return set(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def file_of(self, name: str) -> str:
    return os.path.join(self.folder, self._where[name])

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    return self._handles[self._where[name]].get_tensor(name)


def write_weights(folder: str, tensors: dict[str, np.ndarray],
                  max_shard_bytes: int | None = None) -> list[str]:
  """Write `tensors` into `folder` as model.safetensors, or as shards of at most
  `max_shard_bytes` (a tensor larger than that gets a shard of its own) plus the index.
  Returns the file names written."""
  from safetensors.numpy import save_file

  meta = {"format": "pt"}  # transformers refuses safetensors files without a format tag
  sizes = {n: t.nbytes for n, t in tensors.items()}
  if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
    save_file(tensors, os.path.join(folder, SINGLE), metadata=meta)
    return [SINGLE]
  shards, cur, cur_bytes = [], {}, 0
  for n in tensors:
    if cur and cur_bytes + sizes[n] > max_shard_bytes:
      shards.append(cur)
      cur, cur_bytes = {}, 0
    cur[n] = tensors[n]
    cur_bytes += sizes[n]
  shards.append(cur)
  width = max(5, len(str(len(shards))))
  weight_map, written = {}, []
  for k, shard in enumerate(shards):
    name = f"model-{k + 1:0{width}d}-of-{len(shards):0{width}d}.safetensors"
    save_file(shard, os.path.join(folder, name), metadata=meta)
    weight_map.update({n: name for n in shard})
    written.append(name)
  index = {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": weight_map}
  with open(os.path.join(folder, INDEX), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return written + [INDEX]


def write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def _weight_files(folder: str) -> set[str]:
  """Weight files of a folder: model.safetensors, the index and the shards it names."""
  out = set()
  if os.path.isfile(os.path.join(folder, SINGLE)):
    out.add(SINGLE)
  index = os.path.join(folder, INDEX)
  if os.path.isfile(index):
    out.add(INDEX)
    try:
      with open(index) as f:
        out.update(json.load(f).get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError):
      pass
  return out


@contextlib.contextmanager
def staged_folder(path: str, *, keep_existing: bool = False):
  """Yield an empty temporary folder; on success publish its files at `path`.

  `path` absent: the temporary folder is renamed to `path` in one step. `path` present:
  with `keep_existing=True` it is left untouched (another process published first; the new
  files are dropped), else each file is moved in with `os.replace` (`config.json` last, so a
  reader never sees a new config with old weights) and weight files that the new save does not
  contain are deleted. On error the temporary folder is removed and `path` is unchanged.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise FileExistsError(f"{path} exists and is not a folder")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    yield tmp
    try:
      os.rename(tmp, path)  # fails if path exists (non-empty) -- then merge below
      return
    except OSError:
      if not os.path.isdir(path):
        raise
    if keep_existing:
      return
    new = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
    stale = _weight_files(path) - set(new)
    for name in new:
      os.replace(os.path.join(tmp, name), os.path.join(path, name))
    for name in stale:
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
