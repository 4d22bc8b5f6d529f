"""What `python infer.py` does, as functions of the run config and its command-line options.

infer.py only defines the flags and builds `Options` from them once; everything here takes the
config and the options as arguments, so it runs (and is tested) without absl:

    main(cfg, Options(ctx="64K", random_weights=True))    # = infer.py --ctx=64K --random_weights

or step by step: `cfg, ctx = resolve_config(cfg, opts)`, then `dry_run` or `run(cfg, opts, ctx)`.

User errors are `CliError` (infer.py prints them as one line, exit status 2). Heavy modules
(jax, the model, tokenizers) are imported inside the functions so that `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from rtpurbo_jax import loading
from rtpurbo_jax.attention.routing import selects_blocks
from rtpurbo_jax.infer.prompts import passkey_prompt
from rtpurbo_jax.loading import eos_ids, head_plan

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
MODES = ("rtpurbo", "dense", "streaming", "topk")


class CliError(Exception):
  """A user-facing error: printed as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Options:
  """infer.py's command-line options (one field per flag, same name and default; None: the
  config's value). `Options()` is a plain `python infer.py`."""

  ctx: str | None = None
  model: str | None = None
  random_weights: bool = False
  mode: str | None = None
  prompt: str | None = None
  prompt_file: str | None = None
  passkey: bool = True
  passkey_depth: float = 0.5
  max_new_tokens: int | None = None
  dry_run: bool = False
  device_memory: str | None = None
  chat: bool = True
  stream: bool = True


# ---------------------------------------------------------------------------
# Configuration.


def resolve_config(cfg, opts: Options):
  """Apply the options to the config and validate it. Returns (cfg, ctx)."""
  from rtpurbo_jax.config import parse_size, validate

  if opts.ctx is not None:
    cfg.infer.ctx = opts.ctx
  if opts.model is not None:
    cfg.model_path = opts.model
  elif cfg.infer.model and not opts.random_weights:
    cfg.model_path = cfg.infer.model
  if opts.mode is not None:
    cfg.sparse.mode = opts.mode
  if opts.max_new_tokens is not None:
    cfg.infer.max_new_tokens = opts.max_new_tokens
  validate(cfg)
  ctx = parse_size(cfg.infer.ctx)
  if ctx < 1:
    raise CliError(f"--ctx={cfg.infer.ctx} must be at least 1 token")
  if cfg.infer.max_new_tokens < 1:
    raise CliError(f"max_new_tokens={cfg.infer.max_new_tokens} must be >= 1")
  if opts.prompt is not None and opts.prompt_file is not None:
    raise CliError("give either --prompt or --prompt_file, not both")
  if opts.prompt is not None and not opts.prompt.strip():
    raise CliError("--prompt is empty: give a question, or leave --prompt out for the "
                   "passkey demo")
  if int(cfg.infer.batch) < 1:
    raise CliError(f"config.infer.batch={cfg.infer.batch} must be >= 1")
  if not 0.0 <= opts.passkey_depth <= 1.0:
    raise CliError(f"--passkey_depth={opts.passkey_depth} must be in [0, 1]")
  return cfg, ctx


def model_config(cfg, opts: Options, resolve: bool = False):
  """The architecture: from the model folder's config.json when there is one, else cfg.model.

  resolve: also turn a registered name into its folder (building it on first use).
  """
  from rtpurbo_jax.config import model_config_from

  path = os.path.expanduser(cfg.model_path) if cfg.model_path else ""
  if path and not opts.random_weights:
    from rtpurbo_jax.hf import api, config_io
    if resolve:
      path = api.resolve(cfg.model_path)
    if os.path.isfile(os.path.join(path, "config.json")):
      return config_io.model_config_from_hf(config_io.read_config_json(path))
  return model_config_from(cfg.model)


def folder_plan(cfg, opts: Options, model_cfg):
  """The head plan stored in the model folder's config.json (headwise_config), or None."""
  if not cfg.model_path or opts.random_weights:
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


def memory_plan(cfg, opts: Options, model_cfg, plan, ctx, mode=None):
  """The memory plan of this run at `ctx` tokens (in `mode`, default the config's) against
  --device_memory, else the detected device memory."""
  from rtpurbo_jax.config import sparse_config_from
  from rtpurbo_jax.infer import memory

  sparse = sparse_config_from(cfg.sparse)
  if mode is not None:
    sparse = dataclasses.replace(sparse, mode=mode)
  dev_mem = memory.parse_bytes(opts.device_memory) if opts.device_memory else None
  return memory.plan_memory(model_cfg, sparse, plan, ctx, batch=int(cfg.infer.batch),
                            dtype=cfg.dtype, mesh_shape=mesh_shape(cfg), device_memory=dev_mem,
                            prefill_chunk=int(cfg.infer.prefill_chunk))


