"""Inference engine: chunked prefill into the mixed KV cache, a jitted decode loop, metrics.

The model is split once (`nnx.split`); the graph definition is a static argument of three
module-level jitted functions, so repeated calls with the same shapes never recompile:

  prefill_chunk_step  one chunk of `prefill_chunk` tokens at positions p0..p0+C-1 (p0
                  traced), written into the cache (donated), through the attention's contiguous
                  fast path; keeps the final hidden state of each row's last prompt token (also
                  the evaluation's prefill). With `sparse_prefill` the retrieval heads select
                  key blocks per query block (chunks are then whole blocks).
  _first_token    logits of those hidden states -> the first new token.
  _decode         a `lax.while_loop` over decode steps up to a traced step limit, stopping early
                  once every row has emitted eos. Streaming (`on_token`) calls it with the limit
                  one step further each time: the same executable, one host round trip per token.

Batches are right-padded prompts [batch, prompt_len] with `prompt_lengths`. Row b's prompt
occupies positions 0..len_b-1; its i-th new token sits at position len_b + i.

With a `mesh`, parameters are placed by their logical axes and every cache array by
`attention.cache.CACHE_AXES` (KV heads over `tensor`, cache sequence over `context`); the
jitted functions pin the cache's output sharding and XLA inserts the collectives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtpurbo_jax import sharding as sharding_lib
from rtpurbo_jax.attention import cache as cache_lib
from rtpurbo_jax.attention.mixed import DECODE, PREFILL, PrefillSelectionStats, SelectionStats
from rtpurbo_jax.infer import sampling as sampling_lib


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Sampling settings (static under jit). temperature 0 = greedy."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    sampling_lib.check_params(self.temperature, self.top_k, self.top_p)


@dataclasses.dataclass
class Generation:
  """tokens: [batch, max_new_tokens] int32 (pad after a row's eos); summary: metrics."""

  tokens: np.ndarray
  summary: dict
  first_logits: np.ndarray | None = None  # [batch, vocab] float32, logits of the first token


# ---------------------------------------------------------------------------
# Cache placement.


def cache_shardings(cache, mesh):
  """NamedSharding per cache array (same tree as `cache`) from CACHE_AXES."""
  out = []
  for c in cache:
    out.append(cache_lib.LayerCache(**{
        f.name: sharding_lib.named_sharding(mesh, cache_lib.CACHE_AXES[f.name],
                                            getattr(c, f.name).shape)
        for f in dataclasses.fields(cache_lib.LayerCache)}))
  return out


def _constrain(cache, mesh):
  if mesh is None:
    return cache
  return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))


def tree_bytes(tree, per_device: bool = False) -> int:
  """Bytes of all arrays in `tree`; per_device: what the first device holds."""
  total = 0
  for x in jax.tree.leaves(tree):
    if per_device and hasattr(x, "addressable_shards"):
      total += x.addressable_shards[0].data.nbytes
    else:
      total += x.size * x.dtype.itemsize
  return int(total)


# ---------------------------------------------------------------------------
# Jitted steps (graphdef, mesh and sampling settings are static).


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"), donate_argnames=("cache",))
def prefill_chunk_step(state, cache, ids, p0, lengths, last_h, *, graphdef, mesh):
  """ids: [batch, C] at positions p0..p0+C-1; lengths: [batch]; last_h: [batch, embed].

  Returns (cache, last_h, blocks) with last_h[b] = final hidden state of token lengths[b]-1
  once the chunk holding it has run, and blocks = float32 [2], the (selected, causal) block
  pairs that sparse prefill read in this chunk over all layers (zeros without it).
  """
  model = nnx.merge(graphdef, state)
  b, c = ids.shape
  pos = jnp.broadcast_to(p0 + jnp.arange(c, dtype=jnp.int32)[None], (b, c))
  valid = pos < lengths[:, None]
  (h, cache), stats = nnx.capture(model.hidden_states, PrefillSelectionStats)(
      ids, positions=pos, valid=valid, cache=cache, phase=PREFILL, contiguous=True)
  cache = _constrain(cache, mesh)
  idx = lengths - 1 - p0
  here = (idx >= 0) & (idx < c)
  picked = jnp.take_along_axis(h, jnp.clip(idx, 0, c - 1)[:, None, None], axis=1)[:, 0]
  blocks = sum(jax.tree.leaves(stats), jnp.zeros((2,), jnp.float32))
  return cache, jnp.where(here[:, None], picked.astype(last_h.dtype), last_h), blocks


