"""Uncertainty of the evaluation's numbers: Wilson score intervals and a paired bootstrap.

  wilson(p_hat, n)                  95% Wilson score interval of a proportion from n samples
  paired_bootstrap_rel(a, b, seed)  relative change exp(mean a) / exp(mean b) - 1 of per-window
                                    mean nlls a, b [windows] with a 95% percentile interval,
                                    resampling windows (the same ones for a and b)
  paired_bootstrap_diff(a, b, seed) difference of mean-over-groups accuracies of two modes on
                                    the same prompts, with a 95% percentile interval,
                                    resampling prompts within each group (task)

Partial-score tasks (variable tracking, common words, multi-value NIAH) score a fraction per
sample; their interval is the Wilson interval of the mean score with n samples (a
normal-approximation interval for a bounded mean, conservative for scores that are not 0/1).
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 0.975 quantile


def wilson(p_hat: float, n: int, z: float = Z95) -> tuple[float, float]:
  """(low, high) Wilson score interval of a proportion p_hat observed on n samples.

  The interval is the set of p with |p_hat - p| <= z sqrt(p (1 - p) / n): the roots of a
  quadratic in p. n = 0 gives the uninformative (0, 1).
  """
  if n <= 0:
    return 0.0, 1.0
  p = min(max(float(p_hat), 0.0), 1.0)
  z2 = z * z
  centre = (p + z2 / (2 * n)) / (1 + z2 / n)
  half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
  return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap_rel(nll_a, nll_b, seed, n_boot: int = 2000,
                         level: float = 0.95) -> dict:
  """Relative perplexity change of a against b over paired windows.

  nll_a, nll_b: [windows] mean token nll per window (equal token counts per window), window i
  of a and of b being the same text. Returns {"rel", "lo", "hi", "windows", "n_boot"}: rel =
  exp(mean a - mean b) - 1 on all windows, lo/hi the percentile interval of the same statistic
  over `n_boot` resamples of the window indices (seeded: `seed` is an int or a sequence of ints
  for np.random.default_rng). One window gives lo = hi = rel.
  """
  a = np.asarray(nll_a, np.float64)
  b = np.asarray(nll_b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size == 0:
    raise ValueError(f"paired windows needed: got shapes {a.shape} and {b.shape}")
  diff = a - b
  rel = float(np.expm1(diff.mean()))
  if a.size == 1:
    return {"rel": rel, "lo": rel, "hi": rel, "windows": 1, "n_boot": 0}
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, a.size, (n_boot, a.size))
  boot = np.expm1(diff[idx].mean(axis=1))
  q = (1 - level) / 2
  lo, hi = np.quantile(boot, [q, 1 - q])
  return {"rel": rel, "lo": float(lo), "hi": float(hi), "windows": int(a.size),
          "n_boot": int(n_boot)}


def paired_bootstrap_diff(groups_a, groups_b, seed, n_boot: int = 4000,
                          level: float = 0.95) -> dict:
  """Difference of two modes' accuracy on the same prompts, as a mean over groups (tasks).

  groups_a, groups_b: lists (one entry per group) of [n_g] per-prompt scores, prompt i of
  group g being the same prompt for a and b. The statistic is mean_g(mean a_g) - mean_g(mean
  b_g), the difference of the task-averaged accuracies the reports show; the interval
  resamples prompts within each group (stratified, so every task keeps its weight) `n_boot`
  times, seeded like `paired_bootstrap_rel`. Returns {"diff", "lo", "hi", "n", "changed",
  "n_boot"}: `n` prompts in all, `changed` of them with different scores.
  """
  if len(groups_a) != len(groups_b) or not groups_a:
    raise ValueError(f"paired groups needed: got {len(groups_a)} and {len(groups_b)}")
  diffs = []
  for a, b in zip(groups_a, groups_b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
      raise ValueError(f"paired prompts needed: got shapes {a.shape} and {b.shape}")
    diffs.append(a - b)
  diff = float(np.mean([d.mean() for d in diffs]))
  n = sum(d.size for d in diffs)
  changed = int(sum(np.count_nonzero(d) for d in diffs))
  rng = np.random.default_rng(seed)
  boot = np.zeros(n_boot)
  for d in diffs:
    boot += d[rng.integers(0, d.size, (n_boot, d.size))].mean(axis=1)
  boot /= len(diffs)
  q = (1 - level) / 2
  lo, hi = np.quantile(boot, [q, 1 - q])
  return {"diff": diff, "lo": float(lo), "hi": float(hi), "n": int(n), "changed": changed,
          "n_boot": int(n_boot)}


def fmt_points_interval(diff: float, lo: float, hi: float) -> str:
  """'-2.9 [-5.5, -0.5]' for an accuracy difference and its interval given as fractions."""
  return f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def fmt_pct_interval(rel: float, lo: float, hi: float, digits: int = 1) -> str:
  """'+0.8% [+0.5, +1.1]' for relative changes given as fractions."""
  return f"{100 * rel:+.{digits}f}% [{100 * lo:+.{digits}f}, {100 * hi:+.{digits}f}]"


def fmt_acc_interval(p: float, lo: float, hi: float) -> str:
  """'62.0 [48.2, 74.1]' for an accuracy and its interval given as fractions."""
  return f"{100 * p:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
