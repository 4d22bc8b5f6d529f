"""Ahead-of-time compile check without a GPU.

`compile_for_gpu(fn, *abstract_args)` traces and lowers `fn` for CUDA under an abstract
"NVIDIA H200" device (so the Pallas Triton lowering picks compute capability 9.0 without a
real GPU), captures the Triton IR of every `pallas_call` it contains, and compiles each
one with the `triton` package to an sm_90 cubin. It returns one record per kernel with the
resource numbers ptxas reports (registers, spills, shared memory), so CI catches kernels
that lower but do not compile, and a reader sees their register pressure.

Uses JAX internals (the Triton lowering entry point): a check, not a runtime path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh


@dataclasses.dataclass
class CompiledKernel:
  name: str
  num_warps: int
  num_stages: int
  cubin_bytes: int
  shared_bytes: int
  registers: int | None
  spill_bytes: int | None
  ptx_has_wgmma: bool


@contextlib.contextmanager
def _capture_triton_modules(sink: list):
  """Record (asm, num_warps, num_stages) of every Pallas Triton kernel lowered inside."""
  from jax._src.pallas.triton import pallas_call_registration as reg

  original = reg.lowering.lower_jaxpr_to_triton_module

  def wrapper(*args, **kwargs):
    result = original(*args, **kwargs)
    # The caller (the pallas_call lowering rule) has resolved the launch parameters.
    caller = sys._getframe(1).f_locals
    sink.append((result.module.operation.get_asm(enable_debug_info=False),
                 int(caller.get("num_warps", 4)), int(caller.get("num_stages", 3))))
    return result

  reg.lowering.lower_jaxpr_to_triton_module = wrapper
  try:
    yield
  finally:
    reg.lowering.lower_jaxpr_to_triton_module = original


def lower_for_gpu(fn, *abstract_args, device_kind: str = "NVIDIA H200"):
  """Lower `fn` for CUDA on an abstract device.

  Returns (lowered, [(triton module asm, num_warps, num_stages)]) in lowering order.
  """
  modules: list[str] = []
  dev = AbstractDevice(device_kind=device_kind, num_cores=132, platform="gpu")
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)
  with use_abstract_mesh(mesh), _capture_triton_modules(modules):
    lowered = jax.jit(fn).trace(*abstract_args).lower(lowering_platforms=("cuda",))
  return lowered, modules


def _ptxas_report(ptx: str, arch: str):
  """(registers, spill bytes) from `ptxas -v`, or (None, None) when ptxas is unavailable."""
  try:
    from triton.backends.nvidia import compiler as nvc
    ptxas = nvc.get_ptxas(arch=90).path if hasattr(nvc, "get_ptxas") else None
  except Exception:  # noqa: BLE001 - the report is optional
    ptxas = None
  if not ptxas or not os.path.exists(ptxas):
    return None, None
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "k.ptx")
    with open(src, "w") as f:
      f.write(ptx)
    proc = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o",
                           os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
  text = proc.stdout + proc.stderr
  regs = re.search(r"Used (\d+) registers", text)
  spill = re.findall(r"(\d+) bytes spill stores", text)
  return (int(regs.group(1)) if regs else None,
          sum(int(s) for s in spill) if spill else None)


def compile_for_gpu(fn, *abstract_args, capability: int = 90) -> list[CompiledKernel]:
  """Lower `fn` for an abstract H200 and compile its Triton kernels to sm_90 cubins."""
  import triton
  from triton.backends.compiler import GPUTarget

  _, modules = lower_for_gpu(fn, *abstract_args)
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, (asm, warps, stages) in enumerate(modules):
      path = os.path.join(tmp, f"kernel{i}.ttir")
      with open(path, "w") as f:
        f.write(asm)
      k = triton.compile(path, target=GPUTarget("cuda", capability, 32),
                         options=dict(num_warps=warps, num_stages=stages))
      name = re.search(r"tt\.func public @(\w+)", asm)
      regs, spills = _ptxas_report(k.asm["ptx"], f"sm_{capability}a")
      out.append(CompiledKernel(
          name=name.group(1) if name else f"kernel{i}", num_warps=warps, num_stages=stages,
          cubin_bytes=len(k.asm["cubin"]), shared_bytes=int(k.metadata.shared),
          registers=regs, spill_bytes=spills, ptx_has_wgmma="wgmma" in k.asm["ptx"]))
  return out
