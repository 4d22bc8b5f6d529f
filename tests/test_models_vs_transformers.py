"""Our decoder loaded from HF folders vs transformers (torch, CPU, float32) on random ids.

Oracles: tiny random LlamaForCausalLM (llama3 rope scaling, GQA), Qwen2ForCausalLM (q/k/v
bias) and Qwen3ForCausalLM (q/k norm), tied and untied, every parameter random
(tests/hf_fixtures.py). The reverse direction too: transformers loads what save_pretrained
writes and must reproduce its own logits.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import build_hf_model, hf_logits, make_hf_folder
from rtpurbo_jax.hf import api
from rtpurbo_jax.models.transformer import Transformer

FAMILIES = ("llama", "qwen2", "qwen3")
ATOL = 1e-4


def _ids(rng, batch=2, seq=48, vocab=128):
  return rng.integers(0, vocab, size=(batch, seq), dtype=np.int32)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tmp_path, rng, seed, family, tie):
  folder, hf = make_hf_folder(tmp_path / "m", family, tie=tie, seed=seed)
  model = api.from_pretrained(folder)
  cfg = model.cfg
  assert (cfg.family, cfg.tie_embeddings) == (family, tie)
  assert cfg.qkv_bias == (family == "qwen2") and cfg.qk_norm == (family == "qwen3")
  assert (cfg.rope_scaling is not None) == (family == "llama")
  assert hasattr(model, "lm_head") != tie
  ids = _ids(rng)
  ref = hf_logits(hf, ids)
  out = np.asarray(model(jnp.asarray(ids)))
  diff = float(np.abs(out - ref).max())
  print(f"{family} tie={tie}: max|logit diff|={diff:.2e} (max|logit|={np.abs(ref).max():.2f})")
  assert diff <= ATOL
  assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.99


def test_llama3_scaling_is_exercised(tmp_path, rng, seed):
  """Sensitivity of the comparison above: the same weights without llama3 scaling differ."""
  folder, hf = make_hf_folder(tmp_path / "m", "llama", seed=seed)
  model = api.from_pretrained(folder)
  plain = Transformer(dataclasses.replace(model.cfg, rope_scaling=None))
  nnx.update(plain, nnx.state(model))
  ids = _ids(rng)
  ref = hf_logits(hf, ids)
  diff = float(np.abs(np.asarray(plain(jnp.asarray(ids))) - ref).max())
  print(f"without llama3 scaling: max|logit diff|={diff:.2e}")
  assert diff > 100 * ATOL


def test_bfloat16_load(tmp_path, rng, seed):
  folder, hf = make_hf_folder(tmp_path / "m", "qwen3", seed=seed)
  model = api.from_pretrained(folder, dtype="bfloat16")
  assert model.embed[...].dtype == jnp.bfloat16
  assert model.layers[0].attn.q_proj[...].dtype == jnp.bfloat16
  ids = _ids(rng)
  ref = hf_logits(hf, ids)
  out = np.asarray(model(jnp.asarray(ids)))
  rel = float(np.abs(out - ref).max() / np.abs(ref).max())
  print(f"bfloat16: max|diff| / max|logit| = {rel:.3f}")
  assert rel < 0.1


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_our_save(tmp_path, rng, seed, family, tie):
  """save_pretrained writes a folder transformers reads back into the same model."""
  import transformers

  src, hf = make_hf_folder(tmp_path / "src", family, tie=tie, seed=seed)
  ours = api.from_pretrained(src)
  out = api.save_pretrained(ours, tmp_path / "ours")
  back = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype="float32", attn_implementation="eager").eval()
  assert type(back) is type(hf)
  ids = _ids(rng)
  diff = float(np.abs(hf_logits(back, ids) - hf_logits(hf, ids)).max())
  print(f"{family} tie={tie}: transformers(our save) vs original: max|diff|={diff:.1e}")
  assert diff <= 1e-6
  if family == "llama":
    assert back.config.rope_parameters["rope_type"] == "llama3"


def test_hf_model_builder_randomises_everything(seed):
  """The fixtures randomise norms and biases (otherwise a swapped norm would go unseen)."""
  hf = build_hf_model("qwen2", seed=seed)
  for name, p in hf.named_parameters():
    if name.endswith("norm.weight") or name.endswith(".bias"):
      assert float(p.detach().std()) > 0.05, name
