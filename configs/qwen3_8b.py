"""Qwen3-8B shape (36 layers, 32 q / 8 kv heads, head_dim 128, per-head q/k RMSNorm)."""

from rtpurbo_jax.config import run_config


def get_config():
  c = run_config()
  c.name = "qwen3_8b"
  c.model_path = ""
  c.dtype = "bfloat16"
  c.model.update(family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                 num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=False, qk_norm=True,
                 max_position_embeddings=40960, eos_token_id=151645)
  c.sparse.update(mode="rtpurbo", window=8192, sinks=4, top_p=0.9, block_size=64,
                  seqlen_threshold=16384, indexer_dim=16)
  c.plan.retrieval_ratio = 0.15
  c.infer.ctx = "128K"
  c.infer.prefill_chunk = 65536
  return c
