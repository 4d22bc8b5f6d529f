"""`KernelConfig`: the kernel choice as static data, read from the environment once.

- the config is frozen, hashable and validated; `from_env` parses the RTPURBO_* variables
  with one clear error per bad value; `default()` reads them once;
- a model carries its config in its graph definition: two models that differ only in it are
  two jit cache entries with different programs (Pallas calls or none), same numbers;
- the dispatch decides kernel or reference up front (`ops.supports`): a kernel that raises
  is a bug whose error reaches the caller, never a silent reference run;
- checkpoints and HF folders do not depend on it.
"""

import dataclasses
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import config, ops
from pallas_kernels import reference as ref
from pallas_kernels.config import KernelConfig
from pallas_kernels.gpu import decode as decode_k
from pallas_kernels.gpu import dispatch as gpu_dispatch
from pallas_kernels.gpu import prefill_select as prefill_select_k
from pallas_kernels.gpu import topp_select as topp_select_k
from pallas_kernels.gpu import window_attention as flash_k
from rtpurbo_jax import convert
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.infer.engine import Engine
from rtpurbo_jax.models.transformer import Transformer

REFERENCE = KernelConfig("reference")
GPU = KernelConfig("gpu", interpret=True)  # the GPU backend in the Pallas interpreter
CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)
PLAN = HeadPlan.from_mask([[1, 0, 0, 0], [0, 0, 0, 1]], 2)
SPARSE = SparseConfig(mode="rtpurbo", window=8, sinks=2, seqlen_threshold=0, block_size=8,
                      indexer_dim=8, top_p=0.6, chunk_size=8)
KV = (1, 0, 1, 1)  # 4 query heads on 2 KV heads, groups of unequal size


@pytest.fixture(autouse=True)
def fresh_default():
  """`config.default()` is cached per process: each test starts without it (conftest forgets
  it after each test)."""
  config.default.cache_clear()


def _model(seed, kernels):
  return Transformer(CFG, sparse=SPARSE, plan=PLAN, rngs=nnx.Rngs(seed), init_std=0.3,
                     kernels=kernels)


def _normal(rng, shape, dtype=jnp.float32):
  return jnp.asarray(rng.normal(size=shape), dtype)


# ---------------------------------------------------------------------------
# The config itself.


def test_config_is_frozen_hashable_and_normalised():
  a = KernelConfig("gpu", interpret=1, impls={"window_attention": " Pallas ",
                                              "causal_attention": "cudnn"})
  b = KernelConfig("gpu", True, impls=(("causal_attention", "cudnn"),
                                      ("window_attention", "pallas")))
  assert a == b and hash(a) == hash(b) and len({a, b}) == 1
  assert a.impls == (("causal_attention", "cudnn"), ("window_attention", "pallas"))
  assert a.interpret is True and a.impl("window_attention") == "pallas"
  assert a.impl("cache_causal_attention") is None
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.backend = "tpu"
  c = a.with_impls(window_attention=None, cache_causal_attention="cudnn")
  assert c.impls == (("cache_causal_attention", "cudnn"), ("causal_attention", "cudnn"))
  assert c != a and hash(c) != hash(a)
  assert KernelConfig("gpu") != KernelConfig("gpu", interpret=True) != REFERENCE
  with pytest.raises(ValueError, match=r"backend='cuda': expected one of gpu, tpu, reference"):
    KernelConfig("cuda")
  with pytest.raises(ValueError, match=r"^KernelConfig impls\['cache_causal_attention'\]="
                     r"'cudnn_chunked' is not an implementation of cache_causal_attention: "
                     r"expected one of pallas, cudnn, mgpu$"):
    KernelConfig("gpu", impls={"cache_causal_attention": "cudnn_chunked"})
  with pytest.raises(ValueError, match="unknown GPU operation 'flash'"):
    KernelConfig("gpu", impls={"flash": "pallas"})


