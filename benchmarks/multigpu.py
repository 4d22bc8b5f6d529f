"""Multi-device benchmark on one host: stage-1 training steps and long-context RTPurbo inference.

  python benchmarks/multigpu.py                                  Llama-3.1-8B shape, random
      weights, mesh from the config (fsdp over every device), stage 1 at 64K, inference at 1M
  python benchmarks/multigpu.py --config.mesh.fsdp=1 --config.mesh.tensor=4 \
      --config.mesh.context=2 --seq_len=128K --ctx=1M --out=benchmarks/results/multigpu.json
  python benchmarks/multigpu.py --config=configs/tiny.py --seq_len=256 --ctx=512   (CI, CPU)

Two phases, both on the mesh of `config.mesh` (built by `rtpurbo_jax.sharding.make_mesh`):

  train   `--steps` stage-1 steps (indexer KL against the dense teacher, docs/METHOD.md §4) through
          `rtpurbo_jax.train.trainer.Trainer`, one random sequence of `--seq_len` tokens per
          step; parameters sharded by their logical axes, the sequence over `context`.
  infer   an `rtpurbo_jax.infer.engine.Engine` on the same mesh: chunked prefill of a random
          prompt filling `--ctx` tokens, then `--max_new_tokens` greedy decode steps; the
          cache sequence is sharded over `context` and the KV heads over `tensor`
          (`attention.cache.CACHE_AXES`).

The head plan is a seeded random stand-in with `plan.retrieval_ratio` retrieval heads (the
speed of a calibrated plan with the same ratio is the same). Weights are random and built
directly on the mesh (no host copy of the full model). Before inference, the memory planner
(`rtpurbo_jax.infer.memory`) checks that weights + cache + workspace fit each device.

Reports (stdout and `--out` JSON): step times, prefill time and tokens/s, decode tokens/s,
per-device memory (allocator peak where the backend reports it, else the bytes of the
sharded arrays), the losses and the generated tokens (so runs on different meshes can be
compared), device kind and versions.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:  # run as a script from anywhere in a source checkout
  sys.path.insert(0, _ROOT)

from rtpurbo_jax import cli  # noqa: E402

_CONFIG = cli.define_config(os.path.join(_ROOT, "configs", "llama8b.py"))
flags.DEFINE_string("seq_len", "64K", "Stage-1 training sequence length (e.g. 64K, 4096).")
flags.DEFINE_integer("steps", 3, "Stage-1 steps (the first one includes compilation).")
flags.DEFINE_string("ctx", "1M", "Inference context: prompt + new tokens (e.g. 1M, 128K).")
flags.DEFINE_integer("max_new_tokens", 16, "Greedy decode steps after the prefill.")
flags.DEFINE_string("prefill_chunk", None, "Prompt tokens per prefill step (default: "
                    "config.infer.prefill_chunk).")
flags.DEFINE_enum("phases", "train,infer", ["train,infer", "train", "infer"],
                  "Which phases to run.")
flags.DEFINE_string("device_memory", None, "Memory per device for the memory check, e.g. 141G "
                    "(default: detected).")
flags.DEFINE_float("init_std", 0.02, "Std of the random weights (larger = sharper attention).")
flags.DEFINE_string("out", None, "Write the JSON report here.")
FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------
# Model on the mesh.


def build_model(model_cfg, sparse, plan, dtype, seed, mesh, init_std=0.02):
  """A random-init Transformer whose parameters are created already sharded on `mesh`.

  Initialisation runs inside one jitted function with the logical-axis shardings as outputs,
  so no device ever holds the whole model. The values do not depend on the mesh (JAX's
  partitionable threefry), which makes runs on different meshes comparable.
  """
  import jax
  from flax import nnx

  from rtpurbo_jax import sharding as shd
  from rtpurbo_jax.models.transformer import Transformer

  def make():
    return Transformer(model_cfg, sparse=sparse, plan=plan, dtype=dtype, rngs=nnx.Rngs(seed),
                       init_std=init_std)

  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  shardings = shd.state_shardings(abstract, mesh)
  state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


class RandomBatches:
  """Host batches {"ids": int32 [batch_size, seq_len]} of seeded random tokens (no state)."""

  def __init__(self, vocab: int, batch_size: int, seq_len: int, seed: int):
    import numpy as np
    self.rng = np.random.default_rng(seed)
    self.shape, self.vocab = (batch_size, seq_len), vocab

  def __next__(self):
    return {"ids": self.rng.integers(0, self.vocab, self.shape).astype("int32")}


# ---------------------------------------------------------------------------
# Memory.


def device_peaks() -> list[int] | None:
  """Allocator peak bytes per local device, or None where the backend does not report it."""
  import jax
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # CPU and some plugins have no allocator statistics
      stats = None
    if not stats or "peak_bytes_in_use" not in stats:
      return None
    peaks.append(int(stats["peak_bytes_in_use"]))
  return peaks


def per_device_bytes(*trees) -> int:
  """Bytes the first device holds of the (sharded) arrays in `trees`."""
  from rtpurbo_jax.infer.engine import tree_bytes
  return sum(tree_bytes(t, per_device=True) for t in trees)


# ---------------------------------------------------------------------------
# Phases.


def run_train(cfg, model, plan, mesh, seq_len: int, steps: int) -> dict:
  """`steps` stage-1 steps on random sequences; returns timings, losses and memory."""
  import jax

  from rtpurbo_jax.attention.indexer import IndexerParam
  from rtpurbo_jax.train import stages
  from rtpurbo_jax.train.trainer import ParamSplit, RunOptions, Trainer

  o = cfg.train.stage1
  o.seq_len = seq_len
  o.steps = steps
  o.query_min_pos = min(o.query_min_pos, seq_len - 1)
  sparse = stages.pipeline_sparse(cfg)
  teacher = stages.with_mode(model, "dense", plan=plan, sparse=sparse)
  task = stages.stage1_task(ParamSplit(teacher, IndexerParam), o, sparse)
  with tempfile.TemporaryDirectory(prefix="multigpu_") as work:
    run = RunOptions(ckpt_dir=os.path.join(work, "ckpt"), workdir=work, seed=cfg.seed,
                     checkpoint_every=10 ** 9, keep_checkpoints=1, async_checkpoint=False,
                     log_every=10 ** 9, progress=False)
    trainer = Trainer(task, teacher, o, run, mesh)
    stamps = [time.perf_counter()]
    history = trainer.fit(RandomBatches(model.cfg.vocab_size, o.batch_size, seq_len, cfg.seed),
                          on_step=lambda step, m: stamps.append(time.perf_counter()))
    params_dev = per_device_bytes(trainer.trainable, trainer.frozen, trainer.opt_state)
  times = [b - a for a, b in zip(stamps, stamps[1:])]
  steady = times[1:] or times
  out = {
      "seq_len": seq_len, "steps": len(history), "batch_size": int(o.batch_size),
      "losses": [h["loss"] for h in history],
      "step_s": times, "first_step_s": times[0] if times else None,
      "step_s_median": statistics.median(steady) if steady else None,
      "tokens_per_s": (seq_len * o.batch_size / statistics.median(steady)) if steady else None,
      "params_and_opt_bytes_per_device": params_dev,
      "peak_bytes_per_device": device_peaks(),
  }
  jax.clear_caches()
  return out


def run_infer(cfg, model, plan, mesh, ctx: int, max_new: int, chunk: int) -> dict:
  """Chunked prefill of a random prompt filling `ctx`, then greedy decode."""
  import numpy as np

  from rtpurbo_jax.infer import memory
  from rtpurbo_jax.infer.engine import Engine, Sampling

  prompt_len = ctx - max_new
  if prompt_len < 1:
    raise ValueError(f"--ctx={ctx} leaves no room for a prompt with --max_new_tokens={max_new}")
  dev_mem = memory.parse_bytes(FLAGS.device_memory) if FLAGS.device_memory else None
  mem = memory.plan_memory(model.cfg, model.sparse, plan, ctx, batch=1, dtype=cfg.dtype,
                           mesh_shape=dict(mesh.shape), device_memory=dev_mem,
                           prefill_chunk=chunk, n_devices=mesh.size)
  print(mem.describe())
  memory.check_memory(mem)
  ids = np.random.default_rng(cfg.seed + 1).integers(0, model.cfg.vocab_size,
                                                     (1, prompt_len)).astype(np.int32)
  engine = Engine(model, mesh=mesh, progress=False)
  res = engine.generate(ids, max_new, sampling=Sampling(), max_len=ctx, prefill_chunk=chunk,
                        seed=cfg.seed)
  s = res.summary
  return {
      "ctx": ctx, "prompt_tokens": prompt_len, "max_new_tokens": max_new,
      "prefill_chunk": s["prefill_chunk"], "chunks": s["chunks"], "compile_s": s["compile_s"],
      "prefill_s": s["prefill_s"], "prefill_tok_s": s["prefill_tok_s"],
      "decode_s": s["decode_s"], "decode_tok_s": s["decode_tok_s"],
      "selected_fraction": s["selected_fraction"],
      "cache_bytes": s["cache_bytes"], "cache_bytes_per_device": s["cache_bytes_per_device"],
      "weight_bytes_per_device": per_device_bytes(engine.state),
      "planned_bytes_per_device": mem.total_per_device,
      "peak_bytes_per_device": device_peaks(),
      "tokens": res.tokens[0].tolist(),
  }


# ---------------------------------------------------------------------------


def environment(mesh) -> dict:
  import flax
  import jax
  d = jax.devices()[0]
  return {"device_kind": d.device_kind, "platform": d.platform, "devices": jax.device_count(),
          "processes": jax.process_count(), "mesh": {k: int(v) for k, v in mesh.shape.items()},
          "jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = cli.checked_config(_CONFIG)
  # Our lines on stdout; libraries (orbax logs every file it writes) only from WARNING.
  logging.getLogger().setLevel(logging.WARNING)
  from rtpurbo_jax import sharding as shd
  from rtpurbo_jax.config import model_config_from, parse_size
  from rtpurbo_jax.infer.memory import fmt, synthetic_plan
  from rtpurbo_jax.train import stages

  seq_len, ctx = parse_size(FLAGS.seq_len), parse_size(FLAGS.ctx)
  chunk = parse_size(FLAGS.prefill_chunk or cfg.infer.prefill_chunk)
  if seq_len < 2 or FLAGS.steps < 1 or FLAGS.max_new_tokens < 1 or chunk < 1:
    print("error: --seq_len must be >= 2 and --steps, --max_new_tokens, --prefill_chunk >= 1",
          file=sys.stderr)
    return 2
  mesh = shd.make_mesh(dict(cfg.mesh.to_dict()))
  model_cfg = model_config_from(cfg.model)
  sparse = stages.pipeline_sparse(cfg)
  plan = synthetic_plan(model_cfg, cfg.plan.retrieval_ratio, cfg.seed)
  model = build_model(model_cfg, sparse, plan, cfg.dtype, cfg.seed, mesh, FLAGS.init_std)
  report = {"config": cfg.name, "dtype": cfg.dtype, "env": environment(mesh),
            "plan": plan.summary()}
  print(f"{cfg.name}: {model_cfg.num_params() / 1e9:.3f}B params ({cfg.dtype}) on mesh "
        f"{report['env']['mesh']} of {report['env']['device_kind']}")
  phases = FLAGS.phases.split(",")
  if "train" in phases:
    t = report["train"] = run_train(cfg, model, plan, mesh, seq_len, FLAGS.steps)
    print(f"stage 1 @ {seq_len} tokens: step {t['step_s_median']:.3f}s (first "
          f"{t['first_step_s']:.1f}s), {t['tokens_per_s']:.0f} tok/s, losses "
          f"{[round(x, 5) for x in t['losses']]}, params+opt {fmt(t['params_and_opt_bytes_per_device'])}"
          "/device")
  if "infer" in phases:
    r = report["infer"] = run_infer(cfg, model, plan, mesh, ctx, FLAGS.max_new_tokens, chunk)
    print(f"infer @ {ctx} tokens: prefill {r['prefill_s']:.2f}s ({r['prefill_tok_s']:.0f} "
          f"tok/s), decode {r['decode_tok_s']:.1f} tok/s, cache "
          f"{fmt(r['cache_bytes_per_device'])}/device, weights "
          f"{fmt(r['weight_bytes_per_device'])}/device, tokens {r['tokens']}")
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    tmp = FLAGS.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(report, f, indent=1)
    os.replace(tmp, FLAGS.out)
    print(f"wrote {FLAGS.out}")
  return 0


if __name__ == "__main__":
  cli.run(main)
