"""Low-rank backbone deltas: a small-artifact form of stage 2.

A stage-2 model differs from its base only in the backbone. Stored whole that is the size of
the model (270 MB for SmolLM2-135M in fp16); stored as a rank-r factorisation of each linear
weight's change it is a few MB. This module has both halves of that:

  delta  `compute_delta(base, tuned, rank)`: for each linear weight (attention q/k/v/o, MLP
         gate/up/down; not the embedding or an untied lm_head) the truncated SVD of
         (W_tuned - W_base) in the HF layout [out, in], float32, as factors A [r, in] and
         B [out, r] with B @ A the best rank-r approximation; the 1-D weights (RMSNorm gains,
         Qwen2 q/k/v biases) as full deltas. `apply_delta(model, delta)` adds it back.
         Stored with PEFT-style names in one safetensors file (`save_delta` / `load_delta`):
           <hf name without .weight>.lora_A.weight   [r, in]
           <hf name without .weight>.lora_B.weight   [out, r]
           <hf 1-D tensor name>.delta                 [dim]
         so the file reads like a LoRA adapter whose scale (alpha / r) is 1: B is stored
         already multiplied by the scale.
  LoRA   `LoraSplit`: the Trainer's split (same interface as `trainer.ParamSplit`) that
         trains only such factors (plus, optionally, the 1-D deltas) on top of a frozen
         model, so a LoRA stage 2 produces a delta that is exact at its rank.

`artifact_bytes` / `size_table` give the file size per rank and dtype (`python -m
rtpurbo_jax.lowrank` prints SmolLM2-135M's table).

This module imports no training code (the HF loading path uses it).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtpurbo_jax.config import ConfigError, ModelConfig
from rtpurbo_jax.hf import mapping

DELTA_FILE = "backbone_delta.safetensors"
FORMAT = "rtpurbo-lowrank-delta"
LORA_A, LORA_B, VEC = ".lora_A.weight", ".lora_B.weight", ".delta"


# ---------------------------------------------------------------------------
# Which weights a delta covers.


@dataclasses.dataclass(frozen=True)
class Target:
  """One backbone tensor a delta covers.

  entry: its HF mapping entry; key: its flat nnx state key ('layers/0/attn/q_proj');
  shape: the HF shape ([out, in] for a linear weight, [dim] for a vector).
  """

  entry: mapping.Entry
  key: str
  shape: tuple[int, ...]

  @property
  def low_rank(self) -> bool:
    return len(self.shape) == 2

  @property
  def stem(self) -> str:
    """The PEFT module name: the HF name without its `.weight`."""
    return self.entry.hf[:-len(".weight")] if self.entry.hf.endswith(".weight") else self.entry.hf

  def names(self) -> tuple[str, ...]:
    """The delta-file tensor names of this target."""
    return (self.stem + LORA_A, self.stem + LORA_B) if self.low_rank else (self.entry.hf + VEC,)


def _ours_shape(model, entry: mapping.Entry) -> tuple[int, ...]:
  obj = model
  for part in entry.ours.split("."):
    obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
  return tuple(obj.shape)


def targets(model) -> list[Target]:
  """The linear weights (per-layer LINEAR entries) and 1-D weights of `model`'s backbone, in
  mapping order. The embedding and an untied lm_head are excluded: they are vocabulary-sized
  and a low-rank delta of them is neither small nor what stage 2 needs to change most."""
  out = []
  for e in mapping.entries(model.cfg):
    if e.hf in (mapping.LM_HEAD.hf, "model.embed_tokens.weight"):
      continue
    hf_shape = e.hf_shape(_ours_shape(model, e))
    if e.kind == mapping.LINEAR or len(hf_shape) == 1:
      out.append(Target(e, e.ours.replace(".", "/"), tuple(hf_shape)))
  return out


def to_hf_matrix(t: Target, x) -> np.ndarray:
  """Our parameter -> float32 HF layout ([out, in] or [dim])."""
  return t.entry.to_hf(np.asarray(x, np.float32))


# ---------------------------------------------------------------------------
# Computing and applying a delta.


def svd_factors(d: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Best rank-`rank` factors of d [out, in] (Eckart-Young): A [k, in], B [out, k] with
  k = min(rank, out, in), and all singular values s (descending).

  Through the eigendecomposition of the smaller Gram matrix (d^T d or d d^T) in float64: the
  same top-k subspace and singular values as an SVD at a fraction of its cost (a full SVD of
  every weight of a 30-layer model takes minutes on a busy CPU). The singular values are split
  evenly (B = U sqrt(s), A = sqrt(s) V^T) so neither factor carries the whole scale (fp16
  storage of either stays in range).
  """
  d = np.asarray(d, np.float64)  # float64: the error report then shows only truncation
  tall = d.shape[0] >= d.shape[1]
  lam, vecs = np.linalg.eigh(d.T @ d if tall else d @ d.T)  # ascending
  s = np.sqrt(np.clip(lam[::-1], 0.0, None))
  k = min(rank, len(s))
  top = vecs[:, ::-1][:, :k]  # V_k (tall) or U_k
  root = np.sqrt(s[:k])
  inv = np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)
  if tall:  # d V_k = U_k S_k
    b, a = (d @ top) * inv, root[:, None] * top.T
  else:  # d^T U_k = V_k S_k
    b, a = top * root, ((d.T @ top) * inv).T
  return a.astype(np.float32), b.astype(np.float32), s


