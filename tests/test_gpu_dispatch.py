"""Which implementation the GPU dispatch picks per operation, checked on the CPU.

`dispatch.select_impl` is pure (architecture, dtype, cuDNN availability, override), so the
defaults are pinned here without a GPU: on Hopper cuDNN for causal, window and cache
attention (measured faster on the H200), Pallas for the other operations; elsewhere the
unmeasured defaults (cuDNN for causal and window attention, Pallas for the cache attention),
and Pallas wherever cuDNN cannot run. The committed H200 results
are checked to have run with those same defaults, so the README's figures reproduce from the
default command.
"""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import reference as ref
from pallas_kernels.config import KernelConfig
from pallas_kernels.gpu import dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

PALLAS_ONLY = ("topp_select", "sparse_decode", "ring_decode", "prefill_select",
               "sparse_prefill", "cache_prefill_select", "cache_sparse_prefill")
HOPPER_DEFAULTS = {"causal_attention": "cudnn", "window_attention": "cudnn",
                   "cache_causal_attention": "cudnn", **{op: "pallas" for op in PALLAS_ONLY}}
ALL_PALLAS = {op: "pallas" for op in HOPPER_DEFAULTS}
UNMEASURED_DEFAULTS = dict(ALL_PALLAS, causal_attention="cudnn", window_attention="cudnn")
KV = (0, 0, 1, 1)
CALLS: list[str] = []  # implementations the recorders below were called as
GPU = KernelConfig("gpu")


@pytest.mark.parametrize("cc,kind", [("9.0", None), ((9, 0), None), (None, "NVIDIA H200"),
                                     (None, "NVIDIA H100 80GB HBM3"), ("9.0", "NVIDIA H200")])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_hopper_defaults_per_op(cc, kind, dtype):
  got = dispatch.default_impls(dtype=dtype, cudnn_available=True, compute_capability=cc,
                               device_kind=kind)
  assert got == HOPPER_DEFAULTS
  assert dispatch.gpu_arch(cc, kind) == "hopper"


def test_hopper_defaults_need_cudnn_and_half_precision():
  kw = dict(compute_capability="9.0", device_kind="NVIDIA H200")
  assert dispatch.default_impls(dtype=jnp.bfloat16, cudnn_available=False, **kw) == ALL_PALLAS
  # float32: no cuDNN; causal attention runs through XLA, measured faster than the Pallas
  # flash kernel on the H200; the rest stays on Pallas.
  fp32 = {**ALL_PALLAS, "causal_attention": "xla"}
  assert dispatch.default_impls(dtype=jnp.float32, cudnn_available=True, **kw) == fp32
  assert dispatch.default_impls(dtype=jnp.float32, cudnn_available=False, **kw) == fp32
  # Elsewhere float32 is unmeasured: Pallas as before.
  assert dispatch.default_impls(dtype=jnp.float32, cudnn_available=True,
                                compute_capability="8.0") == ALL_PALLAS


@pytest.mark.parametrize("cc,kind", [("8.0", "NVIDIA A100-SXM4-80GB"), ("8.9", None),
                                     ("10.0", "NVIDIA B200"), (None, "NVIDIA A100-SXM4-80GB"),
                                     (None, "cpu"), (None, None)])
def test_unmeasured_hardware_keeps_the_unmeasured_defaults(cc, kind):
  """No measurement there: cache attention stays on Pallas, causal / window on cuDNN."""
  got = dispatch.default_impls(dtype=jnp.bfloat16, cudnn_available=True,
                               compute_capability=cc, device_kind=kind)
  assert got == UNMEASURED_DEFAULTS
  assert dispatch.gpu_arch(cc, kind) != "hopper"
  assert dispatch.default_impls(dtype=jnp.bfloat16, cudnn_available=False,
                                compute_capability=cc, device_kind=kind) == ALL_PALLAS


