"""Decoder building blocks: RMSNorm, rotary embedding (plain, llama3-scaled), gated MLP.

Parameters carry logical axis names (`sharding.py` maps them to mesh axes). Math that
is sensitive to precision (norm statistics, rotary angles) runs in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rtpurbo_jax.config import ModelConfig, RopeScaling


def param(rngs: nnx.Rngs, init, shape, dtype, axes: tuple[str | None, ...]) -> nnx.Param:
  """A parameter annotated with logical axis names (one name per dimension)."""
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * w, statistics in float32. `scale`: [dim]."""

  def __init__(self, dim: int, eps: float, dtype, *, axis_name: str | None = "embed"):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype), out_sharding=(axis_name,),
                           eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # HF Llama/Qwen cast back to the input dtype before multiplying by the weight.
    return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jnp.ndarray:
  """Inverse frequencies [head_dim // 2], with `llama3` / `linear` scaling applied."""
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv
  if scaling.rope_type == "linear":
    return inv / scaling.factor
  if scaling.rope_type != "llama3":
    raise ValueError(f"unsupported rope_scaling type {scaling.rope_type!r}")
  low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv
  smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  scaled = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
  mid = (1 - smooth) * inv / scaling.factor + smooth * inv
  is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
  return jnp.where(is_mid, mid, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate-half RoPE (HF layout). x: [batch, seq, heads, head_dim]; positions: [batch, seq]."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU MLP: down(silu(gate(x)) * up(x)). Kernels: [embed, mlp] and [mlp, embed]."""

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, init_std: float = 0.02):
    init = nnx.initializers.normal(init_std)
    e, m = cfg.hidden_size, cfg.intermediate_size
    self.gate = param(rngs, init, (e, m), dtype, ("embed", "mlp"))
    self.up = param(rngs, init, (e, m), dtype, ("embed", "mlp"))
    self.down = param(rngs, init, (m, e), dtype, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    g = x @ self.gate[...]
    u = x @ self.up[...]
    return (jax.nn.silu(g) * u) @ self.down[...]