def compute_delta(base, tuned, rank: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """The low-rank delta of `tuned` vs `base` (same architecture).

  Returns (tensors, errors): tensors {delta-file name: float32 array} (see the module
  docstring), errors {hf name: ||D - B A||_F / ||D||_F} for each linear weight (0 when D is
  zero; 1-D deltas are stored whole, error 0). The error of a rank-k truncation is
  sqrt(sum of the tail s_i^2) / sqrt(sum s_i^2).
  """
  if rank < 1:
    raise ValueError(f"rank={rank} must be >= 1")
  if base.cfg != tuned.cfg:
    raise ValueError("base and tuned models have different configs: a delta needs the same "
                     "architecture")
  tensors, errors = {}, {}
  for t in targets(tuned):
    w_b = to_hf_matrix(t, _get(base, t.key))
    w_t = to_hf_matrix(t, _get(tuned, t.key))
    d = w_t.astype(np.float64) - w_b.astype(np.float64)
    if not t.low_rank:
      tensors[t.names()[0]] = d.astype(np.float32)
      continue
    a, b, s = svd_factors(d, rank)
    na, nb = t.names()
    tensors[na], tensors[nb] = a, b
    total = float(np.sum(s ** 2))
    errors[t.entry.hf] = float(np.sqrt(np.sum(s[a.shape[0]:] ** 2) / total)) if total else 0.0
  return tensors, errors


def delta_rank(delta: dict[str, np.ndarray]) -> int:
  """The largest factor rank in a delta (0 when it has only 1-D deltas)."""
  return max((v.shape[0] for k, v in delta.items() if k.endswith(LORA_A)), default=0)


def hf_delta(delta: dict[str, np.ndarray], hf_name: str) -> np.ndarray | None:
  """The dense float32 change of HF tensor `hf_name` ([out, in] = B @ A, or the 1-D delta),
  or None when the delta does not cover it."""
  stem = hf_name[:-len(".weight")] if hf_name.endswith(".weight") else hf_name
  if stem + LORA_A in delta:
    a = np.asarray(delta[stem + LORA_A], np.float32)
    b = np.asarray(delta[stem + LORA_B], np.float32)
    return b @ a
  if hf_name + VEC in delta:
    return np.asarray(delta[hf_name + VEC], np.float32)
  return None


def check_delta_names(delta: dict, hf_names) -> None:
  """ValueError for a delta tensor that names no tensor of `hf_names`, or a lone factor."""
  hf_names = set(hf_names)
  bad = []
  for k in delta:
    if k.endswith(LORA_A) or k.endswith(LORA_B):
      stem = k[:-len(LORA_A)]
      other = stem + (LORA_B if k.endswith(LORA_A) else LORA_A)
      if other not in delta or stem + ".weight" not in hf_names:
        bad.append(k)
    elif not (k.endswith(VEC) and k[:-len(VEC)] in hf_names):
      bad.append(k)
  if bad:
    raise ValueError(f"backbone delta tensors {sorted(bad)[:4]} name no weight of the model "
                     "(or lack their other LoRA factor)")


def apply_delta(model, delta: dict[str, np.ndarray]):
  """Add `delta` (as from `compute_delta` / `load_delta`) to `model` in place; returns it.

  The sum is formed in float32 and cast to each parameter's dtype.
  """
  ts = targets(model)
  check_delta_names(delta, [t.entry.hf for t in ts])
  for t in ts:
    d = hf_delta(delta, t.entry.hf)
    if d is None:
      continue
    if tuple(d.shape) != t.shape:
      raise ValueError(f"backbone delta of {t.entry.hf} has shape {tuple(d.shape)}, the model's "
                       f"weight {t.shape}")
    var = _var(model, t.key)
    w = np.asarray(var[...])
    new = to_hf_matrix(t, w) + d
    var.set_value(jnp.asarray(t.entry.to_ours(new, w.shape), w.dtype))
  return model


def save_delta(delta: dict[str, np.ndarray], path, *, dtype="float32") -> int:
  """Write a delta as one safetensors file (tensors cast to `dtype`); returns its bytes."""
  from safetensors.numpy import save_file
  dt = np.dtype(dtype)
  if dt not in (np.float16, np.float32):
    raise ValueError(f"delta dtype {dtype!r}: float16 or float32")
  meta = {"format": "pt", "rtpurbo": FORMAT, "rank": str(delta_rank(delta))}
  save_file({k: np.ascontiguousarray(v, dt) for k, v in delta.items()}, str(path),
            metadata=meta)
  import os
  return os.path.getsize(path)


def load_delta(path) -> dict[str, np.ndarray]:
  """The tensors of a delta file, as float32."""
  from safetensors.numpy import load_file
  return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}


