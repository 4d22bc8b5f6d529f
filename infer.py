"""Run an RTPurbo (or dense / streaming / top-k) model: answer a prompt, find a passkey, or
plan memory for a context length.

  python infer.py                                  SmolLM2-135M + its RTPurbo artifacts on CPU:
                                                   hide a passkey in 4K tokens of Shakespeare,
                                                   ask for it, report whether it was found
  python infer.py --prompt="Who is Prospero?"      your prompt (chat template applied)
  python infer.py --passkey_depth=0.9 --ctx=8K     the passkey demo elsewhere / longer
  python infer.py --config=configs/llama8b.py --dry_run --ctx=1M --device_memory=141G
                                                   memory plan, dense vs rtpurbo (no weights)
  python infer.py --config=configs/llama8b.py --random_weights --ctx=128K
                                                   shape-only run with random weights and tokens
  python infer.py --config.sparse.sparse_prefill=True --config.sparse.min_blocks=0
                                                   retrieval heads indexer-sparse in prefill too
                                                   (beyond the paper, which keeps them dense;
                                                   it takes no floor under top-p)

Configuration: `--config=configs/<name>.py` (default configs/smollm2_135m.py) with any value
overridden as `--config.section.key=value` (e.g. --config.sparse.top_p=0.95,
--config.infer.temperature=0.7, --config.mesh.tensor=2). The flags below override the matching
config values. Before allocating, the weights + KV cache + workspace per device are checked
against the device memory; a run that does not fit stops with the numbers and the largest
context that would fit.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags

from rtpurbo_jax import cli
from rtpurbo_jax.infer import command

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "smollm2_135m.py")

_CONFIG = cli.define_config(_DEFAULT_CONFIG, "Run config file (ml_collections).")
flags.DEFINE_string("ctx", None, "Context length: 4K | 128K | 1M | any number of tokens "
                    "(default: config.infer.ctx). Passkey/random prompts fill it; prompt runs "
                    "must fit in it; --dry_run plans for it.")
flags.DEFINE_string("model", None, "HF model folder or registered name (e.g. smollm2-135m, "
                    "smollm2-135m-rtpurbo); overrides config.infer.model / config.model_path.")
flags.DEFINE_bool("random_weights", False, "Random weights from config.model (shape-only runs: "
                  "the prompt is random token ids filling --ctx).")
flags.DEFINE_enum("mode", None, command.MODES, "Attention mode (default: config.sparse.mode).")
flags.DEFINE_string("prompt", None, "Prompt text.")
flags.DEFINE_string("prompt_file", None, "Read the prompt from this file.")
flags.DEFINE_bool("passkey", True, "Passkey demo, the default run when no --prompt / "
                  "--prompt_file is given: Shakespeare filling --ctx with a passkey at "
                  "--passkey_depth; reports whether the answer contains it. --nopasskey "
                  "answers a default question instead.")
flags.DEFINE_float("passkey_depth", 0.5, "Where the passkey sits, 0 (start) .. 1 (end).")
flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate (default: "
                     "config.infer.max_new_tokens).")
flags.DEFINE_bool("dry_run", False, "Print the memory plan for dense and rtpurbo (and --mode) "
                  "at --ctx, then exit without loading weights.")
flags.DEFINE_string("device_memory", None, "Memory per device, e.g. 141G or 80GB or 139GiB "
                    "(default: detected; host RAM on CPU).")
flags.DEFINE_bool("chat", True, "Wrap the prompt in the tokenizer's chat template (if any).")
flags.DEFINE_bool("stream", True, "Print the answer token by token.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from rtpurbo_jax import assets
  assets.enable_compilation_cache()
  from rtpurbo_jax.config import ConfigError
  from rtpurbo_jax.infer.memory import MemoryPlanError

  # Every field of Options is the flag of the same name, so the package never reads FLAGS.
  opts = command.Options(**{f.name: FLAGS[f.name].value
                            for f in dataclasses.fields(command.Options)})
  try:
    command.main(cli.load_config(_CONFIG), opts)
  except (command.CliError, ConfigError, MemoryPlanError, FileNotFoundError, ValueError) as e:
    print(f"infer.py: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl would exit 1 on --help
  cli.run(main)
