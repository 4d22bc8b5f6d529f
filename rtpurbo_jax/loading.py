"""The one loading layer: models, head plans and eos ids from a run config, for train.py,
infer.py, serve.py and the evaluation.

What differs between them is only the head-plan policy, and each is named here:
  training     `train.stages.resolve_plan` (strict: a calibrated plan or an error);
  evaluation   `eval.runner.resolve_plan` (plan.path, the model's plan, else a needle
               calibration it records);
  inference    `head_plan` below (plan.path, the model's plan, else a random stand-in, said so).
"""

from __future__ import annotations


def build_model(cfg, path: str, *, sparse=None, plan=None, model_cfg=None,
                init_std: float = 0.02, kernels=None):
  """The model of a run config, as stored: `path` (an HF folder or a registered name) loaded
  in `cfg.dtype`, or, for path "", random weights of `model_cfg` (default: `cfg.model`) with
  `sparse` / `plan` (defaults: the model's own), seeded by `cfg.seed`. kernels: its
  `KernelConfig` (None: the process default, from the environment)."""
  if path:
    import rtpurbo_jax
    return rtpurbo_jax.from_pretrained(path, dtype=cfg.dtype, kernels=kernels)
  from flax import nnx

  from rtpurbo_jax.config import model_config_from
  from rtpurbo_jax.models.transformer import Transformer
  model_cfg = model_cfg or model_config_from(cfg.model)
  # One compiled initialiser instead of one dispatch (and compile) per parameter.
  return nnx.jit(lambda: Transformer(model_cfg, sparse=sparse, plan=plan, dtype=cfg.dtype,
                                     rngs=nnx.Rngs(cfg.seed), init_std=init_std,
                                     kernels=kernels))()


def head_plan(cfg, model_cfg, own_plan=None):
  """(plan, note) for inference: config.plan.path, else the model's calibrated plan, else a
  random stand-in."""
  from rtpurbo_jax.attention.plan import HeadPlan, load_headwise_config
  from rtpurbo_jax.infer.memory import synthetic_plan

  if cfg.plan.path:
    plan, _ = HeadPlan.from_headwise_config(load_headwise_config(cfg.plan.path),
                                            model_cfg.num_kv_heads)
    return plan, f"head plan from {cfg.plan.path}"
  if own_plan is not None and own_plan.mask().any():
    return own_plan, "the model's calibrated head plan"
  plan = synthetic_plan(model_cfg, cfg.plan.retrieval_ratio, cfg.seed)
  return plan, (f"no calibrated head plan: a random plan with {cfg.plan.retrieval_ratio:.0%} "
                "retrieval heads (run calibration for a real one)")


def load_model(cfg, sparse, *, path: str, model_cfg=None, init_std: float = 0.02):
  """(model, plan note) as infer.py and serve.py run it: `build_model`, rebuilt with `sparse`
  and the inference head plan. path "": random weights of `model_cfg`."""
  if not path:
    plan, note = head_plan(cfg, model_cfg)
    return build_model(cfg, "", sparse=sparse, plan=plan, model_cfg=model_cfg,
                       init_std=init_std), note
  from rtpurbo_jax import convert

  model = build_model(cfg, path)
  plan, note = head_plan(cfg, model.cfg, model.plan)
  return convert.rebuild(model, plan=plan, sparse=sparse), note


def eos_ids(tok, model_cfg) -> tuple[int, ...]:
  """Sorted ids that end a generation: the tokenizer's eos (if `tok` is given) and the model
  config's (an int or a list)."""
  ids = set()
  for e in (getattr(tok, "eos_token_id", None), model_cfg.eos_token_id):
    if e is None:
      continue
    ids.update(e if isinstance(e, (tuple, list)) else (e,))
  return tuple(sorted(int(i) for i in ids))
