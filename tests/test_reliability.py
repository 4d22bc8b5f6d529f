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


# ---------------------------------------------------------------------------
# 3. Token ids beyond the model's vocabulary; non-finite calibration scores.


def test_token_ids_beyond_vocab_are_one_data_error(tmp_path):
  from rtpurbo_jax.train import data as data_lib
  (tmp_path / "a.txt").write_text("plain ascii text " * 40)
  (tmp_path / "b.txt").write_text("caf\u00e9 \u00fcber " * 40)  # bytes >= 0xC3 -> ids >= 198
  tok = data_lib.get_tokenizer("byte", vocab_size=160)
  src = data_lib.TextSource(str(tmp_path / "*.txt"))
  it = iter(data_lib.packed_dataset(src, tok, 64, 2, seed=0, process_index=0, process_count=1))
  with pytest.raises(data_lib.DataError, match=r"tokenizer 'byte' gives token id \d+ outside "
                     r"the model's vocabulary \(vocab_size=160\)"):
    for _ in range(40):
      next(it)
  ex = data_lib.ExampleSource(src, tok, 64, 8)
  with pytest.raises(data_lib.DataError, match="vocab_size=160"):
    [ex[i] for i in range(len(ex))]
  ok = data_lib.get_tokenizer("byte", vocab_size=259)  # the byte vocabulary fits
  assert max(ok.encode("\u00ff\u00fe")) < 259
  with pytest.raises(data_lib.DataError, match="token id 2 outside"):  # its eos id
    data_lib.get_tokenizer("byte", vocab_size=2)


def test_calibration_never_returns_nan_scores(tmp_path, seed):
  import jax.numpy as jnp
  from flax import nnx
  import rtpurbo_jax
  from rtpurbo_jax.config import ModelConfig, SparseConfig
  from rtpurbo_jax.models.transformer import Transformer
  cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    max_position_embeddings=512)
  model = Transformer(cfg, sparse=SparseConfig(mode="dense"), rngs=nnx.Rngs(seed))
  from rtpurbo_jax import calibration as calib
  rng = np.random.default_rng(seed)
  doc = rng.integers(0, 64, 128).tolist()
  doc[10] = 1000  # beyond the vocabulary: the embedding gather gives NaN
  ids, span = calib.make_needle_document(doc, rng.integers(0, 64, 16).tolist(), 128)
  with pytest.raises(FloatingPointError, match="not finite"):
    rtpurbo_jax.calibrate(model, jnp.asarray(ids)[None], span, 0.25,
                          out_dir=str(tmp_path / "c"))
  assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------
# 4. plan.path and retrieval_ratio are never silently ignored.


def _plan_setup(tmp_path, calibrated, explicit=None, ratio=0.25):
  import types
  from configs.tiny import get_config
  from rtpurbo_jax.attention.plan import HeadPlan
  from rtpurbo_jax.config import SparseConfig, model_config_from
  cfg = get_config()
  cfg.train.workdir = str(tmp_path / "work")
  cfg.plan.retrieval_ratio = ratio
  os.makedirs(cfg.train.workdir, exist_ok=True)
  hw = lambda m: {"headwise_config": HeadPlan.from_mask(m, 2).to_headwise_config(SparseConfig())}
  if calibrated is not None:
    (tmp_path / "work" / "plan.json").write_text(json.dumps(hw(calibrated)))
  if explicit is not None:
    (tmp_path / "mine.json").write_text(json.dumps(hw(explicit)))
    cfg.plan.path = str(tmp_path / "mine.json")
  mcfg = model_config_from(cfg.model)
  return cfg, types.SimpleNamespace(cfg=mcfg, plan=HeadPlan.all_local(mcfg))


def test_plan_path_and_ratio_are_honoured_or_refused(tmp_path):
  from rtpurbo_jax.config import ConfigError
  from rtpurbo_jax.train import stages
  a, b = [[0, 1, 0, 0], [1, 0, 0, 0]], [[0, 0, 0, 1], [0, 0, 1, 0]]
  cfg, model = _plan_setup(tmp_path / "1", calibrated=a, explicit=b)
  with pytest.raises(ConfigError, match=r"plan.path=.*mine.json' differs from the plan "
                     r"calibrated in .*plan.json"):
    stages.resolve_plan(cfg, model)
  cfg, model = _plan_setup(tmp_path / "2", calibrated=a, explicit=a)
  assert stages.resolve_plan(cfg, model).mask().tolist() == np.asarray(a, bool).tolist()
  cfg, model = _plan_setup(tmp_path / "3", calibrated=None, explicit=b)
  assert stages.resolve_plan(cfg, model).mask().tolist() == np.asarray(b, bool).tolist()
  cfg, model = _plan_setup(tmp_path / "4", calibrated=a, ratio=0.5)
  with pytest.raises(ConfigError, match=r"plan.json has 2 of 8 retrieval heads but "
                     r"plan.retrieval_ratio=0.5 asks for 4"):
    stages.resolve_plan(cfg, model)
  cfg, model = _plan_setup(tmp_path / "5", calibrated=a, ratio=0.25)
  assert stages.resolve_plan(cfg, model).mask().sum() == 2


