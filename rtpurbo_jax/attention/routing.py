"""Head routing: how each query head of one layer attends in one mode, and what it reads.

A `HeadPlan` names each query head a retrieval head or a local head; the mode turns that into
three groups (docs/DESIGN.md §1):

  local     sinks + window (every head in `streaming`, the non-retrieval heads in `rtpurbo` /
            `topk`);
  selected  the indexer selects key blocks for them (the retrieval heads in `rtpurbo` /
            `topk`: top-p / top-k in decode, dense or indexer-sparse in prefill);
  dense     causal over the full history (every head in `dense`).

A KV head keeps a full cache iff one of its query heads is selected or dense; otherwise only a
ring of sinks + recent tokens. Local heads on a full-cache KV head (`full_local`) read the
full cache; the others (`ring_local`) read the ring.

`HeadRouting` is built once per layer (`head_routing`) and is the one place these rules are
applied: the attention module, the cache, the memory planner and the evaluation read it.
"""

from __future__ import annotations

import dataclasses

from rtpurbo_jax.attention.plan import HeadPlan, LayerHeads
from rtpurbo_jax.config import MODES, ConfigError

# Modes whose retrieval heads the indexer selects key blocks for.
SELECTING_MODES = ("rtpurbo", "topk")


def selects_blocks(mode: str) -> bool:
  """Whether `mode` has selected heads (indexer block selection)."""
  return mode in SELECTING_MODES


@dataclasses.dataclass(frozen=True)
class HeadGroup:
  """Query heads that follow one rule, and the KV heads they read.

  heads: query heads, ascending; an index into q [batch, seq, heads, head_dim].
  kv:    the KV head of each, in the model's numbering: an index into k / v
         [batch, seq, kv_heads, head_dim] (attention without a cache).
  slots: the KV head of each inside the cache array the group reads: an index into
         full_k / full_v or ring_k / ring_v [batch, n, T, head_dim] (see `HeadRouting`).
  """

  heads: tuple[int, ...] = ()
  kv: tuple[int, ...] = ()
  slots: tuple[int, ...] = ()

  def __len__(self) -> int:
    return len(self.heads)

  def __add__(self, other: "HeadGroup") -> "HeadGroup":
    """Both groups' heads (in this order); only for groups that read the same cache array."""
    return HeadGroup(self.heads + other.heads, self.kv + other.kv, self.slots + other.slots)


@dataclasses.dataclass(frozen=True)
class HeadRouting:
  """The head groups of one layer in one mode (hashable: a static jit argument).

  Every query head is in exactly one of `local`, `selected`, `dense`; `local` is split into
  `ring_local` (slots index ring_kv) and `full_local` (slots index full_kv). `selected` and
  `dense` read the full cache (slots index full_kv). `local.slots` is empty: its heads read
  two different arrays. The compressed-key cache holds one stream per selected head, in
  `selected.heads` order.
  """

  mode: str
  local: HeadGroup
  ring_local: HeadGroup
  full_local: HeadGroup
  selected: HeadGroup
  dense: HeadGroup
  full_kv: tuple[int, ...]  # KV heads with a full cache, ascending
  ring_kv: tuple[int, ...]  # KV heads with only a ring, ascending

  @property
  def num_heads(self) -> int:
    return len(self.local) + len(self.selected) + len(self.dense)


def head_routing(heads: LayerHeads, mode: str, num_heads: int,
                 num_kv_heads: int) -> HeadRouting:
  """The routing of one layer (`heads` = `HeadPlan.layer(l)`) in `mode`."""
  if mode not in MODES:
    raise ConfigError(f"mode={mode!r}: expected one of {MODES}")
  if (len(heads.local) + len(heads.retrieval) != num_heads or num_kv_heads < 1
      or num_heads % num_kv_heads or heads.group_size != num_heads // num_kv_heads):
    raise ConfigError(f"layer heads {heads} do not fit {num_heads} query heads over "
                      f"{num_kv_heads} KV heads")
  every = tuple(range(num_heads))
  if mode == "dense":
    local, selected, dense = (), (), every
  elif mode == "streaming":
    local, selected, dense = every, (), ()
  else:
    local, selected, dense = heads.local, heads.retrieval, ()
  kv_of = heads.kv_of
  full_kv = tuple(sorted({kv_of(h) for h in selected + dense}))
  ring_kv = tuple(k for k in range(num_kv_heads) if k not in full_kv)

  def group(hs, slots_in=None):
    kv = tuple(kv_of(h) for h in hs)
    slots = () if slots_in is None else tuple(slots_in.index(k) for k in kv)
    return HeadGroup(tuple(hs), kv, slots)

  return HeadRouting(
      mode=mode,
      local=group(local),
      ring_local=group(tuple(h for h in local if kv_of(h) in ring_kv), ring_kv),
      full_local=group(tuple(h for h in local if kv_of(h) in full_kv), full_kv),
      selected=group(selected, full_kv),
      dense=group(dense, full_kv),
      full_kv=full_kv,
      ring_kv=ring_kv,
  )


def plan_routings(plan: HeadPlan, mode: str) -> tuple[HeadRouting, ...]:
  """`head_routing` of every layer of `plan` in `mode`."""
  return tuple(head_routing(plan.layer(l), mode, plan.num_heads, plan.num_kv_heads)
               for l in range(plan.num_layers))
