"""Long-context evaluation of dense / RTPurbo / streaming / top-k on the same weights.

  python -m rtpurbo_jax.eval --config=configs/smollm2_135m.py --config.eval.lengths=2K,4K,8K

Modules:
  corpus      tokenizer adapters (byte stub, HF) and the Shakespeare haystack / held-out text
  tasks       passkey, needle-in-a-haystack (single, multi-key, multi-value), variable
              tracking, common words: prompts + answers + scoring rule, deterministic per seed
  scoring     exact / contains / all / partial
  decode      greedy answers (prefill + cached decode) with the decode steps' selection stats
  perplexity  held-out perplexity, sparse modes scored decode-style
  sparsity    selected blocks, tokens per retrieval head, recall of the exact attention mass
  runner      the run (EvalSettings, evaluate, run_from_config)
  report      results.json, results.md, PNG plots; merging runs over different lengths
"""