def _var(model, key: str) -> nnx.Variable:
  obj = model
  for part in key.split("/"):
    obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
  return obj


def _get(model, key: str):
  return _var(model, key)[...]


# ---------------------------------------------------------------------------
# Artifact size per rank.


def artifact_bytes(cfg: ModelConfig, rank: int, dtype="float16", *, vectors: bool = True
                   ) -> int:
  """Exact size of the delta file of a `cfg` model at `rank` (safetensors header included)."""
  from safetensors.numpy import save
  model = nnx.eval_shape(lambda: _abstract_model(cfg))
  dt = np.dtype(dtype)
  arrays = {}
  for t in targets(model):
    if t.low_rank:
      k = min(rank, *t.shape)
      a, b = t.names()
      arrays[a] = np.zeros((k, t.shape[1]), dt)
      arrays[b] = np.zeros((t.shape[0], k), dt)
    elif vectors:
      arrays[t.names()[0]] = np.zeros(t.shape, dt)
  return len(save(arrays, metadata={"format": "pt", "rtpurbo": FORMAT, "rank": str(rank)}))


def _abstract_model(cfg: ModelConfig):
  from rtpurbo_jax.models.transformer import Transformer
  return Transformer(cfg, rngs=nnx.Rngs(0))


def size_table(cfg: ModelConfig, ranks=(8, 16, 32, 64), dtypes=("float16", "float32"), *,
               other_bytes: int = 0, limit_bytes: int = 20_000_000) -> str:
  """A Markdown table: delta file size and the whole artifact folder (+ `other_bytes`, e.g.
  the indexer and config) per rank and dtype, and whether the folder stays under
  `limit_bytes`. Sizes in MB = 1e6 bytes."""
  full = sum(math.prod(t.shape) for t in targets(nnx.eval_shape(lambda: _abstract_model(cfg)))
             if t.low_rank)
  rows = ["| rank | dtype | delta MB | folder bytes | < limit | params (share of linear) |",
          "|---:|---|---:|---:|---|---:|"]
  for r in ranks:
    for dt in dtypes:
      n = artifact_bytes(cfg, r, dt)
      params = (n - artifact_bytes(cfg, 0, dt)) // np.dtype(dt).itemsize
      rows.append(f"| {r} | {dt} | {n / 1e6:.2f} | {n + other_bytes:,} | "
                  f"{'yes' if n + other_bytes < limit_bytes else 'no'} | "
                  f"{params / 1e6:.2f}M ({params / full:.1%}) |")
  return "\n".join(rows)


