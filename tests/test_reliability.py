"""Reliability under bad input and kills (issue 20): model folders never touch files outside
themselves and are replaced whole; training inputs are validated; a resume reproduces the run.

Oracles: the files on disk (bytes, names, permissions) before and after, and the values that
were saved.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

from rtpurbo_jax.hf import safetensors_io as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(folder, tensors, **kw):
  with st.staged_folder(str(folder)) as tmp:
    st.write_weights(tmp, tensors, **kw)
    st.write_json(os.path.join(tmp, "config.json"), {"n": len(tensors)})


def _load(folder) -> dict:
  with st.WeightReader(str(folder)) as r:
    return {n: r.get(n) for n in sorted(r.names())}


def _hidden(parent) -> list[str]:
  return sorted(n for n in os.listdir(parent) if n.startswith("."))


def _tensors(rng, n=3):
  return {f"t{i}": rng.standard_normal(64).astype(np.float32) for i in range(n)}


# ---------------------------------------------------------------------------
# 1. Paths from an index stay inside the folder.


def _write_index(folder, weight_map):
  st.write_json(os.path.join(folder, st.INDEX), {"metadata": {}, "weight_map": weight_map})


def test_malicious_index_cannot_delete_outside(tmp_path, rng):
  out = tmp_path / "m"
  _save(out, _tensors(rng), max_shard_bytes=300)
  victim, victim_abs = tmp_path / "victim.txt", tmp_path / "elsewhere" / "abs.txt"
  victim_abs.parent.mkdir()
  victim.write_text("keep me")
  victim_abs.write_text("keep me too")
  index = json.loads((out / st.INDEX).read_text())
  for name, bad in (("t0", "../victim.txt"), ("t1", str(victim_abs))):
    wm = dict(index["weight_map"], **{name: bad})
    _write_index(out, wm)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(st.WeightsError, match="outside the model folder|relative path inside"):
      _save(out, _tensors(rng, 1))
    assert victim.read_text() == "keep me" and victim_abs.read_text() == "keep me too"
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert _hidden(tmp_path) == []


def test_malicious_index_cannot_read_outside(tmp_path, rng):
  out = tmp_path / "m"
  out.mkdir()
  secret = rng.standard_normal(8).astype(np.float32)
  save_file({"w": secret}, str(tmp_path / "secret.safetensors"))
  for bad in ("../secret.safetensors", str(tmp_path / "secret.safetensors"), "a/../../x"):
    _write_index(out, {"w": bad})
    with pytest.raises(st.WeightsError, match=r"model\.safetensors\.index\.json names"):
      st.WeightReader(str(out))
  _write_index(out, {"w": ["not", "a", "name"]})
  with pytest.raises(st.WeightsError, match="relative path"):
    st.WeightReader(str(out))


def test_corrupt_safetensors_names_the_file(tmp_path, rng):
  out = tmp_path / "m"
  _save(out, _tensors(rng))
  (out / st.SINGLE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
  with pytest.raises(st.WeightsError, match=r"m/model\.safetensors is not a readable"):
    st.WeightReader(str(out))


# ---------------------------------------------------------------------------
# 2. A save replaces the folder whole, or not at all.


def _fail_moves_named(monkeypatch, name):
  """os.replace / os.rename refuse to move anything onto a path called `name`."""
  for fn in ("replace", "rename"):
    real = getattr(os, fn)

    def guarded(src, dst, *a, _real=real, **k):
      if os.path.basename(os.fspath(dst)) == name:
        raise OSError(errno.EACCES, "unwritable", os.fspath(dst))
      return _real(src, dst, *a, **k)

    monkeypatch.setattr(os, fn, guarded)


def test_unwritable_target_file_never_mixes_old_and_new(tmp_path, rng, monkeypatch):
  out = tmp_path / "m"
  old, new = _tensors(rng), _tensors(rng, 2)
  _save(out, old)
  (out / "tokenizer.json").write_text("{}")
  _fail_moves_named(monkeypatch, "config.json")
  try:
    _save(out, new)
    want, n = new, 2
  except OSError:
    want, n = old, 3
  got = _load(out)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  assert json.loads((out / "config.json").read_text()) == {"n": n}
  assert (out / "tokenizer.json").read_text() == "{}"  # other files are carried over
  assert _hidden(tmp_path) == []


def test_failed_swap_without_exchange_restores_old(tmp_path, rng, monkeypatch):
  out = tmp_path / "m"
  old = _tensors(rng)
  _save(out, old, max_shard_bytes=300)
  monkeypatch.setattr(st, "_exchange", lambda a, b: False)
  real = os.rename

  def rename(src, dst):
    if os.fspath(dst) == str(out) and ".tmp-" in os.fspath(src) and not out.exists():
      raise OSError(errno.EIO, "injected", os.fspath(dst))
    return real(src, dst)

  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(OSError, match="injected"):
    _save(out, _tensors(rng, 1))
  got = _load(out)
  for k in old:
    np.testing.assert_array_equal(got[k], old[k])
  assert _hidden(tmp_path) == []


def test_saved_folder_has_ordinary_permissions(tmp_path, rng):
  _save(tmp_path / "m", _tensors(rng))
  mask = os.umask(0)
  os.umask(mask)
  assert os.stat(tmp_path / "m").st_mode & 0o777 == 0o777 & ~mask
  for n in os.listdir(tmp_path / "m"):
    assert os.stat(tmp_path / "m" / n).st_mode & 0o777 == 0o666 & ~mask, n


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    from rtpurbo_jax.hf import safetensors_io as st
    out, where = sys.argv[1], sys.argv[2]
    if where == "swap":  # no atomic exchange: die between moving the old folder aside and
      st._exchange = lambda a, b: False  # moving the new one in
      real = os.rename
      def rename(src, dst):
        real(src, dst)
        if ".old-" in os.fspath(dst):
          os.kill(os.getpid(), signal.SIGKILL)
      os.rename = rename
    with st.staged_folder(out) as tmp:
      st.write_weights(tmp, {"w": np.full(16, 2.0, np.float32)})
      st.write_json(os.path.join(tmp, "config.json"), {"n": 2})
      print("staged", flush=True)
      if where == "write":
        time.sleep(120)
""")


