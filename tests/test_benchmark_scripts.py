"""The GPU benchmark scripts on CPU-sized shapes, so that they cannot rot between GPU runs:
`benchmarks/e2e.py --tiny` (paper mode and sparse prefill, results merged by variant name),
`benchmarks/check_prefill.py --smoke` (the sparse-prefill checks in the Pallas interpreter
against the references) and `benchmarks/stage1_speed.py --smoke` (the stage-1 loss before and
after its rewrite, equal on a fixed batch), and `scripts/stage1_objective.py --smoke` (token vs
block stage-1 objective and a widened indexer, on a tiny model)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, **env):
  full = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  full.pop("XLA_FLAGS", None)  # one host device, as on a GPU machine
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_e2e_tiny_paper_and_sparse_prefill(tmp_path):
  out = tmp_path / "e2e.json"
  log = _run(["benchmarks/e2e.py", "--tiny", "--only=rtpurbo@2K", "--indexer_scale", "1,16",
              "--out", str(out)], tmp_path)
  assert "rtpurbo@2K/x16: TTFT" in log
  log = _run(["benchmarks/e2e.py", "--tiny", "--only=rtpurbo@2K", "--sparse_prefill",
              "--indexer_scale", "4", "--out", str(out)], tmp_path)
  assert "rtpurbo@2K/sparse_prefill/x4: TTFT" in log
  variants = json.loads(out.read_text())["variants"]
  paper, sparse = variants["rtpurbo@2K"], variants["rtpurbo@2K/sparse_prefill/x4"]
  assert paper["prefill_selected_fraction"] is None and "error" not in paper
  assert sparse["sparse_prefill"] and sparse["indexer_scale"] == 4.0
  sharp = variants["rtpurbo@2K/x16"]  # paper-mode prefill, a sharper decode selection
  assert sharp["indexer_scale"] == 16.0 and sharp["prefill_selected_fraction"] is None
  assert 0.0 < sharp["selected_fraction"] < paper["selected_fraction"]
  assert 0.0 < sparse["prefill_selected_fraction"] <= 1.0
  assert sparse["prompt_tokens"] == paper["prompt_tokens"] > 0
  assert variants["dense@8K:planner"]["fits"] is False  # the tiny setup's refusal


def test_check_prefill_smoke(tmp_path):
  log = _run(["benchmarks/check_prefill.py", "--smoke", "--checks",
              "model_sparse,sparse_chunk", "--out", str(tmp_path)], tmp_path,
             RTPURBO_INTERPRET="1", RTPURBO_KERNELS="gpu")
  rows = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
  by = {r["check"]: r for r in rows}
  assert by["sparse_prefill_model/float32"]["ok"]
  assert by["cache_prefill_select"]["ok"] and by["cache_sparse_prefill"]["ok"]
  assert 0.0 < by["sparse_chunk/time"]["selected_fraction"] < 1.0
  assert json.loads((tmp_path / "check.json").read_text()) == rows


def test_stage1_speed_smoke_same_loss_before_and_after(tmp_path):
  """The single-pass stage-1 loss equals the pre-rewrite one (benchmarks/stage1_baseline.py)
  on a fixed batch of a tiny model (the script asserts 1e-3 relative; checked here too), and
  the stage-2 step of the timing script runs."""
  _run(["benchmarks/stage1_speed.py", "--smoke", "--parts", "stage1,stage2", "--out",
        str(tmp_path)], tmp_path)
  rows = json.loads((tmp_path / "stage1_speed.json").read_text())["rows"]
  same = rows["stage1/loss_rel_diff/reference"]
  assert same["rel_diff"] <= 1e-3 and same["before"] > 0
  assert "error" not in rows["stage2/64"] and rows["stage2/64"]["ms_per_sequence"] > 0


def test_stage1_objective_smoke(tmp_path):
  _run(["scripts/stage1_objective.py", "--smoke", "--out", str(tmp_path), "--train_len", "64",
        "--train_windows", "2", "--steps", "3", "--heldout_len", "96", "--heldout_windows",
        "2", "--chunk", "32", "--top_p", "0.9", "--query_stride", "3", "--variants",
        "token,block,token_r12,token_pos"], tmp_path)
  rep = json.loads((tmp_path / "stage1_objective.json").read_text())
  rows = rep["heldout"]["0.9"]
  assert set(rows) == {"committed", "token", "block", "token_r12", "token_pos"}
  assert rep["units"] == 2 * 3
  assert np.load(tmp_path / "indexer_token_r12.npz")["wq"].shape[1] == 12  # smoke r is 8
  assert "distance_bias" not in np.load(tmp_path / "indexer_token.npz")
  bias = np.load(tmp_path / "indexer_token_pos.npz")["distance_bias"]
  assert bias.shape == (3, 16) and np.abs(bias).max() > 0  # trained from zero
  for name, row in rows.items():
    assert 0.0 < row["recall"]["mean"] <= 1.0 and 0.0 < row["fraction"]["mean"] <= 1.0
    assert ("diff" in row["kl"]) == (name != "token")
  # Training moved the indexers: their held-out KL differs from the committed one's.
  assert rows["token"]["kl"]["mean"] != rows["committed"]["kl"]["mean"]
  assert [r["step"] for r in rep["train_log"]["block"]][-1] == 3
  report = (tmp_path / "stage1_objective.md").read_text()
  assert "| block | 0.9 |" in report and "one query in 3" in report
  assert rep["settings"]["query_stride"] == 3
  # --load evaluates the saved indexers again, here at another held-out length: no training.
  again = tmp_path / "again"
  _run(["scripts/stage1_objective.py", "--smoke", "--out", str(again), "--load", str(tmp_path),
        "--heldout_len", "128", "--heldout_windows", "2", "--chunk", "32", "--top_p", "0.9",
        "--variants", "token,token_pos"], tmp_path)
  rep2 = json.loads((again / "stage1_objective.json").read_text())
  assert rep2["train_log"] == {"token": [], "token_pos": []}
  assert rep2["settings"]["loaded_from"] == str(tmp_path)
  assert rep2["heldout"]["0.9"]["token_pos"]["kl"]["mean"] != rows["token_pos"]["kl"]["mean"]


def test_widened_indexer_starts_as_the_committed_scorer(rng):
  spec = importlib.util.spec_from_file_location(
      "stage1_objective", os.path.join(ROOT, "scripts", "stage1_objective.py"))
  stage1_objective = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(stage1_objective)
  wq, wk = (rng.standard_normal((3, 16, 32)).astype(np.float32) for _ in range(2))
  q, k = (rng.standard_normal((5, 32)).astype(np.float32) for _ in range(2))
  wq2, wk2 = stage1_objective.widen(wq, wk, 24, seed=int(rng.integers(1 << 30)))
  assert wq2.shape == wk2.shape == (3, 24, 32)
  before = np.einsum("hrd,qd,hre,ke->hqk", wq, q, wk, k)
  after = np.einsum("hrd,qd,hre,ke->hqk", wq2, q, wk2, k)
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-4)
  assert np.all(np.std(wk2[:, 16:], axis=(1, 2)) > 0.5 * np.std(wk, axis=(1, 2)))
  assert stage1_objective.parse_variant("token_r32") == ("token", 32, False)
  assert stage1_objective.parse_variant("block") == ("block", None, False)
  assert stage1_objective.parse_variant("token_r32_pos") == ("token", 32, True)
  with pytest.raises(SystemExit, match="tokens_pos"):
    stage1_objective.parse_variant("tokens_pos")


def test_stage2_step_smoke(tmp_path):
  """The stage-2 step benchmark runs the Trainer's step and the bare gradient on a tiny
  model, and records both."""
  _run(["benchmarks/stage2_step.py", "--smoke", "--rows", "bare/b8,trainer/lora", "--out",
        str(tmp_path)], tmp_path)
  rows = json.loads((tmp_path / "stage2_step.json").read_text())["rows"]
  assert set(rows) == {"bare/b8", "trainer/lora"}
  for row in rows.values():
    assert "error" not in row and row["s"] > 0 and row["first_call_s"] > 0
