"""`reference.banded_window_attention` (the differentiable O(S x window) local attention of
stage-2 training) against `masked_attention` (values, lse and gradients), and the stage-2 loss
gradient through it on every kernel backend (the Pallas / cuDNN window kernels have no VJP).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import reference as ref
from pallas_kernels.config import KernelConfig
from rtpurbo_jax import convert
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.models.transformer import Transformer
from rtpurbo_jax.train import stages
from rtpurbo_jax.train.trainer import ParamSplit

# (batch, q_len, q_offset, kv_heads map (len = q heads), n_kv, sinks, window, block)
CASES = {
    "ragged_last_block": (2, 100, 0, (0, 0, 1, 1), 2, 4, 24, 16),
    "window_ge_seq_is_causal": (1, 70, 0, (2, 0, 2), 3, 3, 200, 16),
    "no_sinks": (2, 50, 0, (0, 0), 1, 0, 9, 7),
    "sinks_overlap_window": (1, 40, 0, (1, 0), 2, 12, 8, 8),
    "sinks_beyond_seq": (1, 30, 0, (0, 1), 2, 64, 5, 8),
    "window_1": (1, 33, 0, (0,), 1, 2, 1, 8),
    "block_1": (1, 19, 0, (0, 0, 0), 1, 2, 6, 1),
    "block_gt_seq": (2, 21, 0, (1, 0), 2, 3, 7, 64),
    "q_offset": (2, 37, 29, (1, 1, 0), 2, 4, 13, 8),
}


def _inputs(seed, b, s, off, n_kv, hq, d=16, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 3)
  # A large scale makes attention sharp, so a wrongly visible key shows in the output.
  q = 2.0 * jax.random.normal(ks[0], (b, s, hq, d), dtype)
  k = 2.0 * jax.random.normal(ks[1], (b, off + s, n_kv, d), dtype)
  v = jax.random.normal(ks[2], (b, off + s, n_kv, d), dtype)
  return q, k, v


def _functional(seed, b, s, hq, d):
  """A random linear functional of (out, lse): its gradient is a generic VJP."""
  ko, kl = jax.random.split(jax.random.key(seed + 1))
  wo = jax.random.normal(ko, (b, s, hq, d))
  wl = jax.random.normal(kl, (b, s, hq))
  return lambda o, l: jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(l * wl)


@pytest.mark.parametrize("case", list(CASES))
def test_banded_equals_masked_values_and_grads(seed, case):
  b, s, off, kvmap, n_kv, sinks, window, block = CASES[case]
  q, k, v = _inputs(seed, b, s, off, n_kv, len(kvmap))
  rule = dict(sinks=sinks, window=window, q_offset=off)
  masked = lambda q, k, v: ref.window_attention(q, k, v, kvmap, **rule)
  banded = lambda q, k, v: ref.banded_window_attention(q, k, v, kvmap, block=block, **rule)
  want_o, want_l = jax.jit(masked)(q, k, v)
  got_o, got_l = jax.jit(banded)(q, k, v)
  assert got_o.shape == q.shape and got_o.dtype == q.dtype
  assert got_l.shape == q.shape[:3] and got_l.dtype == jnp.float32
  np.testing.assert_allclose(got_o, want_o, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_l, want_l, rtol=1e-5, atol=1e-5)
  if window >= off + s:
    causal_o, _ = ref.causal_attention(q, k, v, kvmap, q_offset=off)
    np.testing.assert_allclose(got_o, causal_o, rtol=1e-5, atol=1e-5)

  fn = _functional(seed, b, s, len(kvmap), q.shape[-1])
  grad = lambda att: jax.jit(jax.grad(lambda q, k, v: fn(*att(q, k, v)),
                                      argnums=(0, 1, 2)))(q, k, v)
  want, got = grad(masked), grad(banded)
  for name, g, w in zip("qkv", got, want):
    assert np.all(np.isfinite(g)), name
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))),
                               err_msg=name)


def test_traced_offset_and_bf16(seed):
  """q_offset may be a traced scalar (chunk offsets); bf16 in -> bf16 out, fp32 math."""
  b, s, off, kvmap, n_kv, sinks, window, block = CASES["q_offset"]
  q, k, v = _inputs(seed, b, s, off, n_kv, len(kvmap))
  want_o, want_l = ref.window_attention(q, k, v, kvmap, sinks=sinks, window=window, q_offset=off)
  f = jax.jit(lambda q, k, v, o: ref.banded_window_attention(q, k, v, kvmap, sinks=sinks,
                                                             window=window, q_offset=o,
                                                             block=block))
  got_o, got_l = f(q, k, v, jnp.int32(off))
  np.testing.assert_allclose(got_o, want_o, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_l, want_l, rtol=1e-5, atol=1e-5)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  got_o, got_l = f(qb, kb, vb, jnp.int32(off))
  want_o, want_l = ref.window_attention(*(x.astype(jnp.float32) for x in (qb, kb, vb)), kvmap,
                                        sinks=sinks, window=window, q_offset=off)
  assert got_o.dtype == jnp.bfloat16 and got_l.dtype == jnp.float32
  np.testing.assert_allclose(got_o.astype(jnp.float32), want_o, rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(got_l, want_l, rtol=1e-5, atol=1e-5)


def test_grad_memory_is_banded():
  """The compiled backward at S = 16K keeps no [S, S] (nor per-block score) residuals."""
  s, hq, d, window, block = 16384, 4, 16, 256, 128
  q = jax.ShapeDtypeStruct((1, s, hq, d), jnp.float32)
  k = jax.ShapeDtypeStruct((1, s, 2, d), jnp.float32)

  def f(q, k, v):
    o, l = ref.banded_window_attention(q, k, v, (0, 0, 1, 1), sinks=4, window=window,
                                       block=block)
    return jnp.sum(o * o) + jnp.sum(l)

  compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, k).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  band_scores = s * (window + block) * hq * 4  # what saving every block's scores would cost
  assert temp < band_scores / 4, (temp, band_scores)


# ---------------------------------------------------------------------------
# Stage 2 through the model: the gradient exists on the gpu backend (Pallas interpreter).

S, WINDOW, SINKS = 40, 8, 2


def _student(seed):
  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=True)
  plan = HeadPlan.from_mask([[0, 1, 0, 0], [1, 0, 0, 1]], 2)
  sp = SparseConfig(mode="rtpurbo", indexer_dim=8, block_size=8, seqlen_threshold=0,
                    window=WINDOW, sinks=SINKS, top_p=0.5)
  return Transformer(cfg, sparse=sp, plan=plan, rngs=nnx.Rngs(seed), init_std=0.3)


def _stage2_batch(seed, b=2, k=5):
  rng = np.random.default_rng(seed)
  labels = (np.arange(S)[None] >= 10) & (rng.random((b, S)) < 0.7)
  return {"ids": jnp.asarray(rng.integers(0, 97, (b, S)), jnp.int32),
          "labels": jnp.asarray(labels),
          "t_ids": jnp.asarray(rng.integers(0, 97, (b, S, k)), jnp.int32),
          "t_logits": jnp.asarray(3.0 * rng.standard_normal((b, S, k)), jnp.float32)}


def _stage2_grad(model, batch):
  """Gradient of the stage-2 loss (mean top-k KL) wrt the backbone ({name: array}), with the
  model's kernel config. The model is merged inside the jitted function as the Trainer does
  it."""
  o = types.SimpleNamespace(position_chunk=16, seq_len=S)
  split = ParamSplit(model, stages.BACKBONE)
  task = stages.stage2_task(split, o, remat=True)
  trainable, frozen = split.values(model)

  def loss(trainable, frozen):
    kl, n, _ = task.loss(split.merge(trainable, frozen), batch, None, None)
    return kl / n

  return jax.jit(jax.grad(loss))(trainable, frozen)


def test_stage2_grad_on_gpu_backend_equals_reference(seed):
  model, batch = _student(seed), _stage2_batch(seed)
  got = _stage2_grad(convert.rebuild(model, kernels=KernelConfig("gpu", interpret=True)), batch)
  model = convert.rebuild(model, kernels=KernelConfig("reference"))
  want = _stage2_grad(model, batch)
  # An independent oracle: an explicit all-True `valid` takes the position-masked path
  # (`masked_attention` over every key with the sink / window rule).
  want_masked = _stage2_grad(model, dict(batch, valid=jnp.ones((2, S), bool)))
  assert got.keys() == want.keys() == want_masked.keys()
  for key in want:
    g, w, m = (np.asarray(x[key]) for x in (got, want, want_masked))
    scale = float(np.max(np.abs(w)))
    assert np.all(np.isfinite(g)), key
    assert scale > 1e-8, key  # every backbone tensor gets a gradient
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale, err_msg=str(key))
    np.testing.assert_allclose(m, w, rtol=1e-4, atol=1e-4 * scale, err_msg=str(key))
