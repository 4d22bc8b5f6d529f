"""rtpurbo_jax.files: a failed atomic write leaves the old file and no temporary file."""

import json
import os

import pytest

from rtpurbo_jax import files


def test_atomic_write_replaces_whole_file(tmp_path):
  path = str(tmp_path / "a.json")
  files.atomic_write_json(path, {"x": 1})
  files.atomic_write_json(path, {"x": [2, 3]})
  assert json.load(open(path)) == {"x": [2, 3]}
  files.atomic_write(path, "text é")
  assert open(path, encoding="utf-8").read() == "text é"
  assert os.listdir(tmp_path) == ["a.json"]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
  path = str(tmp_path / "a.json")
  files.atomic_write_json(path, {"old": True})
  with pytest.raises(TypeError):
    files.atomic_write_json(path, {"bad": object()})  # not serialisable
  def fail(src, dst):
    raise OSError("disk went away")
  monkeypatch.setattr(files.os, "replace", fail)
  with pytest.raises(OSError, match="disk went away"):
    files.atomic_write(path, b"new")
  assert json.load(open(path)) == {"old": True}
  assert os.listdir(tmp_path) == ["a.json"]
