"""train.py end to end on the tiny config (subprocess): stage1 -> stage2 -> final HF folder,
resume as a no-op, and one clear error for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "to be or not that is the question whether tis nobler in mind suffer".split()


def train(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one device: the tiny mesh
  return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                         "--config=" + os.path.join(ROOT, "configs", "tiny.py"), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def setup(tmp_path, rng):
  from rtpurbo_jax.attention.plan import HeadPlan
  from rtpurbo_jax.config import SparseConfig
  d = tmp_path / "data"
  d.mkdir()
  for i in range(3):
    (d / f"{i}.txt").write_text(" ".join(rng.choice(WORDS, size=400)))
  with open(d / "chat.jsonl", "w") as f:
    for i in range(3):
      f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS, size=60)),
                          "response": " ".join(rng.choice(WORDS, size=8))}) + "\n")
  plan = HeadPlan.from_mask([[0, 1, 0, 0], [1, 0, 0, 1]], 2)
  plan_file = tmp_path / "plan.json"
  plan_file.write_text(json.dumps({"headwise_config": plan.to_headwise_config(SparseConfig())}))
  work = tmp_path / "work"
  args = [f"--config.train.workdir={work}", f"--config.data.train_files={d}/*.txt",
          f"--config.data.stage2_files={d}/chat.jsonl", "--config.data.tokenizer=byte",
          f"--config.plan.path={plan_file}", "--config.train.stages=stage1,stage2",
          "--config.train.progress=False", "--config.train.log_every=1",
          "--config.train.stage1.steps=3", "--config.train.stage1.seq_len=256",
          "--config.train.stage1.query_chunk=64", "--config.train.stage1.warmup=1",
          "--config.train.stage2.steps=2", "--config.train.stage2.seq_len=192",
          "--config.train.stage2.batch_size=2", "--config.train.stage2.warmup=1",
          "--config.train.stage2.position_chunk=64"]
  return work, args, plan


def test_pipeline_runs_resumes_and_exports(setup):
  work, args, plan = setup
  r = train(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = lambda stage: (work / "metrics" / f"{stage}.jsonl").read_text().splitlines()
  s1, s2 = lines("stage1"), lines("stage2")
  assert len(s1) == 3 and len(s2) == 2
  assert {"loss", "kl", "recall", "fraction", "tokens_per_s"} <= set(json.loads(s1[-1]))
  assert json.loads(s2[-1])["weight"] > 0
  assert (work / "ckpt" / "stage1" / "3").is_dir() and (work / "ckpt" / "stage2" / "2").is_dir()
  assert (work / "teacher_top10" / "shard_00000.npz").exists()
  assert json.loads((work / "config.json").read_text())["train"]["stage1"]["steps"] == 3
  assert list((work / "tb").rglob("events.out.tfevents*"))
  # The exported RTPurbo folder carries the plan and the trained indexer.
  cfg = json.loads((work / "final" / "config.json").read_text())
  assert cfg["headwise_config"]["1"] == [1, 0, 0, 1]
  import rtpurbo_jax
  model = rtpurbo_jax.from_pretrained(str(work / "final"))
  assert model.plan == plan and model.sparse.mode == "rtpurbo"
  wq = np.asarray(model.layers[1].attn.indexer_wq[...])
  from rtpurbo_jax.attention.indexer import rotary_init
  assert not np.allclose(wq, rotary_init(2, 8, 16))  # trained, not the initialisation
  # Re-running resumes: nothing left to do, nothing appended.
  r = train(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert len(lines("stage1")) == 3 and len(lines("stage2")) == 2


def test_bad_input_gives_one_clear_error(setup, tmp_path):
  work, args, _ = setup
  r = train(*args, "--config.train.stage1.bogus=1")
  assert r.returncode == 2 and "unknown config key" in r.stderr
  r = train(*[a for a in args if "train_files" not in a],
            f"--config.data.train_files={tmp_path}/missing/*.txt")
  assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
  r = train(*args, "--config.train.stages=stage1,stage3")
  assert r.returncode == 2 and "unknown stage" in r.stderr


def test_calibrate_stage_writes_a_plan(setup):
  pytest.importorskip("rtpurbo_jax.calibration")
  work, args, _ = setup
  args = [a for a in args if not a.startswith(("--config.plan.path", "--config.train.stages"))]
  filler = [a.split("=", 1)[1] for a in args if "train_files" in a][0]
  r = train(*args, "--config.train.stages=calibrate", f"--config.data.filler_files={filler}",
            "--config.train.calibrate.length=512", "--config.train.calibrate.needle_len=32")
  assert r.returncode == 0, r.stderr[-3000:]
  hw = json.loads((work / "plan.json").read_text())["headwise_config"]
  assert sum(sum(hw[str(l)]) for l in range(2)) == 2  # 25% of 8 query heads
