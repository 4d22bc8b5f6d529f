"""The model a run config names, as `infer.py` and `serve.py` run it: pretrained weights (or
random ones) rebuilt with the run's sparse settings and head plan."""

from __future__ import annotations


def head_plan(cfg, model_cfg, own_plan=None):
  """(plan, note): config.plan.path, else the model's calibrated plan, else a random stand-in."""
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
  """(model, plan note). path: a folder or registered name (loaded, then rebuilt with
  `sparse` and the run's plan), or "" for random weights of `model_cfg` (initialised with
  `init_std`)."""
  from flax import nnx

  from rtpurbo_jax import convert
  from rtpurbo_jax.models.transformer import Transformer

  if not path:
    plan, note = head_plan(cfg, model_cfg)
    # One compiled initialiser instead of one dispatch (and compile) per parameter.
    model = nnx.jit(lambda: Transformer(model_cfg, sparse=sparse, plan=plan, dtype=cfg.dtype,
                                        rngs=nnx.Rngs(cfg.seed), init_std=init_std))()
    return model, note
  import rtpurbo_jax

  model = rtpurbo_jax.from_pretrained(path, dtype=cfg.dtype)
  plan, note = head_plan(cfg, model.cfg, model.plan)
  return convert.rebuild(model, plan=plan, sparse=sparse), note
