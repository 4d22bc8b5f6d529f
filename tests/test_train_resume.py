"""Checkpoints: a run killed mid-way and resumed reproduces the uninterrupted trajectory; a
checkpoint of another model or plan is refused with a clear error."""

import jax
import numpy as np
import pytest
from flax import nnx

from rtpurbo_jax import sharding as shd
from rtpurbo_jax.attention.indexer import IndexerParam
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ModelConfig, SparseConfig, run_config
from rtpurbo_jax.models.transformer import Transformer
from rtpurbo_jax.train import data as data_lib
from rtpurbo_jax.train import stages
from rtpurbo_jax.train.checkpoint import CheckpointMismatch
from rtpurbo_jax.train.trainer import ParamSplit, RunOptions, Trainer

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


class Crash(RuntimeError):
  pass


def tiny(seed, plan_mask=((0, 1, 0, 0), (1, 0, 0, 1)), hidden=32):
  cfg = ModelConfig(vocab_size=300, hidden_size=hidden, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=True)
  sp = SparseConfig(mode="dense", indexer_dim=8, block_size=8, seqlen_threshold=0, window=8)
  return Transformer(cfg, sparse=sp, plan=HeadPlan.from_mask(plan_mask, 2),
                     rngs=nnx.Rngs(seed), init_std=0.2)


@pytest.fixture
def corpus(tmp_path, rng):
  d = tmp_path / "corpus"
  d.mkdir()
  for i in range(6):
    (d / f"{i}.txt").write_text(" ".join(rng.choice(WORDS, size=int(rng.integers(10, 80)))))
  return str(d / "*.txt")


def make(seed, corpus, workdir, *, plan_mask=((0, 1, 0, 0), (1, 0, 0, 1)), hidden=32):
  """A fresh model, trainer and data iterator, as a restarted process would build them."""
  model = tiny(seed, plan_mask, hidden)
  o = run_config().train.stage1
  o.update(steps=6, lr=1e-2, warmup=2, seq_len=48, query_chunk=16, query_fraction=0.5)
  task = stages.stage1_task(ParamSplit(model, IndexerParam), o, model.sparse)
  run = RunOptions(ckpt_dir=f"{workdir}/ckpt", workdir=workdir, seed=seed, progress=False,
                   log_every=1, checkpoint_every=2, keep_checkpoints=2)
  tr = Trainer(task, model, o, run, shd.make_mesh({}, devices=jax.devices()[:1]))
  tok = data_lib.TokenFn(data_lib.ByteTokenizer())
  data = iter(data_lib.packed_dataset(data_lib.TextSource(corpus), tok, 48, 1, seed=seed,
                                      process_index=0, process_count=1))
  return tr, data


def test_resume_after_kill_equals_uninterrupted(tmp_path, corpus, seed):
  full, data = make(seed, corpus, str(tmp_path / "a"))
  want = full.fit(data)
  assert len(want) == 6

  def crash_at_3(step, metrics):
    if step == 3:
      raise Crash("killed")

  first, data = make(seed, corpus, str(tmp_path / "b"))
  with pytest.raises(Crash):
    first.fit(data, on_step=crash_at_3)
  # Checkpoint 2 survived (3 was never saved); a fresh process resumes from it.
  again, data = make(seed, corpus, str(tmp_path / "b"))
  got = again.fit(data)
  assert len(got) == 4
  for w, g in zip(want[2:], got):
    for k in ("loss", "kl", "recall", "grad_norm", "lr"):
      np.testing.assert_allclose(g[k], w[k], rtol=1e-6, err_msg=k)
  for k in full.trainable:
    np.testing.assert_allclose(again.trainable[k], full.trainable[k], rtol=1e-6)
  # Keep-N: only the last two checkpoints remain; a finished run only restores.
  assert sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir() if p.name.isdigit()) == \
      ["4", "6"]
  done, data = make(seed, corpus, str(tmp_path / "b"))
  assert done.fit(data) == []
  model = done.finish()
  np.testing.assert_allclose(model.layers[1].attn.indexer_wk[...],
                             full.trainable["layers/1/attn/indexer_wk"], rtol=1e-6)


def test_checkpoint_of_another_plan_or_model_is_refused(tmp_path, corpus, seed):
  tr, data = make(seed, corpus, str(tmp_path / "w"))
  tr.opts.steps = 2
  tr.fit(data)
  other, data = make(seed, corpus, str(tmp_path / "w"), plan_mask=((1, 0, 0, 0), (0, 1, 1, 0)))
  with pytest.raises(CheckpointMismatch, match="head plan differs"):
    other.fit(data)
  bigger, data = make(seed, corpus, str(tmp_path / "w"), hidden=48)
  with pytest.raises(CheckpointMismatch, match="hidden_size=32 vs 48"):
    bigger.fit(data)
  # A damaged checkpoint: one clear error, and the files are left for inspection.
  import shutil
  shutil.rmtree(tmp_path / "w" / "ckpt" / "2" / "trainable")
  same, data = make(seed, corpus, str(tmp_path / "w"))
  with pytest.raises(CheckpointMismatch, match="cannot be restored"):
    same.fit(data)
  assert (tmp_path / "w" / "ckpt" / "2" / "meta").is_dir()
