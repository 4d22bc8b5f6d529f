"""Long-context evaluation: tasks x lengths x modes, perplexity, decode sparsity.

  python -m rtpurbo_jax.eval --config=configs/smollm2_135m.py \
      --config.eval.lengths=2K,4K,8K --config.eval.modes=dense,rtpurbo,streaming,topk

Writes results.json, results.md and PNG plots to `eval.out_dir` after every length (see
rtpurbo_jax/eval/report.py). The head plan comes from `plan.path`, else the model's
headwise_config, else a needle calibration; the sparse knobs (window, top_p, ...) from the
config's `sparse`; dense / streaming run `eval.baseline_model`, rtpurbo / topk `eval.model`.

  python -m rtpurbo_jax.eval --config=configs/smollm2_135m.py \
      --config.eval.reproduce=eval_results/repro/results.json --config.eval.out_dir=/tmp/re

reruns the run recorded in that results.json (config, plan, settings) and checks identical
predictions and perplexities to 1e-4 relative; writes reproduce.json, exits 1 on a mismatch.
"""

from __future__ import annotations

import json
import os
import sys

from rtpurbo_jax import cli
from rtpurbo_jax.files import atomic_write

_CONFIG = cli.define_config(os.path.join("configs", "smollm2_135m.py"))


def main(argv):
  if len(argv) > 1:
    raise cli.ConfigError(f"unexpected arguments {argv[1:]}: use --config.eval.<key>=<value>")
  cfg = cli.checked_config(_CONFIG)
  from rtpurbo_jax import assets
  assets.enable_compilation_cache()
  from rtpurbo_jax.eval import report, runner
  if cfg.eval.reproduce:
    out = runner.reproduce(cfg, cfg.eval.reproduce, progress=True)
    fresh = out.pop("fresh")
    out_dir = fresh["settings"]["out_dir"]
    report.write(fresh, out_dir)
    path = os.path.join(out_dir, "reproduce.json")
    atomic_write(path, (json.dumps(out, indent=1) + "\n").encode())
    print(f"{'reproduced' if out['ok'] else 'NOT reproduced'}: {out['predictions']} predictions, "
          f"{out['perplexities']} perplexities checked against {cfg.eval.reproduce} ({path})")
    for line in out["mismatches"][:20]:
      print("  " + line)
    if not out["ok"]:
      sys.exit(1)
    return
  settings = runner.EvalSettings.from_config(cfg.eval)  # checks the eval section first
  # Files after every length: a run stopped by its time limit keeps the finished lengths.
  results = runner.run_from_config(cfg, on_length=lambda r: report.write(r, settings.out_dir))
  for path in report.write(results, settings.out_dir):
    print(path)


if __name__ == "__main__":
  cli.run(main)
