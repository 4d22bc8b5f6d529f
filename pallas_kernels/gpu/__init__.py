"""GPU kernels: Pallas with the Triton lowering (plus cuDNN for dense parts).

Modules (each holds its kernel(s) and the jnp `reference` it must match):
  window_attention  flash prefill over a contiguous key range (sink + window, or causal)
  cudnn_attention   cuDNN causal / sliding-window prefill, sinks merged by LSE
  sparse_prefill    block-sparse flash prefill over per-query-block block lists
  prefill_select    pooled block log-mass tiles + top-p (sparse-prefill selection)
  topp_select       decode selection: block log-mass of compressed keys + top-p
  topp_rows         register-resident exact / histogram top-p per row
  compact           boolean mask rows -> ascending block lists + counts
  decode            split-KV, GQA-grouped decode over block lists (sparse and ring)
  dispatch          the entry points `pallas_kernels.ops` routes to
  aot               lower for an abstract H200 and compile to sm_90 without a GPU
"""
