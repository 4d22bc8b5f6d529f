"""The committed SmolLM2 RTPurbo artifacts: the registered name loads them over the base model,
README command 1 (`python infer.py`, passkey in 4K tokens of Shakespeare) finds the key, and
the evaluation CLI reproduces the committed small CPU run (`eval_results/repro_cpu/`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def artifacts():
  from rtpurbo_jax.hf import api
  folder = os.path.join(api.artifacts_dir(), api.SMOLLM2_RTPURBO)
  with open(os.path.join(folder, api.ARTIFACT_CONFIG)) as f:
    config = json.load(f)
  return config, load_file(os.path.join(folder, api.ARTIFACT_INDEXER))


def test_registered_name_overlays_committed_plan_and_indexer(artifacts):
  import rtpurbo_jax as rj
  from rtpurbo_jax.convert import indexer_weights

  config, tensors = artifacts
  model = rj.from_pretrained("smollm2-135m-rtpurbo")
  base = rj.from_pretrained("smollm2-135m")
  hw = config["headwise_config"]
  mask = np.asarray([hw[str(i)] for i in range(model.cfg.num_layers)], bool)
  np.testing.assert_array_equal(model.plan.mask(), mask)
  assert model.sparse.mode == "rtpurbo" and model.sparse.window == hw["swa_token_num"]
  ws = indexer_weights(model)
  assert sorted(ws) == sorted(int(n.split(".")[2]) for n in tensors if n.endswith("wq"))
  for i, (wq, wk) in ws.items():
    np.testing.assert_array_equal(np.asarray(wq), tensors[f"model.layers.{i}.self_attn.indexer.wq"])
    np.testing.assert_array_equal(np.asarray(wk), tensors[f"model.layers.{i}.self_attn.indexer.wk"])
  # The backbone is the base model's, untouched.
  np.testing.assert_array_equal(np.asarray(model.layers[5].attn.q_proj[...]),
                                np.asarray(base.layers[5].attn.q_proj[...]))


def test_readme_command_finds_the_passkey():
  proc = subprocess.run([sys.executable, "infer.py", "--stream=false"], cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  out = proc.stdout
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "model: smollm2-135m-rtpurbo, mode=rtpurbo; the model's calibrated head plan" in out
  line = next(l for l in out.splitlines() if l.startswith("passkey "))
  key = line.split()[1].rstrip(":")
  assert line.endswith("FOUND in the answer") and "NOT" not in line, out[-2000:]
  answer = next(l for l in out.splitlines() if l.startswith("answer:"))
  assert key in answer
  prompt_tokens = int(out.split("prompt ")[1].split()[0])
  assert 3800 <= prompt_tokens <= 4096


def test_eval_cli_reproduces_the_committed_small_run(tmp_path):
  """`python -m rtpurbo_jax.eval --config.eval.reproduce=...` on the committed artifacts gives
  the committed small CPU run again: identical predictions, perplexities to 1e-4 relative."""
  ref = os.path.join(ROOT, "eval_results", "repro_cpu", "results.json")
  with open(ref) as f:
    recorded = json.load(f)
  assert recorded["examples"] and recorded["perplexity"]["rtpurbo"]
  proc = subprocess.run(
      [sys.executable, "-m", "rtpurbo_jax.eval", "--config=configs/smollm2_135m.py",
       f"--config.eval.reproduce={ref}", f"--config.eval.out_dir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(tmp_path / "reproduce.json") as f:
    rep = json.load(f)
  assert rep["ok"] and not rep["mismatches"]
  assert rep["predictions"] >= len(recorded["examples"]) and rep["perplexities"] >= 1
