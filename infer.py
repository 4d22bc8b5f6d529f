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
  python infer.py --config.sparse.sparse_prefill=True
                                                   retrieval heads indexer-sparse in prefill too
                                                   (beyond the paper, which keeps them dense)

Configuration: `--config=configs/<name>.py` (default configs/smollm2_135m.py) with any value
overridden as `--config.section.key=value` (e.g. --config.sparse.top_p=0.95,
--config.infer.temperature=0.7, --config.mesh.tensor=2). The flags below override the matching
config values. Before allocating, the weights + KV cache + workspace per device are checked
against the device memory; a run that does not fit stops with the numbers and the largest
context that would fit.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from rtpurbo_jax import cli
from rtpurbo_jax.attention.routing import selects_blocks
from rtpurbo_jax.infer import load
from rtpurbo_jax.infer.load import head_plan

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "smollm2_135m.py")
DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
PREAMBLE_CHARS = 6000  # the Project Gutenberg header of the first play
_MODES = ("rtpurbo", "dense", "streaming", "topk")

_CONFIG = cli.define_config(_DEFAULT_CONFIG, "Run config file (ml_collections).")
flags.DEFINE_string("ctx", None, "Context length: 4K | 128K | 1M | any number of tokens "
                    "(default: config.infer.ctx). Passkey/random prompts fill it; prompt runs "
                    "must fit in it; --dry_run plans for it.")
flags.DEFINE_string("model", None, "HF model folder or registered name (e.g. smollm2-135m, "
                    "smollm2-135m-rtpurbo); overrides config.infer.model / config.model_path.")
flags.DEFINE_bool("random_weights", False, "Random weights from config.model (shape-only runs: "
                  "the prompt is random token ids filling --ctx).")
flags.DEFINE_enum("mode", None, _MODES, "Attention mode (default: config.sparse.mode).")
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


class CliError(Exception):
  """A user-facing error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------
# Configuration.


def resolve_config(cfg):
  """Apply the flags to the config and validate it. Returns (cfg, ctx)."""
  from rtpurbo_jax.config import parse_size, validate

  if FLAGS.ctx is not None:
    cfg.infer.ctx = FLAGS.ctx
  if FLAGS.model is not None:
    cfg.model_path = FLAGS.model
  elif cfg.infer.model and not FLAGS.random_weights:
    cfg.model_path = cfg.infer.model
  if FLAGS.mode is not None:
    cfg.sparse.mode = FLAGS.mode
  if FLAGS.max_new_tokens is not None:
    cfg.infer.max_new_tokens = FLAGS.max_new_tokens
  validate(cfg)
  ctx = parse_size(cfg.infer.ctx)
  if ctx < 1:
    raise CliError(f"--ctx={cfg.infer.ctx} must be at least 1 token")
  if cfg.infer.max_new_tokens < 1:
    raise CliError(f"max_new_tokens={cfg.infer.max_new_tokens} must be >= 1")
  if FLAGS.prompt is not None and FLAGS.prompt_file is not None:
    raise CliError("give either --prompt or --prompt_file, not both")
  if FLAGS.prompt is not None and not FLAGS.prompt.strip():
    raise CliError("--prompt is empty: give a question, or leave --prompt out for the "
                   "passkey demo")
  if int(cfg.infer.batch) < 1:
    raise CliError(f"config.infer.batch={cfg.infer.batch} must be >= 1")
  if not 0.0 <= FLAGS.passkey_depth <= 1.0:
    raise CliError(f"--passkey_depth={FLAGS.passkey_depth} must be in [0, 1]")
  return cfg, ctx


def model_config(cfg, resolve: bool = False):
  """The architecture: from the model folder's config.json when there is one, else cfg.model.

  resolve: also turn a registered name into its folder (building it on first use).
  """
  from rtpurbo_jax.config import model_config_from

  path = os.path.expanduser(cfg.model_path) if cfg.model_path else ""
  if path and not FLAGS.random_weights:
    from rtpurbo_jax.hf import api, config_io
    if resolve:
      path = api.resolve(cfg.model_path)
    if os.path.isfile(os.path.join(path, "config.json")):
      return config_io.model_config_from_hf(config_io.read_config_json(path))
  return model_config_from(cfg.model)


def folder_plan(cfg, model_cfg):
  """The head plan stored in the model folder's config.json (headwise_config), or None."""
  if not cfg.model_path or FLAGS.random_weights:
    return None
  from rtpurbo_jax.attention.plan import HeadPlan
  from rtpurbo_jax.hf import api, config_io

  d = config_io.read_config_json(api.resolve(cfg.model_path))
  if "headwise_config" not in d:
    return None
  return HeadPlan.from_headwise_config(d["headwise_config"], model_cfg.num_kv_heads)[0]


