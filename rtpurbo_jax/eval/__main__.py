"""Long-context evaluation: tasks x lengths x modes, perplexity, decode sparsity.

  python -m rtpurbo_jax.eval --config=configs/smollm2_135m.py \
      --config.eval.lengths=2K,4K,8K --config.eval.modes=dense,rtpurbo,streaming,topk

Writes results.json, results.md and PNG plots to `eval.out_dir` (see rtpurbo_jax/eval/report.py).
The head plan comes from `plan.path`, else the model's headwise_config, else a needle
calibration; the sparse knobs (window, top_p, top-k budget, ...) from the config's `sparse`.
"""

from __future__ import annotations

import os

from rtpurbo_jax import cli

_CONFIG = cli.define_config(os.path.join("configs", "smollm2_135m.py"))


def main(argv):
  if len(argv) > 1:
    raise cli.ConfigError(f"unexpected arguments {argv[1:]}: use --config.eval.<key>=<value>")
  cfg = cli.checked_config(_CONFIG)
  from rtpurbo_jax import assets
  assets.enable_compilation_cache()
  from rtpurbo_jax.eval import report, runner
  settings = runner.EvalSettings.from_config(cfg.eval)  # checks the eval section first
  results = runner.run_from_config(cfg)
  for path in report.write(results, settings.out_dir):
    print(path)


if __name__ == "__main__":
  cli.run(main)