@pytest.mark.parametrize("env,want", [
    ({}, REFERENCE),  # auto on a CPU
    ({"RTPURBO_KERNELS": "auto"}, REFERENCE),
    ({"RTPURBO_KERNELS": "GPU", "RTPURBO_INTERPRET": "1"}, GPU),
    ({"RTPURBO_KERNELS": "gpu", "RTPURBO_INTERPRET": "false"}, KernelConfig("gpu")),
    ({"RTPURBO_KERNELS": "gpu", "RTPURBO_INTERPRET": ""}, KernelConfig("gpu")),
    ({"RTPURBO_KERNELS": "tpu", "RTPURBO_INTERPRET": "races"},
     KernelConfig("tpu", interpret=True, detect_races=True)),
    ({"RTPURBO_KERNELS": "gpu", "RTPURBO_CAUSAL_ATTN": "xla", "RTPURBO_WINDOW_ATTN": " ",
      "RTPURBO_CACHE_ATTN": "CUDNN"},
     KernelConfig("gpu", impls={"causal_attention": "xla", "cache_causal_attention": "cudnn"})),
    # The implementation variables only concern the gpu backend: not read for another.
    ({"RTPURBO_KERNELS": "reference", "RTPURBO_CAUSAL_ATTN": "flash9"}, REFERENCE),
])
def test_from_env(env, want):
  assert jax.default_backend() == "cpu"
  assert KernelConfig.from_env(env) == want


@pytest.mark.parametrize("env,message", [
    ({"RTPURBO_KERNELS": "cuda"},
     "RTPURBO_KERNELS='cuda': expected auto, gpu, tpu or reference"),
    ({"RTPURBO_KERNELS": "gpu", "RTPURBO_WINDOW_ATTN": "sliding"},
     "RTPURBO_WINDOW_ATTN='sliding' is not an implementation of window_attention: expected "
     "one of pallas, cudnn, cudnn_chunked, mgpu"),
    ({"RTPURBO_KERNELS": "gpu", "RTPURBO_CAUSAL_ATTN": "triton"},
     "RTPURBO_CAUSAL_ATTN='triton' is not an implementation of causal_attention: expected "
     "one of pallas, cudnn, xla, mgpu"),
    ({"RTPURBO_KERNELS": "gpu", "RTPURBO_CACHE_ATTN": "xla"},
     "RTPURBO_CACHE_ATTN='xla' is not an implementation of cache_causal_attention: expected "
     "one of pallas, cudnn, mgpu"),
])
def test_from_env_errors_name_the_variable_and_the_choices(env, message):
  with pytest.raises(ValueError) as e:
    KernelConfig.from_env(env)
  assert str(e.value) == message


def test_default_reads_the_environment_once(monkeypatch):
  monkeypatch.setenv("RTPURBO_KERNELS", "gpu")
  monkeypatch.setenv("RTPURBO_INTERPRET", "1")
  assert config.default() == GPU
  model = _model(0, None)  # no config given: the process default
  assert model.kernels == GPU
  assert all(layer.attn.kernels == GPU for layer in model.layers)
  monkeypatch.setenv("RTPURBO_KERNELS", "reference")  # too late: read once
  assert config.default() == GPU and _model(0, None).kernels == GPU
  assert config.resolve(REFERENCE) == REFERENCE and config.resolve(None) == GPU
  config.default.cache_clear()
  assert config.default() == KernelConfig("reference", interpret=True)


# ---------------------------------------------------------------------------
# Part of the jit key.

TRACES = []


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(state, ids, *, graphdef):
  TRACES.append(graphdef)
  return nnx.merge(graphdef, state)(ids)


def _jaxpr(model, ids):
  graphdef, state = nnx.split(model)
  return str(jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(i))(state, ids))


def test_kernel_config_is_part_of_the_jit_key(seed, monkeypatch):
  """Two models that differ only in their kernel config: two graph definitions, two traces
  of one jitted function, the Pallas kernels in one program and not in the other, the same
  logits. Changing the environment afterwards changes neither program."""
  # The first Pallas interpreter run of a process registers one more entry in JAX's trace
  # context (a callback of the interpreter module), which would retrace any earlier jit once.
  x = jnp.zeros((1, 16, 2, 16))
  flash_k.causal_attention(x, x, x, (0, 1), interpret=True)
  ref_model = _model(seed, REFERENCE)
  gpu_model = convert.rebuild(ref_model, kernels=GPU)
  assert gpu_model.kernels == GPU and ref_model.kernels == REFERENCE
  g_ref, s_ref = nnx.split(ref_model)
  g_gpu, s_gpu = nnx.split(gpu_model)
  assert g_ref != g_gpu
  jax.tree.map(np.testing.assert_array_equal, s_ref, s_gpu)  # same weights
  ids = jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (2, 24)),
                    jnp.int32)
  TRACES.clear()
  want = _forward(s_ref, ids, graphdef=g_ref)
  got = _forward(s_gpu, ids, graphdef=g_gpu)
  _forward(s_ref, ids, graphdef=g_ref)  # cached: no third trace
  _forward(s_gpu, ids, graphdef=g_gpu)
  assert TRACES == [g_ref, g_gpu]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  assert "pallas_call" not in _jaxpr(ref_model, ids)
  assert "pallas_call" in _jaxpr(gpu_model, ids)
  # The environment is no part of a built model's program.
  monkeypatch.setenv("RTPURBO_KERNELS", "gpu")
  monkeypatch.setenv("RTPURBO_INTERPRET", "1")
  assert "pallas_call" not in _jaxpr(ref_model, ids)
  _forward(s_ref, ids, graphdef=g_ref)
  assert len(TRACES) == 2