@pytest.mark.parametrize("op,override,cc,cudnn,want", [
    ("cache_causal_attention", "pallas", "9.0", True, "pallas"),
    ("cache_causal_attention", "CUDNN", "8.0", True, "cudnn"),  # explicit, unmeasured arch
    ("cache_causal_attention", "cudnn", "9.0", False, "pallas"),  # cuDNN cannot run
    ("window_attention", "cudnn_chunked", "9.0", True, "cudnn_chunked"),
    ("window_attention", "pallas", "9.0", True, "pallas"),
    ("window_attention", " cudnn ", "8.0", True, "cudnn"),
    ("causal_attention", "pallas", "9.0", True, "pallas"),
    ("causal_attention", "", "9.0", True, "cudnn"),  # empty = no override
    ("sparse_decode", "pallas", "9.0", True, "pallas"),
    ("window_attention", "mgpu", "9.0", False, "mgpu"),  # needs no cuDNN
    ("causal_attention", "MGPU", "9.0", True, "mgpu"),
    ("window_attention", "mgpu", "8.0", True, "pallas"),  # Hopper only
    ("causal_attention", "mgpu", "10.0", True, "pallas"),
])
def test_override_wins_over_the_default(op, override, cc, cudnn, want):
  assert dispatch.select_impl(op, dtype=jnp.bfloat16, cudnn_available=cudnn,
                              compute_capability=cc, override=override) == want


@pytest.mark.parametrize("op,override,env", [
    ("cache_causal_attention", "bogus", "RTPURBO_CACHE_ATTN"),
    ("cache_causal_attention", "cudnn_chunked", "RTPURBO_CACHE_ATTN"),
    ("window_attention", "chunked", "RTPURBO_WINDOW_ATTN"),
    ("causal_attention", "triton", "RTPURBO_CAUSAL_ATTN"),
])
def test_invalid_override_is_one_clear_error(op, override, env):
  # Validated even where cuDNN could not run and the choice would not matter.
  for cudnn in (True, False):
    with pytest.raises(ValueError) as e:
      dispatch.select_impl(op, dtype=jnp.float32, cudnn_available=cudnn, override=override)
    msg = str(e.value)
    assert msg.startswith(f"{env}={override!r}")
    assert ", ".join(dispatch.IMPLS[op]) in msg and op in msg
  with pytest.raises(ValueError, match="sparse_decode"):
    dispatch.select_impl("sparse_decode", dtype=jnp.bfloat16, cudnn_available=True,
                         override="cudnn")
  with pytest.raises(ValueError, match="unknown GPU operation"):
    dispatch.select_impl("flash", dtype=jnp.bfloat16, cudnn_available=True)


def _hopper(monkeypatch, cudnn=True):
  monkeypatch.setattr(dispatch, "device_info", lambda: ("NVIDIA H200", "9.0"))
  monkeypatch.setattr(dispatch, "_cudnn_ok", lambda kernels: cudnn)


def test_process_choice_reads_device_and_config(monkeypatch):
  """impl_for: this process's device and the config's overrides (the environment is read
  only by KernelConfig.from_env, with the same choices and errors)."""
  cudnn_ok = dispatch._cudnn_ok
  _hopper(monkeypatch)
  assert dispatch.current_impls(jnp.bfloat16, GPU) == HOPPER_DEFAULTS
  over = GPU.with_impls(cache_causal_attention="pallas", window_attention="cudnn_chunked")
  assert dispatch.current_impls(jnp.bfloat16, over) == dict(
      HOPPER_DEFAULTS, cache_causal_attention="pallas", window_attention="cudnn_chunked")
  env = {"RTPURBO_KERNELS": "gpu", "RTPURBO_CACHE_ATTN": "pallas",
         "RTPURBO_WINDOW_ATTN": "cudnn_chunked"}
  assert KernelConfig.from_env(env) == over
  assert dispatch.impl_for("window_attention", jnp.bfloat16,
                           over.with_impls(window_attention="pallas")) == "pallas"
  with pytest.raises(ValueError, match=r"^KernelConfig impls\['window_attention'\]='sliding'"):
    GPU.with_impls(window_attention="sliding")
  with pytest.raises(ValueError, match=r"^RTPURBO_CAUSAL_ATTN='bogus'"):
    KernelConfig.from_env(dict(env, RTPURBO_CAUSAL_ATTN="bogus"))
  monkeypatch.setattr(dispatch, "device_info", lambda: ("NVIDIA A100-SXM4-80GB", "8.0"))
  assert dispatch.current_impls(jnp.bfloat16, GPU) == UNMEASURED_DEFAULTS
  # Interpret mode on a Hopper (the real `_cudnn_ok`): never cuDNN.
  monkeypatch.setattr(dispatch, "_cudnn_ok", cudnn_ok)
  monkeypatch.setattr(dispatch, "device_info", lambda: ("NVIDIA H200", "9.0"))
  assert dispatch.current_impls(jnp.bfloat16, KernelConfig("gpu", interpret=True)) == ALL_PALLAS


