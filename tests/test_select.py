"""Block selection (rtpurbo_jax.attention.select) vs brute-force numpy oracles.

Inputs are fresh every run (the `rng` fixture; RTPURBO_TEST_SEED reproduces one).
The oracles are written here from docs/DESIGN.md §1, in float64, one query at a time:
softmax over the causal keys, block masses, sort (ties: lower block index first), shortest
prefix reaching p, plus the own block. Where float32 rounding could legitimately change the
answer (a prefix sum within 1e-5 of p, or two block masses that differ by less than 1e-6
without being equal), the query is "ambiguous": it gets a weaker check (own block kept,
selected mass >= p - 1e-4) and the test requires such queries to be rare.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpurbo_jax.attention import select

AMBIG_CUT = 1e-5
AMBIG_TIE = 1e-6


# ---------------------------------------------------------------------------
# Oracles.


def _causal_block_mass(row, t, bs):
  """float64 block masses over keys 0..t of one query (softmax over those keys)."""
  s = np.asarray(row[: t + 1], np.float64)
  w = np.exp(s - s.max())
  w /= w.sum()
  nb_causal = t // bs + 1
  mass = np.zeros(nb_causal)
  np.add.at(mass, np.arange(t + 1) // bs, w)
  return mass


def _rank(values):
  """Indices by decreasing value, ties: lower index first."""
  return sorted(range(len(values)), key=lambda b: (-values[b], b))


def _near_tie(values):
  v = np.sort(np.asarray(values))
  d = np.diff(v)
  return bool(np.any((d > 0) & (d < AMBIG_TIE)))


def oracle_topp(row, t, p, bs, nb):
  """(selected bool [nb], ambiguous) for one query at position t."""
  mass = _causal_block_mass(row, t, bs)
  sel = np.zeros(nb, bool)
  if p >= 1.0:
    sel[: len(mass)] = True
    return sel, False
  cum, cums = 0.0, []
  for b in _rank(mass):
    if cum >= p:
      break
    sel[b] = True
    cum += mass[b]
    cums.append(cum)
  sel[t // bs] = True
  ambiguous = (any(abs(c - p) < AMBIG_CUT for c in cums) or _near_tie(mass))
  return sel, ambiguous


def oracle_topk(row, t, k_blocks, bs, nb):
  mass = _causal_block_mass(row, t, bs)
  sel = np.zeros(nb, bool)
  for b in _rank(mass)[:k_blocks]:
    sel[b] = True
  sel[t // bs] = True
  return sel, _near_tie(mass)


def random_scores(rng, lead, t, bs, *, scale=3.0, tie_blocks=True, integer=False):
  """Scores [*lead, t]; with tie_blocks, some whole blocks are exact copies of others
  (equal block masses, so the lower-index rule decides)."""
  if integer:
    s = rng.integers(0, 3, size=(*lead, t)).astype(np.float32) * scale
  else:
    s = (rng.standard_normal((*lead, t)) * scale).astype(np.float32)
  nfull = t // bs
  if tie_blocks and nfull >= 2:
    for _ in range(max(1, nfull // 2)):
      a, b = rng.choice(nfull, 2, replace=False)
      s[..., b * bs:(b + 1) * bs] = s[..., a * bs:(a + 1) * bs]
  return s


def random_positions(rng, lead_q, t, bs):
  """Query positions [*lead_q] with the edge cases forced in: 0, inside the first block,
  the first block's end, the second block's start and the last key."""
  pos = rng.integers(0, t, size=lead_q)
  flat = pos.reshape(-1)
  edges = [0, min(5, t - 1), min(bs - 1, t - 1), min(bs, t - 1), t - 1]
  flat[: len(edges)] = edges[: flat.size]
  return flat.reshape(lead_q).astype(np.int32)


def check_against_oracle(got, scores, pos, oracle, selected_mass_floor=None, bs=64):
  """Compare a [..., q, nb] mask with the per-query oracle; returns (#exact, #ambiguous)."""
  got = np.asarray(got)
  lead = scores.shape[:-1]
  nb = got.shape[-1]
  pos_b = np.broadcast_to(pos, lead)
  n_ok = n_amb = 0
  for idx in np.ndindex(*lead):
    t = int(pos_b[idx])
    want, amb = oracle(scores[idx], t, nb)
    if amb:
      n_amb += 1
      assert got[idx][t // bs], f"own block missing at {idx}"
      assert not got[idx][t // bs + 1:].any(), f"future block selected at {idx}"
      if selected_mass_floor is not None:
        mass = _causal_block_mass(scores[idx], t, bs)
        assert mass[got[idx][: len(mass)]].sum() >= selected_mass_floor - 1e-4
      continue
    np.testing.assert_array_equal(got[idx], want, err_msg=f"query {idx} at position {t}")
    n_ok += 1
  return n_ok, n_amb


# ---------------------------------------------------------------------------
# block_topp


@pytest.mark.parametrize("p", [0.3, 0.9, 1.0])
@pytest.mark.parametrize("t,bs", [(200, 64), (77, 16), (128, 64)])
def test_block_topp_matches_bruteforce(p, t, bs, rng):
  batch, heads, q = 2, 3, 24  # batch > 1, several heads, many queries
  scores = random_scores(rng, (batch, heads, q), t, bs)
  pos = random_positions(rng, (batch, 1, q), t, bs)  # broadcast over heads
  got = select.block_topp(jnp.asarray(scores), jnp.asarray(pos), p, bs)
  nb = -(-t // bs)
  assert got.shape == (batch, heads, q, nb) and got.dtype == jnp.bool_
  n_ok, n_amb = check_against_oracle(
      got, scores, pos, lambda row, tt, nb_: oracle_topp(row, tt, p, bs, nb_),
      selected_mass_floor=min(p, 1.0), bs=bs)
  assert n_amb <= 0.05 * (n_ok + n_amb), (n_ok, n_amb)
  if p >= 1.0:  # p = 1 is dense: every causal block, nothing else
    causal = np.arange(nb)[None, None, None, :] <= (pos[..., None] // bs)
    np.testing.assert_array_equal(np.asarray(got), np.broadcast_to(causal, got.shape))


@pytest.mark.parametrize("p", [0.3, 0.5, 0.9])
def test_block_topp_exact_ties_go_to_lower_index(p, rng):
  # Block-constant scores from {0, 1}: many blocks with exactly equal mass.
  bs, nb, q = 8, 12, 40
  t = bs * nb
  levels = rng.integers(0, 2, size=(q, nb)).astype(np.float32)
  scores = np.repeat(levels, bs, axis=-1)
  pos = np.full((q,), t - 1, np.int32)  # full history: every block complete
  pos[:5] = [bs * 3 - 1, bs * 5 - 1, bs * 7 - 1, bs * 9 - 1, bs * 11 - 1]
  got = np.asarray(select.block_topp(jnp.asarray(scores), jnp.asarray(pos), p, bs))
  for i in range(q):
    want, _ = oracle_topp(scores[i], int(pos[i]), p, bs, nb)
    np.testing.assert_array_equal(got[i], want, err_msg=f"query {i}")
  # The rule is not vacuous here: among equal-mass blocks some are dropped, and the kept
  # ones are always the lowest-indexed of their level.
  dropped_ties = 0
  for i in range(q):
    nbc = int(pos[i]) // bs + 1
    for level in (0.0, 1.0):
      same = [b for b in range(nbc) if levels[i, b] == level and b != int(pos[i]) // bs]
      kept = [b for b in same if got[i, b]]
      assert kept == same[: len(kept)], (i, level, same, kept)
      dropped_ties += len(kept) not in (0, len(same))
  assert dropped_ties > 0


def test_block_topp_first_block_and_partial_history(rng):
  bs, t = 64, 150
  scores = random_scores(rng, (5, 64), t, bs, tie_blocks=False)
  pos = np.arange(64, dtype=np.int32)[None].repeat(5, 0)  # every query inside block 0
  got = np.asarray(select.block_topp(jnp.asarray(scores), jnp.asarray(pos), 0.3, bs))
  # The only causal block is block 0: selected, and nothing in the future.
  assert got[..., 0].all() and not got[..., 1:].any()


def test_block_topp_key_valid_drops_empty_slots(rng):
  bs, t, q = 16, 96, 20
  scores = random_scores(rng, (q,), t, bs, tie_blocks=False)
  pos = np.full((q,), t - 1, np.int32)
  key_valid = rng.random((q, t)) > 0.3
  key_valid[:, -1] = True  # the query's own key is always present
  got = np.asarray(select.block_topp(jnp.asarray(scores), jnp.asarray(pos), 0.7, bs,
                                     key_valid=jnp.asarray(key_valid)))
  for i in range(q):
    row = np.where(key_valid[i], scores[i], -np.inf)
    want, amb = oracle_topp(row, t - 1, 0.7, bs, t // bs)
    if not amb:
      np.testing.assert_array_equal(got[i], want)


def test_histogram_is_superset_and_reports_extra_blocks(rng):
  total_exact = total_extra = 0
  for p, scale, bs in [(0.3, 3.0, 16), (0.9, 3.0, 16), (0.9, 8.0, 8), (0.5, 20.0, 8)]:
    t = 400
    scores = random_scores(rng, (2, 2, 32), t, bs, scale=scale)
    pos = random_positions(rng, (2, 1, 32), t, bs)
    exact = np.asarray(select.block_topp(jnp.asarray(scores), jnp.asarray(pos), p, bs))
    hist = np.asarray(select.block_topp_histogram(jnp.asarray(scores), jnp.asarray(pos), p,
                                                  bs))
    assert np.all(hist >= exact), "histogram dropped a block of the exact set"
    causal = np.arange(exact.shape[-1]) <= (np.broadcast_to(pos, exact.shape[:-1])[..., None]
                                            // bs)
    assert not np.any(hist & ~causal), "histogram selected a future block"
    total_exact += int(exact.sum())
    total_extra += int((hist & ~exact).sum())
  print(f"\nhistogram selector: {total_extra} extra blocks over {total_exact} exact "
        f"({100.0 * total_extra / total_exact:.2f}%)")
  assert select.block_topp_histogram(jnp.zeros((1, 8)), jnp.array([7]), 1.0, 4).all()


@pytest.mark.parametrize("k_tokens,bs", [(64, 64), (100, 16), (1, 8), (10_000, 16)])
def test_block_topk_matches_bruteforce(k_tokens, bs, rng):
  t = 190
  scores = random_scores(rng, (2, 2, 20), t, bs)
  pos = random_positions(rng, (2, 2, 20), t, bs)
  got = select.block_topk(jnp.asarray(scores), jnp.asarray(pos), k_tokens, bs)
  k_blocks = math.ceil(k_tokens / bs)
  n_ok, n_amb = check_against_oracle(
      got, scores, pos, lambda row, tt, nb: oracle_topk(row, tt, k_blocks, bs, nb), bs=bs)
  assert n_amb <= 0.05 * (n_ok + n_amb)
  n_sel = np.asarray(got).sum(-1)
  assert np.all(n_sel <= k_blocks + 1)


def test_streaming_mask_matches_bruteforce(rng):
  for sinks, window, t in [(4, 16, 50), (0, 1, 20), (3, 100, 40), (2, 7, 33)]:
    pos = rng.integers(-1, t, size=(3, 11)).astype(np.int32)
    got = np.asarray(select.streaming_mask(jnp.asarray(pos), t, sinks, window))
    want = np.zeros((3, 11, t), bool)
    for i, j in np.ndindex(3, 11):
      tq = pos[i, j]
      for key in range(t):
        want[i, j, key] = 0 <= key <= tq and (key < sinks or tq - window < key)
    np.testing.assert_array_equal(got, want, err_msg=f"sinks={sinks} window={window}")


# ---------------------------------------------------------------------------
# Indexer-level entry points agree with the token-score API.


def test_decode_topp_and_topk_equal_block_api(rng):
  b, h, r, bs, t = 3, 2, 8, 16, 96
  qi = rng.standard_normal((b, h, r)).astype(np.float32)
  ck = rng.standard_normal((b, h, t, r)).astype(np.float32)
  lengths = np.array([1, 40, 96], np.int32)
  scores = np.einsum("bhr,bhtr->bht", qi, ck)
  pos = (lengths - 1)[:, None]
  for p in (0.3, 0.9, 1.0):
    got = np.asarray(select.decode_topp(jnp.asarray(qi), jnp.asarray(ck),
                                        jnp.asarray(lengths), p, bs))
    for bi, hi in np.ndindex(b, h):
      want, amb = oracle_topp(scores[bi, hi], int(pos[bi, 0]), p, bs, t // bs)
      if not amb:
        np.testing.assert_array_equal(got[bi, hi], want)
  got = np.asarray(select.decode_topk(jnp.asarray(qi), jnp.asarray(ck), jnp.asarray(lengths),
                                      32, bs))
  for bi, hi in np.ndindex(b, h):
    want, amb = oracle_topk(scores[bi, hi], int(pos[bi, 0]), 2, bs, t // bs)
    if not amb:
      np.testing.assert_array_equal(got[bi, hi], want)


def test_prefill_topp_per_query_block(rng):
  b, s, h, r, bs, p = 2, 64, 2, 8, 16, 0.6
  qi = rng.standard_normal((b, s, h, r)).astype(np.float32)
  ki = rng.standard_normal((b, s, h, r)).astype(np.float32)
  got = np.asarray(select.prefill_topp(jnp.asarray(qi), jnp.asarray(ki), p, bs))
  nq = s // bs
  assert got.shape == (b, h, nq, nq)
  for bi, hi, qb in np.ndindex(b, h, nq):
    pooled = qi[bi, qb * bs:(qb + 1) * bs, hi].astype(np.float64).mean(0)
    row = ki[bi, :, hi].astype(np.float64) @ pooled
    # The pooled query sits at the end of its block: keys up to there are causal.
    want, amb = oracle_topp(row, (qb + 1) * bs - 1, p, bs, nq)
    if not amb:
      np.testing.assert_array_equal(got[bi, hi, qb], want, err_msg=f"{bi},{hi},{qb}")


def test_prefill_topp_ragged_tail(rng):
  # S not a multiple of the block: the last block's query is the mean of its real queries
  # and only real keys count.
  b, s, h, r, bs, p = 2, 53, 2, 8, 16, 0.6
  qi = rng.standard_normal((b, s, h, r)).astype(np.float32)
  ki = rng.standard_normal((b, s, h, r)).astype(np.float32)
  got = np.asarray(select.prefill_topp(jnp.asarray(qi), jnp.asarray(ki), p, bs))
  nq = -(-s // bs)
  assert got.shape == (b, h, nq, nq)
  n_amb = 0
  for bi, hi, qb in np.ndindex(b, h, nq):
    end = min((qb + 1) * bs, s)
    pooled = qi[bi, qb * bs:end, hi].astype(np.float64).mean(0)
    row = ki[bi, :, hi].astype(np.float64) @ pooled
    want, amb = oracle_topp(row, end - 1, p, bs, nq)
    n_amb += amb
    if not amb:
      np.testing.assert_array_equal(got[bi, hi, qb], want, err_msg=f"{bi},{hi},{qb}")
  assert n_amb <= 2


def test_selected_fraction():
  mask = jnp.array([[True, False, True, False], [True, True, False, False]])
  frac = np.asarray(select.selected_fraction(mask, jnp.array([200, 10]), 64))
  np.testing.assert_allclose(frac, [2 / 4, 2 / 1])


def test_bad_input_is_one_clear_error():
  with pytest.raises(ValueError, match="p=0"):
    select.block_topp(jnp.zeros((2, 8)), jnp.array([1, 2]), 0.0, 4)
  with pytest.raises(ValueError, match="broadcast"):
    select.block_topp(jnp.zeros((2, 8)), jnp.array([1, 2, 3]), 0.5, 4)
  with pytest.raises(ValueError, match="block_size"):
    select.block_topk(jnp.zeros((2, 8)), jnp.array([1, 2]), 4, 0)
  with pytest.raises(ValueError, match="multiple of block_size"):
    select.decode_topp(jnp.zeros((1, 1, 4)), jnp.zeros((1, 1, 10, 4)), jnp.array([3]), 0.9, 4)
  with pytest.raises(ValueError, match="window"):
    select.streaming_mask(jnp.array([3]), 8, 4, 0)


def test_jit_compatible(rng):
  f = jax.jit(lambda s, p: select.block_topp(s, p, 0.9, 16))
  s = rng.standard_normal((4, 50)).astype(np.float32)
  pos = np.array([0, 17, 33, 49], np.int32)
  np.testing.assert_array_equal(np.asarray(f(s, pos)),
                                np.asarray(select.block_topp(s, pos, 0.9, 16)))
