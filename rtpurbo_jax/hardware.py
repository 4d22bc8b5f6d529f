"""Which accelerator this machine has, found without JAX: the hardware probe shared by
`setup.sh` (which runs this file by path, before any package is installed) and
`rtpurbo_jax.doctor`.

Standard library only, and no network: it must run on a bare Python >= 3.12.

  NVIDIA GPU   `nvidia-smi` on PATH lists at least one GPU (name, driver, memory, compute
               capability); a present but failing `nvidia-smi` is reported, not counted.
  TPU          a Google PCI device (vendor 0x1ae0) with a TPU device id under
               /sys/bus/pci/devices (the ids jax itself checks), else /dev/accel* device files
               (older TPU VMs), else the TPU_ACCELERATOR_TYPE / TPU_NAME environment hints.

`probe(run=..., root=..., env=...)` takes the command runner, the filesystem root and the
environment as arguments, so tests can simulate any machine.

  python rtpurbo_jax/hardware.py           # the probe as JSON
  python rtpurbo_jax/hardware.py --choice  # three lines (setup.sh): cpu|gpu|tpu, the CUDA
                                           # extra for a GPU (cuda|cuda12), what was found
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping

GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (as in jax._src.hardware_utils); other Google devices (gVNIC
# network cards) share the vendor id, so the device id decides.
TPU_PCI_DEVICES = {
    "0x0027": "v3", "0x0056": "plc", "0x005e": "v4", "0x0062": "v5p", "0x0063": "v5e",
    "0x006f": "v6e", "0x0076": "tpu7x", "0x0083": "tpu8i", "0x007c": "tpu8t",
}
TPU_ENV_HINTS = ("TPU_ACCELERATOR_TYPE", "TPU_NAME")
# The CUDA 13 plugin (the `cuda` extra, as on the reference GPU image) needs an NVIDIA driver
# of this major version or newer; an older driver gets the CUDA 12 plugin (`cuda12`).
CUDA13_MIN_DRIVER = 580
# Tried in order: older nvidia-smi versions do not know compute_cap.
NVIDIA_SMI_QUERIES = ("name,driver_version,memory.total,compute_cap",
                      "name,driver_version,memory.total")


@dataclasses.dataclass(frozen=True)
class Gpu:
  name: str
  driver: str | None = None
  memory_mib: int | None = None
  compute_capability: str | None = None


@dataclasses.dataclass(frozen=True)
class Hardware:
  """What the probe found. `accelerator` is "gpu", "tpu" or "cpu" (nothing found)."""
  gpus: tuple[Gpu, ...] = ()
  tpu_chips: int = 0
  tpu_version: str | None = None
  tpu_evidence: str | None = None  # "pci", "/dev/accel", or the environment hint's name
  notes: tuple[str, ...] = ()  # a failing nvidia-smi, an old driver, ...

  @property
  def accelerator(self) -> str:
    if self.gpus:
      return "gpu"
    return "tpu" if self.tpu_evidence else "cpu"

  @property
  def driver_major(self) -> int | None:
    return _int((self.gpus[0].driver or "").split(".")[0]) if self.gpus else None

  @property
  def cuda_extra(self) -> str:
    """The project extra for an NVIDIA GPU here: "cuda" (CUDA 13), or "cuda12" where the
    driver is known to be too old for CUDA 13."""
    major = self.driver_major
    return "cuda12" if major is not None and major < CUDA13_MIN_DRIVER else "cuda"

  def describe(self) -> str:
    if self.gpus:
      names = sorted({g.name for g in self.gpus})
      driver = self.gpus[0].driver
      return (f"{len(self.gpus)} NVIDIA GPU(s) ({', '.join(names)}"
              + (f", driver {driver}" if driver else "") + ") listed by nvidia-smi")
    if self.tpu_evidence == "pci":
      return f"{self.tpu_chips} TPU {self.tpu_version} chip(s) on the PCI bus"
    if self.tpu_evidence == "/dev/accel":
      return f"{self.tpu_chips} TPU device file(s) /dev/accel*"
    if self.tpu_evidence:
      return f"a TPU VM ({self.tpu_evidence} is set)"
    return "no NVIDIA GPU (nvidia-smi) and no TPU found"

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["accelerator"] = self.accelerator
    d["cuda_extra"] = self.cuda_extra
    d["description"] = self.describe()
    return d


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(cmd: list[str]) -> "subprocess.CompletedProcess[str]":
  return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def _int(text: str) -> int | None:
  try:
    return int(float(text))
  except ValueError:
    return None


def nvidia_gpus(run: Runner = _run) -> tuple[tuple[Gpu, ...], tuple[str, ...]]:
  """(GPUs listed by nvidia-smi, notes). No nvidia-smi on PATH: no GPUs and no notes."""
  notes: list[str] = []
  out = None
  for query in NVIDIA_SMI_QUERIES:
    try:
      res = run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"])
    except FileNotFoundError:
      return (), ()
    except (OSError, subprocess.SubprocessError) as e:
      return (), (f"nvidia-smi could not run: {e}",)
    if res.returncode == 0:
      out = res.stdout
      break
    last = (res.stdout + res.stderr).strip().splitlines()
    err = last[-1] if last else f"exit status {res.returncode}"
  if out is None:
    return (), (f"nvidia-smi is installed but failed ({err}): no usable NVIDIA driver",)
  gpus = []
  for line in out.splitlines():
    fields = [f.strip() for f in line.split(",")]
    if not fields[0] or fields[0].lower().startswith("no devices"):
      continue
    fields += [""] * (4 - len(fields))
    gpus.append(Gpu(name=fields[0], driver=fields[1] or None, memory_mib=_int(fields[2]),
                    compute_capability=fields[3] or None))
  for g in gpus[:1]:
    major = _int((g.driver or "").split(".")[0])
    if major is not None and major < CUDA13_MIN_DRIVER:
      notes.append(f"NVIDIA driver {g.driver} is older than CUDA 13 needs (>= "
                   f"{CUDA13_MIN_DRIVER}): the CUDA 12 plugin (extra cuda12) is the one that "
                   f"loads")
  return tuple(gpus), tuple(notes)


def tpu_chips(root: str = "/", env: Mapping[str, str] | None = None
              ) -> tuple[int, str | None, str | None]:
  """(chip count, TPU version, evidence) from PCI ids, /dev/accel*, then environment hints."""
  env = os.environ if env is None else env
  count, version = 0, None
  for vendor_file in sorted(glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor"))):
    try:
      with open(vendor_file) as f:
        vendor = f.read().strip()
      if vendor != GOOGLE_PCI_VENDOR:
        continue
      with open(os.path.join(os.path.dirname(vendor_file), "device")) as f:
        device = f.read().strip()
    except OSError:
      continue
    if device in TPU_PCI_DEVICES:
      count, version = count + 1, TPU_PCI_DEVICES[device]
  if count:
    return count, version, "pci"
  accel = glob.glob(os.path.join(root, "dev/accel[0-9]*"))
  if accel:
    return len(accel), None, "/dev/accel"
  for name in TPU_ENV_HINTS:
    if env.get(name):
      return 0, env.get("TPU_ACCELERATOR_TYPE") or None, name
  return 0, None, None


def probe(run: Runner = _run, root: str = "/", env: Mapping[str, str] | None = None) -> Hardware:
  """This machine's accelerators (see the module docstring)."""
  gpus, notes = nvidia_gpus(run)
  chips, version, evidence = tpu_chips(root, env)
  return Hardware(gpus=gpus, tpu_chips=chips, tpu_version=version, tpu_evidence=evidence,
                  notes=notes)


def main(argv: list[str]) -> int:
  hw = probe()
  if "--choice" in argv:
    print(hw.accelerator)
    print(hw.cuda_extra)
    print("; ".join((hw.describe(),) + hw.notes))
  else:
    print(json.dumps(hw.as_dict(), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
