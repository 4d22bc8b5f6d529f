"""Long-context tasks in the spirit of RULER, generated over real text.

Every example is plain text to complete: an instruction, a haystack of Shakespeare lines with
one or more *needles* inserted at chosen depths, and a question ending in an answer prefix.
The prompt holds at most `length - max_new_tokens` tokens (so prompt + answer fit in
`length`), and is filled to within a line of that budget.

Tasks (name: needles -> answers, scoring rule):
  passkey          one 5-digit pass key                         -> the key        (contains)
  niah_single      one "magic number for <key>" (7 digits)      -> the number     (contains)
  niah_multikey    the target needle + 3 distractor keys         -> its number     (contains)
  niah_multivalue  4 numbers for the same key at spread depths   -> all 4          (partial)
  variable_tracking  a chain VAR A = 12345, VAR B = VAR A, ...   -> all 5 names    (partial)
  common_words     a numbered word list, 10 words far more frequent -> those 10    (partial)

Depth d in [0, 1] = fraction of the haystack's tokens that precede the (first) needle.
Generation is deterministic given (seed, task, length, depth, sample index).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable

import numpy as np

from rtpurbo_jax.eval.corpus import Corpus


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt with its expected answers.

  needle_spans: (start, end) character spans in `prompt` of the inserted needles, the
    target needle first; haystack_span: the span of the haystack (needles included).
  """

  task: str
  length: int
  depth: float | None
  index: int
  prompt: str
  answers: tuple[str, ...]
  rule: str
  max_new_tokens: int
  needle_spans: tuple[tuple[int, int], ...] = ()
  haystack_span: tuple[int, int] = (0, 0)


@dataclasses.dataclass(frozen=True)
class TaskContext:
  codec: object  # corpus.ByteCodec / corpus.HFCodec
  corpus: Corpus


@dataclasses.dataclass(frozen=True)
class Task:
  make: Callable  # (ctx, rng, length, depth, index) -> Example
  max_new_tokens: int
  uses_depth: bool = True


# ---------------------------------------------------------------------------
# Prompt assembly.


def _insert_points(counts: list[int], depths: list[float]) -> list[int]:
  """Line index before which each needle goes: the first i with sum(counts[:i]) >= d * total."""
  cum = np.concatenate([[0], np.cumsum(counts)])
  total = cum[-1]
  return [int(np.searchsorted(cum, d * total, side="left")) for d in depths]


def _compose(prefix, suffix, lines, counts, needles):
  """(prompt, needle spans in needle order, haystack span)."""
  points = _insert_points(counts, [d for d, _ in needles])
  # Needles at the same line keep their given order.
  at: dict[int, list[int]] = {}
  for n, p in enumerate(points):
    at.setdefault(p, []).append(n)
  parts, spans, pos = [prefix], [None] * len(needles), len(prefix)
  hay_start = pos
  for i in range(len(lines) + 1):
    for n in at.get(i, ()):
      text = needles[n][1] + "\n"
      spans[n] = (pos, pos + len(needles[n][1]))
      parts.append(text)
      pos += len(text)
    if i < len(lines):
      parts.append(lines[i] + "\n")
      pos += len(lines[i]) + 1
  hay_end = pos
  parts.append(suffix)
  return "".join(parts), tuple(spans), (hay_start, hay_end)


def haystack_prompt(ctx: TaskContext, rng: np.random.Generator, budget: int, prefix: str,
                    suffix: str, needles: list[tuple[float, str]]):
  """Fill `budget` tokens: prefix + haystack lines with needles at their depths + suffix.

  needles: [(depth, text)], each inserted as its own line. Returns (prompt, spans, hay_span).
  The longest prompt with <= budget tokens is found by bisection over the number of lines
  (token counts of separately encoded pieces do not add up exactly under BPE).
  """
  codec = ctx.codec
  fixed = len(codec.encode(prefix)) + len(codec.encode(suffix)) + sum(
      len(codec.encode(t + "\n")) for _, t in needles)
  room = budget - fixed
  if room < 16:
    raise ValueError(f"length too short: the task text alone takes {fixed} of {budget} tokens")
  lines, counts = ctx.corpus.haystack_lines(rng, codec, int(room * 1.1) + 16)

  def build(k):
    return _compose(prefix, suffix, lines[:k], counts[:k], needles)

  # Separately counted lines nearly add up (BPE merges rarely cross a newline): the sum is the
  # search's first guess, which saves most of the whole-prompt encodes (the generation cost).
  guess = int(np.searchsorted(np.cumsum(counts), room, side="right"))
  return build(_largest_fitting(build, len(lines), codec, budget, guess))


