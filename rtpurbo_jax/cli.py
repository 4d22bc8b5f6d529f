"""Shared command-line plumbing for train.py / infer.py / the eval module (absl + ml_collections).

`--config=configs/x.py` selects a config file; `--config.a.b=v` overrides a value. Unknown keys,
bad values and missing files end the program with one clear message (exit code 2).
"""

from __future__ import annotations

import re
import sys

from absl import app
from ml_collections import config_flags

from rtpurbo_jax.config import ConfigError, validate


def define_config(default: str, help_text: str = "Config file (configs/*.py) and overrides "
                  "(--config.section.key=value).") -> config_flags.FlagHolder:
  return config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)


def _overrides(argv):
  for a in argv:
    m = re.match(r"--config\.([\w.]+)=", a)
    if m:
      yield m.group(1)


def run(main) -> None:
  """app.run(main) with config errors reported as one line instead of a traceback."""
  try:
    app.run(lambda argv: _checked(main, argv))
  except (AttributeError, KeyError) as e:
    keys = list(_overrides(sys.argv))
    hint = f" (overrides given: {', '.join(keys)})" if keys else ""
    print(f"error: unknown config key {e}{hint}. Run with --helpfull to list config keys.",
          file=sys.stderr)
    sys.exit(2)


def _checked(main, argv):
  try:
    return main(argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def checked_config(holder: config_flags.FlagHolder):
  """The parsed config after `validate` (raises ConfigError with a clear message)."""
  cfg = holder.value
  validate(cfg)
  return cfg
