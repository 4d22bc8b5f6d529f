"""The committed SmolLM2 RTPurbo artifacts: the registered name loads them (plan, indexer and
the stage-2 backbone delta) over the base model,
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


def test_registered_name_overlays_committed_plan_indexer_and_delta(artifacts):
  import rtpurbo_jax as rj
  from rtpurbo_jax.hf import api
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
  # The learned distance bias: loaded where the artifacts set buckets, one row per head.
  from rtpurbo_jax.convert import distance_biases
  n = config["rtpurbo_sparse"].get("distance_buckets", 0)
  assert model.sparse.distance_buckets == n
  biases = distance_biases(model)
  assert sorted(biases) == (sorted(ws) if n else [])
  for i, b in biases.items():
    np.testing.assert_array_equal(np.asarray(b),
                                  tensors[f"model.layers.{i}.self_attn.indexer.distance_bias"])
  # The backbone is the base model's plus the committed stage-2 delta (rank-r LoRA factors of
  # each linear weight, full deltas of the norm gains), in the HF layout.
  from rtpurbo_jax import lowrank
  info = config["backbone_delta"]
  folder = os.path.join(api.artifacts_dir(), api.SMOLLM2_RTPURBO)
  delta = load_file(os.path.join(folder, info["file"]))
  assert info["rank"] >= 1 and delta
  by_hf = {t.entry.hf: t for t in lowrank.targets(model)}
  for stem in ("model.layers.5.self_attn.q_proj", "model.layers.25.mlp.down_proj"):
    t = by_hf[stem + ".weight"]
    w_base = lowrank.to_hf_matrix(t, _param(base, t.key))
    got = lowrank.to_hf_matrix(t, _param(model, t.key)) - w_base
    want = (delta[stem + ".lora_B.weight"].astype(np.float64) @
            delta[stem + ".lora_A.weight"].astype(np.float64))
    assert delta[stem + ".lora_A.weight"].shape[0] == info["rank"]
    assert np.abs(want).max() > 1e-4
    # The sum is rounded to float32: one ulp of the largest weight.
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=np.finfo(np.float32).eps * np.abs(w_base).max())
  norm = "model.layers.3.input_layernorm.weight"
  assert norm + ".delta" in delta
  t = by_hf[norm]
  got = lowrank.to_hf_matrix(t, _param(model, t.key)) - lowrank.to_hf_matrix(t, _param(base,
                                                                                      t.key))
  np.testing.assert_allclose(got, delta[norm + ".delta"], rtol=0, atol=1e-6)
  # The embedding is not part of the delta: untouched.
  np.testing.assert_array_equal(np.asarray(model.embed[...]), np.asarray(base.embed[...]))
  # Without the delta (what stage 2 starts from): the base backbone, the same plan and indexer.
  stage1 = rj.from_pretrained(api.SMOLLM2_RTPURBO_STAGE1)
  np.testing.assert_array_equal(stage1.plan.mask(), mask)
  for key in ("layers/5/attn/q_proj", "layers/3/input_norm/scale"):
    np.testing.assert_array_equal(_param(stage1, key), _param(base, key))
  for i, (wq, _) in indexer_weights(stage1).items():
    np.testing.assert_array_equal(np.asarray(wq), tensors[f"model.layers.{i}.self_attn.indexer.wq"])


def test_export_indexer_writes_artifacts_the_registered_name_loads(tmp_path):
  """`scripts/export_indexer.py`: the npz's W_q / W_k and its distance bias cut to the buckets
  the fit reached, the chosen top_p, and the committed backbone delta byte for byte; the
  overlay of those artifacts loads exactly that."""
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  import export_indexer
  import rtpurbo_jax as rj
  from rtpurbo_jax.convert import distance_biases, indexer_weights
  from rtpurbo_jax.hf import api

  assert [export_indexer.reached_buckets(n, 64) for n in (64, 128, 4096, 8192)] == [1, 2, 7, 8]
  model = rj.from_pretrained(api.SMOLLM2_RTPURBO)
  ws = indexer_weights(model)
  rng = np.random.default_rng(0)
  wq = np.concatenate([np.asarray(ws[i][0]) for i in sorted(ws)]) * 1.5
  wk = np.concatenate([np.asarray(ws[i][1]) for i in sorted(ws)])
  bias = rng.standard_normal((len(wq), 16)).astype(np.float32)
  np.savez(tmp_path / "ix.npz", wq=wq, wk=wk, distance_bias=bias)
  out = tmp_path / "assets" / api.SMOLLM2_RTPURBO
  _ = subprocess.run([sys.executable, "scripts/export_indexer.py", "--npz",
                      str(tmp_path / "ix.npz"), "--train_len", "4096", "--top_p", "0.7",
                      "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
  src = os.path.join(api.artifacts_dir(), api.SMOLLM2_RTPURBO)
  delta = json.load(open(os.path.join(src, api.ARTIFACT_CONFIG)))["backbone_delta"]
  with open(os.path.join(src, delta["file"]), "rb") as a, open(out / delta["file"], "rb") as b:
    assert a.read() == b.read()
  folder = api.overlay_folder(api.smollm2_folder(), str(out), str(tmp_path / "overlay"))
  back = rj.from_pretrained(folder)
  assert back.sparse.top_p == 0.7 and back.sparse.distance_buckets == 7
  got_ws, got_b = indexer_weights(back), distance_biases(back)
  start = 0
  for i in sorted(ws):
    n = len(ws[i][0])
    np.testing.assert_array_equal(np.asarray(got_ws[i][0]), wq[start:start + n])
    np.testing.assert_array_equal(np.asarray(got_ws[i][1]), wk[start:start + n])
    np.testing.assert_array_equal(np.asarray(got_b[i]), bias[start:start + n, :7])
    start += n
  for key in ("layers/5/attn/q_proj", "layers/3/input_norm/scale"):  # the same backbone
    np.testing.assert_array_equal(_param(back, key), _param(model, key))


def _param(model, key: str) -> np.ndarray:
  obj = model
  for part in key.split("/"):
    obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
  return np.asarray(obj[...], np.float64)


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