def _largest_fitting(build, n: int, codec, budget: int, guess: int | None = None) -> int:
  """The largest k in [0, n] whose prompt `build(k)[0]` encodes to at most `budget` tokens
  (prompts grow with k; build(0) must fit).

  From `guess`: gallop (steps 1, 2, 4, ...) until the answer is bracketed, then bisect; with a
  guess within a line or two this takes 2-3 encodes instead of log2(n). The answer is the same
  as plain bisection's (None) whenever the token count grows with k.
  """
  def fits(k):
    return len(codec.encode(build(k)[0])) <= budget

  lo, hi = 0, n  # invariant: build(lo) fits; no k > hi fits
  if guess is not None and 0 < n:
    k = min(max(int(guess), 0), n)
    step = 1
    if fits(k):
      lo = k
      while lo < hi:
        c = min(lo + step, hi)
        if fits(c):
          lo, step = c, step * 2
        else:
          hi = c - 1
          break
    else:
      hi = k - 1
      while hi > lo:
        c = max(hi - step + 1, lo)
        if c == lo or fits(c):
          lo = c
          break
        hi, step = c - 1, step * 2
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid - 1
  return lo


def _digits(rng, n: int) -> str:
  return str(int(rng.integers(10 ** (n - 1), 10 ** n)))


def _distinct(rng, n: int, draw) -> list[str]:
  out: list[str] = []
  while len(out) < n:
    x = draw()
    if x not in out:
      out.append(x)
  return out


def _key(ctx, rng) -> str:
  vocab = ctx.corpus.vocabulary()
  a, b = rng.choice(len(vocab), 2, replace=False)
  return f"{vocab[a]}-{vocab[b]}"


def _budget(length: int, max_new: int) -> int:
  return length - max_new


# ---------------------------------------------------------------------------
# The tasks.


def passkey(ctx, rng, length, depth, index, max_new=12):
  key = _digits(rng, 5)
  prefix = ("A pass key is hidden somewhere in the long text below. Find it and remember it: "
            "you will be asked for it at the end.\n\n")
  needle = f"The pass key is {key}. Remember it. {key} is the pass key."
  suffix = "\nWhat is the pass key? The pass key is"
  prompt, spans, hay = haystack_prompt(ctx, rng, _budget(length, max_new), prefix, suffix,
                                       [(depth, needle)])
  return Example("passkey", length, depth, index, prompt, (key,), "contains", max_new, spans, hay)


def _magic(key, value):
  return f"One of the special magic numbers for {key} is: {value}."


def _niah_question(key):
  return (f"\nWhat is the special magic number for {key} in the text above? "
          f"The special magic number for {key} is")


_NIAH_PREFIX = ("Some special magic numbers are hidden in the long text below. Remember them: "
                "you will be asked about one of them at the end.\n\n")


def niah_single(ctx, rng, length, depth, index, max_new=16):
  key, value = _key(ctx, rng), _digits(rng, 7)
  prompt, spans, hay = haystack_prompt(ctx, rng, _budget(length, max_new), _NIAH_PREFIX,
                                       _niah_question(key), [(depth, _magic(key, value))])
  return Example("niah_single", length, depth, index, prompt, (value,), "contains", max_new,
                 spans, hay)


def niah_multikey(ctx, rng, length, depth, index, max_new=16, distractors=3):
  keys = _distinct(rng, distractors + 1, lambda: _key(ctx, rng))
  values = _distinct(rng, distractors + 1, lambda: _digits(rng, 7))
  needles = [(depth, _magic(keys[0], values[0]))]
  needles += [(float(rng.uniform()), _magic(k, v)) for k, v in zip(keys[1:], values[1:])]
  prompt, spans, hay = haystack_prompt(ctx, rng, _budget(length, max_new), _NIAH_PREFIX,
                                       _niah_question(keys[0]), needles)
  return Example("niah_multikey", length, depth, index, prompt, (values[0],), "contains",
                 max_new, spans, hay)


def niah_multivalue(ctx, rng, length, depth, index, max_new=48, n_values=4):
  key = _key(ctx, rng)
  values = _distinct(rng, n_values, lambda: _digits(rng, 7))
  depths = [depth] + sorted(float(x) for x in rng.uniform(depth, 1.0, n_values - 1))
  needles = [(d, _magic(key, v)) for d, v in zip(depths, values)]
  suffix = (f"\nWhat are all the special magic numbers for {key} in the text above? "
            f"The special magic numbers for {key} are")
  prompt, spans, hay = haystack_prompt(ctx, rng, _budget(length, max_new), _NIAH_PREFIX, suffix,
                                       needles)
  return Example("niah_multivalue", length, depth, index, prompt, tuple(values), "partial",
                 max_new, spans, hay)


