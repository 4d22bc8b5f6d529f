"""scripts/gpu_run.py plans its job correctly: a preset's steps, waits and flags are valid."""

import importlib.util
import os
import shlex

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


def test_stage2_preset_plans_valid_steps(gpu_run, tmp_path):
  from rtpurbo_jax.config import run_config
  ap = gpu_run.build_parser()
  args = ap.parse_args(["job", "--preset", "stage2", "--out", str(tmp_path / "out")])
  out, big = str(tmp_path / "out"), str(tmp_path / "big")
  steps, cmds, deps = gpu_run.plan_job(args, out, big)
  assert steps[:2] == ["stage2_lora", "stage2_full"]
  assert "stage1" not in steps and set(steps) == set(cmds) == set(deps)
  assert deps["stage2_lora"] == [] and deps["stage2_full"] == [] and deps["eval_win2048"] == []
  assert deps["eval_s2lora"] == ["stage2_lora"] and deps["eval_s2full"] == ["stage2_full"]
  assert deps["eval_s2loratasks"] == ["stage2_lora"]
  cfg = run_config()
  for step in steps:
    cmd = cmds[step]
    assert "{big}" not in " ".join(cmd) and "{out}" not in " ".join(cmd)
    if step.startswith("stage2_"):  # the stage2 subcommand accepts every flag
      sub = ap.parse_args(cmd[2:])
      assert sub.cmd == "stage2" and sub.big == big and sub.steps == 100
      continue
    flags = [f for f in cmd if f.startswith("--config.")]
    assert any(f.startswith("--config.eval.out_dir=" + os.path.join(out, step)) for f in flags)
    for f in flags:
      key = f[len("--config."):].split("=", 1)[0]
      assert _config_key_exists(cfg, key), f"{step}: unknown config key {key}"
  model = {s: next(f for f in cmds[s] if f.startswith("--config.eval.model="))
           for s in steps if s.startswith("eval_s2")}
  assert model["eval_s2full"].endswith(os.path.join(big, "stage2_full", "hf_full"))
  assert model["eval_s2fulld16"].endswith(os.path.join(big, "stage2_full", "hf"))
  assert model["eval_s2lora"].endswith(os.path.join(big, "stage2_lora", "hf"))


def test_plan_refuses_a_wait_for_a_missing_step(gpu_run, tmp_path):
  args = gpu_run.build_parser().parse_args(
      ["job", "--steps", "", "--evals", "x@stage2_nope:" + shlex.quote("--config.seed=1")])
  with pytest.raises(SystemExit, match="stage2_nope"):
    gpu_run.plan_job(args, str(tmp_path / "out"), str(tmp_path / "big"))