def _record(monkeypatch, calls):
  """cuDNN and Pallas entry points replaced by recorders that return the reference."""
  monkeypatch.setattr(dispatch.cudnn, "causal_attention",
                      lambda q, k, v, kv, **kw: calls.append("cudnn")
                      or ref.causal_attention(q, k, v, kv))
  monkeypatch.setattr(dispatch.cudnn, "window_attention",
                      lambda q, k, v, kv, *, sinks, window, chunked: calls.append(
                          "cudnn_chunked" if chunked else "cudnn")
                      or ref.window_attention(q, k, v, kv, sinks=sinks, window=window))
  monkeypatch.setattr(dispatch.cudnn, "cache_causal_attention",
                      lambda q, k, v, kv, *, q_offset: calls.append("cudnn")
                      or ref.cache_causal_attention(q, k, v, kv, q_offset=q_offset))

  def flash(q, k, v, kv, *, q_offset=0, kv_major=False, sinks=None, window=None, interpret):
    assert not interpret
    calls.append("pallas")
    if kv_major:
      return ref.cache_causal_attention(q, k, v, kv, q_offset=q_offset)
    if window is not None:
      return ref.window_attention(q, k, v, kv, sinks=sinks, window=window, q_offset=q_offset)
    return ref.causal_attention(q, k, v, kv, q_offset=q_offset)

  monkeypatch.setattr(dispatch.flash_k, "causal_attention", flash)
  monkeypatch.setattr(dispatch.flash_k, "window_attention", flash)
  monkeypatch.setattr(dispatch, "_pallas_ok", lambda kernels: True)


def _calls_per_op(dtype, q_offset=0, kernels=GPU, d=32):
  """The implementation each switchable dispatch entry point called (through `ops`, so the
  call that `ops` runs is the one the dispatch returned)."""
  from pallas_kernels import ops
  q = jnp.ones((1, 64, 4, d), dtype)
  k = v = jnp.ones((1, 64, 2, d), dtype)
  kc = vc = jnp.ones((1, 2, 128, d), dtype)
  out = {}
  for op, call in (
      ("causal_attention", lambda: ops.causal_attention(q, k, v, KV, q_offset=q_offset,
                                                        kernels=kernels)),
      ("window_attention", lambda: ops.window_attention(q, k, v, KV, sinks=4, window=16,
                                                        q_offset=q_offset, kernels=kernels)),
      ("cache_causal_attention", lambda: ops.cache_causal_attention(
          q, kc, vc, KV, q_offset=q_offset + 32, kernels=kernels))):
    CALLS.clear()
    call()
    out[op] = list(CALLS)
  return out


def test_dispatch_entry_points_follow_the_selection(monkeypatch):
  """The dispatch functions run what select_impl picks: cuDNN on Hopper for bf16, XLA for fp32
  causal attention and Pallas for the other fp32 ops, without cuDNN, for the cache attention
  off Hopper, or with an override in the config; cuDNN's offset rules still apply."""
  _record(monkeypatch, CALLS)
  _hopper(monkeypatch)
  assert _calls_per_op(jnp.bfloat16) == {"causal_attention": ["cudnn"],
                                         "window_attention": ["cudnn"],
                                         "cache_causal_attention": ["cudnn"]}
  # float32 causal attention: neither kernel (None: the XLA reference runs).
  assert _calls_per_op(jnp.float32) == {**{op: ["pallas"] for op in dispatch.OVERRIDE_ENV},
                                        "causal_attention": []}
  assert dispatch.causal_attention(jnp.ones((1, 8, 4, 32)), jnp.ones((1, 8, 2, 32)),
                                   jnp.ones((1, 8, 2, 32)), KV, kernels=GPU) is None
  # A nonzero offset: causal / window cuDNN take none; the cache split takes it.
  assert _calls_per_op(jnp.bfloat16, q_offset=8) == {"causal_attention": ["pallas"],
                                                     "window_attention": ["pallas"],
                                                     "cache_causal_attention": ["cudnn"]}
  over = GPU.with_impls(cache_causal_attention="pallas", window_attention="cudnn_chunked")
  assert _calls_per_op(jnp.bfloat16, kernels=over) == {
      "causal_attention": ["cudnn"], "window_attention": ["cudnn_chunked"],
      "cache_causal_attention": ["pallas"]}
  monkeypatch.setattr(dispatch, "device_info", lambda: ("NVIDIA A100-SXM4-80GB", "8.0"))
  assert _calls_per_op(jnp.bfloat16) == {"causal_attention": ["cudnn"],
                                         "window_attention": ["cudnn"],
                                         "cache_causal_attention": ["pallas"]}
  _hopper(monkeypatch, cudnn=False)  # e.g. interpret mode
  assert _calls_per_op(jnp.bfloat16) == {op: ["pallas"] for op in dispatch.OVERRIDE_ENV}