def _var_name(rng) -> str:
  return "".join(chr(ord("A") + int(c)) for c in rng.integers(0, 26, 5))


def variable_tracking(ctx, rng, length, depth, index, max_new=40, hops=4):
  names = _distinct(rng, hops + 1, lambda: _var_name(rng))
  value = _digits(rng, 5)
  stmts = [f"VAR {names[0]} = {value}."]
  stmts += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
  depths = [depth] + sorted(float(x) for x in rng.uniform(depth, 1.0, hops))
  prefix = ("Keep track of the chain of variable assignments hidden in the long text "
            "below.\n\n")
  suffix = (f"\nQuestion: which variables hold the value {value} in the text above?\n"
            f"Answer: following the assignments, the {len(names)} variables that hold the "
            f"value {value} are:")
  prompt, spans, hay = haystack_prompt(ctx, rng, _budget(length, max_new), prefix, suffix,
                                       list(zip(depths, stmts)))
  return Example("variable_tracking", length, depth, index, prompt, tuple(names), "partial",
                 max_new, spans, hay)


def common_words(ctx, rng, length, depth, index, max_new=64, n_common=10):
  """A numbered word list; `n_common` words appear `f_c` times, the others `f_r` times."""
  codec, vocab = ctx.codec, ctx.corpus.vocabulary()
  budget = _budget(length, max_new)
  order = [vocab[i] for i in rng.permutation(len(vocab))]
  common, rare_pool = order[:n_common], order[n_common:]
  shuffle_seed = int(rng.integers(2 ** 31))
  prefix = "Below is a numbered list of words. Some of them appear many times.\n\n"
  suffix = (f"\nQuestion: which {n_common} words appear most often in the list above?\n"
            f"Answer: the {n_common} most frequent words in the list are:")
  # Common words fill at most half of the list: f_c from the list's capacity in items.
  sample = "".join(f"{100 + i}. {w}\n" for i, w in enumerate(order[:50]))
  per_item = len(codec.encode(sample)) / 50
  room = budget - len(codec.encode(prefix + suffix))
  f_c = int(min(30, max(2, room / per_item // (2 * n_common))))
  f_r = 3 if f_c >= 10 else 1

  def build(m):
    words = common * f_c + rare_pool[:m] * f_r
    perm = np.random.default_rng(shuffle_seed).permutation(len(words))
    body = "".join(f"{i + 1}. {words[j]}\n" for i, j in enumerate(perm))
    return prefix + body + suffix, (len(prefix), len(prefix) + len(body))

  base = len(codec.encode(build(0)[0]))
  if base > budget:
    raise ValueError(f"length {length} is too short for common_words")
  # A guess from the sampled item cost, refined once by a secant step on a real encode, so the
  # search starts within a few items of the answer (the list's encodes dominate the cost).
  guess = min(int((budget - base) / (f_r * per_item)), len(rare_pool))
  if guess > 0:
    got = len(codec.encode(build(guess)[0]))
    guess = int(guess + (budget - got) * guess / max(got - base, 1))
  prompt, hay = build(_largest_fitting(build, len(rare_pool), codec, budget, guess))
  return Example("common_words", length, None, index, prompt, tuple(common), "partial", max_new,
                 (), hay)


TASKS: dict[str, Task] = {
    "passkey": Task(passkey, 12),
    "niah_single": Task(niah_single, 16),
    "niah_multikey": Task(niah_multikey, 16),
    "niah_multivalue": Task(niah_multivalue, 48),
    "variable_tracking": Task(variable_tracking, 40),
    "common_words": Task(common_words, 64, uses_depth=False),
}


def example_rng(seed: int, task: str, length: int, index: int) -> np.random.Generator:
  """An independent stream per (seed, task, length, sample): stable across runs and tasks."""
  return np.random.default_rng([seed, zlib.crc32(task.encode()), length, index])


def make_examples(ctx: TaskContext, task: str, length: int, depths, samples: int,
                  seed: int) -> list[Example]:
  """`samples` examples of `task` at `length` tokens; sample i sits at depths[i % len(depths)]."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}: expected one of {sorted(TASKS)}")
  spec = TASKS[task]
  depths = list(depths) or [0.5]
  for d in depths:
    if not 0.0 <= d <= 1.0:
      raise ValueError(f"depth {d} is outside [0, 1]")
  out = []
  for i in range(samples):
    depth = float(depths[i % len(depths)]) if spec.uses_depth else None
    out.append(spec.make(ctx, example_rng(seed, task, length, i), length, depth, i,
                         max_new=spec.max_new_tokens))
  return out
