"""Write SmolLM2 RTPurbo artifacts with another indexer: the committed plan and backbone delta,
W_q / W_k (and the distance bias) from an `indexer_<variant>.npz` of
`scripts/stage1_objective.py`.

The bias keeps the buckets that the fit's windows reach (1 + floor(log2(blocks - 1)) + 1 for
`--train_len` tokens: 8 at 8K with 64-token blocks); farther blocks then share the last
trained bucket (`indexer.distance_bucket` caps at the last one) instead of an untrained zero.
The backbone delta of `--model`'s artifacts is copied unchanged (the indexer is not part of
it).

  python scripts/export_indexer.py --npz /tmp/db8/indexer_token_pos.npz --train_len 8192 \\
      --top_p 0.8 --out /tmp/art/smollm2-135m-rtpurbo
  RTPURBO_ASSETS=/tmp/art python -m rtpurbo_jax.eval ...   # evaluates them
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rtpurbo_jax.files import atomic_write_json  # noqa: E402
from rtpurbo_jax.hf import api  # noqa: E402


def reached_buckets(train_len: int, block_size: int) -> int:
  """Distance buckets a fit on `train_len`-token windows trains: the own block's, and one per
  power of two up to the farthest block back."""
  farthest = -(-train_len // block_size) - 1
  return 1 if farthest < 1 else 2 + int(math.floor(math.log2(farthest)))


def split_by_layer(stacked: np.ndarray, counts: list[tuple[int, int]]) -> dict:
  """[n_ret, ...] in (layer, head) order -> {layer: [n_layer, ...]}."""
  out, i = {}, 0
  for layer, n in counts:
    out[layer] = stacked[i:i + n]
    i += n
  if i != len(stacked):
    raise SystemExit(f"the npz holds {len(stacked)} heads; the plan has {i}")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n\n", 1)[1])
  ap.add_argument("--npz", required=True, help="indexer_<variant>.npz (wq, wk[, distance_bias])")
  ap.add_argument("--train_len", type=int, required=True,
                  help="the fit's window length (sets the distance buckets kept)")
  ap.add_argument("--out", required=True, help="artifacts folder to write")
  ap.add_argument("--model", default=api.SMOLLM2_RTPURBO)
  ap.add_argument("--top_p", type=float, default=None,
                  help="the artifacts' top_p (default: --model's)")
  args = ap.parse_args(argv)
  import rtpurbo_jax as rj
  from rtpurbo_jax.convert import rebuild, set_distance_bias, set_indexer

  z = np.load(args.npz)
  model = rj.from_pretrained(args.model)
  counts = [(i, len(layer.attn.heads.retrieval)) for i, layer in enumerate(model.layers)
            if layer.attn.heads.retrieval]
  sparse = model.sparse
  if args.top_p is not None:
    sparse = dataclasses.replace(sparse, top_p=args.top_p)
  n = reached_buckets(args.train_len, sparse.block_size) if "distance_bias" in z else 0
  if n > (z["distance_bias"].shape[1] if n else 0):
    raise SystemExit(f"the npz has {z['distance_bias'].shape[1]} buckets; {n} are reached")
  sparse = dataclasses.replace(sparse, distance_buckets=n)
  if sparse != model.sparse:
    model = rebuild(model, sparse=sparse)
  if n:
    set_distance_bias(model, split_by_layer(np.asarray(z["distance_bias"][:, :n]), counts))
  wq, wk = split_by_layer(z["wq"], counts), split_by_layer(z["wk"], counts)
  set_indexer(model, {i: (wq[i], wk[i]) for i in wq})
  source = os.path.join(api.artifacts_dir(), args.model)
  with open(os.path.join(source, api.ARTIFACT_CONFIG)) as f:
    delta = json.load(f).get(api.ARTIFACT_DELTA_KEY)
  api.save_artifacts(model, args.out)
  if delta:  # the backbone is unchanged: its delta file and record, byte for byte
    shutil.copyfile(os.path.join(source, delta["file"]), os.path.join(args.out, delta["file"]))
    cfg_path = os.path.join(args.out, api.ARTIFACT_CONFIG)
    with open(cfg_path) as f:
      config = json.load(f)
    atomic_write_json(cfg_path, {**config, api.ARTIFACT_DELTA_KEY: delta}, indent=2,
                      sort_keys=True)
  print(f"wrote {args.out}: {len(counts)} layers, {sum(n for _, n in counts)} heads, "
        f"top_p={sparse.top_p}, distance_buckets={sparse.distance_buckets}")


if __name__ == "__main__":
  main()
