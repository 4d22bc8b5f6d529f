"""Optimiser: AdamW with global-norm clipping and a warmup schedule (docs/METHOD.md §4).

Stage 1: lr 1e-3, 100 linear warmup steps from 0, then cosine decay to `min_lr_ratio * lr`
over the remaining steps (the indexer's distance bias, where there is one, at `bias_lr`).
Stage 2: lr 3e-6, 200 warmup steps, then constant. Both: weight
decay 0.01 (on matrices, not on norm scales or biases), clip 1.0. Every knob comes from the
stage's config section.
"""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "constant", "linear")


def make_schedule(lr: float, warmup: int, steps: int, kind: str = "cosine",
                  min_lr_ratio: float = 0.0) -> optax.Schedule:
  """Linear warmup 0 -> lr over `warmup` steps, then `kind` until `steps`."""
  if kind not in SCHEDULES:
    raise ValueError(f"schedule={kind!r}: expected one of {SCHEDULES}")
  if lr <= 0 or warmup < 0 or steps < 1:
    raise ValueError(f"need lr > 0, warmup >= 0, steps >= 1 (got {lr}, {warmup}, {steps})")
  warm = optax.linear_schedule(0.0, lr, max(warmup, 1)) if warmup else optax.constant_schedule(lr)
  rest = max(steps - warmup, 1)
  if kind == "cosine":
    after = optax.cosine_decay_schedule(lr, rest, alpha=min_lr_ratio)
  elif kind == "linear":
    after = optax.linear_schedule(lr, lr * min_lr_ratio, rest)
  else:
    after = optax.constant_schedule(lr)
  return optax.join_schedules([warm, after], [warmup])


# Parameters whose tree path holds this name train at the stage's `bias_lr` (when it has one).
BIAS_PARAM = "indexer_bias"


def _is_bias(path) -> bool:
  # A key is a name or a flattened path ("layers/0/attn/indexer_bias", as the Trainer's
  # split state has it).
  for k in path:
    name = getattr(k, "key", getattr(k, "name", None))
    if isinstance(name, str) and BIAS_PARAM in name.replace(".", "/").split("/"):
      return True
  return False


def _decay_mask(params):
  # Decay weight matrices only: 1-d scales, biases and the indexer's distance bias keep
  # their values.
  return jax.tree_util.tree_map_with_path(
      lambda path, p: getattr(p, "ndim", 0) >= 2 and not _is_bias(path), params)


def _scale_bias_updates(ratio: float) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * ratio if _is_bias(path) else u, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def has_bias(params) -> bool:
  """Whether a parameter tree holds the indexer's distance bias."""
  return any(_is_bias(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def make_optimizer(opts, params=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(AdamW chained after global-norm clipping, its lr schedule) from a stage config with
  lr, warmup, steps, schedule, min_lr_ratio, weight_decay, clip, b1, b2, eps.

  A stage with `bias_lr` whose `params` (the trainable tree) hold the indexer's distance bias
  (`BIAS_PARAM`) trains it at peak rate bias_lr on the same schedule shape, without weight
  decay (the same Adam moments; the clip is global over all parameters). Without one the
  optimizer is the plain chain.
  """
  sched = make_schedule(opts.lr, opts.warmup, opts.steps, opts.schedule, opts.min_lr_ratio)
  parts = []
  if opts.clip and opts.clip > 0:
    parts.append(optax.clip_by_global_norm(opts.clip))
  parts.append(optax.adamw(sched, b1=opts.b1, b2=opts.b2, eps=opts.eps,
                           weight_decay=opts.weight_decay, mask=_decay_mask))
  bias_lr = opts.get("bias_lr") if hasattr(opts, "get") else getattr(opts, "bias_lr", None)
  if bias_lr and params is not None and has_bias(params):
    # Adam's step is linear in its rate: the bias's updates scaled by bias_lr / lr are Adam's
    # at bias_lr (the state keeps the plain chain's structure).
    parts.append(_scale_bias_updates(bias_lr / opts.lr))
  return optax.chain(*parts), sched
