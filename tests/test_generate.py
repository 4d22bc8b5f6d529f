"""generate(): greedy vs full-forward oracles, sampling vs numpy, eos, streaming, transformers.

Oracles: step-by-step argmax with full forwards and no cache (dense; and rtpurbo, where the
oracle marks the generated positions as `sparse_queries` so that retrieval heads select blocks
exactly as a decode step does); numpy filtering of logits; transformers' greedy `generate` on a
tiny random HF model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.infer import sampling
from rtpurbo_jax.infer.generate import generate
from rtpurbo_jax.models.transformer import Transformer

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)
# Layer 0: KV head 0 serves a retrieval and a local head; layer 1: KV head 1 does.
PLAN = HeadPlan.from_mask([[1, 0, 0, 0], [0, 0, 0, 1]], 2)
N_NEW = 9


def _model(seed, mode):
  sparse = (SparseConfig() if mode == "dense" else
            SparseConfig(mode=mode, window=8, sinks=2, seqlen_threshold=0, block_size=8,
                         indexer_dim=8, top_p=0.6, chunk_size=16))
  return Transformer(CFG, sparse=sparse, plan=PLAN, rngs=nnx.Rngs(seed), init_std=0.3)


def _prompts(rng, lengths=(21, 13, 5)):
  ids = rng.integers(0, CFG.vocab_size, (len(lengths), max(lengths))).astype(np.int32)
  return ids, np.asarray(lengths)


def _oracle(model, ids, lengths, n_new, sparse_decode):
  """Greedy tokens by full forwards (no cache) over each row's growing unpadded sequence.

  Every forward runs at one fixed length (zeros after the sequence) so that it compiles once:
  attention is causal, so the logits at position len-1 ignore what follows.
  """
  total = int(max(lengths)) + n_new
  graphdef, state = nnx.split(model)

  @jax.jit
  def last_logits(seq, n, prompt_len):
    m = nnx.merge(graphdef, state)
    pos = jnp.arange(total)
    sq = (pos >= prompt_len)[None] if sparse_decode else None
    return m(seq[None], sparse_queries=sq)[0, n - 1]

  out = []
  for row, n in zip(ids, lengths):
    seq = np.zeros(total, np.int32)
    seq[:n] = row[:n]
    for i in range(n_new):
      seq[n + i] = int(jnp.argmax(last_logits(seq, n + i, n)))
    out.append(seq[n:n + n_new])
  return np.asarray(out)


@pytest.mark.parametrize("mode", ["dense", "rtpurbo"])
def test_greedy_matches_full_forward_oracle(mode, seed, rng):
  model = _model(seed, mode)
  ids, lengths = _prompts(rng)
  ids[0, 13:] = 0  # padding content must not matter: rows 1, 2 are padded with garbage
  got = generate(model, ids, N_NEW, prompt_lengths=lengths, prefill_chunk=8)
  want = _oracle(model, ids, lengths, N_NEW, sparse_decode=mode == "rtpurbo")
  assert got.shape == (3, N_NEW) and got.dtype == np.int32
  np.testing.assert_array_equal(got, want)


def test_eos_stops_rows_and_pads(seed, rng):
  model = _model(seed, "dense")
  ids, lengths = _prompts(rng)
  free = generate(model, ids, N_NEW, prompt_lengths=lengths, prefill_chunk=8)
  eos = int(free[0, 2])  # row 0 emits it at step 2 (or earlier)
  got = generate(model, ids, N_NEW, prompt_lengths=lengths, eos_token_id=(eos,),
                 pad_token_id=-1, prefill_chunk=8)
  for r in range(3):
    hits = np.flatnonzero(free[r] == eos)
    stop = hits[0] if hits.size else N_NEW
    np.testing.assert_array_equal(got[r, :stop + 1], free[r, :stop + 1])
    assert (got[r, stop + 1:] == -1).all()
  # Every row stops at once when the first token is eos.
  first = generate(model, ids[:1], N_NEW, prompt_lengths=lengths[:1],
                   eos_token_id=int(free[0, 0]), pad_token_id=-1, prefill_chunk=8)
  np.testing.assert_array_equal(first[0], [free[0, 0]] + [-1] * (N_NEW - 1))


def test_streaming_and_seeded_sampling(seed, rng):
  model = _model(seed, "rtpurbo")
  ids, lengths = _prompts(rng)
  seen = []
  kw = dict(prompt_lengths=lengths, prefill_chunk=8, temperature=1.3, top_k=20, top_p=0.9,
            seed=seed)
  a = generate(model, ids, N_NEW, on_token=lambda i, t: seen.append((i, t.copy())), **kw)
  b = generate(model, ids, N_NEW, **kw)
  np.testing.assert_array_equal(a, b)  # same seed, same tokens; streaming changes nothing
  assert [i for i, _ in seen] == list(range(N_NEW))
  np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), a)
  c = generate(model, ids, N_NEW, **dict(kw, seed=seed + 1))
  assert (a != c).any()


def test_bad_input_errors(seed):
  model = _model(seed, "dense")
  ids = np.ones((2, 4), np.int32)
  with pytest.raises(ValueError, match="prompt_lengths"):
    generate(model, ids, 2, prompt_lengths=[4, 5])
  with pytest.raises(ValueError, match="max_len"):
    generate(model, ids, 4, max_len=6)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, ids, 2, temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="vocabulary"):
    generate(model, ids + CFG.vocab_size, 2)
  with pytest.raises(ValueError, match=r"\[batch, prompt_len\]"):
    generate(model, ids[0], 2)


# ---------------------------------------------------------------------------
# Sampling functions vs numpy.


def _np_filter(x, temperature, top_k, top_p):
  x = x.astype(np.float64) / temperature
  out = np.full_like(x, -np.inf)
  for r in range(x.shape[0]):
    row = x[r].copy()
    if 0 < top_k < row.size:
      kth = np.sort(row)[::-1][top_k - 1]
      row[row < kth] = -np.inf
    if top_p < 1:
      order = np.argsort(-row, kind="stable")
      p = np.exp(row[order] - row[order][0])
      p /= p.sum()
      ahead = np.concatenate([[0.0], np.cumsum(p)[:-1]])
      drop = order[ahead >= top_p]
      row[drop] = -np.inf
    out[r] = row
  return out


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8), (1.5, 12, 0.6), (0.5, 1, 0.9), (1.0, 0, 0.05)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p, rng):
  x = rng.normal(size=(4, 40)).astype(np.float32) * 2
  x[1, :6] = x[1, 0]  # ties
  got = np.asarray(sampling.filter_logits(jnp.asarray(x), temperature=temperature, top_k=top_k,
                                          top_p=top_p))
  want = _np_filter(x, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-5)


def test_sample_distribution_and_greedy(rng, seed):
  x = rng.normal(size=(2, 12)).astype(np.float32)
  x[1, [3, 7]] = x[1].max() + 1.0  # greedy tie: lowest id wins
  greedy = np.asarray(sampling.sample(jnp.asarray(x), jax.random.key(seed)))
  np.testing.assert_array_equal(greedy, [np.argmax(x[0]), 3])
  want = _np_filter(x, 0.8, 6, 0.85)
  p = np.exp(want - want.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  keys = jax.random.split(jax.random.key(seed), 4000)
  draw = jax.vmap(lambda k: sampling.sample(jnp.asarray(x), k, temperature=0.8, top_k=6,
                                            top_p=0.85))
  s = np.asarray(draw(keys))  # [n, 2]
  for r in range(2):
    freq = np.bincount(s[:, r], minlength=12) / len(s)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(p[r]))  # only kept tokens
    np.testing.assert_allclose(freq, p[r], atol=0.035)


# ---------------------------------------------------------------------------
# transformers greedy generation on a tiny random HF model.


def test_matches_transformers_greedy_generate(tmp_path, seed, rng):
  torch = pytest.importorskip("torch")
  from hf_fixtures import make_hf_folder

  import rtpurbo_jax

  folder, hf = make_hf_folder(tmp_path / "m", "llama", seed=seed % 1000)
  ours = rtpurbo_jax.from_pretrained(folder)
  lengths = np.asarray([11, 6])
  ids = rng.integers(3, 128, (2, 11)).astype(np.int32)
  got = rtpurbo_jax.generate(ours, ids, 8, prompt_lengths=lengths, eos_token_id=2,
                             pad_token_id=0, prefill_chunk=4)
  for r, n in enumerate(lengths):
    with torch.no_grad():
      seq = hf.generate(torch.tensor(ids[r:r + 1, :n], dtype=torch.long), max_new_tokens=8,
                        do_sample=False, eos_token_id=2, pad_token_id=0)[0, n:].numpy()
    want = np.zeros(8, np.int64)
    want[:len(seq)] = seq
    np.testing.assert_array_equal(got[r], want)
