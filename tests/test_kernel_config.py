"""`KernelConfig`: the kernel choice as static data, read from the environment once.

The config is frozen, hashable and validated; `from_env` parses the RTPURBO_* variables with
one clear error per bad value.
"""

import dataclasses

import jax
import pytest

from pallas_kernels import config
from pallas_kernels.config import KernelConfig

REFERENCE = KernelConfig("reference")
GPU = KernelConfig("gpu", interpret=True)  # the GPU backend in the Pallas interpreter


@pytest.fixture(autouse=True)
def fresh_default():
  """`config.default()` is cached per process: each test starts and ends without it."""
  config.default.cache_clear()
  yield
  config.default.cache_clear()


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
                     r"expected one of pallas, cudnn$"):
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
     "one of pallas, cudnn, cudnn_chunked"),
    ({"RTPURBO_KERNELS": "gpu", "RTPURBO_CAUSAL_ATTN": "triton"},
     "RTPURBO_CAUSAL_ATTN='triton' is not an implementation of causal_attention: expected "
     "one of pallas, cudnn, xla"),
    ({"RTPURBO_KERNELS": "gpu", "RTPURBO_CACHE_ATTN": "xla"},
     "RTPURBO_CACHE_ATTN='xla' is not an implementation of cache_causal_attention: expected "
     "one of pallas, cudnn"),
])
def test_from_env_errors_name_the_variable_and_the_choices(env, message):
  with pytest.raises(ValueError) as e:
    KernelConfig.from_env(env)
  assert str(e.value) == message


def test_default_reads_the_environment_once(monkeypatch):
  monkeypatch.setenv("RTPURBO_KERNELS", "gpu")
  monkeypatch.setenv("RTPURBO_INTERPRET", "1")
  assert config.default() == GPU
  monkeypatch.setenv("RTPURBO_KERNELS", "reference")  # too late: read once
  assert config.default() == GPU
  assert config.resolve(REFERENCE) == REFERENCE and config.resolve(None) == GPU
  config.default.cache_clear()
  assert config.default() == KernelConfig("reference", interpret=True)
