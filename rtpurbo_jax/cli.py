"""Shared command-line plumbing for train.py / infer.py / the eval module (absl + ml_collections).

`--config=configs/x.py` selects a config file; `--config.a.b=v` overrides a value. Unknown keys,
bad values and missing files end the program with one clear message (exit code 2).
"""

from __future__ import annotations

import re
import sys

from absl import app, flags
from ml_collections import config_flags

from rtpurbo_jax.config import ConfigError, validate

# Errors that are the input's fault: reported as one line naming the file or key, exit 2.
# (Weight files and training data raise ValueError subclasses of their own.)


def _input_errors() -> tuple:
  from rtpurbo_jax.hf.safetensors_io import WeightsError
  from rtpurbo_jax.train.data import DataError
  return (ConfigError, DataError, WeightsError, FileNotFoundError)


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
  started = []

  def body(argv):
    started.append(True)
    return _checked(main, argv)

  try:
    app.run(body)
  except (AttributeError, KeyError) as e:
    if started:  # raised by the program, not by parsing a --config.key override
      raise
    keys = list(_overrides(sys.argv))
    hint = f" (overrides given: {', '.join(keys)})" if keys else ""
    print(f"error: unknown config key {e}{hint}. Run with --helpfull to list config keys.",
          file=sys.stderr)
    sys.exit(2)
  except SyntaxError as e:  # raised while absl parses --config
    print(f"error: config file {e.filename} line {e.lineno}: {e.msg}", file=sys.stderr)
    sys.exit(2)


def _checked(main, argv):
  try:
    return main(argv)
  except _input_errors() as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def load_config(holder: config_flags.FlagHolder):
  """The parsed config; a config file that does not load is a ConfigError naming it
  (ml_collections defers that error to the first access, as an OSError)."""
  try:
    cfg = holder.value
    cfg.keys()  # a config file that failed to load raises here
    return cfg
  except OSError as e:
    path = config_flags.get_config_filename(flags.FLAGS[holder.name])
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    reason = next((l for l in lines if l.startswith("[Errno")), lines[-1] if lines else "")
    raise ConfigError(f"--{holder.name}={path}: the config file cannot be loaded ({reason})"
                      ) from None


def checked_config(holder: config_flags.FlagHolder):
  """The parsed config after `validate` (raises ConfigError with a clear message)."""
  cfg = load_config(holder)
  validate(cfg)
  return cfg
