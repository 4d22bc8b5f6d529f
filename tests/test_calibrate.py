"""Needle calibration vs brute-force full attention matrices on tiny random models.

Two oracles: (1) the HF `transformers` Llama (torch, eager attention, `output_attentions`)
with the same weights: its full [S, S] softmax per layer and head, summed over the needle
block; (2) a numpy S x S softmax built from this model's own projections (Qwen3 q/k norm).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.calibration import calibrate, make_needle_document, needle_scores
from rtpurbo_jax.config import ConfigError, ModelConfig
from rtpurbo_jax.convert import to_rtpurbo
from rtpurbo_jax.models.layers import apply_rope
from rtpurbo_jax.models.transformer import Transformer

LLAMA = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_layers=3,
                    num_heads=6, num_kv_heads=2, head_dim=8, rope_theta=500.0)
QWEN3 = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3,
                    num_heads=6, num_kv_heads=2, head_dim=8, qk_norm=True, family="qwen3")


def _needle_doc(rng, vocab, length=120, n=10, offset=16):
  return make_needle_document(rng.integers(0, vocab, 300), rng.integers(0, vocab, n), length,
                              offset)


# ---------------------------------------------------------------------------
# Oracle 1: transformers (torch) attention probabilities.


def _torch_llama(model: Transformer):
  """An HF LlamaForCausalLM (eager attention, fp32) holding `model`'s weights."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  c = model.cfg
  hf_cfg = transformers.LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
      rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False, attention_bias=False)
  hf = transformers.LlamaForCausalLM(hf_cfg)
  hf.config._attn_implementation = "eager"

  def t(x):
    return torch.tensor(np.asarray(x, np.float32))

  e, h, k, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  sd = {"model.embed_tokens.weight": t(model.embed[...]),
        "model.norm.weight": t(model.final_norm.scale[...]),
        "lm_head.weight": t(model.lm_head[...]).T}
  for i, layer in enumerate(model.layers):
    a, p = layer.attn, f"model.layers.{i}."
    sd[p + "self_attn.q_proj.weight"] = t(a.q_proj[...]).reshape(e, h * d).T
    sd[p + "self_attn.k_proj.weight"] = t(a.k_proj[...]).reshape(e, k * d).T
    sd[p + "self_attn.v_proj.weight"] = t(a.v_proj[...]).reshape(e, k * d).T
    sd[p + "self_attn.o_proj.weight"] = t(a.o_proj[...]).reshape(h * d, e).T
    sd[p + "input_layernorm.weight"] = t(layer.input_norm.scale[...])
    sd[p + "post_attention_layernorm.weight"] = t(layer.post_attn_norm.scale[...])
    sd[p + "mlp.gate_proj.weight"] = t(layer.mlp.gate[...]).T
    sd[p + "mlp.up_proj.weight"] = t(layer.mlp.up[...]).T
    sd[p + "mlp.down_proj.weight"] = t(layer.mlp.down[...]).T
  missing, unexpected = hf.load_state_dict({k_: v.contiguous() for k_, v in sd.items()},
                                           strict=False)
  assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
  return hf.eval()


def test_scores_match_transformers_attention(seed):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(seed)
  # A large init scale: sharp attention, so the needle mass differs a lot between heads.
  model = Transformer(LLAMA, rngs=nnx.Rngs(seed % 1000), init_std=0.4)
  ids, span = _needle_doc(rng, LLAMA.vocab_size)
  n = span[1] - span[0]
  hf = _torch_llama(model)
  with torch.no_grad():
    out = hf(torch.tensor(ids[None].astype(np.int64)), output_attentions=True)
  # The weight mapping is right: same logits.
  np.testing.assert_allclose(out.logits.numpy(), np.asarray(model(jnp.asarray(ids)[None])),
                             atol=2e-4, rtol=1e-4)
  want = np.stack([a[0, :, -n:, span[0]:span[1]].double().sum(-1).mean(-1).numpy()
                   for a in out.attentions])  # [layers, heads]
  plan, scores = calibrate(model, ids, span, retrieval_ratio=0.25)
  assert scores.shape == (LLAMA.num_layers, LLAMA.num_heads)
  np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-6)
  assert np.ptp(want) > 0.05  # heads differ: the ranking below is not arbitrary
  assert plan == HeadPlan.from_scores(want, LLAMA.num_kv_heads, 0.25)


