"""Training: the RTPurbo conversion pipeline (stages.py) on a shared sharded loop (trainer.py).

  data.py        local text sources, tokenisers, packing, grain pipelines, passkey documents
  losses.py      stage-1 indexer KL (chunked), stage-2 top-k KL, LM loss
  optim.py       AdamW + warmup schedules
  checkpoint.py  orbax checkpoints with fingerprint checks
  metrics.py     JSONL + TensorBoard + progress bar
  trainer.py     ParamSplit, Task, Trainer (jit with shardings, accumulation, resume)
  stages.py      calibrate -> stage1 -> stage2 (and lm); `run_pipeline(cfg)` drives train.py
"""