# ---------------------------------------------------------------------------
# 5. A refused run leaves <workdir>/config.json alone.


def test_refused_run_keeps_config_json(tmp_path, seed):
  from rtpurbo_jax.train import stages
  from rtpurbo_jax.train.checkpoint import CheckpointMismatch, Checkpointer
  cfg, _ = _plan_setup(tmp_path, calibrated=[[0, 1, 0, 0], [1, 0, 0, 0]])
  (tmp_path / "t.txt").write_text("some words " * 200)
  cfg.data.train_files, cfg.data.tokenizer = str(tmp_path / "t.txt"), "byte"
  cfg.train.stages, cfg.train.progress, cfg.seed = "stage1", False, seed % 1000
  cfg.train.stage1.update(steps=2, seq_len=128, query_chunk=64)
  work = tmp_path / "work"
  (work / "config.json").write_text('{"the": "first run"}')
  ck = Checkpointer(str(work / "ckpt" / "stage1"), async_save=False)
  ck.save(1, trainable={"x": np.zeros(2, np.float32)}, opt_state={"m": np.zeros(2)},
          data_state=None,
          meta={"fingerprint": {"stage": "stage1", "model": {"vocab_size": 7}}})
  ck.close()
  with pytest.raises(CheckpointMismatch, match="does not belong to this run"):
    stages.run_pipeline(cfg)
  assert (work / "config.json").read_text() == '{"the": "first run"}'
  # A plan refusal (issue 20 item 4) happens before anything is written too.
  cfg.plan.retrieval_ratio = 0.5
  with pytest.raises(stages.ConfigError, match="asks for 4"):
    stages.run_pipeline(cfg)
  assert (work / "config.json").read_text() == '{"the": "first run"}'


# ---------------------------------------------------------------------------
# 6. A resume logs each step once (JSONL and TensorBoard).


def _tensorboard_steps(logdir) -> list[int]:
  """Scalar steps as TensorBoard shows them: a SessionLog START at step T drops the events
  at steps >= T read before it (files in name order, events in file order)."""
  import struct
  from tensorboardX.proto import event_pb2
  steps = []
  for name in sorted(os.listdir(logdir)):
    data = open(os.path.join(logdir, name), "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
        steps = [s for s in steps if s < ev.step]
      elif ev.HasField("summary") and any(v.tag.endswith("/loss") for v in ev.summary.value):
        steps.append(ev.step)
  return steps


def test_resumed_metrics_are_not_duplicated(tmp_path):
  from rtpurbo_jax.train.metrics import MetricsLogger, read_metrics
  log = MetricsLogger(str(tmp_path), "stage1", total_steps=6, progress=False, log_every=1)
  for step in range(1, 6):  # killed after step 5; the last checkpoint was step 3
    log.step(step, {"loss": float(step)})
  log.close()
  with open(tmp_path / "metrics" / "stage1.jsonl", "a") as f:
    f.write('{"stage": "stage1", "step": 6, "lo')  # torn by the kill
  log = MetricsLogger(str(tmp_path), "stage1", total_steps=6, start_step=3, progress=False,
                      log_every=1)
  for step in range(4, 7):
    log.step(step, {"loss": 10.0 + step})
  log.close()
  recs = read_metrics(str(tmp_path / "metrics" / "stage1.jsonl"))
  assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in recs] == [1, 2, 3, 14, 15, 16]
  assert _tensorboard_steps(tmp_path / "tb" / "stage1") == [1, 2, 3, 4, 5, 6]


def test_metrics_log_the_input_wait_per_step(tmp_path):
  from rtpurbo_jax.train.metrics import MetricsLogger, read_metrics
  log = MetricsLogger(str(tmp_path), "stage2", total_steps=5, progress=False, log_every=2)
  for step, wait in zip(range(1, 6), (0.5, 1.5, 0.25, 0.75, 2.0)):
    log.step(step, {"loss": 1.0}, data_seconds=wait)
  log.close()
  recs = read_metrics(str(tmp_path / "metrics" / "stage2.jsonl"))
  assert [r["step"] for r in recs] == [2, 4, 5]
  assert [r["data_seconds_per_step"] for r in recs] == [1.0, 0.5, 2.0]
  assert all(r["seconds_per_step"] >= 0 for r in recs)


# ---------------------------------------------------------------------------
# 10. Checkpoint integrity: digests verified on restore, fallback to the previous step.


