"""Tiny random-init Llama-style model: runs in seconds on CPU (tests, notebooks, CI)."""

from rtpurbo_jax.config import run_config


def get_config():
  c = run_config()
  c.name = "tiny"
  c.model_path = ""  # random init from c.model
  c.model.update(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                 max_position_embeddings=65536, tie_embeddings=True)
  c.sparse.update(mode="rtpurbo", window=128, sinks=4, top_p=0.9, block_size=64,
                  seqlen_threshold=0, indexer_dim=8)
  c.plan.retrieval_ratio = 0.25
  c.infer.ctx = "1K"
  c.infer.max_new_tokens = 8
  c.infer.prefill_chunk = 256
  return c