# ---------------------------------------------------------------------------
# Oracle 2: numpy S x S softmax from the model's projections (q/k norm, GQA).


def _brute_force(model, ids, span):
  """Materialise every head's full S x S softmax and sum the needle block."""
  cfg = model.cfg
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
    k = np.repeat(np.asarray(k, np.float64), cfg.group_size, axis=2)
    lg = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), k) / np.sqrt(cfg.head_dim)
    lg = np.where(np.tril(np.ones((s, s), bool)), lg, -np.inf)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out.append(p[0, :, s - n:, span[0]:span[1]].sum(-1).mean(-1))
    x, _ = layer(x, pos, inv)
  return np.stack(out)


def test_scores_match_full_attention_qwen3(seed, tmp_path):
  rng = np.random.default_rng(seed)
  model = Transformer(QWEN3, rngs=nnx.Rngs(seed % 1000), init_std=0.4)
  ids, span = _needle_doc(rng, QWEN3.vocab_size)
  assert np.array_equal(ids[span[0]:span[1]], ids[-10:])
  plan, scores = calibrate(model, jnp.asarray(ids)[None], span, retrieval_ratio=0.2,
                           out_dir=str(tmp_path))
  ref = _brute_force(model, jnp.asarray(ids)[None], span)
  np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-6)
  assert plan == HeadPlan.from_scores(ref, QWEN3.num_kv_heads, 0.2)
  assert plan.mask().sum() == int(0.2 * QWEN3.num_layers * QWEN3.num_heads)
  # Report files: the JSON holds the same scores and plan; the PNG is a PNG.
  doc = json.loads((tmp_path / "head_scores.json").read_text())
  np.testing.assert_allclose(doc["scores"], scores)
  assert doc["retrieval"] == plan.mask().astype(int).tolist()
  assert doc["needle_span"] == list(span) and doc["seq_len"] == len(ids)
  assert (tmp_path / "head_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sparse_model_is_calibrated_densely(seed):
  # Calibration always reads the dense attention, whatever mode the given model is in.
  rng = np.random.default_rng(seed)
  model = Transformer(LLAMA, rngs=nnx.Rngs(1), init_std=0.4)
  ids, span = _needle_doc(rng, LLAMA.vocab_size)
  plan = HeadPlan.from_mask(rng.random((LLAMA.num_layers, LLAMA.num_heads)) < 0.3, 2)
  sparse = to_rtpurbo(model, plan, window=8, sinks=2, top_p=0.5, block_size=16,
                      seqlen_threshold=0, indexer_dim=4)
  np.testing.assert_allclose(needle_scores(sparse, ids, span), needle_scores(model, ids, span),
                             rtol=1e-6, atol=1e-7)


def test_make_needle_document_layout():
  doc = np.arange(1000, 1300)
  needle = np.arange(7)
  ids, (a, e) = make_needle_document(doc, needle, 100, offset=5)
  assert ids.dtype == np.int32 and ids.shape == (100,)
  np.testing.assert_array_equal(ids[:5], doc[:5])
  np.testing.assert_array_equal(ids[a:e], needle)
  np.testing.assert_array_equal(ids[-7:], needle)
  np.testing.assert_array_equal(ids[e:-7], doc[5:5 + 100 - 14 - 5])
  ids0, span0 = make_needle_document(doc, needle, 40, offset=0)  # the paper's layout
  assert span0 == (0, 7) and np.array_equal(ids0[:7], needle)


def test_bad_input_is_a_clear_error():
  model = Transformer(QWEN3, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="needle span"):
    calibrate(model, np.zeros(64, np.int32), (40, 60))  # overlaps the later needle
  ids, span = make_needle_document(np.arange(100) % 90, np.arange(5), 60)
  bad = ids.copy()
  bad[-1] += 1
  with pytest.raises(ConfigError, match="differ"):
    calibrate(model, bad, span)
  with pytest.raises(ConfigError, match="one document"):
    calibrate(model, np.stack([ids, ids]), span)
  with pytest.raises(ConfigError, match="retrieval_ratio"):
    calibrate(model, ids, span, retrieval_ratio=0.0)
  with pytest.raises(ConfigError, match="document has"):
    make_needle_document(np.arange(10), np.arange(5), 60)
  with pytest.raises(ConfigError, match="cannot hold"):
    make_needle_document(np.arange(100), np.arange(30), 60)
