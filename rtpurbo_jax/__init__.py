"""rtpurbo_jax: turn a full-attention decoder LLM into an RTPurbo sparse model in JAX.

Public API (imported lazily so `import rtpurbo_jax` stays cheap):
  from_pretrained(path_or_name, dtype="float32")    HF folder or "smollm2-135m[-rtpurbo]"
  save_pretrained(model, path)                       HF format (+ headwise_config, indexer)
  save_artifacts(model, path)                        only the plan + indexer (a base overlay)
  load_tokenizer(path_or_name)                       transformers tokenizer
  generate(model, input_ids, max_new_tokens, ...)    KV-cached sampling
  calibrate(model, input_ids, needle_span, retrieval_ratio=0.15) -> HeadPlan (+ scores)
  to_rtpurbo(model, plan, indexer=None, *, window, sinks, top_p, block_size, ...)
  memory_report(config, plan, ctx, batch)            cache bytes, dense vs RTPurbo
"""

__version__ = "0.1.0"

_EXPORTS = {
    "from_pretrained": "rtpurbo_jax.hf.api",
    "save_pretrained": "rtpurbo_jax.hf.api",
    "save_artifacts": "rtpurbo_jax.hf.api",
    "load_tokenizer": "rtpurbo_jax.hf.api",
    "generate": "rtpurbo_jax.infer.generate",
    "calibrate": "rtpurbo_jax.calibration",
    "to_rtpurbo": "rtpurbo_jax.convert",
    "memory_report": "rtpurbo_jax.infer.memory",
    "HeadPlan": "rtpurbo_jax.attention.plan",
    "ModelConfig": "rtpurbo_jax.config",
    "SparseConfig": "rtpurbo_jax.config",
    "Transformer": "rtpurbo_jax.models.transformer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    import importlib
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'rtpurbo_jax' has no attribute {name!r}")
