"""Shared pytest setup.

- 8 host CPU devices (docs/DESIGN.md §4: sharded == single-device checks), set before jax loads.
- `seed`: fresh per test unless RTPURBO_TEST_SEED is set; printed, so a failure can be
  reproduced with RTPURBO_TEST_SEED=<seed>.
- The process's default kernel config (`pallas_kernels.config.default()`, the environment read
  once) is forgotten after each test, so that a test which sets RTPURBO_* variables leaves no
  reading of them behind.
- Compiled programs are dropped after each test module (`jax.clear_caches()`): a whole-suite
  process otherwise keeps every module's programs alive.
"""

import os
import secrets

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def seed() -> int:
  s = int(os.environ.get("RTPURBO_TEST_SEED") or secrets.randbelow(2**31))
  print(f"seed={s} (rerun with RTPURBO_TEST_SEED={s})")
  return s


@pytest.fixture
def rng(seed) -> np.random.Generator:
  return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _forget_default_kernel_config():
  yield
  from pallas_kernels import config
  config.default.cache_clear()


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  """Each test module's compiled programs (and the traces that hold them) are dropped when it
  ends: a single-process run of the whole suite otherwise keeps every module's programs."""
  yield
  import jax
  jax.clear_caches()
