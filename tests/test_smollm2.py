"""Real SmolLM2-135M from the packaged GGUF vs transformers loading the same GGUF.

Both sides dequantize the same Q4_1 / Q8_0 tensors to float32, so any difference beyond
float32 rounding is a conversion bug (llama.cpp's q/k row order, tied embeddings, rope theta,
norm eps). One forward pass each over ~256 tokens of a randomly placed Shakespeare passage.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow

SEQ = 256


@pytest.fixture(scope="module")
def gguf_path():
  from rtpurbo_jax import assets
  try:
    return assets.smollm2_gguf_path()
  except FileNotFoundError as e:
    if os.environ.get("CI"):  # CI installs the GGUF: a missing one is a failure there
      raise
    pytest.skip(str(e))


def _passage(rng) -> str:
  from rtpurbo_jax.assets import shakespeare_text
  text = shakespeare_text(("hamlet", "macbeth", "tempest"))
  start = int(rng.integers(len(text) // 10, len(text) - 4000))
  return text[start:start + 4000]


def _nll(logits, ids):
  """Per-token negative log-likelihood of ids[1:] under logits[:-1] (float64)."""
  lg = np.asarray(logits, np.float64)[:-1]
  lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
  return lse - lg[np.arange(len(lg)), ids[1:]]


def test_smollm2_matches_transformers_gguf(gguf_path, rng):
  import torch
  import transformers

  from rtpurbo_jax.hf import api

  d, name = os.path.split(gguf_path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
  tok = api.load_tokenizer("smollm2-135m")
  text = _passage(rng)
  ids = np.asarray(tok(text)["input_ids"][:SEQ], np.int32)
  assert len(ids) == SEQ
  assert hf_tok(text)["input_ids"][:SEQ] == ids.tolist()  # same tokenizer as transformers'

  model = api.from_pretrained("smollm2-135m")
  cfg = model.cfg
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
  assert cfg.tie_embeddings and cfg.rope_theta == 1e5
  ours = np.asarray(model(jnp.asarray(ids[None])))[0]
  del model

  hf = transformers.AutoModelForCausalLM.from_pretrained(
      d, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    ref = hf(torch.tensor(ids[None].astype(np.int64))).logits[0].float().numpy()

  agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
  ppl_ours = float(np.exp(_nll(ours, ids).mean()))
  ppl_ref = float(np.exp(_nll(ref, ids).mean()))
  diff = float(np.abs(ours - ref).max())
  print(f"SmolLM2 {SEQ} tokens: argmax agreement {agree:.4f}, perplexity ours {ppl_ours:.4f} "
        f"vs transformers {ppl_ref:.4f} ({100 * abs(ppl_ours / ppl_ref - 1):.4f}%), "
        f"max|logit diff| {diff:.2e} (max|logit| {np.abs(ref).max():.1f})")
  assert agree >= 0.99
  assert abs(ppl_ours / ppl_ref - 1) <= 0.005
  assert ppl_ref < 200  # sanity: the passage is English text the model can predict