def prefill_chunks(state, cache, ids, lengths, chunk: int, last_h, *, graphdef, mesh,
                   after_chunk: Callable[[int, jax.Array], None] | None = None):
  """`prefill_chunk_step` over right-padded prompts ids [batch, p], `chunk` tokens at a time
  (the last chunk padded). after_chunk(i, last_h) runs once chunk i is dispatched.
  Returns (cache, last_h, blocks) as `prefill_chunk_step`, blocks summed over the chunks."""
  ids = np.asarray(ids)
  n_chunks = -(-ids.shape[1] // chunk)
  ids = np.pad(ids, ((0, 0), (0, n_chunks * chunk - ids.shape[1])))
  blocks = jnp.zeros((2,), jnp.float32)
  for i in range(n_chunks):
    cache, last_h, chunk_blocks = prefill_chunk_step(
        state, cache, ids[:, i * chunk:(i + 1) * chunk], np.int32(i * chunk), lengths, last_h,
        graphdef=graphdef, mesh=mesh)
    blocks = blocks + chunk_blocks
    if after_chunk is not None:
      after_chunk(i, last_h)
  return cache, last_h, blocks


def prefill_chunk_size(requested: int | None, prompt_len: int, sparse) -> int:
  """The prefill chunk for a prompt of `prompt_len`: `requested` (None = the whole prompt),
  at most the prompt, rounded up to whole `block_size` blocks with `sparse_prefill` (whose
  selection works on blocks aligned to absolute positions)."""
  chunk = prompt_len if requested is None else int(requested)
  if chunk < 1:
    raise ValueError(f"prefill_chunk={requested} must be >= 1")
  chunk = min(chunk, prompt_len)
  if sparse.sparse_prefill:
    chunk = -(-chunk // sparse.block_size) * sparse.block_size
  return chunk


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"))
def _first_token(state, last_h, key, *, graphdef, sampling):
  """First new token [batch] and its logits [batch, vocab] from last_h [batch, embed]."""
  model = nnx.merge(graphdef, state)
  logits = model.logits_from_hidden(last_h[:, None])[:, 0]
  tok = sampling_lib.sample(logits, jax.random.fold_in(key, 0), **dataclasses.asdict(sampling))
  return tok, logits


def _is_eos(tok, eos: tuple[int, ...]):
  if not eos:
    return jnp.zeros(tok.shape, bool)
  return jnp.any(tok[:, None] == jnp.asarray(eos, jnp.int32)[None], axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "sampling", "eos", "pad_id"),
                   donate_argnames=("cache", "carry"))
def _decode(state, cache, carry, lengths, limit, key, *, graphdef, mesh, sampling, eos, pad_id):
  """Decode until `carry["n"] == limit` or every row is done.

  carry: out [batch, N] int32 (tokens so far, pad elsewhere), n () int32 (tokens produced),
  done [batch] bool, frac_sum / frac_count () float32 (selected-block fraction statistics).
  Step n feeds out[:, n-1] at position lengths + n - 1 and writes out[:, n].
  """

  def cond(c):
    _, cr = c
    return (cr["n"] < limit) & ~jnp.all(cr["done"])

  def body(c):
    cache, cr = c
    model = nnx.merge(graphdef, state)
    n = cr["n"]
    tok = jax.lax.dynamic_index_in_dim(cr["out"], n - 1, axis=1, keepdims=False)
    (logits, cache), stats = nnx.capture(model, SelectionStats)(
        tok[:, None], positions=(lengths + n - 1)[:, None], cache=cache, phase=DECODE)
    cache = _constrain(cache, mesh)
    fracs = jax.tree.leaves(stats)
    nxt = sampling_lib.sample(logits[:, 0], jax.random.fold_in(key, n),
                              **dataclasses.asdict(sampling))
    nxt = jnp.where(cr["done"], pad_id, nxt)
    out = jax.lax.dynamic_update_index_in_dim(cr["out"], nxt, n, axis=1)
    cr = dict(out=out, n=n + 1, done=cr["done"] | _is_eos(nxt, eos),
              frac_sum=cr["frac_sum"], frac_count=cr["frac_count"])
    if fracs:
      cr["frac_sum"] = cr["frac_sum"] + jnp.mean(jnp.concatenate([f.reshape(-1) for f in fracs]))
      cr["frac_count"] = cr["frac_count"] + 1.0
    return cache, cr

  return jax.lax.while_loop(cond, body, (cache, carry))


# ---------------------------------------------------------------------------


def _eos_tuple(eos) -> tuple[int, ...]:
  if eos is None:
    return ()
  if isinstance(eos, (int, np.integer)):
    return (int(eos),)
  return tuple(int(e) for e in eos)


def check_prompts(input_ids, prompt_lengths, vocab_size: int):
  """Validated (ids [batch, prompt_len] int32, lengths [batch] int32) as numpy arrays."""
  ids = np.asarray(input_ids)
  if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
    raise ValueError(f"input_ids must be [batch, prompt_len] with both >= 1, got shape "
                     f"{ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
  b, p = ids.shape
  if prompt_lengths is None:
    lengths = np.full((b,), p, np.int32)
  else:
    lengths = np.asarray(prompt_lengths).astype(np.int64)
    if lengths.shape != (b,):
      raise ValueError(f"prompt_lengths must have shape [batch]=({b},), got {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > p:
      raise ValueError(f"prompt_lengths must be in [1, {p}] (the padded prompt length), got "
                       f"{lengths.tolist()}")
  real = np.arange(p)[None] < lengths[:, None]
  bad = real & ((ids < 0) | (ids >= vocab_size))
  if bad.any():
    r, c = np.argwhere(bad)[0]
    raise ValueError(f"input_ids[{r}, {c}]={ids[r, c]} is outside the vocabulary "
                     f"[0, {vocab_size})")
  return np.where(real, ids, 0).astype(np.int32), lengths.astype(np.int32)


class Engine:
  """Chunked prefill + batched decode for one model (optionally on a mesh).

  `Engine(model, mesh=mesh)` places the parameters on the mesh in place.
  """

  def __init__(self, model, *, mesh=None, progress: bool | None = None):
    if mesh is not None:
      sharding_lib.shard_model(model, mesh)
    self.model = model
    self.mesh = mesh
    self.progress = progress
    self.graphdef, self.state = nnx.split(model)

  # -- cache -------------------------------------------------------------------

  def new_cache(self, batch: int, max_len: int):
    """A zero cache for `batch` rows of up to `max_len` tokens, placed on the mesh."""
    model = self.model
    if self.mesh is None:
      return model.init_cache(batch, max_len)
    shapes = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    shardings = cache_shardings(shapes, self.mesh)
    return jax.jit(lambda: model.init_cache(batch, max_len), out_shardings=shardings)()

  # -- generation --------------------------------------------------------------

  def generate(self, input_ids, max_new_tokens: int, *, prompt_lengths=None,
               sampling: Sampling = Sampling(), eos_token_id=None, pad_token_id: int = 0,
               seed: int = 0, max_len: int | None = None, prefill_chunk: int | None = None,
               on_token: Callable[[int, np.ndarray], None] | None = None,
               on_prefill_chunk: Callable[[int, int, float], None] | None = None
               ) -> Generation:
    """Prefill the prompts in chunks, then decode `max_new_tokens` tokens per row.

    on_token(step, tokens): called per new token position (step 0 = the first token) with
    tokens [batch] (pad_token_id for rows already finished).
    on_prefill_chunk(done, total, seconds): called once each chunk has finished (waits for it:
    one host sync per chunk), with the prefill time so far; lets a long run report progress.
    """
    cfg = self.model.cfg
    ids, lengths = check_prompts(input_ids, prompt_lengths, cfg.vocab_size)
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be a non-negative integer")
    b, p = ids.shape
    eos = _eos_tuple(eos_token_id)
    need = int(lengths.max()) + max_new_tokens
    max_len = need if max_len is None else int(max_len)
    if max_len < need:
      raise ValueError(f"max_len={max_len} is too small: the longest prompt ({lengths.max()} "
                       f"tokens) plus max_new_tokens={max_new_tokens} needs {need}")
    if max_new_tokens == 0:
      return Generation(np.zeros((b, 0), np.int32), {"batch": b, "generated_tokens": 0})
    chunk = prefill_chunk_size(prefill_chunk, p, self.model.sparse)
    n_chunks = -(-p // chunk)
    static = dict(graphdef=self.graphdef, mesh=self.mesh)
    key = jax.random.key(seed)
    lengths_d = jnp.asarray(lengths)
    n_max = max_new_tokens

    cache = self.new_cache(b, max_len)
    summary = {
        "batch": b, "prompt_len": p, "prompt_tokens": int(lengths.sum()),
        "max_len": int(cache[0].max_len), "prefill_chunk": chunk, "chunks": n_chunks,
        "mode": self.model.sparse.mode,
        "devices": 1 if self.mesh is None else int(self.mesh.size),
        "cache_bytes": tree_bytes(cache),
        "cache_bytes_per_device": tree_bytes(cache, per_device=True),
    }

    # Compile ahead so that the timings below measure execution only.
    t = time.perf_counter()
    last_h = jnp.zeros((b, cfg.hidden_size), self.model.dtype)
    carry = self._carry(np.full((b,), pad_token_id, np.int32), n_max, pad_token_id, eos)
    prefill_chunk_step.lower(self.state, cache, np.zeros((b, chunk), np.int32), np.int32(0),
                             lengths_d, last_h, **static).compile()
    _first_token.lower(self.state, last_h, key, graphdef=self.graphdef,
                       sampling=sampling).compile()
    dec_static = dict(sampling=sampling, eos=eos, pad_id=int(pad_token_id), **static)
    if n_max > 1:
      _decode.lower(self.state, cache, carry, lengths_d, np.int32(n_max), key,
                    **dec_static).compile()
    summary["compile_s"] = time.perf_counter() - t

    # Prefill.
    progress = self.progress
    if progress is None:
      progress = sys.stderr.isatty()
    bar = _progress(n_chunks, progress and n_chunks > 1)
    t0 = time.perf_counter()

    def after_chunk(i, last_h):
      if bar is not None or on_prefill_chunk is not None:
        last_h.block_until_ready()
      if bar is not None:
        bar.update(1)
      if on_prefill_chunk is not None:
        on_prefill_chunk(i + 1, n_chunks, time.perf_counter() - t0)

    cache, last_h, blocks = prefill_chunks(self.state, cache, ids, lengths_d, chunk, last_h,
                                           after_chunk=after_chunk, **static)
    if bar is not None:
      bar.close()
    first, logits = _first_token(self.state, last_h, key, graphdef=self.graphdef,
                                 sampling=sampling)
    first = np.asarray(first)
    ttft = time.perf_counter() - t0
    summary.update(ttft_s=ttft, prefill_s=ttft, prefill_tok_s=summary["prompt_tokens"] / ttft)
    selected, causal = (float(x) for x in np.asarray(blocks))
    summary["prefill_selected_fraction"] = selected / causal if causal else None
    if on_token is not None:
      on_token(0, first.copy())

    # Decode.
    carry = self._carry(first, n_max, pad_token_id, eos)
    t1 = time.perf_counter()
    if n_max > 1:
      if on_token is None:
        cache, carry = _decode(self.state, cache, carry, lengths_d, np.int32(n_max), key,
                               **dec_static)
      else:
        for step in range(1, n_max):
          cache, carry = _decode(self.state, cache, carry, lengths_d, np.int32(step + 1), key,
                                 **dec_static)
          if int(carry["n"]) <= step:  # every row finished
            break
          on_token(step, np.asarray(carry["out"][:, step]))
    out = np.asarray(carry["out"])
    decode_s = time.perf_counter() - t1
    steps = int(carry["n"]) - 1
    count = float(carry["frac_count"])
    summary.update(
        decode_steps=steps, decode_s=decode_s,
        decode_tok_s=(b * steps / decode_s) if steps else math.nan,
        generated_tokens=int(b * (steps + 1)),
        selected_fraction=float(carry["frac_sum"]) / count if count else None)
    del cache
    return Generation(out, summary, np.asarray(logits))

  def _carry(self, first, n_max: int, pad_id: int, eos):
    first = jnp.asarray(first, jnp.int32)
    out = jnp.full((first.shape[0], n_max), pad_id, jnp.int32).at[:, 0].set(first)
    return dict(out=out, n=jnp.int32(1), done=_is_eos(first, eos),
                frac_sum=jnp.float32(0.0), frac_count=jnp.float32(0.0))


def _progress(total: int, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return None
  return tqdm(total=total, desc="prefill", unit="chunk", file=sys.stderr)