@pytest.mark.parametrize("where", ["write", "swap"])
def test_killed_save_leaves_a_loadable_folder(tmp_path, where):
  out = tmp_path / "m"
  _save(out, {"w": np.ones(16, np.float32)})
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  p = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(out), where],
                       stdout=subprocess.PIPE, text=True, env=env)
  try:
    assert p.stdout.readline().strip() == "staged"
    if where == "write":
      p.send_signal(signal.SIGKILL)
  finally:
    p.wait(timeout=60)
  assert p.returncode == -signal.SIGKILL
  assert _hidden(tmp_path)  # the killed save's leftovers
  if where == "write":
    np.testing.assert_array_equal(_load(out)["w"], np.ones(16, np.float32))
  # The next save puts back what a kill left aside and removes the temporary folders.
  _save(out, {"w": np.full(16, 3.0, np.float32)}, max_shard_bytes=8)
  assert _hidden(tmp_path) == []
  np.testing.assert_array_equal(_load(out)["w"], np.full(16, 3.0, np.float32))


# ---------------------------------------------------------------------------
# 7. headwise_config values are checked, one error naming the field.


_GOOD_HW = {"0": [0, 1, 0, 0], "1": [1, 0, 0, 1], "sink_token_num": 4, "swa_token_num": 128,
            "seqlen_threshold": 0, "top_p": 0.9, "block_size": 64, "indexer_dim": 8}


@pytest.mark.parametrize("patch,message", [
    ({"0": [0, 2, 0, 0]}, r"headwise_config\['0'\]\[1\]=2: must be 0 or 1"),
    ({"1": [1, 0, -1, 1]}, r"\['1'\]\[2\]=-1"),
    ({"0": [0, 0.5, 0, 0]}, r"\['0'\]\[1\]=0.5"),
    ({"0": ["1", 0, 0, 0]}, r"\['0'\]\[0\]='1'"),
    ({"1": [1, 0]}, "different numbers of heads"),
    ({"1": "1001"}, r"headwise_config\['1'\] must be a list"),
    ({"swa_token_num": "8K"}, "swa_token_num='8K': must be a non-negative integer"),
    ({"sink_token_num": -4}, "sink_token_num=-4"),
    ({"block_size": 64.5}, "block_size=64.5"),
    ({"top_p": "high"}, "top_p='high': must be a number in"),
    ({"top_p": 1.5}, "top_p=1.5"),
])
def test_bad_headwise_config_values(tmp_path, patch, message):
  from rtpurbo_jax.attention.plan import HeadPlan, read_plan
  from rtpurbo_jax.config import ConfigError
  with pytest.raises(ConfigError, match=message):
    HeadPlan.from_headwise_config({**_GOOD_HW, **patch}, 2)
  path = tmp_path / "plan.json"
  path.write_text(json.dumps({"headwise_config": {**_GOOD_HW, **patch}}))
  with pytest.raises(ConfigError, match=f"{path}: .*{message}"):
    read_plan(str(path), 2)
  plan, over = HeadPlan.from_headwise_config(_GOOD_HW, 2)  # the unpatched one is fine
  assert plan.mask().sum() == 3 and over["window"] == 128 and over["top_p"] == 0.9


def test_plan_file_that_is_not_an_object(tmp_path):
  from rtpurbo_jax.attention.plan import read_plan
  from rtpurbo_jax.config import ConfigError
  path = tmp_path / "plan.json"
  path.write_text(json.dumps([[0, 1, 0, 0], [1, 0, 0, 1]]))
  with pytest.raises(ConfigError, match=f"{path}: a head plan file must be a JSON object"):
    read_plan(str(path), 2)
  path.write_text(json.dumps({"headwise_config": [[0, 1]]}))
  with pytest.raises(ConfigError, match="headwise_config must be a JSON object, got list"):
    read_plan(str(path), 2)
  path.write_text("{not json")
  with pytest.raises(ConfigError, match="not JSON"):
    read_plan(str(path), 2)
