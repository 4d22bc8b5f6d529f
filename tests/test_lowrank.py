"""Low-rank backbone deltas (rtpurbo_jax/lowrank.py) and LoRA stage 2.

Oracles: numpy's SVD (Eckart-Young: the rank-r error is the tail of the singular values), the
tuned model itself (a delta of rank <= r must reproduce it to fp32 rounding, through the
artifact files, the cache overlay and from_pretrained; transformers loads that overlay too),
and the base model (LoRA at step 0, artifacts without a delta).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rtpurbo_jax import lowrank
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ConfigError, ModelConfig, SparseConfig, run_config
from rtpurbo_jax.convert import rebuild, to_rtpurbo
from rtpurbo_jax.hf import api
from rtpurbo_jax.models.transformer import Transformer

V = 97


def _cfg(family="llama"):
  return ModelConfig(family=family, vocab_size=V, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                     tie_embeddings=family == "llama", qkv_bias=family == "qwen2")


def _model(seed, family="llama"):
  return Transformer(_cfg(family), rngs=nnx.Rngs(seed), init_std=0.2)


def _rtpurbo(model, top_p=0.6):
  plan = HeadPlan.from_mask([[0, 1, 0, 0], [1, 0, 0, 1]], 2)
  return to_rtpurbo(model, plan, window=8, sinks=2, top_p=top_p, block_size=8,
                    seqlen_threshold=0, indexer_dim=8)


def _flat(model, filt=nnx.Param):
  return {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, filt))}


def _perturb(model, rng, rank: int | None, scale=0.05):
  """Add to every delta target of `model` (in place) a random change of `rank` (None = full
  rank) in the HF layout; 1-D weights get a dense change."""
  for t in lowrank.targets(model):
    var = lowrank._var(model, t.key)
    w = np.asarray(var[...])
    if t.low_rank:
      k = min(t.shape) if rank is None else rank
      d = rng.standard_normal((t.shape[0], k)) @ rng.standard_normal((k, t.shape[1]))
      d *= scale / np.sqrt(k)
    else:
      d = scale * rng.standard_normal(t.shape)
    var.set_value(jnp.asarray(w + t.entry.to_ours(d.astype(np.float32), w.shape)))
  return model


def _ids(rng, batch=2, seq=40):
  return jnp.asarray(rng.integers(0, V, (batch, seq)).astype(np.int32))


# ---------------------------------------------------------------------------
# The SVD delta.


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_delta_is_exact_when_the_change_has_rank_at_most_r(rng, seed, family):
  base = _model(seed, family)
  tuned = _perturb(_model(seed, family), rng, rank=3)
  delta, errors = lowrank.compute_delta(base, tuned, rank=4)
  ts = lowrank.targets(base)
  assert {t.entry.hf for t in ts if t.low_rank} == set(errors)
  assert len(errors) == 7 * 2  # q k v o gate up down per layer; not the embedding / lm_head
  assert not any("embed" in k or "lm_head" in k for k in delta)
  if family == "qwen2":
    assert "model.layers.0.self_attn.q_proj.bias.delta" in delta  # 1-D biases: full deltas
  assert delta["model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 48)
  assert delta["model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 4)
  assert delta["model.norm.weight.delta"].shape == (32,)
  assert max(errors.values()) < 1e-5, errors
  back = lowrank.apply_delta(_model(seed, family), delta)
  want, got = _flat(tuned), _flat(back)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2e-6, err_msg=k)


def test_delta_error_is_the_singular_value_tail(rng, seed):
  base = _model(seed)
  tuned = _perturb(_model(seed), rng, rank=None)  # full rank
  r = 5
  delta, errors = lowrank.compute_delta(base, tuned, rank=r)
  for t in lowrank.targets(base):
    if not t.low_rank:
      continue
    d = (lowrank.to_hf_matrix(t, lowrank._get(tuned, t.key)).astype(np.float64)
         - lowrank.to_hf_matrix(t, lowrank._get(base, t.key)))
    s = np.linalg.svd(d, compute_uv=False)
    want = np.sqrt(np.sum(s[r:] ** 2) / np.sum(s ** 2))
    np.testing.assert_allclose(errors[t.entry.hf], want, rtol=1e-6, err_msg=t.entry.hf)
    assert want > 0.1  # a real truncation
    approx = lowrank.hf_delta(delta, t.entry.hf)
    got = np.linalg.norm(d - approx) / np.linalg.norm(d)
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=t.entry.hf)


def test_delta_file_size_and_bad_names(tmp_path, rng, seed):
  base = _model(seed)
  delta, _ = lowrank.compute_delta(base, _perturb(_model(seed), rng, 2), rank=2)
  for dt in ("float16", "float32"):
    n = lowrank.save_delta(delta, tmp_path / f"d_{dt}.safetensors", dtype=dt)
    assert n == lowrank.artifact_bytes(base.cfg, 2, dt)
  back = lowrank.load_delta(tmp_path / "d_float32.safetensors")
  assert back.keys() == delta.keys()
  table = lowrank.size_table(base.cfg, (1, 2))
  assert table.count("\n") == 5 and "float16" in table
  with pytest.raises(ValueError, match="name no weight"):
    lowrank.apply_delta(_model(seed), {**delta, "model.layers.9.mlp.up_proj.lora_A.weight":
                                       delta["model.layers.0.mlp.up_proj.lora_A.weight"]})
  with pytest.raises(ValueError, match="name no weight"):
    lowrank.apply_delta(_model(seed), {k: v for k, v in delta.items()
                                       if k != "model.layers.0.mlp.up_proj.lora_B.weight"})


# ---------------------------------------------------------------------------
# Artifacts with a backbone delta.


def test_artifacts_with_delta_load_the_tuned_model(tmp_path, rng, seed):
  dense = _model(seed, "qwen2")
  base_folder = api.save_pretrained(dense, tmp_path / "base")
  base = _rtpurbo(dense)
  tuned = _perturb(_rtpurbo(_model(seed, "qwen2")), rng, rank=3)
  art = tmp_path / "art"
  api.save_artifacts(tuned, art, base=base, delta_rank=4)
  assert sorted(os.listdir(art)) == sorted([api.ARTIFACT_CONFIG, api.ARTIFACT_INDEXER,
                                            lowrank.DELTA_FILE])
  rec = json.loads((art / api.ARTIFACT_CONFIG).read_text())["backbone_delta"]
  assert rec["rank"] == 4 and rec["file"] == lowrank.DELTA_FILE and rec["max_rel_error"] < 1e-5
  target = tmp_path / "overlay"
  folder = api.overlay_folder(base_folder, art, target)
  config = json.loads((target / "config.json").read_text())
  assert "backbone_delta" not in config and "headwise_config" in config
  assert os.path.isfile(target / ("merged-model.safetensors"))
  assert not os.path.islink(target / "merged-model.safetensors")
  stamp = (target / "artifacts.sha256").read_text()
  back = api.from_pretrained(folder)
  assert back.plan == tuned.plan and back.sparse == tuned.sparse
  want, got = _flat(tuned), _flat(back)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2e-6, err_msg=k)
  ids = _ids(rng)
  dense_of = lambda m: rebuild(m, sparse=SparseConfig(mode="dense"))
  np.testing.assert_allclose(np.asarray(dense_of(back)(ids)), np.asarray(dense_of(tuned)(ids)),
                             rtol=1e-5, atol=1e-5)
  # transformers loads the overlay folder as a plain model (the indexer tensors are extra).
  torch = pytest.importorskip("torch")
  import transformers
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                         attn_implementation="eager")
  with torch.no_grad():
    hf_logits = hf(torch.as_tensor(np.array(ids), dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(hf_logits, np.asarray(dense_of(tuned)(ids)), rtol=1e-4, atol=1e-4)

  # Another delta rebuilds the overlay (the delta file is in the digest).
  tuned2 = _perturb(_rtpurbo(_model(seed, "qwen2")), rng, rank=2)
  api.save_artifacts(tuned2, art, base=base, delta_rank=4)
  api.overlay_folder(base_folder, art, target)
  assert (target / "artifacts.sha256").read_text() != stamp
  np.testing.assert_allclose(_flat(api.from_pretrained(target))["layers/1/mlp/up"],
                             _flat(tuned2)["layers/1/mlp/up"], atol=2e-6)

  # Without a base: the delta file goes, and the overlay is the base backbone again, linked.
  api.save_artifacts(tuned, art)
  assert lowrank.DELTA_FILE not in os.listdir(art)
  assert "backbone_delta" not in json.loads((art / api.ARTIFACT_CONFIG).read_text())
  api.overlay_folder(base_folder, art, target)
  assert os.path.islink(target / "base-model.safetensors")
  assert not os.path.exists(target / "merged-model.safetensors")
  plain = api.from_pretrained(target)
  want = _flat(base)
  for k, v in _flat(plain).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_artifacts_delta_errors(tmp_path, rng, seed):
  base_folder = api.save_pretrained(_model(seed), tmp_path / "base")
  base = _rtpurbo(_model(seed))
  with pytest.raises(ValueError, match="delta_rank"):
    api.save_artifacts(base, tmp_path / "art", base=base)
  api.save_artifacts(_perturb(_rtpurbo(_model(seed)), rng, 2), tmp_path / "art", base=base,
                     delta_rank=2)
  os.remove(tmp_path / "art" / lowrank.DELTA_FILE)
  with pytest.raises(FileNotFoundError, match="backbone delta"):
    api.overlay_folder(base_folder, tmp_path / "art", tmp_path / "overlay")


# ---------------------------------------------------------------------------
# LoRA stage 2.


def test_lora_split_at_step_0_is_the_base_model(rng, seed):
  model = _model(seed)  # dense: the sparse path adds compile time and nothing to this check
  split = lowrank.LoraSplit(model, 4, 8.0, norms=True, seed=seed)
  tr, fr = split.values(model)
  assert set(fr) == set(_flat(model, ...))  # every variable is frozen
  assert sum(k.endswith("/lora_A") for k in tr) == 14 and sum(k.endswith("/delta") for k in tr) == 5
  assert all(np.any(np.asarray(v)) for k, v in tr.items() if k.endswith("lora_A"))
  for k, w in split.merged_weights(tr, fr).items():  # B = 0: W + 0 is W, bit for bit
    np.testing.assert_array_equal(np.asarray(w), np.asarray(fr[k]), err_msg=k)
  ids = _ids(rng)
  got = jax.jit(lambda t, f: split.merge(t, f)(ids))(tr, fr)
  # Same weights; only XLA's fusion (jit vs eager) may round differently.
  np.testing.assert_allclose(np.asarray(got), np.asarray(model(ids)), rtol=1e-5, atol=2e-5)


def _stage2_trainer(tmp_path, seed, rank, norms, steps, lr):
  from rtpurbo_jax import sharding as shd
  from rtpurbo_jax.train import stages
  from rtpurbo_jax.train.trainer import RunOptions, Trainer
  dense = _model(seed)
  student = _rtpurbo(dense, top_p=0.5)
  o = run_config().train.stage2
  o.update(steps=steps, lr=lr, warmup=0, batch_size=2, micro_batch=1, seq_len=32,
           position_chunk=8, lora_rank=rank, lora_alpha=2.0 * rank, lora_norms=norms)
  split = lowrank.LoraSplit(student, rank, o.lora_alpha, norms=norms, seed=seed)
  task = stages.stage2_task(split, o, remat=True)
  run = RunOptions(ckpt_dir=str(tmp_path / "ckpt"), workdir=str(tmp_path), progress=False,
                   log_every=1, checkpoint_every=1000)
  return Trainer(task, student, o, run, shd.make_mesh({}, devices=jax.devices()[:1])), dense


def _stage2_batch(seed, teacher, n=2, s=32, k=5):
  from rtpurbo_jax.train import losses
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, V, (n, s)).astype(np.int32)
  labels = np.broadcast_to(np.arange(s) >= s - 12, (n, s)).copy()
  t_ids, t_logits = nnx.jit(lambda m: losses.teacher_topk(m, jnp.asarray(ids), k=k))(teacher)
  return {"ids": ids, "labels": labels, "t_ids": np.asarray(t_ids),
          "t_logits": np.asarray(t_logits)}


class _Fixed:
  def __init__(self, batch):
    self.batch = batch

  def __next__(self):
    return self.batch


def test_lora_stage2_trains_only_the_factors_and_folds_them(tmp_path, rng, seed):
  tr, dense = _stage2_trainer(tmp_path, seed, rank=2, norms=True, steps=6, lr=1e-2)
  split = tr.task.split
  student_before = _flat(tr.model, ...)
  frozen_before = {k: np.asarray(v) for k, v in tr.frozen.items()}
  hist = tr.fit(_Fixed(_stage2_batch(seed, dense)))
  kl = [h["kl"] for h in hist]
  assert kl[0] > 1e-4 and kl[-1] < 0.9 * kl[0], kl
  for k, v in tr.frozen.items():  # the frozen weights are bitwise unchanged
    np.testing.assert_array_equal(np.asarray(v), frozen_before[k], err_msg=k)
  trained = {k: np.asarray(v) for k, v in tr.trainable.items()}
  assert all(np.any(v) for k, v in trained.items() if k.endswith(("lora_B", "/delta")))

  model = tr.finish()  # write_back: W + (alpha / r) B @ A in our layout
  after = _flat(model, ...)
  targets = {t.key: t for t in split.targets}
  for k, w0 in student_before.items():
    if k not in targets:  # embedding, indexer, ...: untouched
      np.testing.assert_array_equal(after[k], w0, err_msg=k)
      continue
    t = targets[k]
    if t.low_rank:
      d = split.scale * trained[k + "/lora_B"] @ trained[k + "/lora_A"]  # [out, in]
    else:
      d = trained[k + "/delta"]
    np.testing.assert_allclose(after[k], w0 + t.entry.to_ours(d, w0.shape), rtol=0, atol=1e-6,
                               err_msg=k)

  # The folded model's delta is exactly rank r: the SVD at rank r and the factors agree.
  base = _rtpurbo(dense, top_p=0.5)
  _, errors = lowrank.compute_delta(base, model, rank=2)
  assert max(errors.values()) < 1e-3, errors
  exact = lowrank.apply_delta(_rtpurbo(_model(seed), top_p=0.5), split.delta(tr.trainable))
  for k, v in _flat(exact).items():
    np.testing.assert_allclose(v, after[k], rtol=0, atol=1e-6, err_msg=k)


def test_lora_config_errors(seed):
  from rtpurbo_jax.train import stages
  cfg = run_config()
  cfg.train.stage2.lora_rank = -1
  with pytest.raises(ConfigError, match="lora_rank=-1"):
    stages.validate_train(cfg)
  cfg.train.stage2.lora_rank = 4
  cfg.train.stage2.lora_alpha = 0.0
  with pytest.raises(ConfigError, match="lora_alpha=0.0"):
    stages.validate_train(cfg)
  cfg.train.stage2.lora_alpha = 8.0
  with pytest.raises(ConfigError, match="data"):  # the LoRA keys pass; the next check fails
    stages.validate_train(cfg)
  with pytest.raises(ConfigError, match="exceeds min"):
    lowrank.LoraSplit(_model(seed), 33, 8.0)  # k_proj, v_proj are [32, 32]
  with pytest.raises(Exception):  # the locked schema types it
    cfg.train.stage2.lora_rank = "four"