def test_corrupt_checkpoint_falls_back_to_previous_step(tmp_path, rng, caplog):
  import logging
  from rtpurbo_jax.train.checkpoint import Checkpointer
  fp = {"stage": "stage1", "model": {"n": 1}}
  # Random bits do not compress: orbax's zstd stores them verbatim, so the test can corrupt
  # exactly one value in place without changing any file size.
  w = {s: rng.integers(0, 2**32, 512, dtype=np.uint32).view(np.float32) for s in (1, 2)}
  opt = {"m": np.zeros(4, np.float32), "count": np.int32(3)}
  ck = Checkpointer(str(tmp_path), async_save=False)
  for s in (1, 2):
    ck.save(s, trainable={"w": w[s]}, opt_state=opt, data_state=None,
            meta={"fingerprint": fp})
  ck.close()
  target = w[2][100:104].tobytes()
  hits = [p for p in (tmp_path / "2").rglob("*") if p.is_file() and target in p.read_bytes()]
  assert len(hits) == 1, hits
  data = bytearray(hits[0].read_bytes())
  at = data.index(target)
  data[at + 1] ^= 0x10  # one value of w changes; the size does not
  hits[0].write_bytes(bytes(data))
  ck = Checkpointer(str(tmp_path), async_save=False)
  with caplog.at_level(logging.WARNING):
    got = ck.restore_latest(expected=fp, trainable_like={"w": w[2]}, opt_state_like=opt,
                            steps=10)
  step, trainable = got[0], got[1]
  assert step == 1
  np.testing.assert_array_equal(np.asarray(trainable["w"]), w[1])
  assert "step 2" in caplog.text and "corrupt" in caplog.text and "['w']" in caplog.text
  assert (tmp_path / "2.corrupt").is_dir() and ck.latest_step() == 1
  ck.save(2, trainable={"w": w[2]}, opt_state=opt, data_state=None, meta={"fingerprint": fp})
  ck.close()
  ck = Checkpointer(str(tmp_path), async_save=False)
  got = ck.restore_latest(expected=fp, trainable_like={"w": w[2]}, opt_state_like=opt,
                          steps=10)
  ck.close()
  assert got[0] == 2
  np.testing.assert_array_equal(np.asarray(got[1]["w"]), w[2])


# ---------------------------------------------------------------------------
# 8, 9. The command lines: one line naming the file or key, exit status 2.


def _cli(args, tmp_path, script="infer.py"):
  env = dict(os.environ, RTPURBO_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, *(["-m", script] if "." in script and "/" not in script
                           and not script.endswith(".py") else [script]), *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _one_error(r, *parts):
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  errors = [l for l in r.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1 and all(p in errors[0] for p in parts), r.stderr[-2000:]


@pytest.mark.parametrize("script", ["infer.py", "train.py", "rtpurbo_jax.eval"])
def test_missing_config_file_is_one_line(tmp_path, script):
  _one_error(_cli(["--config=configs/nope.py"], tmp_path, script), "configs/nope.py",
             "No such file")


def test_infer_unknown_key_empty_prompt_and_batch(tmp_path):
  tiny = "--config=configs/tiny.py"
  _one_error(_cli([tiny, "--config.infer.bogus=1"], tmp_path), "unknown config key",
             "infer.bogus")
  _one_error(_cli([tiny, "--random_weights", "--prompt="], tmp_path), "--prompt is empty")
  _one_error(_cli([tiny, "--random_weights", "--config.infer.batch=0"], tmp_path),
             "config.infer.batch=0 must be >= 1")


def test_infer_dry_run_cache_summary_uses_the_run_config(tmp_path):
  import re
  r = _cli(["--config=configs/tiny.py", "--dry_run", "--config.dtype=bfloat16"], tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  plan_cache = {l.split()[0]: re.search(r"cache (\S+ \S+) \+", l).group(1)
                for l in r.stdout.splitlines() if " ctx=" in l}
  m = re.search(r"KV cache at 1024 tokens: dense (\S+ \S+), rtpurbo (\S+ \S+) \(([\d.]+)x "
                r"smaller\)", r.stdout)
  assert m, r.stdout
  assert (m.group(1), m.group(2)) == (plan_cache["dense"], plan_cache["rtpurbo"])
  assert float(m.group(3)) > 1.0  # the tiny plan keeps a 132-slot ring, not a full cache


def test_corrupt_weights_are_one_line_in_train(tmp_path):
  folder = tmp_path / "m"
  folder.mkdir()
  st.write_json(str(folder / "config.json"), {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
      "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
      "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
      "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1e4})
  (folder / st.SINGLE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header....")
  r = _cli(["--config=configs/tiny.py", f"--config.model_path={folder}",
            "--config.train.stages=calibrate", f"--config.train.workdir={tmp_path}/w"],
           tmp_path, "train.py")
  _one_error(r, f"{folder}/model.safetensors is not a readable safetensors file")


def test_random_weights_check_memory_before_building_the_prompt(monkeypatch):
  import importlib.util

  from rtpurbo_jax.infer import command, memory
  spec = importlib.util.spec_from_file_location("tiny_config",
                                                os.path.join(ROOT, "configs", "tiny.py"))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  opts = command.Options(random_weights=True, ctx="64K")
  cfg, ctx = command.resolve_config(tiny.get_config(), opts)
  calls = []

  class Stop(Exception):
    pass

  def check(mem):
    calls.append(("check", mem.ctx))
    raise Stop

  monkeypatch.setattr(memory, "check_memory", check)
  monkeypatch.setattr(command, "random_prompt", lambda *a: calls.append("prompt"))
  with pytest.raises(Stop):
    command.run(cfg, opts, ctx)
  assert calls == [("check", 65536)]
