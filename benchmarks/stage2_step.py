"""Where a stage-2 step's time goes: the bare loss gradient against the Trainer's step.

SmolLM2-135M shape (fp32, random weights) with the committed plan in rtpurbo mode, 4K tokens
per sequence, top-10 KL at 300 label positions, per-layer remat (what `gpu_run.py stage2`
runs). Rows, each timed after a first (compiling) call:

  bare/b1        jit(value_and_grad(loss)) on one sequence
  bare/b8        the same on a batch of 8 sequences in one call
  trainer/full   `Trainer.step` on a global batch of 8 (micro-batch 1: a scan of 8 gradient
                 accumulations), every backbone weight trained, AdamW update included
  trainer/lora   the same with LoRA rank 16 (the backbone frozen)

  python benchmarks/stage2_step.py --out DIR      # on the GPU
  python benchmarks/stage2_step.py --smoke        # CPU: tiny shapes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import stage1_speed  # noqa: E402
from rtpurbo_jax import lowrank, sharding  # noqa: E402
from rtpurbo_jax.config import run_config  # noqa: E402
from rtpurbo_jax.train import losses, stages  # noqa: E402
from rtpurbo_jax.train.trainer import ParamSplit, RunOptions, Trainer  # noqa: E402


def _timed(fn, reps: int):
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fn())
  return first, (time.perf_counter() - t) / reps


def batch_of(model, b: int, seq: int, labels_n: int) -> dict:
  rng = np.random.default_rng(0)
  labels = np.zeros((b, seq), bool)
  labels[:, -labels_n:] = True
  return {"ids": rng.integers(0, model.cfg.vocab_size, (b, seq), dtype=np.int32),
          "labels": labels,
          "t_ids": rng.integers(0, model.cfg.vocab_size, (b, seq, 10), dtype=np.int32),
          "t_logits": rng.standard_normal((b, seq, 10)).astype(np.float32)}


def bare(student, batch: dict, reps: int):
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)

  def loss(params, rest, mb):
    m = nnx.merge(graphdef, params, rest)
    h = losses.hidden_states(m, mb["ids"], sparse_queries=mb["labels"], remat=True)
    w, tied = losses.output_rows(m)
    kl, n = losses.topk_kl(h, w, tied, mb["t_ids"], mb["t_logits"], mb["labels"], chunk=512)
    return kl / n

  fn = jax.jit(jax.value_and_grad(loss))
  dev = {k: jnp.asarray(v) for k, v in batch.items()}
  return _timed(lambda: fn(params, rest, dev), reps)


def trainer_step(student, batch: dict, lora_rank: int, reps: int):
  o = run_config().train.stage2
  o.update(steps=100, lr=3e-6, warmup=10, batch_size=len(batch["ids"]), micro_batch=1,
           seq_len=batch["ids"].shape[1])
  split = (lowrank.LoraSplit(student, lora_rank, 16.0, norms=True, seed=0) if lora_rank
           else ParamSplit(student, stages.BACKBONE))
  task = stages.stage2_task(split, o, remat=True)
  work = tempfile.mkdtemp()
  run = RunOptions(ckpt_dir=os.path.join(work, "ckpt"), workdir=work, progress=False)
  mesh = sharding.make_mesh({})
  tr = Trainer(task, student, o, run, mesh)
  step = [0]

  def one():
    step[0] += 1
    return tr.step(batch, step[0])["loss"]

  return _timed(one, reps)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="")
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--rows", default="bare/b1,bare/b8,trainer/full,trainer/lora")
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  labels_n = 300
  if args.smoke:
    args.seq, args.reps, labels_n = 64, 1, 16
  model = stage1_speed.build_model(argparse.Namespace(smoke=args.smoke, model=""))
  student = stages.with_mode(model, "rtpurbo")
  rows: dict = {}
  for name in args.rows.split(","):
    b = 1 if name == "bare/b1" else 8
    batch = batch_of(model, b, args.seq, labels_n)
    try:
      if name.startswith("bare"):
        first, t = bare(student, batch, args.reps)
      else:
        first, t = trainer_step(student, batch, 16 if name.endswith("lora") else 0, args.reps)
      rows[name] = {"s": t, "s_per_sequence": t / b, "first_call_s": first}
    except Exception as e:  # one failing row must not lose the others
      rows[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
      traceback.print_exc()
    print(name, rows[name], flush=True)
  dev = jax.devices()[0]
  result = {"device": str(dev.device_kind), "platform": dev.platform, "jax": jax.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "env": {k: os.environ.get(k, "") for k in ("RTPURBO_KERNELS", "XLA_FLAGS")},
            "seq": args.seq, "rows": rows}
  print("\n%-16s %10s %14s %14s" % ("row", "s", "s/sequence", "first call s"))
  for name, r in rows.items():
    print("%-16s %10.3f %14.3f %14.1f %s" % (name, r.get("s", 0), r.get("s_per_sequence", 0),
                                            r.get("first_call_s", 0), r.get("error", "")[:60]))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stage2_step.json"), "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
