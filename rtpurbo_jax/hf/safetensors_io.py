"""Weight files of an HF model folder: read (single or sharded safetensors), write atomically.

Reading is lazy and per tensor (memory-mapped by safetensors), so a large checkpoint is never
held twice. Every file name taken from an index must stay inside the folder (no absolute
paths, no `..`): a name that leaves it stops the load or save with `WeightsError`.

Writing builds the complete new folder beside the target (`.<name>.tmp-<pid>-*`) and swaps it
in as a whole: a reader sees the old folder or the new one, never a mix, and an error or a
kill leaves the old folder loadable. Files of the old folder that the new save does not
write (tokenizer, ...) are carried over, except the old weight files. Hidden folders left by
a killed save are removed by the next save into the same target.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile

import numpy as np

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class WeightsError(ValueError):
  """A weight file or index is unreadable or names a file outside its folder."""


def inside(folder: str, name, source: str) -> str:
  """`folder/name` for a file name read from `source` (an index); `WeightsError` when the
  name is not a relative path that stays inside `folder` (absolute, `..`, empty, not a str).
  Checked on the text, not on resolved links: a folder may link its own files elsewhere."""
  if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name):
    raise WeightsError(f"{source} names {name!r}: a weight file must be a relative path "
                       "inside the model folder")
  norm = os.path.normpath(name)
  if norm == "." or norm == ".." or norm.startswith(".." + os.sep):
    raise WeightsError(f"{source} names {name!r}, which is outside the model folder")
  return os.path.join(folder, norm)


def _open(path: str):
  from safetensors import safe_open
  try:
    return safe_open(path, framework="numpy")
  except Exception as e:  # SafetensorError (corrupt header), OSError
    raise WeightsError(f"{path} is not a readable safetensors file ({e})") from None


class WeightReader:
  """Tensors of an HF folder by name. Use as a context manager (closes the files)."""

  def __init__(self, folder: str):
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
      if not isinstance(weight_map, dict):
        raise WeightsError(f"{index}: 'weight_map' must be an object of name -> file")
      files = {}
      for shard in weight_map.values():
        path = inside(folder, shard, index)
        if shard in files:
          continue
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
    self._handles = {k: _open(p) for k, p in files.items()}
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
  """Weight files of a folder: model.safetensors, the index and the shards it names (each
  checked to be inside the folder)."""
  out = set()
  if os.path.isfile(os.path.join(folder, SINGLE)):
    out.add(SINGLE)
  index = os.path.join(folder, INDEX)
  if os.path.isfile(index):
    out.add(INDEX)
    try:
      with open(index) as f:
        shards = json.load(f).get("weight_map", {}).values()
    except (OSError, ValueError, AttributeError):
      return out  # an unreadable index names nothing
    for shard in shards:
      inside(folder, shard, index)
      out.add(os.path.normpath(shard))
  return out


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _leftovers(path: str) -> list[tuple[str, str, int]]:
  """(kind, folder, pid) of the hidden `.tmp-` / `.old-` folders that saves into `path`
  left beside it, newest first. pid -1 when the name carries none."""
  parent, base = os.path.split(path)
  out = []
  for name in os.listdir(parent):
    for kind in ("tmp", "old"):
      prefix = f".{base}.{kind}-"
      if name.startswith(prefix):
        pid = name[len(prefix):].split("-", 1)[0]
        full = os.path.join(parent, name)
        out.append((kind, full, int(pid) if pid.isdigit() else -1, os.path.getmtime(full)))
  out.sort(key=lambda t: -t[3])
  return [t[:3] for t in out]


def _clean_stale(path: str) -> None:
  """Undo what a killed save into `path` left behind: the old folder moved aside while the
  target is missing goes back; temporary folders of dead processes are removed."""
  for kind, folder, pid in _leftovers(path):
    if pid > 0 and _alive(pid):
      continue  # a save in progress
    if kind == "old" and not os.path.exists(path):
      os.rename(folder, path)  # killed between moving the old folder aside and the swap
    else:
      shutil.rmtree(folder, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst, follow_symlinks=False)
  except OSError:
    shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: str, new: str) -> None:
  """Link (or copy) into `new` the files of `old` that the new save did not write, except
  `old`'s weight files (model.safetensors, its index and the shards the index names)."""
  skip = _weight_files(old) | set(os.listdir(new))
  for name in sorted(os.listdir(old)):
    if name in skip:
      continue
    src, dst = os.path.join(old, name), os.path.join(new, name)
    if os.path.isdir(src) and not os.path.islink(src):
      shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
      _link_or_copy(src, dst)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _ordinary_permissions(folder: str) -> None:
  """What `mkdir` / `open` give under the umask: mkdtemp makes 0700 folders and safetensors
  writes 0600 files, which other users of a shared model folder could not read."""
  mask = _umask()
  for root, dirs, files in os.walk(folder):
    os.chmod(root, 0o777 & ~mask)
    for name in files:
      if not os.path.islink(os.path.join(root, name)):
        os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _exchange(a: str, b: str) -> bool:
  """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False
  raise OSError(err, os.strerror(err), b)


def _publish(tmp: str, path: str) -> None:
  """Make the complete folder `tmp` appear at `path`, replacing a folder there as a whole.
  After an atomic exchange `tmp` holds the old folder (the caller removes it); without one
  the old folder is moved aside, and moved back if the second rename fails."""
  try:
    os.rename(tmp, path)  # `path` absent (or an empty folder)
    return
  except OSError:
    if not os.path.isdir(path):
      raise
  if _exchange(tmp, path):
    return
  parent, base = os.path.split(path)
  aside = tempfile.mkdtemp(prefix=f".{base}.old-{os.getpid()}-", dir=parent)
  os.rename(path, aside)  # replaces the empty `aside`
  try:
    os.rename(tmp, path)
  except BaseException:
    os.rename(aside, path)
    raise
  shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(path: str, *, keep_existing: bool = False):
  """Yield an empty temporary folder beside `path`; on success it becomes `path` as a whole.

  `path` present: with `keep_existing=True` it is left untouched (another process published
  first; the new files are dropped); else the files of the old folder that the new one lacks
  are carried over (not its weight files) and the folders are swapped. On error or a kill
  `path` is unchanged; leftovers of killed saves are removed when the next save starts. The
  new folder gets the permissions of an ordinary `mkdir` (not mkdtemp's 0700).
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise FileExistsError(f"{path} exists and is not a folder")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  _clean_stale(path)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-", dir=parent)
  try:
    yield tmp
    _ordinary_permissions(tmp)
    if os.path.isdir(path):
      if keep_existing:
        return
      _carry_over(path, tmp)
    _publish(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
