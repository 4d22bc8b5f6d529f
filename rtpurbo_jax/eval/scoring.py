"""Scoring rules: a model's completion against the expected answers, a score in [0, 1].

Answers match as whole words, case-insensitively: "12345" is found in "is 12345." but not in
"912345", and "ABCDE" not in "ABCDEF".

  exact     the completion's first non-empty line, stripped of surrounding spaces and
            punctuation, equals one of the answers
  contains  any answer occurs in the completion
  all       1 if every answer occurs, else 0
  partial   the fraction of answers that occur
"""

from __future__ import annotations

import re

RULES = ("exact", "contains", "all", "partial")
_STRIP = " \t\r\n.,;:!?\"'()[]{}"


def _occurs(answer: str, text: str) -> bool:
  pat = r"(?<![A-Za-z0-9])" + re.escape(answer.strip()) + r"(?![A-Za-z0-9])"
  return re.search(pat, text, flags=re.IGNORECASE) is not None


def _first_line(text: str) -> str:
  for line in text.splitlines():
    if line.strip():
      return line
  return ""


def score(rule: str, prediction: str, answers) -> float:
  """Score of `prediction` against `answers` (a string or a sequence of strings)."""
  if isinstance(answers, str):
    answers = (answers,)
  answers = tuple(answers)
  if not answers:
    raise ValueError("no expected answers to score against")
  if rule == "exact":
    got = _first_line(prediction).strip(_STRIP).casefold()
    return float(any(got == a.strip(_STRIP).casefold() for a in answers))
  hits = [_occurs(a, prediction) for a in answers]
  if rule == "contains":
    return float(any(hits))
  if rule == "all":
    return float(all(hits))
  if rule == "partial":
    return sum(hits) / len(hits)
  raise ValueError(f"unknown scoring rule {rule!r}: expected one of {RULES}")
