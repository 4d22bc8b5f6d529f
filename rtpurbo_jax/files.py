"""Atomic file writes: a reader (or a run resumed after a crash) sees the old file or the
whole new one, never a prefix.

The data goes to a temporary file in the target's folder (same filesystem, so the rename is
atomic), is flushed to disk, and replaces the target with `os.replace`. On any error the
temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import json
import os


def atomic_write(path: str, data: bytes | str) -> None:
  """Write `data` (bytes, or str as UTF-8) to `path` atomically."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str, obj, *, indent: int | None = 1, **dump_kw) -> None:
  """`json.dump(obj)` to `path` atomically (the object is serialised before the file is
  touched, so an unserialisable object leaves no trace)."""
  atomic_write(path, json.dumps(obj, indent=indent, **dump_kw))
