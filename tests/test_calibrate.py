"""Calibration scores vs a brute-force full attention matrix on a tiny random model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.calibrate import calibrate, make_needle_document
from rtpurbo_jax.config import ConfigError, ModelConfig
from rtpurbo_jax.models.layers import apply_rope
from rtpurbo_jax.models.transformer import Transformer

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=6,
                  num_kv_heads=2, head_dim=8, qk_norm=True, family="qwen3")


def _brute_force(model, ids, span):
  """Materialise every head's full S x S softmax and sum the needle block."""
  s = ids.shape[1]
  n = span[1] - span[0]
  pos = jnp.arange(s)[None]
  inv = model.inv_freq()
  x = jnp.take(model.embed[...], ids, axis=0)
  out = []
  for layer in model.layers:
    a = layer.attn
    h = layer.input_norm(x)
    q = jnp.einsum("bse,ehd->bshd", h, a.q_proj[...])
    k = jnp.einsum("bse,ekd->bskd", h, a.k_proj[...])
    q, k = apply_rope(a.q_norm(q), pos, inv), apply_rope(a.k_norm(k), pos, inv)
    k = np.repeat(np.asarray(k, np.float64), CFG.group_size, axis=2)
    lg = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), k) / np.sqrt(CFG.head_dim)
    lg = np.where(np.tril(np.ones((s, s), bool)), lg, -np.inf)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out.append(p[0, :, s - n:, span[0]:span[1]].sum(-1).mean(-1))
    x, _ = layer(x, pos, inv)
  return np.stack(out)


def test_scores_match_full_attention(seed, tmp_path):
  rng = np.random.default_rng(seed)
  model = Transformer(CFG, rngs=nnx.Rngs(seed % 1000), init_std=0.4)
  ids, span = make_needle_document(rng.integers(0, 96, 300), rng.integers(0, 96, 10), 120)
  assert np.array_equal(ids[span[0]:span[1]], ids[-10:])
  plan, scores = calibrate(model, ids, span, retrieval_ratio=0.2, out_dir=str(tmp_path))
  ref = _brute_force(model, jnp.asarray(ids)[None], span)
  np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-6)
  assert plan == HeadPlan.from_scores(ref, CFG.num_kv_heads, 0.2)
  assert plan.mask().sum() == int(0.2 * CFG.num_layers * CFG.num_heads)
  assert (tmp_path / "head_scores.png").stat().st_size > 0
  assert (tmp_path / "head_scores.json").exists()


def test_bad_needle_span_is_a_clear_error():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="needle span"):
    calibrate(model, np.zeros(64, np.int32), (40, 60))
