"""Llama-3.1-8B shape (32 layers, 32 q / 8 kv heads, head_dim 128, llama3 rope scaling, 128K).

Point `model_path` at a local HF folder of Llama-3.1-8B(-Instruct) for real weights, or run
`infer.py --random_weights` for shape-only runs. Paper settings: window 8192 + 4 sinks,
top-p 0.9, blocks of 64, dense below 16K tokens, 15% retrieval heads.
"""

from rtpurbo_jax.config import run_config


def get_config():
  c = run_config()
  c.name = "llama8b"
  c.model_path = ""
  c.dtype = "bfloat16"
  c.model.update(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=False,
                 max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128009)
  c.model.rope_scaling.update(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=8192)
  c.sparse.update(mode="rtpurbo", window=8192, sinks=4, top_p=0.9, block_size=64,
                  seqlen_threshold=16384, indexer_dim=16)
  c.plan.retrieval_ratio = 0.15
  c.infer.ctx = "128K"
  c.infer.prefill_chunk = 65536
  return c
