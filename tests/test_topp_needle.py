"""scripts/topp_needle.py: its selection rules against a brute force, its needle spans, and its
summary on hand-made rows."""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tn():
  spec = importlib.util.spec_from_file_location("topp_needle",
                                                os.path.join(ROOT, "scripts", "topp_needle.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _brute_topp(mass: np.ndarray, allowed: np.ndarray, own: int, p: float) -> np.ndarray:
  """The shortest heaviest-first prefix of the allowed blocks whose normalised mass reaches p
  (ties: lower index first), plus the own block."""
  idx = [int(i) for i in np.flatnonzero(allowed)]
  total = mass[idx].sum()
  order = sorted(idx, key=lambda i: (-mass[i], i))
  keep, acc = np.zeros(mass.size, bool), 0.0
  for i in order:
    if acc >= p * total:
      break
    keep[i] = True
    acc += mass[i]
  keep[own] = True
  return keep


def test_rules_match_a_brute_force(tn, rng):
  for _ in range(20):
    nb = int(rng.integers(3, 12))
    n_valid = int(rng.integers(2, nb + 1))
    lm = rng.normal(0, 2, (4, nb)).astype(np.float32)
    lm[:, 0] += rng.uniform(0, 4)  # a heavy sink block, as the indexer gives
    valid = np.arange(nb) < n_valid
    own = n_valid - 1
    p, k = float(rng.uniform(0.5, 0.95)), int(rng.integers(1, nb))
    floor = int(rng.integers(1, nb))
    out = tn.select_rules(jnp.asarray(lm), jnp.asarray(np.broadcast_to(valid, lm.shape)),
                          jnp.full((4,), own, jnp.int32), p, k, floor)
    assert set(out) == set(tn.RULES)
    for h in range(4):
      mass = np.exp(lm[h].astype(np.float64))
      np.testing.assert_array_equal(np.asarray(out["top-p"][h]),
                                    _brute_topp(mass, valid, own, p))
      rest = valid.copy()
      rest[0] = False
      want = _brute_topp(mass, rest, own, p) if rest.any() else np.eye(nb, dtype=bool)[own]
      want[0] = True
      np.testing.assert_array_equal(np.asarray(out["top-p -sink"][h]), want)
      order = sorted(np.flatnonzero(valid), key=lambda i: (-lm[h, i], i))[:k]
      want_k = np.isin(np.arange(nb), order)
      want_k[own] = True
      np.testing.assert_array_equal(np.asarray(out["top-k"][h]), want_k)
      heaviest = sorted(np.flatnonzero(valid), key=lambda i: (-lm[h, i], i))[:floor]
      want_f = _brute_topp(mass, valid, own, p) | np.isin(np.arange(nb), heaviest)
      np.testing.assert_array_equal(np.asarray(out["top-p +floor"][h]), want_f)


def test_needle_span_and_summary(tn):
  from rtpurbo_jax.eval.corpus import ByteCodec
  prompt = "hay hay NEEDLE hay"
  assert tn.needle_token_span(ByteCodec(), prompt, (8, 14)) == (8, 14)
  rows = []
  for depth, kept in ((0.1, [True, False]), (0.9, [True, True])):
    rows.append({"depth": depth, "scores": {"dense": 1.0, "rtpurbo": float(all(kept))},
                 "needle_mass": [0.5, 0.01], "sink_mass": [0.2, 0.4],
                 "indexer_sink_share": [0.6, 0.8],
                 **{f"{r}|kept": kept for r in tn.RULES},
                 **{f"{r}|blocks": [3, 5] for r in tn.RULES},
                 **{f"{r}|recall": [0.9, 0.7] for r in tn.RULES}})
  s = tn.summarise(rows, reading_mass=0.1)
  assert s["0.1"]["top-p"]["kept"] == 0.5 and s["0.1"]["top-p"]["kept_reading"] == 1.0
  assert s["all"]["top-p"]["kept"] == 0.75 and s["all"]["reading_pairs"] == 2
  assert s["all"]["accuracy"] == {"dense": 1.0, "rtpurbo": 0.5}
  assert s["all"]["indexer_sink_share"] == pytest.approx(0.7)
  assert s["all"]["top-k"]["blocks"] == 4.0
  md = tn.markdown({"task": "t", "length": 8, "model": "m", "top_p": 0.9, "block_size": 4,
                    "topk_blocks": 2, "reading_mass": 0.1, "scores_from": "x"}, s)
  assert "| 0.1 | 1 | 1 / 2 |" in md