def test_mgpu_choice_runs_the_mosaic_kernel(monkeypatch):
  """An "mgpu" override on a Hopper runs the Mosaic GPU kernel for bf16 at any offset, static
  or traced, and for the cache attention of a prefill chunk; fp32, head_dim 32, a cache length
  that is not a whole number of key blocks or another architecture fall back to Pallas. In the
  interpreter the choice stands on any device."""
  _record(monkeypatch, CALLS)
  for name in ("window_attention", "causal_attention", "cache_causal_attention"):
    monkeypatch.setattr(dispatch.mgpu_k, name,
                        lambda *a, interpret, name=name, **kw: CALLS.append("mgpu")
                        or getattr(ref, name)(*a, **kw))
  _hopper(monkeypatch, cudnn=False)
  over = GPU.with_impls(window_attention="mgpu", causal_attention="mgpu",
                        cache_causal_attention="mgpu")
  every = {op: ["mgpu"] for op in dispatch.OVERRIDE_ENV}
  assert _calls_per_op(jnp.bfloat16, kernels=over, d=64) == every
  # Queries past the last key (offset 8 + 64 rows over 64 keys): the kernel writes a row that
  # sees no key as the reference does, so it takes them.
  assert _calls_per_op(jnp.bfloat16, q_offset=8, kernels=over, d=64) == every
  assert _calls_per_op(jnp.bfloat16, kernels=over) == {op: ["pallas"]  # head_dim 32
                                                       for op in dispatch.OVERRIDE_ENV}
  assert _calls_per_op(jnp.float32, kernels=over, d=64) == {op: ["pallas"]
                                                            for op in dispatch.OVERRIDE_ENV}
  from pallas_kernels import ops
  q = jnp.ones((1, 64, 4, 64), jnp.bfloat16)
  kv = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
  CALLS.clear()
  jax.jit(lambda off: ops.window_attention(q, kv, kv, KV, sinks=4, window=16, q_offset=off,
                                           kernels=over))(jnp.int32(0))
  assert CALLS == ["mgpu"]  # a traced offset
  CALLS.clear()
  cache = jnp.ones((1, 2, 96, 64), jnp.bfloat16)  # 96 slots: not whole 128-key blocks
  ops.cache_causal_attention(q, cache, cache, KV, q_offset=16, kernels=over)
  assert CALLS == ["pallas"]
  monkeypatch.setattr(dispatch, "device_info", lambda: ("NVIDIA A100-SXM4-80GB", "8.0"))
  assert _calls_per_op(jnp.bfloat16, kernels=over, d=64)["window_attention"] == ["pallas"]
  assert dispatch.impl_for("window_attention", jnp.bfloat16,
                           KernelConfig("gpu", interpret=True, impls=over.impls)) == "mgpu"


def _load(name):
  with open(os.path.join(RESULTS, name)) as f:
    return json.load(f)


def test_committed_h200_figures_ran_with_the_defaults():
  """The README / NOTES figures (benchmarks/results/*_h200.json) were measured with the
  implementations the dispatch now picks on the H200 by default."""
  want = dispatch.default_impls(dtype=jnp.bfloat16, cudnn_available=True,
                                compute_capability="9.0", device_kind="NVIDIA H200")
  choice = [r for r in _load("check_prefill_h200.json")
            if r["check"] == "cache_causal_attention/choice"]
  assert [r["impl"] for r in choice] == [want["cache_causal_attention"]]
  e2e = _load("e2e_h200.json")["variants"]
  measured = {name: v["kernels"] for name, v in e2e.items()
              if name.startswith("rtpurbo@") and "kernels" in v}
  assert {"rtpurbo@128K", "rtpurbo@512K", "rtpurbo@1M"} <= set(measured)
  for name, kernels in measured.items():
    assert kernels["backend"] == "gpu", name
    assert kernels["cache_attn"] == want["cache_causal_attention"], name
    assert kernels["window_impl"] == want["window_attention"], name
  assert _load("kernels_h200.json")["dispatch_window_impl"] == want["window_attention"]
