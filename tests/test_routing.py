"""HeadRouting (attention/routing.py) vs a brute-force derivation from the plan mask.

The oracle restates docs/DESIGN.md §1 one query head at a time: in `dense` every head is
dense, in `streaming` every head local, in `rtpurbo` / `topk` a retrieval head is selected
and the others local; a KV head keeps a full cache iff one of its query heads is selected
or dense; a local head reads the ring iff its KV head keeps none.
"""

import numpy as np
import pytest

from rtpurbo_jax.attention import routing as routing_lib
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import MODES, ConfigError


def _oracle(row, mode: str, num_kv: int) -> dict:
  """{query head: (group, kv head, cache slot)}, full_kv, ring_kv for one mask row."""
  h = len(row)
  g = h // num_kv
  role = {}
  for q in range(h):
    if mode == "dense":
      role[q] = "dense"
    elif mode == "streaming":
      role[q] = "local"
    else:
      role[q] = "selected" if row[q] else "local"
  full = sorted({q // g for q in range(h) if role[q] != "local"})
  ring = [k for k in range(num_kv) if k not in full]
  heads = {}
  for q in range(h):
    kv = q // g
    if role[q] == "local":
      group, slot = ("ring_local", ring.index(kv)) if kv in ring else ("full_local",
                                                                       full.index(kv))
    else:
      group, slot = role[q], full.index(kv)
    heads[q] = (group, kv, slot)
  return {"heads": heads, "full_kv": tuple(full), "ring_kv": tuple(ring)}


def _check(routing, want, num_heads):
  assert routing.full_kv == want["full_kv"] and routing.ring_kv == want["ring_kv"]
  seen = {}
  for name in ("ring_local", "full_local", "selected", "dense"):
    group = getattr(routing, name)
    assert list(group.heads) == sorted(group.heads)
    assert len(group.kv) == len(group.slots) == len(group)
    for q, kv, slot in zip(group.heads, group.kv, group.slots):
      assert q not in seen, f"head {q} in {seen.get(q)} and {name}"
      seen[q] = name
      assert (name, kv, slot) == want["heads"][q], (q, name, kv, slot)
      # The slot names the head's own KV head inside the array the group reads.
      kv_list = routing.ring_kv if name == "ring_local" else routing.full_kv
      assert kv_list[slot] == kv
  assert sorted(seen) == list(range(num_heads))
  local = sorted(routing.ring_local.heads + routing.full_local.heads)
  assert routing.local.heads == tuple(local)
  assert routing.local.kv == tuple(want["heads"][q][1] for q in local)
  assert routing.num_heads == num_heads


@pytest.mark.parametrize("heads,kv", [(8, 2), (8, 4), (8, 8), (4, 1), (6, 3)])
def test_routing_matches_bruteforce_for_every_mode(heads, kv, rng):
  # Random layers plus the edge rows: no retrieval head, all retrieval heads, and one
  # retrieval head in the first GQA group (a mixed group beside ring-only groups).
  rows = [rng.random(heads) < 0.3 for _ in range(6)]
  rows += [np.zeros(heads, bool), np.ones(heads, bool), np.eye(heads, dtype=bool)[0]]
  plan = HeadPlan.from_mask(np.stack(rows), kv)
  for mode in MODES:
    routings = routing_lib.plan_routings(plan, mode)
    assert len(routings) == plan.num_layers
    for l, routing in enumerate(routings):
      assert routing.mode == mode
      assert routing == routing_lib.head_routing(plan.layer(l), mode, heads, kv)
      _check(routing, _oracle(plan.mask()[l], mode, kv), heads)
      if routing_lib.selects_blocks(mode):
        # The selecting modes keep the plan's own KV split.
        assert routing.full_kv == plan.layer(l).full_kv
        assert routing.selected.heads == plan.layer(l).retrieval


def test_mixed_gqa_layer_by_hand():
  # 6 query heads over 3 KV heads (groups {0,1}, {2,3}, {4,5}); retrieval heads 2, 3, 5:
  # KV 0 ring-only, KV 1 selected-only, KV 2 mixed.
  plan = HeadPlan.from_mask([[0, 0, 1, 1, 0, 1]], 3)
  r = routing_lib.head_routing(plan.layer(0), "rtpurbo", 6, 3)
  assert (r.full_kv, r.ring_kv) == ((1, 2), (0,))
  assert r.ring_local == routing_lib.HeadGroup((0, 1), (0, 0), (0, 0))
  assert r.full_local == routing_lib.HeadGroup((4,), (2,), (1,))
  assert r.selected == routing_lib.HeadGroup((2, 3, 5), (1, 1, 2), (0, 0, 1))
  assert not r.dense
  both = r.dense + r.selected
  assert both == r.selected and len(both) == 3
  assert hash(r) == hash(routing_lib.head_routing(plan.layer(0), "rtpurbo", 6, 3))


def test_selecting_modes():
  assert [m for m in MODES if routing_lib.selects_blocks(m)] == ["rtpurbo", "topk"]


def test_bad_arguments_are_one_clear_error():
  plan = HeadPlan.from_mask([[1, 0, 0, 0]], 2)
  with pytest.raises(ConfigError, match="mode"):
    routing_lib.head_routing(plan.layer(0), "sparse", 4, 2)
  with pytest.raises(ConfigError, match="do not fit"):
    routing_lib.head_routing(plan.layer(0), "rtpurbo", 8, 2)
  with pytest.raises(ConfigError, match="do not fit"):
    routing_lib.head_routing(plan.layer(0), "rtpurbo", 4, 4)
