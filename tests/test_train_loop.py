"""The training loop on a tiny random model: stage 1 learns, stage 2 trains only the backbone
in sparse mode, gradient accumulation equals one large batch."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtpurbo_jax import sharding as shd
from rtpurbo_jax.attention.indexer import IndexerParam
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ModelConfig, SparseConfig, run_config
from rtpurbo_jax.train import losses, stages
from rtpurbo_jax.train.trainer import ParamSplit, RunOptions, Trainer

V = 97


def tiny(seed, mode="dense", top_p=0.5):
  cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=True)
  plan = HeadPlan.from_mask([[0, 1, 0, 0], [1, 0, 0, 1]], 2)
  sp = SparseConfig(mode=mode, indexer_dim=8, block_size=8, seqlen_threshold=0, window=8,
                    top_p=top_p)
  return Transformer_(cfg, sp, plan, seed)


def Transformer_(cfg, sp, plan, seed):
  from rtpurbo_jax.models.transformer import Transformer
  return Transformer(cfg, sparse=sp, plan=plan, rngs=nnx.Rngs(seed), init_std=0.2)


class FixedBatches:
  """An endless iterator over precomputed host batches (checkpointable like grain's)."""

  def __init__(self, batches):
    self.batches, self.i = batches, 0

  def __next__(self):
    b = self.batches[self.i % len(self.batches)]
    self.i += 1
    return b

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def one_device_mesh():
  return shd.make_mesh({}, devices=jax.devices()[:1])


def run_opts(tmp_path, name):
  return RunOptions(ckpt_dir=str(tmp_path / name / "ckpt"), workdir=str(tmp_path / name),
                    progress=False, log_every=1, checkpoint_every=1000)


def values(model, filt):
  return {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, filt))}


def test_stage1_loss_decreases_and_backbone_is_untouched(tmp_path, seed):
  model = tiny(seed)
  o = run_config().train.stage1
  o.update(steps=12, lr=2e-2, warmup=0, schedule="constant", seq_len=64, query_chunk=16)
  backbone = values(model, stages.BACKBONE)
  before = values(model, IndexerParam)
  ids = np.asarray(jax.random.randint(jax.random.key(seed), (1, 64), 0, V), np.int32)
  task = stages.stage1_task(ParamSplit(model, IndexerParam), o, model.sparse)
  tr = Trainer(task, model, o, run_opts(tmp_path, "s1"), one_device_mesh())
  hist = tr.fit(FixedBatches([{"ids": ids}]))
  tr.finish()
  kl = [h["kl"] for h in hist]
  assert kl[-1] < 0.8 * kl[0], kl
  after = values(model, IndexerParam)
  assert all(not np.allclose(before[k], after[k]) for k in before)
  for k, v in values(model, stages.BACKBONE).items():
    np.testing.assert_array_equal(v, backbone[k])
  # metrics were written as JSONL and TensorBoard events
  assert (tmp_path / "s1" / "metrics" / "stage1.jsonl").read_text().count("\n") == 12
  assert any((tmp_path / "s1" / "tb").rglob("events.out.tfevents*"))


def test_stage1_trains_the_distance_bias_at_its_own_rate(tmp_path, seed):
  """With sparse.distance_buckets the indexer's distance bias is a stage-1 parameter; Adam's
  first step moves every element with a gradient by its peak rate, so the bias moves by
  bias_lr (weight decay does not reach it) and W_q / W_k by lr (plus their decay)."""
  import dataclasses

  base = tiny(seed)
  sp = dataclasses.replace(base.sparse, distance_buckets=4)
  model = Transformer_(base.cfg, sp, base.plan, seed)
  o = run_config().train.stage1
  o.update(steps=1, lr=1e-3, bias_lr=0.05, warmup=0, schedule="constant", seq_len=64,
           query_chunk=16, clip=0.0, weight_decay=0.5)
  before = values(model, IndexerParam)
  assert any("indexer_bias" in k for k in before)
  ids = np.asarray(jax.random.randint(jax.random.key(seed), (1, 64), 0, V), np.int32)
  task = stages.stage1_task(ParamSplit(model, IndexerParam), o, model.sparse)
  tr = Trainer(task, model, o, run_opts(tmp_path, "s1b"), one_device_mesh())
  tr.fit(FixedBatches([{"ids": ids}]))
  tr.finish()
  after = values(model, IndexerParam)
  for k in before:
    step = np.abs(after[k] - before[k])
    moved = step[step > 0]
    assert moved.size > 0.5 * step.size, k  # the gradient reaches (almost) every element
    if "indexer_bias" in k:
      np.testing.assert_allclose(moved, 0.05, rtol=1e-3, err_msg=k)
    else:  # 1e-3 x (1 + decay 0.5 x |w| / 1): within a factor of two of lr
      assert 5e-4 < float(np.median(moved)) < 2e-3, k