def mesh_shape(cfg):
  return {k: int(v) for k, v in cfg.mesh.items()}


# ---------------------------------------------------------------------------
# Memory planning.


def memory_plan(cfg, model_cfg, plan, ctx, mode=None):
  import dataclasses

  from rtpurbo_jax.config import sparse_config_from
  from rtpurbo_jax.infer import memory

  sparse = sparse_config_from(cfg.sparse)
  if mode is not None:
    sparse = dataclasses.replace(sparse, mode=mode)
  dev_mem = memory.parse_bytes(FLAGS.device_memory) if FLAGS.device_memory else None
  return memory.plan_memory(model_cfg, sparse, plan, ctx, batch=int(cfg.infer.batch),
                            dtype=cfg.dtype, mesh_shape=mesh_shape(cfg), device_memory=dev_mem,
                            prefill_chunk=int(cfg.infer.prefill_chunk))


def dry_run(cfg, model_cfg, ctx):
  from rtpurbo_jax.infer.memory import fmt

  plan, note = head_plan(cfg, model_cfg)
  print(f"model: {cfg.name} ({model_cfg.family}, {model_cfg.num_layers} layers, "
        f"{model_cfg.num_heads} q / {model_cfg.num_kv_heads} kv heads, "
        f"{model_cfg.num_params() / 1e9:.2f}B params, {cfg.dtype})")
  print(f"plan: {note}; {plan.summary()['retrieval_heads']} retrieval heads, "
        f"{plan.summary()['full_kv_heads']} of {plan.summary()['kv_heads']} KV heads full")
  modes = ["dense", "rtpurbo"] + ([cfg.sparse.mode] if cfg.sparse.mode not in
                                  ("dense", "rtpurbo") else [])
  plans = {mode: memory_plan(cfg, model_cfg, plan, ctx, mode) for mode in modes}
  for mem in plans.values():
    print(mem.describe())
  # The same caches as the plan lines (this run's sparse settings and dtype), not defaults.
  dense, sparse = plans["dense"].cache_bytes, plans["rtpurbo"].cache_bytes
  print(f"KV cache at {ctx} tokens: dense {fmt(dense)}, rtpurbo {fmt(sparse)} "
        f"({dense / max(sparse, 1):.2f}x smaller)")


# ---------------------------------------------------------------------------
# Prompts.


def chat_ids(tok, text: str) -> list[int]:
  if FLAGS.chat and getattr(tok, "chat_template", None):
    text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                   add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])
  return list(tok(text)["input_ids"])


