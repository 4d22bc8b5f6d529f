"""GGUF (llama.cpp) -> HF folder, for Llama-architecture files such as SmolLM2's.

Quantized tensors (Q4_1, Q8_0, ...) are dequantized to float32 with `gguf.quants.dequantize`.
llama.cpp stores attn_q / attn_k with the rows of every head interleaved for its
"adjacent pairs" RoPE: HF row (head, half, i) sits at GGUF row (head, i, half). We undo that so
the weights use the rotate-half layout of HF and of this project.

The result is an ordinary HF folder (config.json, model.safetensors in float32, tokenizer
files), published atomically.
"""

from __future__ import annotations

import os

import numpy as np

from rtpurbo_jax.hf import safetensors_io

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str:
  """llama.cpp tensor name -> HF name (ValueError for names a Llama model has no place for)."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
  raise ValueError(f"GGUF tensor {gguf_name!r} is not supported (Llama architecture only; "
                   "llama3 rope_freqs and biases are not handled)")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row order. w: [n_heads * head_dim, in] -> same shape, HF order."""
  rows, cols = w.shape
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader, key: str, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def read_config(reader) -> dict:
  """HF config.json dict from GGUF metadata (llama architecture)."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

  def need(key):
    v = _field(reader, f"{arch}.{key}")
    if v is None:
      raise ValueError(f"GGUF metadata lacks {arch}.{key}")
    return v

  hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
  kv = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
  head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
  rot = _field(reader, f"{arch}.rope.dimension_count")
  if rot is not None and int(rot) != head_dim:
    raise ValueError(f"GGUF rope.dimension_count={rot} != head_dim={head_dim} (partial rotary "
                     "is not supported)")
  if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
    raise ValueError("GGUF rope scaling is not supported")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab = _field(reader, f"{arch}.vocab_size")
  if vocab is None:
    if tokens is None:
      raise ValueError("GGUF metadata has neither a vocab_size nor a token list")
    vocab = len(tokens.data)
  names = {t.name for t in reader.tensors}
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(need("feed_forward_length")),
      "num_hidden_layers": int(need("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": kv,
      "head_dim": head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
      "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 8192)),
      "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      "rope_scaling": None,
      "rope_parameters": {"rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
                          "rope_type": "default"},
      "tie_word_embeddings": "output.weight" not in names,
      "attention_bias": False,
      "mlp_bias": False,
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
      "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
      "dtype": "float32",
      "torch_dtype": "float32",
  }


def read_tensors(reader, config: dict) -> dict[str, np.ndarray]:
  """Every tensor dequantized to float32, HF names and layout."""
  from gguf.quants import dequantize

  heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
  out = {}
  for t in reader.tensors:
    name = hf_name(t.name)
    w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
    want = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
    if w.shape != want:
      w = w.reshape(want)
    if t.name.endswith("attn_q.weight"):
      w = unpermute_rope_rows(w, heads)
    elif t.name.endswith("attn_k.weight"):
      w = unpermute_rope_rows(w, kv)
    out[name] = np.ascontiguousarray(w)
  return out


def _save_tokenizer(gguf_path: str, folder: str, config: dict) -> None:
  """Tokenizer from the GGUF via transformers, saved as ordinary tokenizer files."""
  from transformers import AutoTokenizer

  d, name = os.path.split(os.path.abspath(gguf_path))
  tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
  # The GGUF metadata is the authority on special tokens; the converted tokenizer may name
  # another eos / pad token.
  for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("pad_token", "pad_token_id")):
    tid = config.get(key)
    if tid is not None:
      setattr(tok, attr, tok.convert_ids_to_tokens(int(tid)))
  tok.save_pretrained(folder)


def convert_to_hf_folder(gguf_path: str, target: str, *, tokenizer: bool = True) -> str:
  """Write config.json + model.safetensors (+ tokenizer files) for `gguf_path` at `target`.

  Atomic: `target` appears complete or not at all. If another process publishes `target`
  first, its copy is kept. Returns `target`.
  """
  from gguf import GGUFReader

  if not os.path.isfile(gguf_path):
    raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
  reader = GGUFReader(gguf_path)
  config = read_config(reader)
  existed = os.path.exists(target)
  with safetensors_io.staged_folder(target, keep_existing=not existed) as tmp:
    tensors = read_tensors(reader, config)
    safetensors_io.write_weights(tmp, tensors)
    del tensors
    if tokenizer:
      _save_tokenizer(gguf_path, tmp, config)
    safetensors_io.write_json(os.path.join(tmp, "config.json"), config)
  return target