def stage2_batches(seed, teacher, n, s=32, k=5):
  """Random examples with right padding and labels on the last tokens, plus the dense
  teacher's top-k logits (as stages.TeacherStore would serve them)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, V, (n, s)).astype(np.int32)
  lengths = rng.integers(s - 8, s + 1, n)
  valid = np.arange(s)[None] < lengths[:, None]
  labels = valid & (np.arange(s)[None] >= lengths[:, None] - 10)
  t_ids, t_logits = nnx.jit(lambda m: losses.teacher_topk(m, jnp.asarray(ids),
                                                          valid=jnp.asarray(valid), k=k))(teacher)
  return {"ids": ids, "valid": valid, "labels": labels, "t_ids": np.asarray(t_ids),
          "t_logits": np.asarray(t_logits)}


def stage2_trainer(tmp_path, name, seed, batch_size, micro_batch, steps=1, lr=1e-3, mesh=None,
                   top_p=0.5, eps=1e-8):
  dense = tiny(seed, top_p=top_p)
  student = stages.with_mode(dense, "rtpurbo")
  o = run_config().train.stage2
  o.update(steps=steps, lr=lr, warmup=0, batch_size=batch_size, micro_batch=micro_batch,
           seq_len=32, position_chunk=8, eps=eps)
  task = stages.stage2_task(ParamSplit(student, stages.BACKBONE), o, remat=True)
  return Trainer(task, student, o, run_opts(tmp_path, name), mesh or one_device_mesh()), dense


def test_stage2_trains_backbone_in_sparse_mode(tmp_path, seed):
  tr, dense = stage2_trainer(tmp_path, "s2", seed, 2, 1, steps=8, lr=3e-3)
  data = stage2_batches(seed, dense, 2)
  idx_before = values(tr.model, IndexerParam)
  bb_before = values(tr.model, stages.BACKBONE)
  hist = tr.fit(FixedBatches([data]))
  model = tr.finish()
  assert model.sparse.mode == "rtpurbo"
  kl = [h["kl"] for h in hist]
  assert kl[0] > 1e-4 and kl[-1] < 0.7 * kl[0], kl  # sparse student != dense teacher at first
  assert hist[0]["weight"] == data["labels"].sum()
  for k, v in values(model, IndexerParam).items():
    np.testing.assert_array_equal(v, idx_before[k])
  changed = [k for k, v in values(model, stages.BACKBONE).items()
             if not np.array_equal(v, bb_before[k])]
  assert len(changed) == len(bb_before)


def test_gradient_accumulation_equals_one_large_batch(tmp_path, seed):
  # Well-conditioned comparison: the two batch shapes round differently, so top_p = 1 (block
  # selection is a step function of the scores) and Adam eps = 1 (the update is ~lr * g
  # instead of ~lr * sign(g), which amplifies rounding of near-zero gradients).
  a, dense = stage2_trainer(tmp_path, "big", seed, 4, 4, top_p=1.0, eps=1.0)
  b, _ = stage2_trainer(tmp_path, "acc", seed, 4, 1, top_p=1.0, eps=1.0)
  data = stage2_batches(seed, dense, 4)
  initial = {k: np.asarray(v) for k, v in a.trainable.items()}
  ma = jax.device_get(a.step(data, 0))
  mb = jax.device_get(b.step(data, 0))
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-4)
  for k in a.trainable:
    np.testing.assert_allclose(a.trainable[k], b.trainable[k], rtol=1e-6, atol=1e-9,
                               err_msg=k)
  moved = max(float(np.abs(a.trainable[k] - b0).max()) for k, b0 in initial.items())
  assert moved > 1e-7  # the step did change the weights


def test_teacher_store_is_resumable_and_exact(tmp_path, seed):
  import os
  import pytest
  from rtpurbo_jax.config import ConfigError
  from rtpurbo_jax.train import data as data_lib
  teacher = tiny(seed)
  tok = data_lib.TokenFn(data_lib.HashTokenizer(V))
  rng = np.random.default_rng(seed)
  words = ["w%d" % i for i in range(50)]
  recs = [{"prompt": " ".join(rng.choice(words, 20)), "response": " ".join(rng.choice(words, 5))}
          for _ in range(5)]
  examples = [data_lib.make_example(r, tok, 24, 10) for r in recs]
  fp = {"model": "tiny", "seed": seed}
  store = stages.TeacherStore(str(tmp_path / "t"), 5, 4, fp, shard_size=2)
  store.build(teacher, examples, batch=2, chunk=8, progress=False)
  assert store.missing() == []
  os.remove(store.shard_path(1))
  stamps = {s: os.path.getmtime(store.shard_path(s)) for s in (0, 2)}
  store = stages.TeacherStore(str(tmp_path / "t"), 5, 4, fp, shard_size=2)
  assert store.missing() == [1]
  store.build(teacher, examples, batch=2, chunk=8, progress=False)
  assert {s: os.path.getmtime(store.shard_path(s)) for s in (0, 2)} == stamps
  for i, ex in enumerate(examples):
    got = store.load(i, 24, ex["labels"])
    want_ids, want_logits = nnx.jit(lambda m: losses.teacher_topk(
        m, jnp.asarray(ex["ids"][None]), valid=jnp.asarray(ex["valid"][None]), k=4))(teacher)
    lab = ex["labels"]
    np.testing.assert_array_equal(got["t_ids"][lab], np.asarray(want_ids)[0][lab])
    np.testing.assert_allclose(got["t_logits"][lab], np.asarray(want_logits)[0][lab],
                               rtol=1e-5, atol=1e-6)
    assert not got["t_logits"][~lab].any()
  with pytest.raises(ConfigError, match="another model or data"):
    stages.TeacherStore(str(tmp_path / "t"), 5, 4, {"model": "other"}, shard_size=2)
