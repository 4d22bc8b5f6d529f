"""HF import / export: save -> load round trips, sharded folders, RTPurbo metadata, errors.

Oracles: the saved model itself (a round trip must give bit-identical parameters and logits),
transformers for sharded folders it wrote, and llama.cpp's q/k row permutation for the GGUF
reader.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from hf_fixtures import hf_logits, make_hf_folder
from rtpurbo_jax.attention.indexer import rotary_init
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ConfigError, ModelConfig, SparseConfig
from rtpurbo_jax.convert import distance_biases, indexer_weights, set_distance_bias, to_rtpurbo
from rtpurbo_jax.hf import api, gguf_io, safetensors_io
from rtpurbo_jax.models.transformer import Transformer


def _cfg(family="llama", tie=False):
  return ModelConfig(family=family, vocab_size=128, hidden_size=64, intermediate_size=96,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4,
                     rms_norm_eps=1e-6, tie_embeddings=tie, qkv_bias=family == "qwen2",
                     qk_norm=family == "qwen3", max_position_embeddings=256)


def _random_model(seed, family="llama", tie=False, dtype="float32"):
  """Every parameter random (norm scales and biases too), so any mapping slip shows."""
  model = Transformer(_cfg(family, tie), dtype=dtype, rngs=nnx.Rngs(seed), init_std=0.2)
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)

  def draw(path, x):
    base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0  # norm scales around 1
    return jnp.asarray(base + 0.2 * rng.standard_normal(x.shape), x.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(draw, state))
  return model


def _params(model):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    assert pa[k].dtype == pb[k].dtype, k
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def _ids(rng, batch=2, seq=64):
  return jnp.asarray(rng.integers(0, 128, size=(batch, seq), dtype=np.int32))


# ---------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen2", False), ("qwen3", False)])
def test_dense_round_trip(tmp_path, rng, seed, family, tie):
  model = _random_model(seed, family, tie)
  api.save_pretrained(model, tmp_path / "m")
  cfg = json.load(open(tmp_path / "m" / "config.json"))
  assert "headwise_config" not in cfg
  if tie:
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")
  back = api.from_pretrained(tmp_path / "m")
  assert back.cfg == model.cfg and back.sparse == model.sparse and back.plan == model.plan
  _assert_same_params(model, back)
  ids = _ids(rng)
  np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(model(ids)))


def test_bfloat16_round_trip(tmp_path, rng, seed):
  model = _random_model(seed, "qwen2", dtype="bfloat16")
  api.save_pretrained(model, tmp_path / "m")
  stored = load_file(tmp_path / "m" / "model.safetensors")
  assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == jnp.bfloat16
  assert json.load(open(tmp_path / "m" / "config.json"))["dtype"] == "bfloat16"
  back = api.from_pretrained(tmp_path / "m", dtype="bfloat16")
  _assert_same_params(model, back)
  ids = _ids(rng)
  np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(model(ids)))


def _rtpurbo_model(seed, rng):
  base = _random_model(seed, "qwen3")
  mask = rng.random((2, 4)) < 0.4
  mask[0, rng.integers(4)] = True  # layer 0 has retrieval heads
  mask[1] = False  # layer 1 has none (no indexer tensors)
  plan = HeadPlan.from_mask(mask, 2)
  n = int(mask[0].sum())
  indexer = {0: (rng.standard_normal((n, 16, 16)).astype(np.float32),
                 rng.standard_normal((n, 16, 16)).astype(np.float32))}
  return to_rtpurbo(base, plan, indexer, window=8, sinks=2, top_p=0.6, block_size=8,
                    seqlen_threshold=0)


def test_rtpurbo_round_trip(tmp_path, rng, seed):
  model = _rtpurbo_model(seed, rng)
  api.save_pretrained(model, tmp_path / "m")
  cfg = json.load(open(tmp_path / "m" / "config.json"))
  hw = cfg["headwise_config"]
  assert hw["0"] == [int(x) for x in model.plan.retrieval[0]] and hw["1"] == [0, 0, 0, 0]
  assert (hw["sink_token_num"], hw["swa_token_num"], hw["seqlen_threshold"]) == (2, 8, 0)
  stored = load_file(tmp_path / "m" / "model.safetensors")
  n = int(model.plan.mask()[0].sum())
  assert stored["model.layers.0.self_attn.indexer.wq"].shape == (n, 16, 16)
  assert stored["model.layers.0.self_attn.indexer.wk"].dtype == np.float32
  assert "model.layers.1.self_attn.indexer.wq" not in stored

  back = api.from_pretrained(tmp_path / "m")
  assert back.plan == model.plan and back.sparse == model.sparse
  _assert_same_params(model, back)
  for i, (wq, wk) in indexer_weights(model).items():
    np.testing.assert_array_equal(np.asarray(indexer_weights(back)[i][0]), np.asarray(wq))
    np.testing.assert_array_equal(np.asarray(indexer_weights(back)[i][1]), np.asarray(wk))
  ids = _ids(rng)
  sq = jnp.asarray(rng.random(ids.shape) < 0.5)  # indexer top-p decides these queries
  np.testing.assert_array_equal(np.asarray(back(ids, sparse_queries=sq)),
                                np.asarray(model(ids, sparse_queries=sq)))
  np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(model(ids)))


def test_artifacts_overlay_equals_full_save(tmp_path, rng, seed):
  """Base folder + save_artifacts -> overlay_folder loads the same model as save_pretrained."""
  model = _rtpurbo_model(seed, rng)
  base = api.save_pretrained(_random_model(seed, "qwen3"), tmp_path / "base")  # its backbone
  api.save_artifacts(model, tmp_path / "art")
  assert sorted(os.listdir(tmp_path / "art")) == [api.ARTIFACT_INDEXER, api.ARTIFACT_CONFIG]
  assert os.path.getsize(tmp_path / "art" / api.ARTIFACT_INDEXER) < 20_000  # no backbone
  folder = api.overlay_folder(base, tmp_path / "art", tmp_path / "overlay")
  assert os.path.islink(os.path.join(folder, "base-model.safetensors"))  # linked, not copied
  back = api.from_pretrained(folder)
  assert back.plan == model.plan and back.sparse == model.sparse
  _assert_same_params(model, back)
  ids = _ids(rng)
  sq = jnp.asarray(rng.random(ids.shape) < 0.5)
  np.testing.assert_array_equal(np.asarray(back(ids, sparse_queries=sq)),
                                np.asarray(model(ids, sparse_queries=sq)))

  # New artifacts (another indexer) rebuild the cached overlay.
  n = int(model.plan.mask()[0].sum())
  other = to_rtpurbo(model, model.plan, {0: (rng.standard_normal((n, 16, 16)).astype(np.float32),
                                             rng.standard_normal((n, 16, 16)).astype(np.float32))},
                     window=8, sinks=2, top_p=0.6, block_size=8, seqlen_threshold=0)
  api.save_artifacts(other, tmp_path / "art")
  again = api.from_pretrained(api.overlay_folder(base, tmp_path / "art", tmp_path / "overlay"))
  np.testing.assert_array_equal(np.asarray(indexer_weights(again)[0][0]),
                                np.asarray(indexer_weights(other)[0][0]))

  # A sharded base works the same way.
  api.save_pretrained(_random_model(seed, "qwen3"), tmp_path / "sharded", max_shard_bytes=20_000)
  assert os.path.exists(tmp_path / "sharded" / safetensors_io.INDEX)
  back = api.from_pretrained(api.overlay_folder(tmp_path / "sharded", tmp_path / "art",
                                                tmp_path / "overlay2"))
  _assert_same_params(other, back)


def test_distance_bias_round_trip(tmp_path, rng, seed):
  """The indexer's distance bias saves with the indexer (full folder and artifacts), loads
  back exactly, and is what the loaded model selects with; sparse.distance_buckets=0 on load
  turns it off."""
  plain = _rtpurbo_model(seed, rng)
  model = to_rtpurbo(plain, plain.plan, window=8, sinks=2, top_p=0.6, block_size=8,
                     seqlen_threshold=0, distance_buckets=5)
  n = int(model.plan.mask()[0].sum())
  set_distance_bias(model, {0: rng.standard_normal((n, 5)).astype(np.float32) * 2})
  api.save_pretrained(model, tmp_path / "m")
  stored = load_file(tmp_path / "m" / "model.safetensors")
  assert stored["model.layers.0.self_attn.indexer.distance_bias"].shape == (n, 5)
  assert "model.layers.1.self_attn.indexer.distance_bias" not in stored
  base = api.save_pretrained(_random_model(seed, "qwen3"), tmp_path / "base")
  api.save_artifacts(model, tmp_path / "art")
  ids = _ids(rng)
  sq = jnp.asarray(rng.random(ids.shape) < 0.5)
  want = np.asarray(model(ids, sparse_queries=sq))
  for folder in (tmp_path / "m", api.overlay_folder(base, tmp_path / "art", tmp_path / "ov")):
    back = api.from_pretrained(folder)
    assert back.sparse.distance_buckets == 5
    np.testing.assert_array_equal(np.asarray(distance_biases(back)[0]),
                                  np.asarray(distance_biases(model)[0]))
    np.testing.assert_array_equal(np.asarray(back(ids, sparse_queries=sq)), want)
  # Turned off on load: the stored bias is not read, the selection is the method's.
  off = api.from_pretrained(tmp_path / "m", sparse=dataclasses.replace(model.sparse,
                                                                        distance_buckets=0))
  assert not distance_biases(off)
  np.testing.assert_array_equal(np.asarray(off(ids, sparse_queries=sq)),
                                np.asarray(plain(ids, sparse_queries=sq)))
  assert np.abs(np.asarray(plain(ids, sparse_queries=sq)) - want).max() > 1e-3
  # A folder without bias tensors loads a zero bias (the method's score).
  f = tmp_path / "m" / "model.safetensors"
  save_file({k: v for k, v in stored.items() if "distance_bias" not in k}, f,
            metadata={"format": "pt"})
  zero = api.from_pretrained(tmp_path / "m")
  assert float(np.abs(np.asarray(distance_biases(zero)[0])).max()) == 0.0


def test_artifacts_errors(tmp_path, seed):
  with pytest.raises(ValueError, match="no retrieval heads"):
    api.save_artifacts(_random_model(seed), tmp_path / "art")
  os.makedirs(tmp_path / "art")
  with pytest.raises(FileNotFoundError, match="rtpurbo_config.json"):
    api.overlay_folder(tmp_path, tmp_path / "art", tmp_path / "overlay")
  assert not os.path.exists(tmp_path / "overlay")


def test_rtpurbo_without_indexer_tensors_keeps_rotary_init(tmp_path, rng, seed):
  model = _rtpurbo_model(seed, rng)
  api.save_pretrained(model, tmp_path / "m")
  f = tmp_path / "m" / "model.safetensors"
  save_file({k: v for k, v in load_file(f).items() if ".indexer." not in k}, f,
            metadata={"format": "pt"})
  back = api.from_pretrained(tmp_path / "m")
  wq, wk = indexer_weights(back)[0]
  want = rotary_init(wq.shape[0], 16, 16)
  np.testing.assert_array_equal(np.asarray(wq), want)
  np.testing.assert_array_equal(np.asarray(wk), want)
  # The indexer decides the sparse queries' logits, so the round trip above is sensitive to it.
  ids = _ids(rng)
  sq = jnp.asarray(rng.random(ids.shape) < 0.5)
  diff = np.abs(np.asarray(back(ids, sparse_queries=sq))
                - np.asarray(model(ids, sparse_queries=sq)))
  print(f"rotary vs saved indexer: max|logit diff|={diff.max():.2e}")
  assert diff.max() > 1e-2


def test_sparse_override_and_plain_headwise_config(tmp_path, rng, seed):
  model = _rtpurbo_model(seed, rng)
  api.save_pretrained(model, tmp_path / "m")
  override = SparseConfig(mode="streaming", window=4, sinks=1, seqlen_threshold=0)
  back = api.from_pretrained(tmp_path / "m", sparse=override)
  assert back.sparse == override and back.plan == model.plan
  # A config.json with only headwise_config (as RTP-LLM writes it): mode rtpurbo + its values.
  path = tmp_path / "m" / "config.json"
  cfg = json.load(open(path))
  del cfg["rtpurbo_sparse"]
  cfg["headwise_config"]["swa_token_num"] = 16
  json.dump(cfg, open(path, "w"))
  back = api.from_pretrained(tmp_path / "m")
  assert back.sparse == SparseConfig(mode="rtpurbo", window=16, sinks=2, seqlen_threshold=0,
                                     top_p=0.6, block_size=8, indexer_dim=16)


# ---------------------------------------------------------------------------
# Sharded folders.


def test_transformers_sharded_folder_loads(tmp_path, rng, seed):
  folder, hf = make_hf_folder(tmp_path / "m", "qwen2", seed=seed, max_shard_size="40KB")
  index = json.load(open(os.path.join(folder, safetensors_io.INDEX)))
  assert len(set(index["weight_map"].values())) > 1
  assert not os.path.exists(os.path.join(folder, safetensors_io.SINGLE))
  model = api.from_pretrained(folder)
  ids = _ids(rng)
  diff = float(np.abs(np.asarray(model(ids)) - hf_logits(hf, np.asarray(ids))).max())
  print(f"sharded qwen2 vs transformers: max|logit diff|={diff:.2e}")
  assert diff <= 1e-4


def test_our_sharded_save_and_resave(tmp_path, rng, seed):
  model = _random_model(seed, "llama")
  out = tmp_path / "m"
  api.save_pretrained(model, out, max_shard_bytes=40_000)
  shards = set(json.load(open(out / safetensors_io.INDEX))["weight_map"].values())
  assert len(shards) > 1
  back = api.from_pretrained(out)
  _assert_same_params(model, back)
  # Re-save unsharded into the same folder: stale shards go, other files stay.
  (out / "tokenizer_config.json").write_text("{}")
  other = _random_model(seed + 1, "llama")
  api.save_pretrained(other, out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors",
                                     "tokenizer_config.json"]
  _assert_same_params(other, api.from_pretrained(out))
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folders


def test_failed_save_leaves_folder_intact(tmp_path, seed, monkeypatch):
  model = _random_model(seed, "llama")
  out = tmp_path / "m"
  api.save_pretrained(model, out)
  before = {n: (out / n).read_bytes() for n in os.listdir(out)}

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(safetensors_io, "write_json", boom)
  with pytest.raises(OSError, match="disk full"):
    api.save_pretrained(_random_model(seed + 1, "llama"), out)
  assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
  with pytest.raises(OSError, match="disk full"):
    api.save_pretrained(model, tmp_path / "new")
  assert not os.path.exists(tmp_path / "new")


# ---------------------------------------------------------------------------
# Errors: one clear message naming the path or tensor.


@pytest.fixture
def saved(tmp_path, seed):
  api.save_pretrained(_random_model(seed, "llama"), tmp_path / "m")
  return tmp_path / "m"


def test_unknown_name():
  with pytest.raises(ValueError, match=r"unknown model name 'smollm3-9000'.*smollm2-135m"):
    api.from_pretrained("smollm3-9000")


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.*does not exist"):
    api.from_pretrained(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="not downloaded"):
    api.from_pretrained("some-org/some-model")


def test_missing_config(tmp_path):
  (tmp_path / "m").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    api.from_pretrained(tmp_path / "m")


def test_missing_weight_file(saved):
  os.remove(saved / "model.safetensors")
  with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors"):
    api.from_pretrained(saved)


def test_missing_shard(tmp_path, seed):
  api.save_pretrained(_random_model(seed, "llama"), tmp_path / "m", max_shard_bytes=40_000)
  shard = sorted(n for n in os.listdir(tmp_path / "m") if n.startswith("model-"))[1]
  os.remove(tmp_path / "m" / shard)
  with pytest.raises(FileNotFoundError, match=shard):
    api.from_pretrained(tmp_path / "m")


def _rewrite(folder, fn):
  f = folder / "model.safetensors"
  tensors = load_file(f)
  fn(tensors)
  save_file(tensors, f, metadata={"format": "pt"})


def test_wrong_shape(saved):
  name = "model.layers.1.self_attn.k_proj.weight"
  _rewrite(saved, lambda t: t.__setitem__(name, np.zeros((16, 64), np.float32)))
  with pytest.raises(ValueError, match=rf"{name}.*shape \(16, 64\), expected \(32, 64\)"):
    api.from_pretrained(saved)


def test_missing_tensor(saved):
  name = "model.layers.0.mlp.up_proj.weight"
  _rewrite(saved, lambda t: t.pop(name))
  with pytest.raises(ValueError, match=f"{name}.*missing"):
    api.from_pretrained(saved)


def test_unexpected_tensor(saved):
  name = "model.layers.0.self_attn.o_proj.bias"
  _rewrite(saved, lambda t: t.__setitem__(name, np.zeros((64,), np.float32)))
  with pytest.raises(ValueError, match="no place for.*o_proj.bias"):
    api.from_pretrained(saved)


def test_unsupported_config(saved):
  path = saved / "config.json"
  cfg = json.load(open(path))
  json.dump({**cfg, "architectures": ["GPT2LMHeadModel"]}, open(path, "w"))
  with pytest.raises(ValueError, match="unsupported model.*GPT2LMHeadModel"):
    api.from_pretrained(saved)
  json.dump({**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4,
                                        "factor": 4.0}}, open(path, "w"))
  with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
    api.from_pretrained(saved)


def test_plan_mismatch(saved):
  path = saved / "config.json"
  cfg = json.load(open(path))
  cfg["headwise_config"] = {"0": [1, 0, 0, 0]}  # one layer, the model has two
  json.dump(cfg, open(path, "w"))
  with pytest.raises(ConfigError, match="head plan is 1 layers x 4 heads"):
    api.from_pretrained(saved)


def test_tokenizer_missing(saved):
  with pytest.raises(FileNotFoundError, match="no tokenizer"):
    api.load_tokenizer(saved)


def test_unrepresentable_family_flags(tmp_path, seed):
  import dataclasses
  model = Transformer(dataclasses.replace(_cfg("qwen2"), qkv_bias=False))
  with pytest.raises(ConfigError, match="no HF equivalent"):
    api.save_pretrained(model, tmp_path / "m")
  assert not os.path.exists(tmp_path / "m")


# ---------------------------------------------------------------------------
# GGUF: llama.cpp's q/k row order.


def test_gguf_unpermute_inverts_llama_cpp_order(rng):
  heads, head_dim, cols = 3, 8, 5
  w = rng.standard_normal((heads * head_dim, cols))
  # llama.cpp's converter: per head, rows (half, i) -> (i, half).
  permuted = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(gguf_io.unpermute_rope_rows(permuted, heads), w)
  assert not np.array_equal(permuted, w)