def test_checkpoint_and_hf_folder_do_not_depend_on_it(seed, tmp_path):
  from rtpurbo_jax.hf.api import from_pretrained, save_pretrained

  ref_model = _model(seed, REFERENCE)
  gpu_model = convert.rebuild(ref_model, kernels=GPU)
  s_ref, s_gpu = nnx.state(ref_model), nnx.state(gpu_model)
  assert jax.tree.structure(s_ref) == jax.tree.structure(s_gpu)
  save_pretrained(ref_model, tmp_path / "a")
  save_pretrained(gpu_model, tmp_path / "b")
  names = sorted(p.name for p in (tmp_path / "a").iterdir())
  assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
  for name in names:
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  assert "kernel" not in json.dumps(json.loads((tmp_path / "a" / "config.json").read_text()))
  loaded = from_pretrained(str(tmp_path / "b"), kernels=GPU)
  assert loaded.kernels == GPU
  assert from_pretrained(str(tmp_path / "b"), kernels=REFERENCE).kernels == REFERENCE


# ---------------------------------------------------------------------------
# Kernel or reference, decided up front.


def _raise_value_error(**_):
  raise ValueError("kernel bug")


def _convert_offset(q_offset, **_):
  int(q_offset)  # a kernel that needs a static offset but was handed a traced one


@pytest.mark.parametrize("op", ["window_attention", "cache_causal_attention"])
@pytest.mark.parametrize("bug,error", [
    (_raise_value_error, ValueError),
    (_convert_offset, (jax.errors.ConcretizationTypeError,
                       jax.errors.TracerIntegerConversionError))])
def test_a_kernel_that_raises_reaches_the_caller(op, bug, error, seed, monkeypatch):
  """A fake accelerator whose `op` kernel fails inside the engine's chunked prefill (q_offset
  traced): the error propagates; no reference run hides it. Before, exactly these errors
  sent the call to the jnp reference."""
  chosen = []

  def choose(*args, kernels, q_offset=0, **kwargs):
    chosen.append(op)
    return functools.partial(bug, q_offset=q_offset)

  fake = types.SimpleNamespace(**{op: choose})
  monkeypatch.setattr(ops, "accelerator", lambda backend: fake if backend == "gpu" else None)
  model = _model(seed, KernelConfig("gpu"))
  ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, (1, 20)).astype(np.int32)
  with pytest.raises(error):
    Engine(model).generate(ids, 1, prefill_chunk=8)
  assert chosen
  # The same prompt on the reference backend runs (the fake is not consulted there).
  chosen.clear()
  out = Engine(convert.rebuild(model, kernels=REFERENCE)).generate(ids, 1, prefill_chunk=8)
  assert not chosen and np.isfinite(out.first_logits).all()


def test_reference_backend_takes_a_traced_offset(seed):
  rng = np.random.default_rng(seed)
  q = _normal(rng, (1, 12, 4, 16))
  k, v = _normal(rng, (1, 30, 2, 16)), _normal(rng, (1, 30, 2, 16))
  kc, vc = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  window = jax.jit(lambda off: ops.window_attention(q, k, v, KV, sinks=2, window=5,
                                                    q_offset=off, kernels=REFERENCE))
  cache = jax.jit(lambda off: ops.cache_causal_attention(q, kc, vc, KV, q_offset=off,
                                                         kernels=REFERENCE))
  for off in (0, 7, 18):
    for got, want in ((window(jnp.int32(off)),
                       ref.window_attention(q, k, v, KV, sinks=2, window=5, q_offset=off)),
                      (cache(jnp.int32(off)),
                       ref.cache_causal_attention(q, kc, vc, KV, q_offset=off))):
      np.testing.assert_allclose(got[0], want[0], atol=1e-6)
      np.testing.assert_allclose(got[1], want[1], atol=1e-6)
  assert not ops.supports("window_attention", q, k, v, KV, sinks=2, window=5,
                          kernels=REFERENCE)


