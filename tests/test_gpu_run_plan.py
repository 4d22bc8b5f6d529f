"""scripts/gpu_run.py plans its job correctly: a preset's steps, waits and flags are valid."""

import importlib.util
import json
import os
import shlex

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpu_run():
  spec = importlib.util.spec_from_file_location("gpu_run", os.path.join(ROOT, "scripts",
                                                                        "gpu_run.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _config_key_exists(cfg, dotted: str) -> bool:
  node = cfg
  for part in dotted.split("."):
    if part not in node:
      return False
    node = node[part]
  return True


@pytest.mark.parametrize("preset", ["stage2", "stage2_lora"])
def test_stage2_presets_plan_valid_steps(gpu_run, tmp_path, preset):
  from rtpurbo_jax.config import run_config
  ap = gpu_run.build_parser()
  args = ap.parse_args(["job", "--preset", preset, "--out", str(tmp_path / "out")])
  out, big = str(tmp_path / "out"), str(tmp_path / "big")
  steps, cmds, deps = gpu_run.plan_job(args, out, big)
  run = {"stage2": "stage2_full", "stage2_lora": "stage2_lora"}[preset]
  assert steps[0] == run and "stage1" not in steps and set(steps) == set(cmds) == set(deps)
  # one stage-2 run per job: two side by side ran an 80 GB GPU out of memory
  assert [s for s in steps if s.startswith("stage2_")] == [run] and deps[run] == []
  assert all(deps[s] == [run] for s in steps[1:]) and len(steps) >= 3
  cfg = run_config()
  for step in steps:
    cmd = cmds[step]
    assert "{big}" not in " ".join(cmd) and "{out}" not in " ".join(cmd)
    if step.startswith("stage2_"):  # the stage2 subcommand accepts every flag
      sub = ap.parse_args(cmd[2:])
      assert sub.cmd == "stage2" and sub.big == big and sub.steps == 100
      assert sub.max_minutes > 0 and 100 % sub.checkpoint_every == 0
      # a pass over the whole batch (~55 GiB at 8 x 4K) or half of it (~34 GiB) is too big
      assert 0 < sub.micro_batch <= sub.batch // 4 and sub.batch % sub.micro_batch == 0
      assert (sub.lora_rank > 0) == (preset == "stage2_lora")
      continue
    flags = [f for f in cmd if f.startswith("--config.")]
    assert any(f.startswith("--config.eval.out_dir=" + os.path.join(out, step)) for f in flags)
    for f in flags:
      key = f[len("--config."):].split("=", 1)[0]
      assert _config_key_exists(cfg, key), f"{step}: unknown config key {key}"
  model = {s: next(f for f in cmds[s] if f.startswith("--config.eval.model="))
           for s in steps if s.startswith("eval_")}
  if preset == "stage2":
    assert model["eval_s2full"].endswith(os.path.join(big, "stage2_full", "hf_full"))
    assert model["eval_s2fulltasks"].endswith(os.path.join(big, "stage2_full", "hf_full"))
    assert model["eval_s2fulld16"].endswith(os.path.join(big, "stage2_full", "hf"))
  else:
    assert set(model.values()) == {"--config.eval.model=" + os.path.join(big, "stage2_lora",
                                                                         "hf")}


def test_levers_preset_evaluates_the_committed_model(gpu_run, tmp_path):
  from rtpurbo_jax.config import run_config
  args = gpu_run.build_parser().parse_args(["job", "--preset", "levers", "--out",
                                            str(tmp_path / "out")])
  steps, cmds, deps = gpu_run.plan_job(args, str(tmp_path / "out"), str(tmp_path / "big"))
  assert steps == ["eval_s2topp095", "eval_s2topk"] and all(d == [] for d in deps.values())
  cfg = run_config()
  for step in steps:
    flags = dict(f[len("--config."):].split("=", 1) for f in cmds[step]
                 if f.startswith("--config."))
    assert "eval.model" not in flags  # the committed smollm2-135m-rtpurbo, delta included
    assert flags["eval.lengths"] == "4K,2K" and flags["eval.ppl_samples"] == "0"
    for key in flags:
      assert _config_key_exists(cfg, key), f"{step}: unknown config key {key}"
  assert "sparse.top_p=0.95" in " ".join(cmds["eval_s2topp095"])
  assert "eval.modes=rtpurbo,topk" in " ".join(cmds["eval_s2topk"])


def test_floor_preset_measures_the_floor_on_the_committed_model(gpu_run, tmp_path):
  from rtpurbo_jax.config import run_config
  args = gpu_run.build_parser().parse_args(["job", "--preset", "floor", "--out",
                                            str(tmp_path / "out")])
  steps, cmds, deps = gpu_run.plan_job(args, str(tmp_path / "out"), str(tmp_path / "big"))
  assert all(d == [] for d in deps.values()) and len(steps) == 4
  cfg = run_config()
  flags = {s: dict(f[len("--config."):].split("=", 1) for f in cmds[s]
                   if f.startswith("--config.")) for s in steps}
  for step, f in flags.items():
    assert "eval.model" not in f and all(_config_key_exists(cfg, k) for k in f), step
  floors = {s: (f["sparse.min_blocks"], f["eval.lengths"], f["eval.modes"])
            for s, f in flags.items()}
  assert sorted(floors.values()) == [
      ("4", "8K,4K,2K", "rtpurbo"), ("8", "4K,2K", "topk"), ("8", "8K", "rtpurbo,topk"),
      ("8", "8K,4K", "rtpurbo")]


def test_stage2_levers_preset_runs_the_levers_beside_stage2(gpu_run, tmp_path):
  args = gpu_run.build_parser().parse_args(["job", "--preset", "stage2_levers", "--out",
                                            str(tmp_path / "out")])
  steps, cmds, deps = gpu_run.plan_job(args, str(tmp_path / "out"), str(tmp_path / "big"))
  assert [s for s in steps if s.startswith("stage2_")] == ["stage2_full"]
  sub = gpu_run.build_parser().parse_args(cmds["stage2_full"][2:])
  assert sub.steps == 30 and sub.save_full and sub.lora_rank == 0 and sub.micro_batch == 2
  # the levers start with stage 2 (nothing to wait for), ahead of stage 2's own evaluations
  assert steps[1:3] == ["eval_s2floor8", "eval_s2topp095"]
  assert deps["eval_s2floor8"] == deps["eval_s2topp095"] == []
  assert "sparse.min_blocks=8" in " ".join(cmds["eval_s2floor8"])
  from rtpurbo_jax.config import run_config
  assert _config_key_exists(run_config(), "sparse.min_blocks")
  assert {s for s in steps if deps[s] == ["stage2_full"]} == {
      "eval_s2full", "eval_s2fulld16", "eval_s2fulltasks"}


def test_every_subcommand_runs_a_defined_function(gpu_run):
  """`main` dispatches each subcommand by name: all of them, and every helper they call, must
  exist (the device calls are the only ones that run `prepare` / `setup` / `start` / `wait`)."""
  import argparse
  import ast
  import builtins
  ap = gpu_run.build_parser()
  sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
  for name in sub.choices:
    assert callable(getattr(gpu_run, name, None)), f"subcommand {name} has no function"
  tree = ast.parse(open(gpu_run.__file__).read())
  defined = set(dir(builtins)) | set(vars(gpu_run))
  missing = set()
  for fn in tree.body:  # each top-level function with its nested ones, whose names it shares
    if not isinstance(fn, ast.FunctionDef):
      continue
    local = {a.arg for a in ast.walk(fn) if isinstance(a, ast.arg)}
    for node in ast.walk(fn):
      if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
        local.add(node.id)
      elif isinstance(node, (ast.Import, ast.ImportFrom)):
        local.update((a.asname or a.name).split(".")[0] for a in node.names)
      elif isinstance(node, (ast.FunctionDef, ast.ExceptHandler)) and node.name:
        local.add(node.name)
    for node in ast.walk(fn):
      if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        if node.id not in local and node.id not in defined:
          missing.add(node.id)
  assert not missing, f"names used but defined nowhere: {sorted(missing)}"


def test_plan_refuses_a_wait_for_a_missing_step(gpu_run, tmp_path):
  args = gpu_run.build_parser().parse_args(
      ["job", "--steps", "", "--evals", "x@stage2_nope:" + shlex.quote("--config.seed=1")])
  with pytest.raises(SystemExit, match="stage2_nope"):
    gpu_run.plan_job(args, str(tmp_path / "out"), str(tmp_path / "big"))


def test_time_budget_stops_at_a_checkpoint_after_the_limit(gpu_run):
  now = [0.0]
  on_step = gpu_run.time_budget(2.0, 20, clock=lambda: now[0])
  for step in range(1, 20):  # before the limit: never
    now[0] = step * 5.0
    on_step(step, {})
  now[0] = 121.0
  for step in (41, 59):  # after it, but not a checkpoint step
    on_step(step, {})
  with pytest.raises(gpu_run.TimeUp) as stop:
    on_step(60, {})
  assert stop.value.step == 60
  never = gpu_run.time_budget(0, 20, clock=lambda: 1e9)
  never(20, {})  # 0 minutes: no budget


def test_run_within_keeps_the_checkpoint_it_stopped_at(gpu_run, tmp_path, seed):
  """A run stopped by its time budget returns the weights of its last checkpoint: those of
  a run asked for exactly that many steps."""
  from configs.tiny import get_config
  from rtpurbo_jax.attention.indexer import IndexerParam
  from flax import nnx

  def cfg_in(work):
    cfg = get_config()
    (tmp_path / "t.txt").write_text("some words and other words " * 100)
    cfg.data.train_files, cfg.data.tokenizer = str(tmp_path / "t.txt"), "byte"
    cfg.train.update(workdir=str(work), stages="calibrate,stage1", progress=False,
                     save_final=False, checkpoint_every=2)
    cfg.seed = seed % 1000
    cfg.train.stage1.update(steps=6, seq_len=128, query_chunk=64)
    return cfg

  cfg = cfg_in(tmp_path / "stopped")
  model, done = gpu_run.run_within(cfg, "stage1", 1e-9, 2)  # spent at once: stops at step 2
  assert done == 2
  cfg2 = cfg_in(tmp_path / "two")
  cfg2.train.stage1.steps = 2
  model2, done2 = gpu_run.run_within(cfg2, "stage1", 0, 2)
  assert done2 == 2
  cfg6 = cfg_in(tmp_path / "six")
  model6, _ = gpu_run.run_within(cfg6, "stage1", 0, 2)
  idx = lambda m: jax.tree.leaves(nnx.state(m, IndexerParam))
  for a, b, c in zip(idx(model), idx(model2), idx(model6)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(np.asarray(a), np.asarray(c))
             for a, c in zip(idx(model), idx(model6)))


def test_presets_before_the_floor_pin_the_papers_top_p(gpu_run, tmp_path):
  """The SmolLM2 config sets a floor of 8; the presets recorded before it keep min_blocks 0 in
  their stage-2 training and evaluations (the runs they recorded), the floor's keep theirs."""
  for preset, floor_steps in (("stage2_lora", set()), ("stage2", set()), ("levers", set()),
                              ("stage2_levers", {"eval_s2floor8"})):
    args = gpu_run.build_parser().parse_args(["job", "--preset", preset, "--out",
                                              str(tmp_path / "out")])
    steps, cmds, _ = gpu_run.plan_job(args, str(tmp_path / "out"), str(tmp_path / "big"))
    for step in steps:
      flags = [f for f in cmds[step] if "min_blocks" in f]
      if step.startswith("stage2_"):
        assert flags == ["--min_blocks=0"], (preset, step)
        sub = gpu_run.build_parser().parse_args(cmds[step][2:])
        assert sub.min_blocks == 0
      else:
        want = "8" if step in floor_steps else "0"
        assert flags == [f"--config.sparse.min_blocks={want}"], (preset, step, flags)


def test_plan_at_ratio_ranks_by_the_committed_scores(gpu_run, tmp_path):
  """At the committed ratio the plan is the committed one; at 0.2 it adds the next heads of
  the same ranking (a superset), with the config's sparse settings."""
  from rtpurbo_jax.attention.plan import read_plan
  from configs.smollm2_135m import get_config
  cfg = get_config()
  committed, _ = read_plan(os.path.join(ROOT, "assets", "smollm2-135m-rtpurbo",
                                        "rtpurbo_config.json"), 3)
  same, _ = read_plan(gpu_run.plan_at_ratio(cfg, 0.15, str(tmp_path / "p15.json")), 3)
  np.testing.assert_array_equal(same.mask(), committed.mask())
  wider, settings = read_plan(gpu_run.plan_at_ratio(cfg, 0.2, str(tmp_path / "p20.json")), 3)
  assert int(wider.mask().sum()) == 54 and int(committed.mask().sum()) == 40
  assert (wider.mask() >= committed.mask()).all()
  scores = np.asarray(json.load(open(gpu_run.CALIBRATION))["scores"])
  assert scores[wider.mask()].min() >= scores[~wider.mask()].max()
  assert settings["top_p"] == cfg.sparse.top_p and settings["window"] == cfg.sparse.window


def test_ratio_preset_trains_stage2_on_its_own_stage1(gpu_run, tmp_path):
  from rtpurbo_jax.config import run_config
  ap = gpu_run.build_parser()
  args = ap.parse_args(["job", "--preset", "ratio020", "--out", str(tmp_path / "out")])
  out, big = str(tmp_path / "out"), str(tmp_path / "big")
  steps, cmds, deps = gpu_run.plan_job(args, out, big)
  assert steps[:3] == ["stage1", "heldout", "stage2_lora"]
  s1 = ap.parse_args(cmds["stage1"][2:])
  assert s1.cmd == "stage1" and s1.retrieval_ratio == 0.2 and s1.steps == 600
  assert s1.seq_len == 8192
  # stage 2 starts from this job's stage-1 artifacts, so it must wait for them
  assert deps["stage2_lora"] == ["stage1"] and deps["heldout"] == ["stage1"]
  s2 = ap.parse_args(cmds["stage2_lora"][2:])
  assert (s2.lora_rank, s2.lr, s2.steps, s2.stop_at, s2.min_blocks) == (16, 1e-4, 100, 30, 0)
  assert s2.stop_at % s2.checkpoint_every == 0 and s2.max_minutes == 0
  cfg = run_config()
  for step in steps[3:]:
    flags = dict(f[len("--config."):].split("=", 1) for f in cmds[step]
                 if f.startswith("--config."))
    assert all(_config_key_exists(cfg, k) for k in flags), step
    tuned = step != "eval_r020s1ppl"
    assert deps[step] == ["stage1"] + ["stage2_lora"] * tuned
    assert flags["sparse.min_blocks"] == ("8" if tuned else "0")
    assert (flags.get("eval.model") == os.path.join(big, "stage2_lora", "hf")) == tuned
  lengths = {s: dict(f.split("=", 1) for f in cmds[s] if "eval.lengths" in f)
             for s in steps[3:]}
  assert sorted(v["--config.eval.lengths"] for v in lengths.values()) == [
      "4K,2K", "8K", "8K,4K", "8K,4K"]


def test_short_ratio_preset_evaluates_its_stage1_model(gpu_run, tmp_path):
  args = gpu_run.build_parser().parse_args(["job", "--preset", "ratio020_s1", "--out",
                                            str(tmp_path / "out")])
  steps, cmds, deps = gpu_run.plan_job(args, str(tmp_path / "out"), str(tmp_path / "big"))
  assert steps[0] == "stage1" and "--retrieval_ratio" in cmds["stage1"]
  assert cmds["stage1"][cmds["stage1"].index("--retrieval_ratio") + 1] == "0.2"
  evals = steps[1:]
  assert len(evals) == 3 and all(deps[s] == ["stage1"] for s in evals)
  for s in evals:  # the stage-1 model (RTPURBO_ASSETS), the paper's top-p
    line = " ".join(cmds[s])
    assert "eval.model" not in line and "--config.sparse.min_blocks=0" in line


def test_stop_at_ends_a_run_at_that_checkpoint(gpu_run):
  on_step = gpu_run.time_budget(0, 10, clock=lambda: 0.0, stop_at=30)
  for step in range(1, 30):
    on_step(step, {})
  with pytest.raises(gpu_run.TimeUp) as stop:
    on_step(30, {})
  assert stop.value.step == 30 and "asked to stop" in str(stop.value)
  with pytest.raises(SystemExit, match="not a checkpoint step"):
    gpu_run.run_within(None, "stage2", 0, 20, stop_at=30)