def dry_run(cfg, opts: Options, model_cfg, ctx):
  """Print the model, its head plan and the memory plans for dense and rtpurbo (and the
  config's mode) at `ctx` tokens, without loading weights."""
  from rtpurbo_jax.infer.memory import fmt

  plan, note = head_plan(cfg, model_cfg)
  print(f"model: {cfg.name} ({model_cfg.family}, {model_cfg.num_layers} layers, "
        f"{model_cfg.num_heads} q / {model_cfg.num_kv_heads} kv heads, "
        f"{model_cfg.num_params() / 1e9:.2f}B params, {cfg.dtype})")
  print(f"plan: {note}; {plan.summary()['retrieval_heads']} retrieval heads, "
        f"{plan.summary()['full_kv_heads']} of {plan.summary()['kv_heads']} KV heads full")
  modes = ["dense", "rtpurbo"] + ([cfg.sparse.mode] if cfg.sparse.mode not in
                                  ("dense", "rtpurbo") else [])
  plans = {mode: memory_plan(cfg, opts, model_cfg, plan, ctx, mode) for mode in modes}
  for mem in plans.values():
    print(mem.describe())
  # The same caches as the plan lines (this run's sparse settings and dtype), not defaults.
  dense, sparse = plans["dense"].cache_bytes, plans["rtpurbo"].cache_bytes
  print(f"KV cache at {ctx} tokens: dense {fmt(dense)}, rtpurbo {fmt(sparse)} "
        f"({dense / max(sparse, 1):.2f}x smaller)")


# ---------------------------------------------------------------------------
# Prompts.


def chat_ids(tok, text: str, chat: bool) -> list[int]:
  """Token ids of `text`, wrapped in the tokenizer's chat template when `chat` and it has one."""
  if chat and getattr(tok, "chat_template", None):
    text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                   add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])
  return list(tok(text)["input_ids"])


def random_prompt(vocab_size: int, n: int, seed: int) -> list[int]:
  """`n` random token ids (shape-only runs)."""
  import numpy as np
  return np.random.default_rng(seed).integers(0, vocab_size, n).tolist()


def prompt_ids(tok, opts: Options, ctx: int, max_new: int, seed: int):
  """(ids, passkey or None): the passkey demo, --prompt_file, --prompt or the default
  question."""
  if opts.passkey and opts.prompt is None and opts.prompt_file is None:
    return passkey_prompt(tok, ctx, max_new, opts.passkey_depth, seed)
  if opts.prompt_file:
    with open(opts.prompt_file, encoding="utf-8") as f:
      text = f.read()
    if not text.strip():
      raise CliError(f"--prompt_file={opts.prompt_file} is empty")
  else:
    text = opts.prompt if opts.prompt is not None else DEFAULT_PROMPT
  return chat_ids(tok, text, opts.chat), None


# ---------------------------------------------------------------------------
# The run.


def main(cfg, opts: Options) -> None:
  """infer.py's whole run on the loaded config: the memory plan (--dry_run) or `run`."""
  cfg, ctx = resolve_config(cfg, opts)
  if opts.dry_run:
    dry_run(cfg, opts, model_config(cfg, opts), ctx)
    return
  run(cfg, opts, ctx)


def load_model(cfg, opts: Options, model_cfg, mode_sparse):
  """(model, plan note): pretrained or random weights, rebuilt with the run's plan and mode."""
  path = "" if opts.random_weights else cfg.model_path
  return loading.load_model(cfg, mode_sparse, path=path, model_cfg=model_cfg)


def run(cfg, opts: Options, ctx: int):
  """Build the prompt, check memory, load the model and generate, printing the answer (streamed
  with --stream), the timings and, for the passkey demo, whether the key was found. Returns the
  engine's result."""
  import numpy as np

  import jax
  from rtpurbo_jax import sharding
  from rtpurbo_jax.config import sparse_config_from
  from rtpurbo_jax.infer import memory
  from rtpurbo_jax.infer.engine import Engine, Sampling

  model_cfg = model_config(cfg, opts, resolve=True)
  sparse = sparse_config_from(cfg.sparse)
  max_new = int(cfg.infer.max_new_tokens)
  batch = int(cfg.infer.batch)

  tok = None
  if cfg.model_path and not opts.random_weights:
    import rtpurbo_jax
    tok = rtpurbo_jax.load_tokenizer(cfg.model_path)
  def check_memory(need):
    """Plan memory for what will be allocated, before building or loading anything big."""
    plan_for_check, _ = head_plan(cfg, model_cfg, folder_plan(cfg, opts, model_cfg))
    memory.check_memory(memory_plan(cfg, opts, model_cfg, plan_for_check, need))

  key = None
  if tok is None:
    if opts.passkey or opts.prompt or opts.prompt_file:
      print("note: no tokenizer with --random_weights; the prompt is random token ids")
    n = ctx - max_new if ctx > max_new else 1
    check_memory(n + max_new)
    ids = random_prompt(model_cfg.vocab_size, n, cfg.seed)
  else:
    ids, key = prompt_ids(tok, opts, ctx, max_new, cfg.seed)
    need = len(ids) + max_new
    if need > ctx:
      raise CliError(f"the prompt has {len(ids)} tokens; with max_new_tokens={max_new} it "
                     f"needs {need} > --ctx={ctx}: raise --ctx or shorten the prompt")
    check_memory(need)

  model, note = load_model(cfg, opts, model_cfg, sparse)
  print(f"model: {cfg.model_path or cfg.name}{' (random weights)' if opts.random_weights else ''}"
        f", mode={sparse.mode}; {note if selects_blocks(sparse.mode) else 'no plan needed'}")
  mesh = None
  if jax.device_count() > 1:
    mesh = sharding.make_mesh(mesh_shape(cfg))
  engine = Engine(model, mesh=mesh, progress=True)

  eos = eos_ids(tok, model_cfg) if tok is not None else ()
  shown = {"ids": [], "text": "", "ended": False}

  def on_token(step, toks):
    """Print row 0's answer as it grows (decoding the whole answer keeps multi-byte text)."""
    if tok is None or not opts.stream or shown["ended"]:
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
    print() if opts.stream else print(f"answer: {answer}")
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
