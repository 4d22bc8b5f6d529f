"""Does the installed JAX use this machine's accelerator?  `python -m rtpurbo_jax.doctor [--json]`

Prints the hardware (`rtpurbo_jax.hardware.probe`, found without JAX), JAX's backend and
devices (kind, count, memory where `Device.memory_stats()` reports it), the jax / jaxlib /
plugin versions, the kernel config that a process started with this environment runs
(`pallas_kernels.config.KernelConfig.from_env`: backend and why, interpreter, overrides), and,
for a GPU, the implementation that `pallas_kernels.gpu.dispatch.select_impl` picks per
operation (bf16 and fp32).

Exit status 1, with one message per problem on stderr, when the install does not match the
hardware: an NVIDIA GPU or a TPU that JAX does not use (e.g. CPU-only jaxlib on a GPU VM), a
plugin whose version differs from jaxlib's, jax and jaxlib of different versions, JAX failing
to start. `JAX_PLATFORMS=cpu` on accelerator hardware is not a problem while the plugin is
installed (the CPU was asked for). Exit status 0 otherwise; warnings (an old NVIDIA driver,
versions other than the project's pins) do not change it.

`collect(hw)` / `main(argv, probe=...)` take the hardware probe as an argument, so tests can
simulate a machine ("GPU present, jax on CPU") on any host.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import sys
import tomllib
from collections.abc import Callable

from rtpurbo_jax import hardware

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Distributions whose versions are reported; the plugins must match jaxlib's version.
CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt")
TPU_PLUGINS = ("libtpu", "libtpu-nightly")
DISTRIBUTIONS = ("jax", "jaxlib") + CUDA_PLUGINS + TPU_PLUGINS + ("nvidia-cudnn-cu13",)
# JAX platform names per accelerator of the probe.
PLATFORMS = {"gpu": ("gpu", "cuda"), "tpu": ("tpu",)}
# The project extras (pyproject.toml) that install an accelerator's jax build; which one a GPU
# needs depends on its driver (`Hardware.cuda_extra`).
EXTRAS = ("cuda", "cuda12", "tpu")
BUILDS = {"gpu": "the CUDA plugin of jax", "tpu": "libtpu (jax[tpu])"}
DTYPES = ("bfloat16", "float32")


def versions() -> dict[str, str]:
  """Installed versions of `DISTRIBUTIONS` (absent ones left out)."""
  out = {}
  for name in DISTRIBUTIONS:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def pins() -> dict[str, str]:
  """The project's requirement strings: "jax" -> "jax==0.11.2", and per accelerator extra
  (`EXTRAS`) its requirement. From this checkout's pyproject.toml (the one place they are
  kept), else from the installed project's metadata; {} when neither is there."""
  reqs: list[str] = []
  try:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
      project = tomllib.load(f)["project"]
    reqs = list(project.get("dependencies", []))
    for extra, items in project.get("optional-dependencies", {}).items():
      reqs += [f'{r}; extra == "{extra}"' for r in items]
  except (OSError, KeyError, tomllib.TOMLDecodeError):
    try:
      reqs = importlib.metadata.requires("rtpurbo_jax") or []
    except importlib.metadata.PackageNotFoundError:
      reqs = []
  out = {}
  for r in reqs:
    req, _, marker = (s.strip() for s in r.partition(";"))
    m = re.search(r'extra\s*==\s*"([^"]+)"', marker)
    if m and m.group(1) in EXTRAS:
      out[m.group(1)] = req
    elif not m and re.match(r"jax\s*==", req):
      out["jax"] = req
  return out


def jax_state() -> dict:
  """JAX's default backend and devices, grouped by (platform, kind); {"error": ...} if JAX
  cannot start its backends."""
  try:
    import jax
    devices = jax.devices()
    backend = jax.default_backend()
  except Exception as e:  # noqa: BLE001 -- any failure to start JAX is what we report
    return {"error": f"{type(e).__name__}: {e}"}
  groups: dict[tuple[str, str], dict] = {}
  for d in devices:
    g = groups.setdefault((d.platform, d.device_kind), {
        "platform": d.platform, "kind": d.device_kind, "count": 0, "memory_bytes": [],
        "compute_capability": getattr(d, "compute_capability", None)})
    g["count"] += 1
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 -- backends without memory stats raise or return None
      stats = None
    g["memory_bytes"].append((stats or {}).get("bytes_limit"))
  for g in groups.values():
    if not any(g["memory_bytes"]):
      g["memory_bytes"] = None  # not reported by this backend
  try:
    platform_version = devices[0].client.platform_version
  except Exception:  # noqa: BLE001
    platform_version = None
  return {"backend": backend, "platform_version": platform_version,
          "jax_platforms": os.environ.get("JAX_PLATFORMS") or None,
          "devices": list(groups.values())}