def passkey_prompt(tok, ctx: int, max_new: int, depth: float, seed: int):
  """(prompt ids, passkey): Shakespeare filling `ctx` tokens with the key at `depth`.

  Completion style (no chat template): the prompt ends with the needle's own opening words,
  so even a small model answers by recalling the number that followed them.
  """
  import numpy as np

  from rtpurbo_jax import assets

  key = str(np.random.default_rng(seed).integers(10000, 100000))
  needle = f"\nThe pass key is {key}.\n"
  question = "\n\nThe pass key is"
  text = assets.shakespeare_text()[PREAMBLE_CHARS:]
  budget = ctx - max_new

  def encode(t):
    return list(tok(t, add_special_tokens=False)["input_ids"])

  n_fill = budget - len(encode(needle + question)) - 1
  if n_fill < 1:
    raise CliError(f"--ctx={ctx} is too short for the passkey prompt with {max_new} new tokens")
  chars = min(len(text), 6 * n_fill)
  while True:
    filler = encode(text[:chars])
    if len(filler) >= n_fill or chars >= len(text):
      break
    chars = min(len(text), 2 * chars)
  reps = -(-n_fill // max(1, len(filler)))
  filler = (filler * reps)[:n_fill]
  for _ in range(4):  # re-tokenizing the joined text can shift the count a little
    cut = int(round(depth * len(filler)))
    ids = encode(tok.decode(filler[:cut]) + needle + tok.decode(filler[cut:]) + question)
    if len(ids) <= budget:
      return ids, key
    filler = filler[:len(filler) - (len(ids) - budget) - 8]
  raise CliError("could not fit the passkey prompt into --ctx")


def random_prompt(vocab_size: int, n: int, seed: int) -> list[int]:
  """`n` random token ids (shape-only runs)."""
  import numpy as np
  return np.random.default_rng(seed).integers(0, vocab_size, n).tolist()


def prompt_ids(tok, ctx: int, max_new: int, seed: int):
  """(ids, passkey or None): the passkey demo, --prompt_file, --prompt or the default
  question."""
  if FLAGS.passkey and FLAGS.prompt is None and FLAGS.prompt_file is None:
    return passkey_prompt(tok, ctx, max_new, FLAGS.passkey_depth, seed)
  if FLAGS.prompt_file:
    with open(FLAGS.prompt_file, encoding="utf-8") as f:
      text = f.read()
    if not text.strip():
      raise CliError(f"--prompt_file={FLAGS.prompt_file} is empty")
  else:
    text = FLAGS.prompt if FLAGS.prompt is not None else DEFAULT_PROMPT
  return chat_ids(tok, text), None


# ---------------------------------------------------------------------------
# Model.


def load_model(cfg, model_cfg, mode_sparse):
  """(model, plan note): pretrained or random weights, rebuilt with the run's plan and mode."""
  path = "" if FLAGS.random_weights else cfg.model_path
  return load.load_model(cfg, mode_sparse, path=path, model_cfg=model_cfg)


def eos_ids(tok, model_cfg) -> tuple[int, ...]:
  ids = set()
  for e in (getattr(tok, "eos_token_id", None), model_cfg.eos_token_id):
    if e is None:
      continue
    ids.update(e if isinstance(e, (tuple, list)) else (e,))
  return tuple(sorted(int(i) for i in ids))


def run(cfg, ctx):
  import numpy as np

  import jax
  from rtpurbo_jax import sharding
  from rtpurbo_jax.config import sparse_config_from
  from rtpurbo_jax.infer import memory
  from rtpurbo_jax.infer.engine import Engine, Sampling

  model_cfg = model_config(cfg, resolve=True)
  sparse = sparse_config_from(cfg.sparse)
  max_new = int(cfg.infer.max_new_tokens)
  batch = int(cfg.infer.batch)

  tok = None
  if cfg.model_path and not FLAGS.random_weights:
    import rtpurbo_jax
    tok = rtpurbo_jax.load_tokenizer(cfg.model_path)
  def check_memory(need):
    """Plan memory for what will be allocated, before building or loading anything big."""
    plan_for_check, _ = head_plan(cfg, model_cfg, folder_plan(cfg, model_cfg))
    memory.check_memory(memory_plan(cfg, model_cfg, plan_for_check, need))

  key = None
  if tok is None:
    if FLAGS.passkey or FLAGS.prompt or FLAGS.prompt_file:
      print("note: no tokenizer with --random_weights; the prompt is random token ids")
    n = ctx - max_new if ctx > max_new else 1
    check_memory(n + max_new)
    ids = random_prompt(model_cfg.vocab_size, n, cfg.seed)
  else:
    ids, key = prompt_ids(tok, ctx, max_new, cfg.seed)
    need = len(ids) + max_new
    if need > ctx:
      raise CliError(f"the prompt has {len(ids)} tokens; with max_new_tokens={max_new} it "
                     f"needs {need} > --ctx={ctx}: raise --ctx or shorten the prompt")
    check_memory(need)

  model, note = load_model(cfg, model_cfg, sparse)
  print(f"model: {cfg.model_path or cfg.name}{' (random weights)' if FLAGS.random_weights else ''}"
        f", mode={sparse.mode}; {note if selects_blocks(sparse.mode) else 'no plan needed'}")
  mesh = None
  if jax.device_count() > 1:
    mesh = sharding.make_mesh(mesh_shape(cfg))
  engine = Engine(model, mesh=mesh, progress=True)

  eos = eos_ids(tok, model_cfg) if tok is not None else ()
  shown = {"ids": [], "text": "", "ended": False}

  def on_token(step, toks):
    """Print row 0's answer as it grows (decoding the whole answer keeps multi-byte text)."""
    if tok is None or not FLAGS.stream or shown["ended"]:
      return
    if step == 0:
      sys.stdout.write("answer: ")
    if int(toks[0]) in eos:
      shown["ended"] = True
      return
    shown["ids"].append(int(toks[0]))
    text = tok.decode(shown["ids"], skip_special_tokens=True)
    sys.stdout.write(text[len(shown["text"]):])
    sys.stdout.flush()
    shown["text"] = text

  # Pad the prompt to a bucket so that prompts of similar length share compiled executables.
  bucket = min(-(-len(ids) // 128) * 128, ctx - max_new)
  prompt = np.asarray([ids + [0] * (bucket - len(ids))] * batch, np.int32)
  res = engine.generate(
      prompt, max_new, sampling=Sampling(float(cfg.infer.temperature), int(cfg.infer.top_k),
                                         float(cfg.infer.top_p)),
      prompt_lengths=np.full((batch,), len(ids)), max_len=min(ctx, bucket + max_new),
      eos_token_id=eos, pad_token_id=int(eos[0]) if eos else 0, seed=int(cfg.seed),
      prefill_chunk=int(cfg.infer.prefill_chunk), on_token=on_token)
  answer = None
  if tok is not None:
    row = [int(t) for t in res.tokens[0]]
    cut = next((i for i, t in enumerate(row) if t in eos), len(row))
    answer = tok.decode(row[:cut], skip_special_tokens=True).strip()
    print() if FLAGS.stream else print(f"answer: {answer}")
  s = res.summary
  frac, pfrac = s["selected_fraction"], s.get("prefill_selected_fraction")
  print(f"prompt {s['prompt_tokens']} tokens, {s['generated_tokens']} generated | TTFT "
        f"{s['ttft_s']:.2f}s, prefill {s['prefill_tok_s']:.0f} tok/s, decode "
        f"{s['decode_tok_s']:.1f} tok/s | KV cache {memory.fmt(s['cache_bytes'])}"
        + (f" | mean selected-block fraction {frac:.3f}" if frac is not None else "")
        + (f" (prefill {pfrac:.3f})" if pfrac is not None else "")
        + f" | compile {s['compile_s']:.1f}s")
  if key is not None:
    found = key in (answer or "")
    print(f"passkey {key}: {'FOUND' if found else 'NOT FOUND'} in the answer")
  return res


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from rtpurbo_jax import assets
  assets.enable_compilation_cache()
  from rtpurbo_jax.config import ConfigError
  from rtpurbo_jax.infer.memory import MemoryPlanError

  try:
    cfg, ctx = resolve_config(cli.load_config(_CONFIG))
    if FLAGS.dry_run:
      dry_run(cfg, model_config(cfg), ctx)
      return 0
    run(cfg, ctx)
  except (CliError, ConfigError, MemoryPlanError, FileNotFoundError, ValueError) as e:
    print(f"infer.py: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl would exit 1 on --help
  cli.run(main)
