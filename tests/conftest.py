"""Shared pytest setup.

- 8 host CPU devices (docs/DESIGN.md §4: sharded == single-device checks), set before jax loads.
- `seed`: fresh per test unless RTPURBO_TEST_SEED is set; printed, so a failure can be
  reproduced with RTPURBO_TEST_SEED=<seed>.
- The process's default kernel config (`pallas_kernels.config.default()`, the environment read
  once) is forgotten after each test, so that a test which sets RTPURBO_* variables leaves no
  reading of them behind.
- Compiled programs are dropped after each test module (`jax.clear_caches()`): a whole-suite
  process otherwise keeps every module's programs alive.
- Test files run longest first (`_LONGEST_FIRST`): under `-n 2 --dist loadfile` (the README's
  command) xdist hands whole files to the workers in collection order, so the long files start
  while both workers are busy instead of one worker finishing a long file alone at the end.
"""

import os
import secrets

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


# Files by one-process time on a 2-core CPU (seconds, the whole suite, 2026-12-07), longest
# first; the files not named (each under 45 s) follow in pytest's order.
_LONGEST_FIRST = (
    "test_engine_ring.py",  # 345
    "test_smollm2_rtpurbo.py",  # 294, of which the README passkey run 235
    "test_eval.py",  # 236
    "test_benchmark_scripts.py",  # 197
    "test_gpu_kernels.py",  # 185
    "test_mixed.py",  # 169
    "test_train_losses.py",  # 129
    "test_tpu_kernels.py",  # 125
    "test_notebooks.py",  # 124
    "test_engine.py",  # 111
    "test_banded_attention.py",  # 109
    "test_serve_smollm2.py",  # 107
    "test_train_loop.py",  # 72
    "test_train_cli.py",  # 67
    "test_train_sharded.py",  # 60
    "test_multigpu.py",  # 60
    "test_gpu_run_plan.py",  # 60
    "test_serve.py",  # 49
    "test_kernel_config.py",  # 49
    "test_smollm2.py",  # 47
)


def pytest_configure(config):
  # xdist would otherwise reorder the files by their number of tests, not their time.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  here = os.path.dirname(os.path.abspath(__file__))
  gone = [n for n in _LONGEST_FIRST if not os.path.exists(os.path.join(here, n))]
  if gone:
    raise pytest.UsageError(f"conftest._LONGEST_FIRST names files that do not exist: {gone}")
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the rest


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
