"""infer.py as a user runs it (subprocess): --help, --dry_run, a random-weights run, errors."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, tmp_path):
  env = dict(os.environ, RTPURBO_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device: the plain single-process run
  return subprocess.run([sys.executable, "infer.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_help_explains_flags(tmp_path):
  r = _run("--help", tmp_path=tmp_path)
  assert r.returncode == 0, r.stderr
  for flag in ("--ctx", "--mode", "--passkey", "--dry_run", "--random_weights", "--prompt_file",
               "--device_memory", "--config"):
    assert flag in r.stdout
  assert "--config.section.key=value" in r.stdout  # the module docstring is the usage text


def test_dry_run_llama8b_1m(tmp_path):
  r = _run("--config=configs/llama8b.py", "--dry_run", "--ctx=1M", "--device_memory=141G",
           tmp_path=tmp_path)
  assert r.returncode == 0, r.stderr
  lines = {l.split()[0]: l for l in r.stdout.splitlines() if "ctx=1M" in l}
  assert "does NOT fit" in lines["dense"] and "max ctx that fits" in lines["dense"]
  assert ": fits;" in lines["rtpurbo"]
  assert "KV cache at 1048576 tokens" in r.stdout


def test_random_weights_run(tmp_path):
  r = _run("--config=configs/tiny.py", "--random_weights", "--ctx=600", "--max_new_tokens=5",
           "--config.infer.prefill_chunk=256", tmp_path=tmp_path)
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert "prompt 595 tokens, 5 generated" in out
  assert "decode" in out and "mean selected-block fraction" in out


@pytest.mark.parametrize("args,message", [
    (("--config=configs/tiny.py", "--config.sparse.top_p=-1"), "sparse.top_p=-1"),
    (("--config=configs/llama8b.py", "--random_weights", "--ctx=1M", "--mode=dense",
      "--device_memory=141G"), "out of memory before allocating"),
    (("--config=configs/tiny.py", "--ctx=lots"), "cannot read size"),
])
def test_errors_are_one_clear_line(args, message, tmp_path):
  r = _run(*args, tmp_path=tmp_path)
  assert r.returncode == 2
  errors = [l for l in r.stderr.splitlines() if l.startswith("infer.py: error:")]
  assert len(errors) == 1 and message in errors[0], r.stderr
  assert "Traceback" not in r.stderr
