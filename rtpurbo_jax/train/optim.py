"""Optimiser: AdamW with global-norm clipping and a warmup schedule (docs/METHOD.md §4).

Stage 1: lr 1e-3, 100 linear warmup steps from 0, then cosine decay to `min_lr_ratio * lr`
over the remaining steps. Stage 2: lr 3e-6, 200 warmup steps, then constant. Both: weight
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


def _decay_mask(params):
  # Decay weight matrices only: 1-d scales and biases keep their values.
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(opts) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(AdamW chained after global-norm clipping, its lr schedule) from a stage config with
  lr, warmup, steps, schedule, min_lr_ratio, weight_decay, clip, b1, b2, eps."""
  sched = make_schedule(opts.lr, opts.warmup, opts.steps, opts.schedule, opts.min_lr_ratio)
  parts = []
  if opts.clip and opts.clip > 0:
    parts.append(optax.clip_by_global_norm(opts.clip))
  parts.append(optax.adamw(sched, b1=opts.b1, b2=opts.b2, eps=opts.eps,
                           weight_decay=opts.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), sched
