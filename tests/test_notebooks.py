"""The notebooks run top to bottom under papermill with the tiny parameters (as in CI), and
the numbers they record agree with independent recomputations.

The kernel is `python3`, which papermill resolves to the ipykernel of the running
interpreter (the .venv of setup.sh), so a fresh clone needs no kernel registration.
"""

import json
import os

import nbformat
import numpy as np
import pytest

papermill = pytest.importorskip("papermill")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB = os.path.join(ROOT, "notebooks")


def execute(name, tmp_path, devices, **params):
  out_nb = tmp_path / name
  env = {"JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits the environment
  try:
    papermill.execute_notebook(os.path.join(NB, name), str(out_nb), parameters=params,
                               kernel_name="python3", cwd=NB, progress_bar=False,
                               execution_timeout=600)
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nbformat.read(str(out_nb), as_version=4)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "tpu_vm.ipynb"])
def test_committed_without_outputs(name):
  nb = nbformat.read(os.path.join(NB, name), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_quickstart(tmp_path):
  from rtpurbo_jax.attention.plan import HeadPlan
  res_file = tmp_path / "quick.json"
  execute("quickstart.ipynb", tmp_path, 1, CONFIG="configs/tiny.py", MODEL="",
          TOKENIZER="byte", CALIB_LEN=512, NEEDLE_LEN=32, STEPS=3, SEQ_LEN=256,
          PASSKEY_LEN=512, LENGTHS=[256, 512], WORKDIR=str(tmp_path / "work"),
          RESULTS=str(res_file))
  r = json.loads(res_file.read_text())
  # The plan is the global top `retrieval_ratio` of the recorded scores (tiny: 2 x 4 heads).
  scores = np.asarray(r["scores"])
  assert scores.shape == (2, 4) and np.all(np.isfinite(scores))
  expect = HeadPlan.from_scores(scores, 2, r["retrieval_ratio"])
  np.testing.assert_array_equal(np.asarray(r["mask"]), expect.mask().astype(int))
  assert r["plan"]["retrieval_heads"] == 2
  # Stage 1 ran its steps through train.py with a finite KL.
  assert len(r["stage1_losses"]) == 3 and all(np.isfinite(r["stage1_losses"]))
  # Passkey: both modes produced the task's number of tokens; the prompt filled the length.
  pk = r["passkey"]
  assert 400 < pk["prompt_tokens"] <= 512
  for mode in ("dense", "rtpurbo"):
    assert len(pk[mode]["tokens"]) == 12 and pk[mode]["score"] in (0.0, 1.0)
  # Sparsity: local heads see 4 sinks + 128 window tokens, so the compute sparsity is at least
  # the local heads' share (6 of 8) of 1 - 132 / context, and it grows with the length.
  sp = {s["length"]: s for s in r["sparsity"]}
  assert sorted(sp) == [256, 512]
  for length, s in sp.items():
    assert 0.0 <= s["selected_fraction"] <= 1.0 and 0.0 <= s["recall"] <= 1.0 + 1e-6
    mean_ctx = (length // 2 + length) / 2  # queries sit in the second half
    assert s["compute_sparsity"] >= 0.75 * (1 - 132 / (0.9 * mean_ctx)) - 0.05
  assert sp[512]["compute_sparsity"] > sp[256]["compute_sparsity"]
  # Dense cache / RTPurbo cache grows with the length (RTPurbo local heads stay at 132 slots).
  assert sp[512]["cache_ratio"] > sp[256]["cache_ratio"] > 0


def test_tpu_vm(tmp_path):
  res_file = tmp_path / "tpu.json"
  execute("tpu_vm.ipynb", tmp_path, 2, CONFIG="configs/tiny.py", MODEL="", TOKENIZER="byte",
          CALIB_LEN=512, NEEDLE_LEN=32, STEPS=2, SEQ_LEN=256, LONG_CONFIG="configs/tiny.py",
          CTX="512", MAX_NEW_TOKENS=4, DEVICE_MEMORY="", WORKDIR=str(tmp_path / "work"),
          RESULTS=str(res_file))
  r = json.loads(res_file.read_text())
  assert r["devices"] == 2 and r["mesh"]["fsdp"] == 2  # tiny mesh: fsdp = every device
  assert r["plan"]["retrieval_heads"] == 2 and len(r["stage1_losses"]) == 2
  # Memory plan: the dense cache holds K and V of every layer, KV head and position (fp32);
  # RTPurbo keeps less. Weights are the same in both modes.
  dense, rtp = r["memory"]["dense"], r["memory"]["rtpurbo"]
  assert dense["cache_bytes"] >= 2 * 2 * 2 * 512 * 16 * 4
  assert rtp["cache_bytes"] < dense["cache_bytes"]
  assert rtp["weight_bytes"] >= dense["weight_bytes"] and dense["fits"] and rtp["fits"]
  inf = r["infer"]
  assert inf["prompt_tokens"] == 512 - 4 and inf["generated_tokens"] == 4
  assert inf["prefill_tok_s"] > 0 and inf["decode_tok_s"] > 0
