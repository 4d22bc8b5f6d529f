"""The hardware probe (rtpurbo_jax.hardware) on simulated machines, and the doctor's verdict:
an accelerator that JAX does not use fails it with one message naming the fix; a matching
install passes; the kernel choices it reports are those of pallas_kernels' own functions."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxlib
import pytest

from pallas_kernels import config
from pallas_kernels.gpu import dispatch
from rtpurbo_jax import doctor, hardware

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200 = "NVIDIA H200, 580.95.05, 143771, 9.0"


def smi(*outputs):
  """A fake command runner: nvidia-smi answers each query with the next (rc, stdout, stderr)."""
  calls, answers = [], list(outputs)

  def run(cmd):
    calls.append(cmd)
    assert cmd[0] == "nvidia-smi"
    rc, out, err = answers.pop(0)
    return subprocess.CompletedProcess(cmd, rc, out, err)

  run.calls = calls
  return run


def no_smi(cmd):
  raise FileNotFoundError(cmd[0])


def pci(root, *devices):
  """A fake /sys/bus/pci/devices holding (vendor, device) pairs."""
  for i, (vendor, device) in enumerate(devices):
    d = root / "sys" / "bus" / "pci" / "devices" / f"0000:00:{i:02x}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")


# ---------------------------------------------------------------------------
# hardware.probe


def test_probe_nvidia_gpus(tmp_path):
  run = smi((0, f"{H200}\n{H200}\n", ""))
  hw = hardware.probe(run=run, root=str(tmp_path), env={})
  assert hw.accelerator == "gpu" and len(hw.gpus) == 2 and not hw.notes
  g = hw.gpus[0]
  assert (g.name, g.driver, g.memory_mib, g.compute_capability) == (
      "NVIDIA H200", "580.95.05", 143771, "9.0")
  assert "compute_cap" in run.calls[0][1]
  assert "2 NVIDIA GPU(s) (NVIDIA H200, driver 580.95.05)" in hw.describe()


def test_probe_old_nvidia_smi_and_old_driver(tmp_path):
  # An nvidia-smi without the compute_cap field: the second query (without it) is used; a
  # driver older than CUDA 13 needs is a note.
  run = smi((2, "", 'Field "compute_cap" is not a valid field to query.'),
            (0, "NVIDIA A100-SXM4-80GB, 535.104.05, 81920\n", ""))
  hw = hardware.probe(run=run, root=str(tmp_path), env={})
  assert hw.gpus == (hardware.Gpu("NVIDIA A100-SXM4-80GB", "535.104.05", 81920, None),)
  assert len(run.calls) == 2 and "compute_cap" not in run.calls[1][1]
  assert len(hw.notes) == 1 and "535.104.05" in hw.notes[0] and ">= 580" in hw.notes[0]
  assert hw.driver_major == 535 and hw.cuda_extra == "cuda12"
  assert gpu_machine().cuda_extra == "cuda" and cpu_machine().cuda_extra == "cuda"


def test_probe_failing_nvidia_smi_is_a_note_not_a_gpu(tmp_path):
  err = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
  hw = hardware.probe(run=smi((9, "", err), (9, "", err)), root=str(tmp_path), env={})
  assert hw.accelerator == "cpu" and not hw.gpus
  assert len(hw.notes) == 1 and "failed" in hw.notes[0] and "communicate" in hw.notes[0]


def test_probe_tpu_on_the_pci_bus(tmp_path):
  # Four v5e chips; a gVNIC network card shares Google's vendor id and must not count.
  pci(tmp_path, ("0x1af4", "0x1041"), ("0x1ae0", "0x0042"),
      *[("0x1ae0", "0x0063")] * 4)
  hw = hardware.probe(run=no_smi, root=str(tmp_path), env={})
  assert (hw.accelerator, hw.tpu_chips, hw.tpu_version, hw.tpu_evidence) == (
      "tpu", 4, "v5e", "pci")
  assert "4 TPU v5e chip(s)" in hw.describe()


def test_probe_plain_vm_is_cpu(tmp_path):
  pci(tmp_path, ("0x1ae0", "0x0042"), ("0x8086", "0x0d57"))
  hw = hardware.probe(run=no_smi, root=str(tmp_path), env={"TPU_OTHER": "x"})
  assert hw.accelerator == "cpu" and hw.tpu_evidence is None and not hw.notes


def test_probe_tpu_accel_files_and_env_hints(tmp_path):
  (tmp_path / "dev").mkdir()
  for i in range(4):
    (tmp_path / "dev" / f"accel{i}").touch()
  hw = hardware.probe(run=no_smi, root=str(tmp_path), env={})
  assert (hw.accelerator, hw.tpu_chips, hw.tpu_evidence) == ("tpu", 4, "/dev/accel")
  bare = tmp_path / "bare"
  bare.mkdir()
  hw = hardware.probe(run=no_smi, root=str(bare), env={"TPU_ACCELERATOR_TYPE": "v5litepod-8"})
  assert (hw.accelerator, hw.tpu_version, hw.tpu_evidence) == (
      "tpu", "v5litepod-8", "TPU_ACCELERATOR_TYPE")


# ---------------------------------------------------------------------------
# doctor


def gpu_machine():
  return hardware.probe(run=smi((0, H200 + "\n", "")), root="/nonexistent", env={})


def tpu_machine():
  return hardware.probe(run=no_smi, root="/nonexistent", env={"TPU_NAME": "my-tpu"})


def cpu_machine():
  return hardware.probe(run=no_smi, root="/nonexistent", env={})


def run_main(capsys, machine, *args):
  rc = doctor.main(list(args), probe=lambda: machine)
  out, err = capsys.readouterr()
  return rc, out, err


@pytest.fixture(autouse=True)
def plain_env(monkeypatch):
  for name in ("RTPURBO_KERNELS", "RTPURBO_INTERPRET", *dispatch.OVERRIDE_ENV.values()):
    monkeypatch.delenv(name, raising=False)


def test_pins_come_from_pyproject():
  pins = doctor.pins()
  assert pins["jax"] == f"jax=={jax.__version__}" == "jax==0.11.2"
  assert pins["cuda"] == "jax[cuda13]==0.11.2" and pins["tpu"] == "jax[tpu]==0.11.2"
  assert pins["cuda12"] == "jax[cuda12]==0.11.2"


def test_cpu_machine_with_cpu_jax_is_ok(capsys):
  rc, out, err = run_main(capsys, cpu_machine(), "--json")
  assert rc == 0 and err == ""
  r = json.loads(out)
  assert r["ok"] and r["problems"] == [] and r["hardware"]["accelerator"] == "cpu"
  assert r["jax"]["backend"] == jax.default_backend() == "cpu"
  assert sum(g["count"] for g in r["jax"]["devices"]) == jax.device_count()
  assert r["jax"]["devices"][0]["memory_bytes"] is None  # the CPU reports none
  assert r["versions"]["jax"] == jax.__version__
  assert r["versions"]["jaxlib"] == jaxlib.__version__
  assert (r["kernels"]["backend"], r["kernels"]["why"]) == config.backend_choice()
  assert config.KernelConfig(r["kernels"]["backend"], r["kernels"]["interpret"],
                             impls=r["kernels"]["overrides"]) == config.KernelConfig.from_env()
  assert r["kernels"]["backend"] == "reference" and "default JAX backend is cpu" in \
      r["kernels"]["why"]
  assert "gpu_impls" not in r["kernels"]


def test_gpu_present_jax_on_cpu_fails_with_one_message(capsys):
  rc, out, err = run_main(capsys, gpu_machine())
  assert rc == 1
  errors = err.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith("error: ")
  msg = errors[0]
  assert "NVIDIA H200" in msg and "JAX runs on cpu" in msg and "CUDA plugin" in msg
  assert "./setup.sh --gpu" in msg and "jax[cuda13]==0.11.2" in msg
  assert out.strip().endswith("NOT OK")
  # What the GPU dispatch would pick there, from select_impl itself (Hopper: cuDNN for the
  # bf16 attention ops, XLA for fp32 causal attention).
  assert "gpu ops:   for NVIDIA H200" in out
  r = doctor.collect(gpu_machine())
  for dt in doctor.DTYPES:
    assert r["kernels"]["gpu_impls"][dt] == dispatch.default_impls(
        dtype=jnp.dtype(dt), cudnn_available=True, compute_capability="9.0",
        device_kind="NVIDIA H200")
  assert r["kernels"]["gpu_impls"]["bfloat16"]["causal_attention"] == "cudnn"
  assert r["kernels"]["gpu_impls"]["float32"]["causal_attention"] == "xla"


def test_old_driver_is_told_the_cuda12_build(capsys):
  machine = hardware.probe(run=smi((0, "NVIDIA A100-SXM4-80GB, 550.54.15, 81920, 8.0\n", "")),
                           root="/nonexistent", env={})
  rc, out, err = run_main(capsys, machine)
  assert rc == 1 and "jax[cuda12]==0.11.2" in err and "jax[cuda13]" not in err
  assert "warning:   NVIDIA driver 550.54.15 is older than CUDA 13 needs" in out
  # Ampere has no measurements: the unmeasured defaults (cuDNN for causal / window attention).
  assert "bfloat16  causal_attention=cudnn window_attention=cudnn (others pallas)" in out


def test_gpu_prediction_follows_overrides(capsys, monkeypatch):
  monkeypatch.setenv("RTPURBO_CAUSAL_ATTN", "pallas")
  r = doctor.collect(gpu_machine())
  assert r["kernels"]["gpu_impls"]["bfloat16"]["causal_attention"] == "pallas"
  monkeypatch.setenv("RTPURBO_CAUSAL_ATTN", "flash9")
  rc, _, err = run_main(capsys, cpu_machine())
  assert rc == 0  # no GPU: the GPU dispatch is not consulted
  rc, _, err = run_main(capsys, gpu_machine())
  assert rc == 1 and "RTPURBO_CAUSAL_ATTN='flash9'" in err


def test_tpu_vm_with_cpu_jax_fails(capsys):
  rc, out, err = run_main(capsys, tpu_machine(), "--json")
  assert rc == 1
  r = json.loads(out)
  assert not r["ok"] and len(r["problems"]) == 1
  msg = r["problems"][0]
  assert "TPU_NAME" in msg and "libtpu" in msg and "./setup.sh --tpu" in msg
  assert "jax[tpu]==0.11.2" in msg and err.strip() == f"error: {msg}"


def test_kernel_backend_reason_follows_rtpurbo_kernels(capsys, monkeypatch):
  monkeypatch.setenv("RTPURBO_KERNELS", "reference")
  assert doctor.collect(cpu_machine())["kernels"]["why"] == "RTPURBO_KERNELS=reference"
  # gpu kernels in the Pallas interpreter: the dispatch's own choice, all Pallas (no cuDNN).
  monkeypatch.setenv("RTPURBO_KERNELS", "gpu")
  monkeypatch.setenv("RTPURBO_INTERPRET", "1")
  monkeypatch.setenv("RTPURBO_WINDOW_ATTN", "cudnn_chunked")
  k = doctor.collect(cpu_machine())["kernels"]
  assert k["backend"] == "gpu" and k["interpret"]
  assert k["overrides"] == {"window_attention": "cudnn_chunked"}
  used = config.KernelConfig("gpu", interpret=True, impls=k["overrides"])
  assert used == config.KernelConfig.from_env()
  assert k["gpu_impls"]["bfloat16"] == dispatch.current_impls(jnp.bfloat16, used)
  assert set(k["gpu_impls"]["bfloat16"].values()) == {"pallas"}  # the interpreter: no cuDNN
  rc, out, _ = run_main(capsys, cpu_machine())
  assert "kernels:   gpu (RTPURBO_KERNELS=gpu; Pallas interpreter; " \
      "window_attention=cudnn_chunked)" in out
  monkeypatch.setenv("RTPURBO_KERNELS", "cuda")
  rc, _, err = run_main(capsys, cpu_machine())
  assert rc == 1 and "RTPURBO_KERNELS='cuda'" in err


def state(backend, jax_platforms=None):
  return {"backend": backend, "platform_version": None, "jax_platforms": jax_platforms,
          "devices": []}


def test_check_plugin_installed_but_not_loaded():
  hw, pins = gpu_machine(), doctor.pins()
  vers = {"jax": "0.11.2", "jaxlib": "0.11.2", "jax-cuda13-plugin": "0.11.2",
          "jax-cuda13-pjrt": "0.11.2"}
  problems, _ = doctor.check(hw, state("cpu"), vers, {}, pins)
  assert len(problems) == 1 and "did not load" in problems[0]
  assert "jax-cuda13-plugin 0.11.2" in problems[0]
  # JAX_PLATFORMS=cpu asked for the CPU: a warning, not a failure, while the plugin is there.
  problems, warnings = doctor.check(hw, state("cpu", "cpu"), vers, {}, pins)
  assert problems == [] and any("JAX_PLATFORMS=cpu" in w for w in warnings)
  # ... but without the plugin the install still does not match the machine.
  problems, _ = doctor.check(hw, state("cpu", "cpu"), {"jax": "0.11.2", "jaxlib": "0.11.2"},
                             {}, pins)
  assert len(problems) == 1 and "not installed" in problems[0]
  # An old driver with the CUDA 13 plugin: the message names the CUDA 12 build.
  old = hardware.probe(run=smi((0, "NVIDIA A100, 550.54.15, 81920, 8.0\n", "")),
                       root="/nonexistent", env={})
  problems, _ = doctor.check(old, state("cpu"), vers, {}, pins)
  assert len(problems) == 1 and "did not load" in problems[0] and "550.54.15" in problems[0]
  assert problems[0].endswith("Install the CUDA 12 build with ./setup.sh --gpu (or pip install "
                              "'jax[cuda12]==0.11.2').")
  # JAX on the GPU: nothing to report.
  assert doctor.check(hw, state("gpu"), vers, {}, pins) == ([], [])


def test_check_versions():
  hw, pins = cpu_machine(), doctor.pins()
  vers = {"jax": "0.11.2", "jaxlib": "0.11.2", "jax-cuda13-plugin": "0.11.1"}
  problems, _ = doctor.check(hw, state("cpu"), vers, {}, pins)
  assert len(problems) == 1 and "jax-cuda13-plugin 0.11.1 does not match jaxlib 0.11.2" in \
      problems[0]
  problems, _ = doctor.check(hw, state("cpu"), {"jax": "0.11.2", "jaxlib": "0.11.1"}, {}, pins)
  assert len(problems) == 1 and "differ" in problems[0]
  problems, warnings = doctor.check(hw, state("cpu"), {"jax": "0.12.0", "jaxlib": "0.12.0"},
                                    {}, pins)
  assert problems == [] and warnings == ["jax 0.12.0 is installed; the project pins 0.11.2"]
  problems, _ = doctor.check(hw, {"error": "RuntimeError: boom"}, {}, {}, pins)
  assert problems == ["JAX could not start: RuntimeError: boom"]


def test_text_report_shows_device_memory():
  report = {
      "ok": True, "problems": [], "warnings": ["an old driver"],
      "hardware": gpu_machine().as_dict(),
      "jax": {"backend": "gpu", "platform_version": "PJRT C API\ncuda 13000",
              "jax_platforms": None,
              "devices": [{"platform": "gpu", "kind": "NVIDIA H200", "count": 8,
                           "memory_bytes": [int(132.5 * 2**30)] * 8,
                           "compute_capability": "9.0"}]},
      "versions": {"jax": "0.11.2", "jaxlib": "0.11.2", "jax-cuda13-plugin": "0.11.2"},
      "kernels": {"backend": "gpu", "why": "RTPURBO_KERNELS=auto and the default JAX backend "
                  "is gpu", "interpret": False, "overrides": {},
                  "gpu_impls_for": "NVIDIA H200 (this process)",
                  "gpu_impls": {"bfloat16": {"causal_attention": "cudnn", "topp_select":
                                             "pallas"}}}}
  text = doctor.format_text(report)
  assert "jax:       backend gpu (PJRT C API cuda 13000)\n" in text
  assert ("devices:   8 x NVIDIA H200 (gpu, compute capability 9.0); memory 132.5 GiB per "
          "device") in text
  assert "jax-cuda13-plugin 0.11.2" in text and "warning:   an old driver" in text
  assert "bfloat16  causal_attention=cudnn (others pallas)" in text
  assert text.endswith("\nok")


def doctor_subprocess(tmp_path, fake_gpu):
  """`python -m rtpurbo_jax.doctor --json` in a fresh process; a fake nvidia-smi on PATH
  simulates the GPU."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "RTPURBO_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  if fake_gpu:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{H200}'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
  return subprocess.run([sys.executable, "-m", "rtpurbo_jax.doctor", "--json"], env=env,
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_module_entry_point(tmp_path):
  if hardware.probe().accelerator != "cpu":
    pytest.skip("this host has an accelerator")
  res = doctor_subprocess(tmp_path, fake_gpu=False)
  assert res.returncode == 0, res.stderr
  assert json.loads(res.stdout)["ok"]
  res = doctor_subprocess(tmp_path, fake_gpu=True)
  assert res.returncode == 1
  r = json.loads(res.stdout)
  assert r["hardware"]["accelerator"] == "gpu" and r["jax"]["backend"] == "cpu"
  assert "error: this machine has 1 NVIDIA GPU(s) (NVIDIA H200" in res.stderr