def kernels(hw: hardware.Hardware, state: dict) -> dict:
  """The kernel config a process started with this environment runs (`KernelConfig.from_env`,
  what `pallas_kernels.config.default()` reads once) and why; for a GPU, the implementation
  per operation and dtype: the dispatch's own choice under that config when the backend is
  gpu, else (GPU hardware, JAX elsewhere) what `select_impl` would pick for the GPU nvidia-smi
  lists, with the RTPURBO_*_ATTN overrides."""
  if "error" in state:
    return {"error": "JAX did not start"}
  from pallas_kernels import config
  try:
    cfg = config.KernelConfig.from_env()
    _, why = config.backend_choice()
  except ValueError as e:
    return {"error": str(e)}
  out = {"backend": cfg.backend, "why": why, "interpret": cfg.interpret,
         "overrides": dict(cfg.impls)}
  if cfg.backend != "gpu" and not hw.gpus:
    return out
  import jax.numpy as jnp
  from pallas_kernels.gpu import dispatch
  try:
    if cfg.backend == "gpu":
      kind, cc = dispatch.device_info()
      out["gpu_impls_for"] = f"{kind} (this process)"

      def pick(op, dtype):
        return dispatch.impl_for(op, dtype, cfg)
    else:
      gpu = hw.gpus[0]
      out["gpu_impls_for"] = f"{gpu.name} (nvidia-smi; once JAX runs on it, with cuDNN)"
      overrides = config.impl_overrides()

      def pick(op, dtype):
        return dispatch.select_impl(op, dtype=dtype, cudnn_available=True,
                                    compute_capability=gpu.compute_capability,
                                    device_kind=gpu.name, override=overrides.get(op))
    out["gpu_impls"] = {dt: {op: pick(op, jnp.dtype(dt)) for op in dispatch.IMPLS}
                        for dt in DTYPES}
  except ValueError as e:  # an invalid RTPURBO_*_ATTN override
    out["error"] = str(e)
  return out


def _install_hint(hw: hardware.Hardware, accel: str, pinned: dict[str, str]) -> str:
  flag = f"./setup.sh --{accel}"
  req = pinned.get(hw.cuda_extra if accel == "gpu" else "tpu")
  return f"{flag} (or pip install '{req}')" if req else flag


def check(hw: hardware.Hardware, state: dict, vers: dict[str, str], kern: dict,
          pinned: dict[str, str]) -> tuple[list[str], list[str]]:
  """(problems, warnings) of a report's parts; any problem makes the doctor exit 1."""
  problems, warnings = [], list(hw.notes)
  if "error" in state:
    problems.append(f"JAX could not start: {state['error']}")
  accel = hw.accelerator
  if accel != "cpu" and "error" not in state and state["backend"] not in PLATFORMS[accel]:
    plugins = CUDA_PLUGINS if accel == "gpu" else TPU_PLUGINS
    have = [f"{p} {vers[p]}" for p in plugins if p in vers]
    forced = state.get("jax_platforms")
    if have and forced and not any(p in forced.lower() for p in PLATFORMS[accel]):
      warnings.append(f"JAX_PLATFORMS={forced} keeps JAX on {state['backend']} although this "
                      f"machine has {hw.describe()}")
    elif not have:
      problems.append(f"this machine has {hw.describe()}, but JAX runs on "
                      f"{state['backend']}: {BUILDS[accel]} is not installed. "
                      f"Install it with {_install_hint(hw, accel, pinned)}.")
    else:
      # A CUDA 13 plugin under a driver too old for it is the common case: name the build
      # that loads there.
      fix = (f" Install the CUDA 12 build with {_install_hint(hw, accel, pinned)}."
             if accel == "gpu" and hw.cuda_extra == "cuda12" and "jax-cuda13-plugin" in vers
             else "")
      problems.append(f"this machine has {hw.describe()}, but JAX runs on "
                      f"{state['backend']} although {', '.join(have)} is installed: the plugin "
                      f"did not load (JAX's warning at start-up says why"
                      + ("; " + "; ".join(hw.notes) if hw.notes else "") + ")." + fix)
  jaxlib = vers.get("jaxlib")
  if jaxlib and vers.get("jax") and vers["jax"] != jaxlib:
    problems.append(f"jax {vers['jax']} and jaxlib {jaxlib} differ: reinstall with ./setup.sh")
  for p in CUDA_PLUGINS:
    if jaxlib and p in vers and vers[p] != jaxlib:
      problems.append(f"{p} {vers[p]} does not match jaxlib {jaxlib}: reinstall with "
                      f"{_install_hint(hw, 'gpu', pinned)}")
  want = pinned.get("jax", "").partition("==")[2].strip()
  if want and vers.get("jax") and vers["jax"] != want:
    warnings.append(f"jax {vers['jax']} is installed; the project pins {want}")
  if "error" in kern and "error" not in state:
    problems.append(kern["error"])
  return problems, warnings


