"""Chunked prefill through the contiguous fast paths == the unchunked forward.

The fast paths: local heads on ring KV heads (ring slots gathered in position order + the
window kernel at a traced offset), local heads on full-cache KV heads, retrieval heads over
the full cache at a traced offset. Checked against `model(ids)` without a cache (the
one-sequence reference forward), with a poisoned initial cache (large finite values in every
slot: a key read before it is written dominates the softmax), ragged rows, chunk boundaries
that cross the ring's wrap-around, chunks shorter and longer than the ring, and GQA groups
that mix retrieval and local heads. Each case runs on the jnp references and, in the Pallas
interpreter, on the GPU kernels (`KernelConfig("gpu", interpret=True)`, the model's own
config).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.config import KernelConfig
from rtpurbo_jax.attention.mixed import PrefillSelectionStats, SelectionStats
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.models.transformer import Transformer

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=6, num_kv_heads=3, head_dim=16)
# Layer 0: KV 0 serves a retrieval and a local head, KV 1 and 2 are ring-only.
# Layer 1: KV 0 ring-only, KV 1 retrieval-only, KV 2 mixed.
PLAN = HeadPlan.from_mask([[1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 1]], 3)

# (window, sinks, seqlen_threshold, chunk): ring capacity = max(sinks + window, threshold).
CASES = [
    (8, 2, 0, 5),    # capacity 10: chunks cross the wrap-around at odd offsets
    (8, 2, 14, 7),   # dense fallback for the first chunks, a mixed chunk, then sparse
    (6, 0, 0, 16),   # no sinks; chunk longer than the ring
    (16, 4, 0, 3),   # window longer than several chunks
    (5, 3, 0, 11),
]


KERNELS = {"reference": KernelConfig("reference"),
           "gpu-interpret": KernelConfig("gpu", interpret=True)}


def _model(seed, window, sinks, threshold, kernels="reference", **sparse):
  kw = dict(mode="rtpurbo", window=window, sinks=sinks, seqlen_threshold=threshold,
            block_size=8, indexer_dim=8, top_p=1.0, chunk_size=8)
  sp = SparseConfig(**(kw | sparse))
  return Transformer(CFG, sparse=sp, plan=PLAN, rngs=nnx.Rngs(seed), init_std=0.3,
                     kernels=KERNELS[kernels])


def _poisoned_cache(model, batch, max_len, rng):
  """A cache whose arrays hold large random values (positions stay -1, lengths 0)."""
  cache = model.init_cache(batch, max_len)

  def poison(name, x):
    if name in ("ring_pos", "length"):
      return x
    return jnp.asarray(rng.normal(size=x.shape) * 30.0, x.dtype)

  return [dataclasses.replace(c, **{f.name: poison(f.name, getattr(c, f.name))
                                    for f in dataclasses.fields(c)}) for c in cache]


def _chunked_logits(model, ids, lengths, chunk, rng):
  """Logits [batch, seq, vocab] from contiguous chunked prefill (one jitted step, p0 traced),
  then 3 decode steps fed with ids[:, seq:seq + 3] (returned as [batch, 3, vocab])."""
  graphdef, state = nnx.split(model)
  b, total = ids.shape
  s = total - 3

  @jax.jit
  def step(cache, x, p0):
    m = nnx.merge(graphdef, state)
    pos = jnp.broadcast_to(p0 + jnp.arange(x.shape[1], dtype=jnp.int32), x.shape)
    out, _, _ = nnx.capture(m, SelectionStats, PrefillSelectionStats)(
        x, positions=pos, valid=pos < lengths[:, None], cache=cache, phase="prefill",
        contiguous=True)
    return out

  @jax.jit
  def decode(cache, x, pos):
    m = nnx.merge(graphdef, state)
    out, _ = nnx.capture(m, SelectionStats)(x, positions=pos, cache=cache, phase="decode")
    return out

  n = -(-s // chunk)
  padded = np.pad(ids[:, :s], ((0, 0), (0, n * chunk - s)))
  cache = _poisoned_cache(model, b, total + 8, rng)
  outs = []
  for i in range(n):
    o, cache = step(cache, padded[:, i * chunk:(i + 1) * chunk], jnp.int32(i * chunk))
    outs.append(np.asarray(o))
  dec = []
  for j in range(3):  # every row continues from its own length
    tok = ids[np.arange(b), np.asarray(lengths) + j][:, None]
    o, cache = decode(cache, tok, (lengths + j)[:, None])
    dec.append(np.asarray(o)[:, 0])
  return np.concatenate(outs, axis=1)[:, :s], np.stack(dec, axis=1)


def _check_rows(model, s, chunk, rng, decode=True):
  """Chunked prefill of two ragged rows (then 3 decode steps) == each row alone, no cache.

  With decode=False each row's reference is its prompt alone, and only prefill is compared:
  under `sparse_prefill` a one-sequence forward treats following tokens as prefill queries,
  which pool into their query block, where the engine decodes them.
  Returns the reference logits of row 0.
  """
  ids = rng.integers(0, CFG.vocab_size, (2, s + 3)).astype(np.int32)
  lengths = np.asarray([s, int(rng.integers(s // 2, s - 1))], np.int32)
  extra = 3 if decode else 0
  want = [np.asarray(model(ids[r:r + 1, :lengths[r] + extra]))[0] for r in range(2)]
  got, dec = _chunked_logits(model, ids, jnp.asarray(lengths), chunk, rng)
  for r in range(2):
    n = lengths[r]
    np.testing.assert_allclose(got[r, :n], want[r][:n], atol=3e-4, rtol=3e-4)
    if decode:
      np.testing.assert_allclose(dec[r], want[r][n:n + 3], atol=3e-4, rtol=3e-4)
  return ids, want[0]


@pytest.mark.parametrize("kernels", ["reference", "gpu-interpret"])
@pytest.mark.parametrize("window,sinks,threshold,chunk", CASES)
def test_chunked_prefill_and_decode_equal_one_sequence(window, sinks, threshold, chunk,
                                                       kernels, seed):
  _check_rows(_model(seed, window, sinks, threshold, kernels), 37, chunk,
              np.random.default_rng(seed))


@pytest.mark.parametrize("kernels", ["reference", "gpu-interpret"])
@pytest.mark.parametrize("chunk", [8, 16, 24])
def test_sparse_prefill_chunked_equals_one_sequence(chunk, kernels, seed):
  """`sparse_prefill`: retrieval heads select key blocks per query block, chunk by chunk
  (selection over the compressed-key cache at the chunk's offset), as the one-sequence
  forward selects them; ragged rows end inside a block. top_p 0.5 makes the selection
  matter: the same prompt prefilled with dense retrieval heads gives other logits."""
  model = _model(seed, 8, 2, 0, kernels, top_p=0.5, sparse_prefill=True)
  s = 45
  ids, want = _check_rows(model, s, chunk, np.random.default_rng(seed), decode=False)
  dense_ret = np.asarray(_model(seed, 8, 2, 0, kernels, top_p=0.5)(ids[:1, :s]))[0]
  assert np.max(np.abs(dense_ret - want)) > 1e-2


# (window, sinks, seqlen_threshold, chunk). A threshold above window + sinks would make the
# reference differ by design: the one-sequence forward applies the rule of the row's final
# length to every query, the engine that of the length so far.
@pytest.mark.parametrize("window,sinks,threshold,chunk", [(16, 2, 17, 7), (24, 0, 0, 16)])
def test_layer_decode_kernel_in_engine(window, sinks, threshold, chunk, seed, monkeypatch):
  """rtpurbo decode steps through the one-kernel layer decode (block size 16, the decode
  kernels' minimum): ring heads over a wrapped ring, local and retrieval heads sharing KV
  heads, the sparse threshold crossed inside the prefill; equal to each row alone."""
  from pallas_kernels.gpu import layer_decode as layer_decode_k
  calls = []
  kernel = layer_decode_k.layer_decode
  monkeypatch.setattr(layer_decode_k, "layer_decode",
                      lambda *a, **k: calls.append(1) or kernel(*a, **k))
  model = _model(seed, window, sinks, threshold, "gpu-interpret", block_size=16)
  _check_rows(model, 37, chunk, np.random.default_rng(seed))
  assert calls  # traced once per layer


@pytest.mark.parametrize("kernels", ["reference", "gpu-interpret"])
def test_dense_mode_chunked_prefill_and_decode_equal_one_sequence(kernels, seed, monkeypatch):
  """Dense mode: prefill chunks over the cache in place, decode through the layer-decode
  kernel (every written block of each head); ragged rows."""
  calls = []
  if kernels == "gpu-interpret":
    from pallas_kernels.gpu import layer_decode as layer_decode_k
    kernel = layer_decode_k.layer_decode
    monkeypatch.setattr(layer_decode_k, "layer_decode",
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
  model = _model(seed, 8, 2, 0, kernels, mode="dense", block_size=16)  # the kernel's minimum
  _check_rows(model, 37, 16, np.random.default_rng(seed))
  assert bool(calls) == (kernels == "gpu-interpret")  # traced once per layer