def _gpu_cases(rng):
  """(op, args, kwargs, the kernel module function it runs, supported) on both sides of the
  GPU kernels' shape rules."""
  q, k, v = (_normal(rng, (1, 40, h, 32)) for h in (4, 2, 2))
  q24, k24 = _normal(rng, (1, 40, 4, 24)), _normal(rng, (1, 40, 2, 24))
  kc, vc = _normal(rng, (1, 2, 64, 32)), _normal(rng, (1, 2, 64, 32))
  kc24 = _normal(rng, (1, 2, 64, 24))
  kd, vd, kd24 = _normal(rng, (2, 2, 64, 32)), _normal(rng, (2, 2, 64, 32)), _normal(
      rng, (2, 2, 64, 24))  # decode caches, batch 2
  q1, q1_24 = _normal(rng, (2, 4, 32)), _normal(rng, (2, 4, 24))
  lengths = jnp.asarray([64, 29], jnp.int32)
  mask = jnp.asarray(rng.random((2, 4, 4)) < 0.5)
  ring_pos = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2, 64))
  qi, ck = _normal(rng, (2, 2, 8)), _normal(rng, (2, 2, 48, 8))
  ck_lengths = jnp.asarray([48, 29], jnp.int32)
  ki = _normal(rng, (1, 48, 2, 8))
  rule = dict(sinks=2, window=9)
  return [
      ("window_attention", (q, k, v, KV), dict(rule, q_offset=0), "flash_window", True),
      ("window_attention", (q24, k24, k24, KV), rule, "flash_window", False),
      ("causal_attention", (q, k, v, KV), {}, "flash_causal", True),
      ("causal_attention", (q24, k24, k24, KV), {}, "flash_causal", False),
      ("cache_causal_attention", (q, kc, vc, KV), dict(q_offset=20), "flash_causal", True),
      ("cache_causal_attention", (q24, kc24, kc24, KV), dict(q_offset=20), "flash_causal",
       False),
      ("sparse_decode", (q1, kd, vd, KV, mask, lengths), dict(block_size=16), "sparse_decode",
       True),
      ("sparse_decode", (q1_24, kd24, kd24, KV, mask, lengths), dict(block_size=16),
       "sparse_decode", False),
      ("ring_decode", (q1, kd, vd, ring_pos, KV, lengths - 1), rule, "ring_decode", True),
      ("ring_decode", (q1_24, kd24, kd24, ring_pos, KV, lengths - 1), rule, "ring_decode",
       False),
      ("topp_select", (qi, ck, ck_lengths), dict(top_p=0.7, block_size=16), "topp_select",
       True),
      ("topp_select", (qi, ck, ck_lengths), dict(top_p=0.7, block_size=24), "topp_select",
       False),  # blocks of 24: not a power of two
      ("prefill_select", (ki, ki), dict(top_p=0.7, block_size=16), "prefill_select", True),
      ("prefill_select", (ki, ki), dict(top_p=0.7, block_size=24), "prefill_select", False),
  ]


def test_gpu_supports_decides_kernel_or_reference(seed, monkeypatch):
  """On the gpu backend (interpreter): where `ops.supports` says yes, the Pallas kernel runs
  and matches the reference; where it says no, no kernel is traced and the reference's own
  numbers come back."""
  calls = []

  def counted(name, fn):
    return lambda *a, **k: calls.append(name) or fn(*a, **k)

  for name, module, attr in (("flash_window", flash_k, "window_attention"),
                             ("flash_causal", flash_k, "causal_attention"),
                             ("sparse_decode", decode_k, "sparse_decode"),
                             ("ring_decode", decode_k, "ring_decode"),
                             ("topp_select", topp_select_k, "topp_select"),
                             ("prefill_select", prefill_select_k, "prefill_select")):
    monkeypatch.setattr(module, attr, counted(name, getattr(module, attr)))
  assert gpu_dispatch.flash_k is flash_k and gpu_dispatch.decode_k is decode_k
  for op, args, kwargs, kernel, supported in _gpu_cases(np.random.default_rng(seed)):
    calls.clear()
    assert ops.supports(op, *args, kernels=GPU, **kwargs) == supported, (op, supported)
    got = ops.__dict__[op](*args, kernels=GPU, **kwargs)
    want = getattr(ref, op)(*args, **kwargs)
    assert calls == ([kernel] if supported else []), (op, supported)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
      np.testing.assert_array_equal(np.isfinite(g), np.isfinite(w))
      np.testing.assert_allclose(g[np.isfinite(w)], w[np.isfinite(w)], atol=3e-5, rtol=3e-5,
                                 err_msg=f"{op} supported={supported}")