def collect(hw: hardware.Hardware | None = None) -> dict:
  """The whole report as a dict (what --json prints); `hw` defaults to `hardware.probe()`."""
  hw = hardware.probe() if hw is None else hw
  state = jax_state()
  vers = versions()
  kern = kernels(hw, state)
  pinned = pins()
  problems, warnings = check(hw, state, vers, kern, pinned)
  return {"ok": not problems, "problems": problems, "warnings": warnings,
          "hardware": hw.as_dict(), "jax": state, "versions": vers, "pins": pinned,
          "kernels": kern}


def _gib(n) -> str:
  return "?" if n is None else f"{n / 2**30:.1f} GiB"


def format_text(report: dict) -> str:
  """The report for people."""
  lines = [f"hardware:  {report['hardware']['description']}"]
  st = report["jax"]
  if "error" in st:
    lines.append(f"jax:       failed to start ({st['error']})")
  else:
    forced = f", JAX_PLATFORMS={st['jax_platforms']}" if st["jax_platforms"] else ""
    pv = " ".join(str(st["platform_version"] or "").split())  # GPU: "PJRT C API cuda 13000"
    pv = f" ({pv})" if pv and pv != st["backend"] else ""
    lines.append(f"jax:       backend {st['backend']}{pv}{forced}")
    for g in st["devices"]:
      mem = g["memory_bytes"]
      mem = ("memory not reported" if mem is None else
             "memory " + ", ".join(sorted({_gib(m) for m in mem})) + " per device")
      cc = f", compute capability {g['compute_capability']}" if g["compute_capability"] else ""
      lines.append(f"devices:   {g['count']} x {g['kind']} ({g['platform']}{cc}); {mem}")
  lines.append("versions:  " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
  k = report["kernels"]
  if "backend" in k:
    lines.append(f"kernels:   {k['backend']} ({k['why']}"
                 + ("; Pallas interpreter" if k["interpret"] else "")
                 + "".join(f"; {op}={impl}" for op, impl in k.get("overrides", {}).items())
                 + ")")
  if "gpu_impls" in k:
    lines.append(f"gpu ops:   for {k['gpu_impls_for']}")
    for dt, impls in k["gpu_impls"].items():
      picked = " ".join(f"{op}={impl}" for op, impl in impls.items() if impl != "pallas")
      lines.append(f"  {dt:9s} " + (f"{picked} (others pallas)" if picked else "all pallas"))
  for w in report["warnings"]:
    lines.append(f"warning:   {w}")
  lines.append("ok" if report["ok"] else "NOT OK")
  return "\n".join(lines)


def main(argv: list[str] | None = None,
         probe: Callable[[], hardware.Hardware] = hardware.probe) -> int:
  parser = argparse.ArgumentParser(prog="python -m rtpurbo_jax.doctor", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true", help="print the report as JSON")
  args = parser.parse_args(argv)
  report = collect(probe())
  print(json.dumps(report, indent=1) if args.json else format_text(report))
  for p in report["problems"]:
    print(f"error: {p}", file=sys.stderr)
  return 0 if report["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
