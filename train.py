"""Convert a full-attention LLM into an RTPurbo model: calibrate -> stage1 -> stage2.

  python train.py --config=configs/smollm2_135m.py \
      --config.data.train_files='corpus/*.txt' --config.train.workdir=runs/smollm2

`--config.train.stages` picks the stages (calibrate, stage1, stage2, lm; comma-separated, run
in order). The workdir receives config.json, plan.json, metrics (JSONL + TensorBoard),
orbax checkpoints, the stage-2 teacher logits and final/ (HF format with headwise_config and
the indexer). Re-running the same command resumes where the last run stopped.
"""

from __future__ import annotations

import logging
import sys

from absl import app

from rtpurbo_jax import cli

_CONFIG = cli.define_config("configs/tiny.py")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = cli.checked_config(_CONFIG)
  # Our progress lines at INFO; libraries (orbax logs every file it renames) at WARNING.
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("rtpurbo_jax").setLevel(logging.INFO)
  from rtpurbo_jax.train import data as data_lib
  from rtpurbo_jax.train import stages
  try:
    stages.run_pipeline(cfg)
  except (data_lib.DataError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  cli.run(main)