# ---------------------------------------------------------------------------
# LoRA training: the Trainer's split.


def check_lora_config(o) -> None:
  """One clear error for invalid `train.stage2.lora_*` values (`o` = that section)."""
  r, alpha = o.lora_rank, o.lora_alpha
  if isinstance(r, bool) or not isinstance(r, int) or r < 0:
    raise ConfigError(f"train.stage2.lora_rank={r!r} must be an integer >= 0 (0 = full "
                      "fine-tune of the backbone)")
  if r and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
    raise ConfigError(f"train.stage2.lora_alpha={alpha!r} must be > 0 (the LoRA scale is "
                      "lora_alpha / lora_rank)")


def _flat_key(path) -> str:
  return "/".join(str(p) for p in path)


def _abstract(v: nnx.Variable) -> nnx.Variable:
  x = v.get_value()
  return v.replace(jax.ShapeDtypeStruct(x.shape, x.dtype))


class LoraSplit:
  """LoRA on the backbone's linear weights (and optionally a full delta of its 1-D weights),
  with the interface of `trainer.ParamSplit` (values, merge, write_back, axes, shardings).

  trainable: flat {name: float32 array}
    '<key>/lora_A' [r, in], '<key>/lora_B' [out, r] per linear weight (HF/PEFT orientation;
    <key> = the flat state key, e.g. 'layers/0/attn/q_proj'), and '<key>/delta' [dim] per
    1-D weight when `norms`;
  frozen: every variable of the model (the base weights, the indexer, ...), unchanged by
    training.
  merge: W + (alpha / r) * (B @ A) reshaped to our layout (A^T B^T is [in, out], which is our
  [*in_dims, *out_dims] flattened), inside jit. Standard LoRA init: A uniform in
  +-1/sqrt(in) (seeded), B zero, deltas zero, so step 0 is exactly the base model.
  """

  def __init__(self, model: nnx.Module, rank: int, alpha: float, *, norms: bool = True,
               seed: int = 0):
    if rank < 1:
      raise ConfigError(f"LoRA rank {rank} must be >= 1")
    if alpha <= 0:
      raise ConfigError(f"LoRA alpha {alpha} must be > 0")
    self.rank, self.alpha, self.norms, self.seed = int(rank), float(alpha), norms, seed
    self.scale = self.alpha / self.rank
    self.graphdef, state = nnx.split(model)
    self._fr = {_flat_key(p): (p, _abstract(v)) for p, v in nnx.to_flat_state(state)}
    self.targets = [t for t in targets(model) if t.low_rank or norms]
    for t in self.targets:
      if t.low_rank and rank > min(t.shape):
        raise ConfigError(f"train.stage2.lora_rank={rank} exceeds min(out, in)={min(t.shape)} "
                          f"of {t.entry.hf} {list(t.shape)}")
      if t.key not in self._fr:
        raise ValueError(f"model has no variable {t.key}")

  # -- the ParamSplit interface ------------------------------------------------------

  def init_trainable(self) -> dict:
    """Fresh factors: A seeded uniform, B and the 1-D deltas zero (float32)."""
    out = {}
    base = jax.random.key(self.seed)
    for i, t in enumerate(self.targets):
      if t.low_rank:
        n_out, n_in = t.shape
        bound = 1.0 / math.sqrt(n_in)  # PEFT's kaiming-uniform(a=sqrt 5) bound
        out[t.key + "/lora_A"] = jax.random.uniform(jax.random.fold_in(base, i),
                                                    (self.rank, n_in), jnp.float32,
                                                    -bound, bound)
        out[t.key + "/lora_B"] = jnp.zeros((n_out, self.rank), jnp.float32)
      else:
        out[t.key + "/delta"] = jnp.zeros(t.shape, jnp.float32)
    return out

  def _frozen(self, model) -> dict:
    flat = {_flat_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    missing = sorted(set(self._fr) - set(flat))
    if missing:
      raise ValueError(f"model lacks variables {missing[:4]} of the split it was given")
    return {k: flat[k] for k in self._fr}

  def values(self, model) -> tuple[dict, dict]:
    return self.init_trainable(), self._frozen(model)

  def merged_weights(self, trainable: dict, frozen: dict) -> dict:
    """{key: W + delta} for every target, each in its frozen dtype (jit-compatible)."""
    out = {}
    for t in self.targets:
      w = frozen[t.key]
      if t.low_rank:
        a, b = trainable[t.key + "/lora_A"], trainable[t.key + "/lora_B"]
        # HIGHEST: the merged weight must not pick up bf16/tf32 matmul rounding on GPU/TPU.
        d = jnp.matmul(a.T, b.T, precision=jax.lax.Precision.HIGHEST) * self.scale
      else:
        d = trainable[t.key + "/delta"]
      out[t.key] = (w.astype(jnp.float32) + d.reshape(w.shape)).astype(w.dtype)
    return out

  def merge(self, trainable: dict, frozen: dict) -> nnx.Module:
    values = {**frozen, **self.merged_weights(trainable, frozen)}
    state = nnx.from_flat_state([(p, v.replace(values[k])) for k, (p, v) in self._fr.items()])
    return nnx.merge(self.graphdef, state)

  def write_back(self, model: nnx.Module, trainable: dict) -> None:
    """Fold the factors into `model`'s weights (W += scale * B @ A), in place."""
    merged = self.merged_weights(trainable, self._frozen(model))
    nnx.update(model, nnx.from_flat_state(
        [(self._fr[k][0], self._fr[k][1].replace(v)) for k, v in merged.items()]))

  def axes(self, which: str) -> dict:
    if which != "trainable":
      return {k: v.get_metadata().get("out_sharding") for k, (_, v) in self._fr.items()}
    out = {}
    for t in self.targets:
      if t.low_rank:
        # Factors are small (r x dim): replicated, so no layout rule has to fit them.
        out[t.key + "/lora_A"] = (None, None)
        out[t.key + "/lora_B"] = (None, None)
      else:
        out[t.key + "/delta"] = self._fr[t.key][1].get_metadata().get("out_sharding")
    return out

  def shardings(self, which: str, mesh, values: dict) -> dict:
    from rtpurbo_jax import sharding as shd
    axes = self.axes(which)
    return {k: shd.named_sharding(mesh, axes[k], values[k].shape) for k in values}

  def delta(self, trainable: dict) -> dict[str, np.ndarray]:
    """The trained factors as a delta-file dict (scale folded into B; exact, no SVD)."""
    out = {}
    for t in self.targets:
      if t.low_rank:
        a, b = t.names()
        out[a] = np.asarray(trainable[t.key + "/lora_A"], np.float32)
        out[b] = np.asarray(trainable[t.key + "/lora_B"], np.float32) * np.float32(self.scale)
      else:
        out[t.names()[0]] = np.asarray(trainable[t.key + "/delta"], np.float32)
    return out


def main(argv=None) -> None:
  """Print SmolLM2-135M's artifact size table (the committed indexer + config included)."""
  import argparse
  import os
  ap = argparse.ArgumentParser(description=main.__doc__)
  ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
  args = ap.parse_args(argv)
  cfg = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                    tie_embeddings=True)
  from rtpurbo_jax.hf import api
  folder = os.path.join(api.artifacts_dir(), api.SMOLLM2_RTPURBO)
  other = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
              if n != DELTA_FILE) if os.path.isdir(folder) else 0
  print(f"SmolLM2-135M backbone delta (attention + MLP factors, norm deltas); folder adds "
        f"{other / 1e6:.2f} MB of {folder}")
  print(size_table(cfg, args.ranks, other_bytes=other))


if __name__ == "__main__":
  main()
