"""The evaluation suite: task generators, scoring, perplexity, selection report, greedy decode,
and the CLI end to end on a tiny random model."""

import collections
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.convert import to_rtpurbo
from rtpurbo_jax.eval import perplexity as ppl_lib
from rtpurbo_jax.eval import report, scoring, sparsity
from rtpurbo_jax.eval.corpus import ByteCodec, Corpus, HFCodec
from rtpurbo_jax.eval.decode import GreedyDecoder
from rtpurbo_jax.eval.runner import EvalSettings
from rtpurbo_jax.eval.tasks import TASKS, TaskContext, make_examples
from rtpurbo_jax.models.transformer import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus():
  return Corpus.shakespeare()


@pytest.fixture(scope="module")
def bpe_codec(corpus):
  """A real byte-level BPE (trained here on Shakespeare): token counts of pieces do not add
  up exactly, unlike the byte codec."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus.haystack[:20000], trainer)
  return HFCodec(PreTrainedTokenizerFast(tokenizer_object=tok))


NEEDLE_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue",
                "variable_tracking")


# ---------------------------------------------------------------------------
# Generators.


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generators_are_deterministic_per_seed(task, corpus, seed):
  ctx = TaskContext(ByteCodec(), corpus)
  a = make_examples(ctx, task, 1024, [0.2, 0.7], 2, seed)
  b = make_examples(ctx, task, 1024, [0.2, 0.7], 2, seed)
  c = make_examples(ctx, task, 1024, [0.2, 0.7], 2, seed + 1)
  assert a == b
  assert [e.prompt for e in a] != [e.prompt for e in c]
  assert [e.answers for e in a] != [e.answers for e in c]
  # The two samples differ from each other too.
  assert a[0].prompt != a[1].prompt


@pytest.mark.parametrize("codec_name", ["byte", "bpe"])
@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_needles_hold_the_answer_at_the_requested_depth(task, codec_name, corpus, bpe_codec,
                                                        rng, seed):
  codec = ByteCodec() if codec_name == "byte" else bpe_codec
  ctx = TaskContext(codec, corpus)
  length = int(rng.choice([1024, 1536, 2048]))
  depths = [float(rng.uniform(0.0, 1.0)) for _ in range(3)] + [0.0, 1.0]
  for e in make_examples(ctx, task, length, depths, len(depths), seed):
    ids = codec.encode(e.prompt)
    budget = length - e.max_new_tokens
    # Fits, and is filled to within a line or two of the budget.
    longest_line = max(len(codec.encode(l + "\n")) for l in e.prompt.splitlines())
    assert budget - 2 * longest_line - 8 <= len(ids) <= budget
    h0, h1 = e.haystack_span
    needles = [e.prompt[a:b] for a, b in e.needle_spans]
    # Every answer sits in a needle; the target needle comes first.
    for ans in e.answers:
      assert any(ans in n for n in needles), (ans, needles)
      assert scoring.score("contains", e.prompt[h0:h1], ans) == 1.0
    assert e.answers[0] in needles[0]
    # Depth: tokens of haystack text before the first needle / all haystack tokens.
    a0, b0 = e.needle_spans[0]
    before = len(codec.encode(e.prompt[h0:a0])) - sum(
        len(codec.encode(e.prompt[a:b] + "\n")) for a, b in e.needle_spans if b <= a0)
    total = len(codec.encode(e.prompt[h0:h1])) - sum(
        len(codec.encode(n + "\n")) for n in needles)
    tol = (longest_line + 8 * len(needles) + 4) / total
    assert abs(before / total - e.depth) <= tol + 0.02, (before, total, e.depth)
    assert 0 <= h0 <= a0 < b0 <= h1 <= len(e.prompt)


def test_multikey_distractors_have_other_keys(corpus, seed):
  ctx = TaskContext(ByteCodec(), corpus)
  for e in make_examples(ctx, "niah_multikey", 1024, [0.5], 3, seed):
    keys = [re.search(r"numbers for (\S+) is", e.prompt[a:b]).group(1) for a, b in e.needle_spans]
    values = [re.search(r"is: (\d+)", e.prompt[a:b]).group(1) for a, b in e.needle_spans]
    assert len(set(keys)) == len(keys) == 4 and len(set(values)) == 4
    question = e.prompt[e.haystack_span[1]:]
    assert keys[0] in question and all(k not in question for k in keys[1:])


def test_variable_chain_resolves_to_the_answers(corpus, seed):
  ctx = TaskContext(ByteCodec(), corpus)
  for e in make_examples(ctx, "variable_tracking", 1024, [0.3], 2, seed):
    stmts = [e.prompt[a:b] for a, b in e.needle_spans]
    value = re.search(r"hold the value (\d+) in", e.prompt).group(1)
    # Resolve the assignments in prompt order, as a reader would.
    env = {}
    for s in sorted(stmts, key=e.prompt.index):
      name, rhs = re.match(r"VAR (\w+) = (VAR \w+|\d+)\.", s).groups()
      env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
    assert sorted(n for n, v in env.items() if v == value) == sorted(e.answers)


@pytest.mark.parametrize("codec_name", ["byte", "bpe"])
def test_common_words_answers_are_the_most_frequent(codec_name, corpus, bpe_codec, seed):
  codec = ByteCodec() if codec_name == "byte" else bpe_codec
  ctx = TaskContext(codec, corpus)
  for e in make_examples(ctx, "common_words", 2048, [0.5], 2, seed):
    a, b = e.haystack_span
    words = re.findall(r"^\d+\. (\w+)$", e.prompt[a:b], flags=re.M)
    counts = collections.Counter(words)
    top = counts.most_common()
    assert sorted(e.answers) == sorted(w for w, _ in top[:10])
    assert top[9][1] > top[10][1]  # strictly more frequent than any other word
    assert len(codec.encode(e.prompt)) <= 2048 - e.max_new_tokens


def test_bad_generator_input(corpus):
  ctx = TaskContext(ByteCodec(), corpus)
  with pytest.raises(ValueError, match="unknown task"):
    make_examples(ctx, "nope", 1024, [0.5], 1, 0)
  with pytest.raises(ValueError, match="outside"):
    make_examples(ctx, "passkey", 1024, [1.5], 1, 0)
  with pytest.raises(ValueError, match="too short"):
    make_examples(ctx, "passkey", 100, [0.5], 1, 0)


# ---------------------------------------------------------------------------
# Scoring.


def test_scoring_rules_on_known_answers():
  s = scoring.score
  assert s("exact", " 12345.\nmore", "12345") == 1.0
  assert s("exact", "The key is 12345", "12345") == 0.0
  assert s("exact", "\n  Apple!", ["pear", "apple"]) == 1.0
  assert s("contains", "the pass key is 12345. Remember", "12345") == 1.0
  assert s("contains", "the pass key is 912345", "12345") == 0.0  # whole numbers only
  assert s("contains", "VAR ABCDEF", "ABCDE") == 0.0
  assert s("contains", "abcde, fghij", ["x", "FGHIJ"]) == 1.0  # any answer, any case
  assert s("all", "a1 b2 c3", ["a1", "c3"]) == 1.0
  assert s("all", "a1 b2", ["a1", "c3"]) == 0.0
  assert s("partial", "AAAAA, CCCCC and DDDDD", ["AAAAA", "BBBBB", "CCCCC", "DDDDD"]) == 0.75
  assert s("partial", "", ["x", "y"]) == 0.0
  with pytest.raises(ValueError, match="unknown scoring rule"):
    s("fuzzy", "x", "x")
  with pytest.raises(ValueError, match="no expected answers"):
    s("contains", "x", [])


# ---------------------------------------------------------------------------
# Models.


def _tiny(seed, *, layers=2):
  cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=layers,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=65536,
                    tie_embeddings=True)
  return Transformer(cfg, rngs=nnx.Rngs(seed % 2**31), init_std=0.3)


def _plan(model, rng):
  cfg = model.cfg
  return HeadPlan.from_scores(rng.random((cfg.num_layers, cfg.num_heads)), cfg.num_kv_heads,
                              0.25)


SPARSE = SparseConfig(mode="rtpurbo", window=32, sinks=4, top_p=0.8, block_size=16,
                      seqlen_threshold=0, indexer_dim=8, topk_tokens=32, chunk_size=64)


def _models(base, plan, modes=("dense", "rtpurbo", "streaming", "topk"), sparse=SPARSE):
  from rtpurbo_jax.eval.runner import mode_models
  return mode_models(base, plan, sparse, modes)


def _np_nll(logits, ids):
  lg = np.asarray(logits, np.float64)[:, :-1]
  m = lg.max(-1, keepdims=True)
  lse = np.log(np.exp(lg - m).sum(-1)) + m[..., 0]
  tgt = np.take_along_axis(lg, np.asarray(ids)[:, 1:, None], -1)[..., 0]
  return lse - tgt


@pytest.mark.parametrize("mode", ["dense", "rtpurbo", "streaming"])
def test_perplexity_matches_numpy(mode, seed, rng):
  base = _tiny(seed)
  model = _models(base, _plan(base, rng), (mode,))[mode]
  ids = jnp.asarray(rng.integers(3, 300, (2, 100)), jnp.int32)
  sq = jnp.ones(ids.shape, bool) if ppl_lib.decode_style(mode) else None
  # chunk 16 does not divide 99 predicted positions: exercises the padded last chunk.
  got = np.asarray(ppl_lib.make_nll_fn(model, chunk=16)(ids, sq))
  logits = jax.jit(lambda ids, sq: model(ids, sparse_queries=sq))(ids, sq)
  want = _np_nll(logits, ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ppl_lib.token_nll(logits, ids)), want, rtol=1e-5,
                             atol=1e-4)
  start = int(rng.integers(1, 99))
  assert ppl_lib.perplexity(got, start) == pytest.approx(np.exp(want[:, start - 1:].mean()),
                                                         rel=1e-5)
  assert ppl_lib.perplexity(got) == pytest.approx(np.exp(want.mean()), rel=1e-5)


def test_heldout_windows_are_slices_of_the_text(corpus, seed):
  codec = ByteCodec()
  text = corpus.heldout_text()[:20000]
  w = ppl_lib.heldout_windows(codec, text, 512, 3, seed)
  assert w.shape == (3, 512) and w.dtype == np.int32
  assert np.array_equal(w, ppl_lib.heldout_windows(codec, text, 512, 3, seed))
  full = np.asarray(codec.encode(text))
  for row in w:
    hits = [s for s in range(len(full) - 511) if full[s] == row[0] and
            np.array_equal(full[s:s + 512], row)]
    assert hits
  with pytest.raises(ValueError, match="fewer than"):
    ppl_lib.heldout_windows(codec, text[:100], 512, 1, seed)


def _np_topp(logmass, valid, own, p):
  """Block top-p from scratch: heaviest blocks first (ties: lower index) until mass >= p."""
  lm = np.where(valid, logmass, -np.inf)
  mass = np.exp(lm - lm[valid].max())
  mass /= mass.sum()
  keep = np.zeros(len(lm), bool)
  acc = 0.0
  for j in sorted(np.flatnonzero(valid), key=lambda j: (-mass[j], j)):
    if acc >= p:
      break
    keep[j] = True
    acc += mass[j]
  keep[own] = True
  return keep


def test_selection_report_matches_brute_force(seed, rng):
  """Layer 0 of a one-layer model: selection, tokens and recall from numpy."""
  base = _tiny(seed, layers=1)
  plan = HeadPlan.from_mask([[False, True, True, False]], 2)
  model = _models(base, plan, ("rtpurbo",))["rtpurbo"]
  s = 150
  ids = jnp.asarray(rng.integers(3, 300, (1, s)), jnp.int32)
  qpos = sparsity.query_positions(s, 6, seed)
  assert qpos[-1] == s - 1 and np.all(qpos >= s // 2) and len(set(qpos)) == len(qpos)
  rep = sparsity.selection_report(model, ids, qpos)

  attn = model.layers[0].attn
  pos = jnp.arange(s)[None]
  x = attn.project_qkv(model.layers[0].input_norm(jnp.take(model.embed[...], ids, axis=0)),
                       pos, model.inv_freq())
  q_pre, k_pre, q, k = (np.asarray(a, np.float64) for a in x[:4])
  wq, wk = np.asarray(attn.indexer_wq[...]), np.asarray(attn.indexer_wk[...])
  bs = SPARSE.block_size
  for j, h in enumerate(attn.heads.retrieval):
    kvh = attn.heads.kv_of(h)
    got = rep["heads"][j]
    fr, tok, rec = [], [], []
    for t in qpos:
      sc = (wq[j] @ q_pre[0, t, h]) @ (wk[j] @ k_pre[0, :t + 1, kvh].T)
      nb = t // bs + 1
      lm = np.array([np.log(np.exp(sc[b * bs:(b + 1) * bs]).sum()) for b in range(nb)])
      keep = _np_topp(lm, np.ones(nb, bool), nb - 1, SPARSE.top_p)
      logits = k[0, :t + 1, kvh] @ q[0, t, h] / np.sqrt(16)
      p = np.exp(logits - logits.max())
      p /= p.sum()
      sel = np.repeat(keep, bs)[:t + 1]
      fr.append(keep.sum() / nb)
      tok.append(sel.sum())
      rec.append(p[sel].sum())
    assert (got["layer"], got["head"]) == (0, h)
    assert got["fraction"] == pytest.approx(np.mean(fr), abs=1e-6)
    assert got["tokens"] == pytest.approx(np.mean(tok), abs=1e-4)
    assert got["recall"] == pytest.approx(np.mean(rec), abs=1e-4)
  assert 0.0 < rep["selected_fraction"] <= 1.0 and 0.0 <= rep["recall"] <= 1.0 + 1e-6


def test_selection_report_top_p_one_is_dense(seed, rng):
  base = _tiny(seed)
  plan = _plan(base, rng)
  sp = SparseConfig(**{**SPARSE.__dict__, "top_p": 1.0})
  model = _models(base, plan, ("rtpurbo",), sp)["rtpurbo"]
  ids = jnp.asarray(rng.integers(3, 300, (1, 130)), jnp.int32)
  rep = sparsity.selection_report(model, ids, [64, 100, 129])
  assert rep["selected_fraction"] == pytest.approx(1.0)
  assert rep["recall"] == pytest.approx(1.0, abs=1e-5)
  assert rep["tokens_per_head"] == pytest.approx(np.mean([65, 101, 130]))
  with pytest.raises(ValueError, match="rtpurbo or topk"):
    sparsity.selection_report(_models(base, plan, ("dense",))["dense"], ids, [100])


def test_shared_selection_reports_equal_separate_ones(seed, rng):
  base = _tiny(seed)
  models = _models(base, _plan(base, rng), ("rtpurbo", "topk"))
  ids = jnp.asarray(rng.integers(3, 300, (1, 140)), jnp.int32)
  qpos = sparsity.query_positions(140, 5, seed)
  both = sparsity.selection_reports(models, ids, qpos)
  for m in ("rtpurbo", "topk"):
    alone = sparsity.selection_report(models[m], ids, qpos)
    for h1, h2 in zip(both[m]["heads"], alone["heads"], strict=True):
      assert h1 == pytest.approx(h2)
    assert both[m]["compute_sparsity"] == pytest.approx(alone["compute_sparsity"])
  # topk keeps ceil(32 / 16) = 2 blocks plus the own block.
  assert all(h["fraction"] <= 3 / (70 // 16 + 1) + 1e-6 for h in both["topk"]["heads"])


def _greedy_brute_force(forward, prompt, steps, size):
  """Greedy tokens from full uncached forwards. Causal: the logits at position n - 1 ignore
  the zeros after it, so one padded shape (one compilation) serves every step."""
  ids = np.zeros((1, size), np.int32)
  ids[0, :len(prompt)] = prompt
  end = len(prompt) + steps
  for n in range(len(prompt), end):
    ids[0, n] = int(jnp.argmax(forward(jnp.asarray(ids))[0, n - 1]))
  return list(ids[0, len(prompt):end])


def test_greedy_decoder_matches_uncached_argmax_and_shares_prefill(seed, rng):
  base = _tiny(seed)
  models = _models(base, _plan(base, rng))
  lens = np.asarray([70, 45], np.int32)
  ids = np.zeros((2, 72), np.int32)
  for r, n in enumerate(lens):
    ids[r, :n] = rng.integers(3, 300, n)
  steps = 5
  dense = GreedyDecoder(models["dense"])
  first, cache = dense.prefill(ids, lens, 96)
  toks, fr = dense.decode(first, cache, steps)
  assert fr == {}
  forward = jax.jit(lambda ids: models["dense"](ids))
  for r, n in enumerate(lens):
    assert list(toks[r]) == _greedy_brute_force(forward, ids[r, :n], steps, 80)
  # rtpurbo and topk share one prefill: topk's own prefill gives the same cache.
  rt, tk = GreedyDecoder(models["rtpurbo"]), GreedyDecoder(models["topk"])
  f1, c1 = rt.prefill(ids, lens, 96)
  f2, c2 = tk.prefill(ids, lens, 96)
  np.testing.assert_array_equal(np.asarray(f1), np.asarray(f2))
  for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  toks_rt, fr_rt = rt.decode(f1, c1, steps)
  # A chunked prefill (contiguous fast path, chunks ending inside the padding) decodes alike.
  for m, want in (("dense", toks), ("rtpurbo", toks_rt)):
    d = GreedyDecoder(models[m], prefill_chunk=16)
    fc, cc = d.prefill(ids, lens, 96)
    np.testing.assert_array_equal(d.decode(fc, cc, steps)[0], want)
  assert sorted(fr_rt) == [i for i, l in enumerate(models["rtpurbo"].layers)
                           if l.attn.heads.retrieval]
  for f in fr_rt.values():
    assert np.all((f > 0) & (f <= 1))


def test_settings_reject_bad_values():
  from rtpurbo_jax.config import ConfigError
  st = EvalSettings(lengths=(1024, 2048, 4096), samples=(4, 2, 1))
  assert [st.samples_at(n) for n in st.lengths] == [4, 2, 1]
  with pytest.raises(ConfigError, match="one per length"):
    EvalSettings(lengths=(1024, 2048), samples=(4, 2, 1))
  with pytest.raises(ConfigError, match="unknown mode"):
    EvalSettings(modes=("dense", "fast"))
  with pytest.raises(ConfigError, match="unknown task"):
    EvalSettings(tasks=("passkey", "trivia"))
  with pytest.raises(ConfigError, match="depths"):
    EvalSettings(depths=(0.5, 2.0))


def _tiny_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs",
                                                                          "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_plan_is_calibrated_when_none_is_given(corpus, seed):
  from rtpurbo_jax.eval import runner
  cfg = _tiny_config()
  cfg.seed = seed % 1000
  cfg.train.calibrate.length, cfg.train.calibrate.needle_len = 384, 24
  model, codec = runner.load_model(cfg)
  plan, source, record = runner.resolve_plan(cfg, model, codec, corpus)
  assert "calibration" in source and plan.mask().sum() == 2  # 25% of 8 query heads
  scores = np.asarray(record["scores"])
  assert scores.shape == (2, 4) and np.all((scores > 0) & (scores < 1))
  assert plan == HeadPlan.from_scores(scores, 2, 0.25)
  # The earlier needle is off the attention-sink tokens at the start.
  assert record["needle_span"][0] > 0 and record["needle_span"][1] - record["needle_span"][0] == 24


# ---------------------------------------------------------------------------
# The CLI on configs/tiny.py.


def _cli(tmp_path, *overrides):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "rtpurbo_jax.eval", "--config=configs/tiny.py", *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cli_end_to_end_on_tiny(tmp_path):
  plan = {str(l): [int(h == l + 1) for h in range(4)] for l in range(2)}
  plan_path = tmp_path / "plan.json"
  plan_path.write_text(json.dumps(plan))
  out = tmp_path / "out"
  r = _cli(tmp_path, "--config.eval.lengths=768", "--config.eval.samples=1",
           "--config.eval.tasks=passkey,niah_multikey,common_words",
           "--config.eval.sparsity_queries=4", f"--config.plan.path={plan_path}",
           f"--config.eval.out_dir={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  for name in report.FILES:
    assert (out / name).stat().st_size > 0, name
    if name.endswith(".png"):
      assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  res = json.loads((out / "results.json").read_text())
  modes = ["dense", "rtpurbo", "streaming", "topk"]
  assert res["plan"]["retrieval_heads"] == 2
  assert res["settings"]["lengths"] == [768] and res["settings"]["modes"] == modes
  assert [e["task"] for e in res["examples"]] == ["passkey", "niah_multikey", "common_words"]
  for e in res["examples"]:
    for m in modes:
      assert e["scores"][m] == scoring.score(e["rule"], e["predictions"][m], e["answers"])
  acc = res["accuracy"]["scores"]
  for m in modes:
    want = np.mean([e["scores"][m] for e in res["examples"]])
    assert acc[m]["average"]["768"] == pytest.approx(want)
  assert set(res["perplexity"]) == set(modes)
  assert set(res["sparsity"]) == set(res["decode_sparsity"]) == {"rtpurbo", "topk"}
  assert len(res["sparsity"]["rtpurbo"]["768"]["heads"]) == 2
  md = (out / "results.md").read_text()
  assert "| passkey | 768 |" in md and "| **average** | 768 |" in md and "Perplexity" in md

  # A second run at another length (relabelled copy) merges into one report.
  other = json.loads(json.dumps(res).replace('"768"', '"640"'))
  other["settings"]["lengths"] = [640]
  other["meta"]["lengths_done"] = [640]
  for e in other["examples"]:
    e["length"] = 640
    e["scores"] = {m: 1.0 - v for m, v in e["scores"].items()}
  (tmp_path / "b.json").write_text(json.dumps(other))
  merged_dir = tmp_path / "merged"
  report.main([str(out / "results.json"), str(tmp_path / "b.json"),
               f"--out_dir={merged_dir}"])
  merged = json.loads((merged_dir / "results.json").read_text())
  assert merged["settings"]["lengths"] == [640, 768]
  assert len(merged["examples"]) == 6
  for m in modes:
    a = merged["accuracy"]["scores"][m]["average"]
    assert a["768"] == pytest.approx(acc[m]["average"]["768"])
    assert a["640"] == pytest.approx(1.0 - acc[m]["average"]["768"])
  assert set(merged["perplexity"]["dense"]) == {"640", "768"}
  with pytest.raises(ValueError, match="appears in runs"):
    report.merge([res, res])


def test_cli_bad_values_give_one_clear_error(tmp_path):
  r = _cli(tmp_path, "--config.eval.modes=dense,fast")
  assert r.returncode == 2
  assert "unknown mode 'fast'" in r.stderr
  assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------
# Intervals, binding top-k budget, baseline weights, merging by mode, variants table,
# reproduction.


def test_wilson_interval_hand_value_and_brute_force(rng):
  from rtpurbo_jax.eval import stats
  # 7 of 10 by hand: centre (0.7 + z^2/20) / (1 + z^2/10), half-width
  # z / (1 + z^2/10) * sqrt(0.021 + z^2/400), z = 1.96 -> [0.3968, 0.8922].
  lo, hi = stats.wilson(0.7, 10)
  assert lo == pytest.approx(0.39677, abs=1e-4) and hi == pytest.approx(0.89224, abs=1e-4)
  assert stats.wilson(0.3, 0) == (0.0, 1.0)
  # Brute force: the interval is {p : (p_hat - p)^2 <= z^2 p (1 - p) / n} on a fine grid.
  grid = np.linspace(0.0, 1.0, 200001)
  for _ in range(5):
    n = int(rng.integers(1, 300))
    p_hat = float(rng.integers(0, n + 1) / n) if rng.random() < 0.7 else float(rng.random())
    inside = grid[(p_hat - grid) ** 2 <= stats.Z95 ** 2 * grid * (1 - grid) / n]
    lo, hi = stats.wilson(p_hat, n)
    assert lo == pytest.approx(inside.min(), abs=1e-5) and hi == pytest.approx(inside.max(),
                                                                               abs=1e-5)


def test_paired_bootstrap_is_seeded_and_matches_a_loop(rng, seed):
  from rtpurbo_jax.eval import stats
  a = rng.normal(3.0, 0.2, 7)
  b = a - rng.normal(0.01, 0.02, 7)
  r1 = stats.paired_bootstrap_rel(a, b, [seed, 1], n_boot=500)
  assert r1 == stats.paired_bootstrap_rel(a, b, [seed, 1], n_boot=500)
  assert r1 != stats.paired_bootstrap_rel(a, b, [seed, 2], n_boot=500)
  assert r1["rel"] == pytest.approx(np.exp(a.mean()) / np.exp(b.mean()) - 1, rel=1e-12)
  # The same resamples drawn and evaluated one at a time.
  draw = np.random.default_rng([seed, 1]).integers(0, 7, (500, 7))
  reps = sorted(np.exp(a[i].mean()) / np.exp(b[i].mean()) - 1 for i in draw)
  assert r1["lo"] == pytest.approx(np.quantile(reps, 0.025), rel=1e-9)
  assert r1["hi"] == pytest.approx(np.quantile(reps, 0.975), rel=1e-9)
  assert r1["lo"] <= r1["rel"] <= r1["hi"]
  # A constant per-window change has a zero-width interval.
  c = stats.paired_bootstrap_rel(b + 0.01, b, seed)
  assert c["lo"] == pytest.approx(np.expm1(0.01)) and c["hi"] == pytest.approx(np.expm1(0.01))
  assert stats.fmt_pct_interval(0.008, 0.005, 0.011) == "+0.8% [+0.5, +1.1]"


def test_paired_accuracy_bootstrap_matches_a_loop(rng, seed):
  """Task-averaged accuracy difference over paired prompts: the statistic by hand, the interval
  against the same stratified resamples evaluated one at a time."""
  from rtpurbo_jax.eval import stats
  sizes = (9, 5, 12)
  a = [rng.integers(0, 2, n).astype(float) for n in sizes]
  b = [np.where(rng.random(n) < 0.3, 1 - x, x) for n, x in zip(sizes, a)]
  b[2] = rng.random(12)  # a partial-score task
  r = stats.paired_bootstrap_diff(a, b, [seed, 4], n_boot=300)
  assert r == stats.paired_bootstrap_diff(a, b, [seed, 4], n_boot=300)
  assert r["diff"] == pytest.approx(np.mean([x.mean() for x in a]) -
                                    np.mean([y.mean() for y in b]), abs=1e-12)
  assert r["n"] == sum(sizes)
  assert r["changed"] == sum(int(np.sum(x != y)) for x, y in zip(a, b))
  gen = np.random.default_rng([seed, 4])
  draws = [gen.integers(0, n, (300, n)) for n in sizes]
  reps = [np.mean([a[g][draws[g][k]].mean() - b[g][draws[g][k]].mean() for g in range(3)])
          for k in range(300)]
  assert r["lo"] == pytest.approx(np.quantile(reps, 0.025), abs=1e-12)
  assert r["hi"] == pytest.approx(np.quantile(reps, 0.975), abs=1e-12)
  assert r["lo"] <= r["diff"] <= r["hi"]
  same = stats.paired_bootstrap_diff(a, a, seed)
  assert (same["diff"], same["lo"], same["hi"], same["changed"]) == (0, 0, 0, 0)
  with pytest.raises(ValueError, match="paired prompts"):
    stats.paired_bootstrap_diff([a[0]], [a[0][:-1]], seed)
  assert stats.fmt_points_interval(-0.029, -0.055, -0.005) == "-2.9 [-5.5, -0.5]"


def test_largest_fitting_from_a_guess_equals_bisection(rng):
  from rtpurbo_jax.eval import tasks as tasks_lib
  for _ in range(30):
    n = int(rng.integers(1, 400))
    cum = np.concatenate([[0], np.cumsum(rng.integers(1, 30, n))])
    budget = int(rng.integers(0, cum[-1] + 40))
    calls = []

    class Codec:
      def encode(self, k):
        calls.append(k)
        return [0] * int(cum[k])

    build = lambda k: (k,)
    want = int(np.searchsorted(cum, budget, side="right") - 1)
    assert tasks_lib._largest_fitting(build, n, Codec(), budget) == want
    for guess in (want, want + 1, want - 2, int(rng.integers(-5, n + 5))):
      calls.clear()
      assert tasks_lib._largest_fitting(build, n, Codec(), budget, guess) == want
    calls.clear()
    tasks_lib._largest_fitting(build, n, Codec(), budget, want)
    assert len(calls) <= 2  # a right guess costs the guess and its successor


def _selection_suite(base, plan, modes, sparse=SPARSE, **kw):
  from rtpurbo_jax.eval import runner

  class Bar:
    def step(self, *a, **k):
      pass

  st = EvalSettings(lengths=(200,), modes=modes, sparsity_queries=6, **kw)
  return runner._Suite(base, base, ByteCodec(), plan, st, sparse, Bar())


def test_binding_topk_budget_is_rtpurbo_tokens_rounded_to_blocks(seed, rng):
  """topk's budget = rtpurbo's measured tokens per retrieval head, rounded up to blocks; topk
  then keeps exactly that many blocks (+ the own block when it is not among them)."""
  base = _tiny(seed, layers=1)
  plan = HeadPlan.from_mask([[False, True, True, False]], 2)
  suite = _selection_suite(base, plan, ("topk",))  # rtpurbo is measured though not evaluated
  windows = rng.integers(3, 300, (2, 200)).astype(np.int32)
  reports, budget = suite.selection(200, windows)
  assert set(reports) == {"topk"}
  qpos = sparsity.query_positions(200, 6, 0)
  rt = _models(base, plan, ("rtpurbo",))["rtpurbo"]
  measured = sparsity.selection_report(rt, windows, qpos)["tokens_per_head"]
  bs = SPARSE.block_size
  assert budget["rule"] == "binding"
  assert budget["rtpurbo_tokens_per_head"] == pytest.approx(measured, rel=1e-6)
  assert budget["tokens"] == int(np.ceil(measured / bs)) * bs and budget["blocks"] == int(
      np.ceil(measured / bs))
  assert suite.models["topk"].sparse.topk_tokens == budget["tokens"]
  # Brute force topk's selection: the k heaviest blocks by indexer log-mass, plus the own one.
  k = budget["blocks"]
  attn = suite.models["topk"].layers[0].attn
  pos = jnp.arange(200)[None]
  wq, wk = np.asarray(attn.indexer_wq[...]), np.asarray(attn.indexer_wk[...])
  for j, h in enumerate(attn.heads.retrieval):
    fracs = []
    for w in range(2):
      x = attn.project_qkv(base.layers[0].input_norm(jnp.take(base.embed[...],
                                                              jnp.asarray(windows[w:w + 1]),
                                                              axis=0)), pos, base.inv_freq())
      q_pre, k_pre = (np.asarray(a, np.float64) for a in x[:2])
      for t in qpos:
        sc = (wq[j] @ q_pre[0, t, h]) @ (wk[j] @ k_pre[0, :t + 1, attn.heads.kv_of(h)].T)
        nb = t // bs + 1
        lm = np.array([np.logaddexp.reduce(sc[b * bs:(b + 1) * bs]) for b in range(nb)])
        top = set(np.argsort(-lm, kind="stable")[:k].tolist())
        count = len(top | {nb - 1})
        if nb > k:
          assert count == k + (nb - 1 not in top)
        fracs.append(count / nb)
    assert reports["topk"]["heads"][j]["fraction"] == pytest.approx(np.mean(fracs), abs=1e-6)
  # A fixed budget is used as given.
  fixed = _selection_suite(base, plan, ("topk",), topk_budget="40")
  _, b2 = fixed.selection(200, windows)
  assert b2 == {"tokens": 40, "blocks": 3, "rule": "fixed", "rtpurbo_tokens_per_head": None}


def _tiny_settings(**kw):
  d = dict(lengths=(512,), tasks=("passkey", "niah_single"), samples=(2,), depths=(0.3, 0.7),
           ppl_samples=3, sparsity_queries=4, batch=3, prefill_chunk=256)
  d.update(kw)
  return EvalSettings(**d)


def _run(model, plan, corpus, settings, baseline=None, name="run"):
  from rtpurbo_jax.eval import runner
  return runner.evaluate(model, ByteCodec(), plan, settings, sparse=SPARSE, corpus=corpus,
                         baseline=baseline, progress=False, meta={"name": name, "model": "A",
                                                                  "baseline_model": "B"})


def test_merge_by_mode_and_variants_table(corpus, seed, rng, tmp_path):
  """Mode subsets (dense,streaming + rtpurbo,topk) merge into the run of all four modes, and the
  variants table reads its numbers from those runs."""
  base = _tiny(seed)
  plan = _plan(base, rng)
  full = _run(base, plan, corpus, _tiny_settings())
  b_run = _run(base, plan, corpus, _tiny_settings(modes=("dense", "streaming")), name="base")
  v_run = _run(base, plan, corpus, _tiny_settings(modes=("rtpurbo", "topk")), name="v")
  merged = report.merge([b_run, v_run])
  assert merged["settings"]["modes"] == list(full["settings"]["modes"])
  key = lambda e: (e["task"], e["index"])
  for a, b in zip(sorted(merged["examples"], key=key), sorted(full["examples"], key=key),
                  strict=True):
    assert a["predictions"] == b["predictions"] and a["scores"] == b["scores"]
  for m in full["settings"]["modes"]:
    assert merged["perplexity"][m]["512"]["ppl"] == pytest.approx(
        full["perplexity"][m]["512"]["ppl"], rel=1e-6)
  assert merged["accuracy"]["scores"] == full["accuracy"]["scores"]
  assert merged["perplexity_vs_dense"]["rtpurbo"]["512"]["ppl"]["rel"] == pytest.approx(
      full["perplexity_vs_dense"]["rtpurbo"]["512"]["ppl"]["rel"], rel=1e-5)
  assert merged["topk_budget"] == full["topk_budget"]
  assert merged["mode_sources"]["dense"]["weights"] == "B"
  assert merged["mode_sources"]["rtpurbo"]["weights"] == "A"
  with pytest.raises(ValueError, match="appears in runs"):
    report.merge([b_run, full])
  other_seed = json.loads(json.dumps(v_run))
  other_seed["settings"]["seed"] = 1
  with pytest.raises(ValueError, match="different seed"):
    report.merge([b_run, other_seed])
  # dense / streaming do not depend on the plan; rtpurbo does.
  other_plan = json.loads(json.dumps(b_run))
  other_plan["plan"]["per_layer"] = other_plan["plan"]["per_layer"][::-1] + [0]
  assert report.merge([other_plan, v_run])["settings"]["modes"] == merged["settings"]["modes"]
  with pytest.raises(ValueError, match="different plan settings for mode rtpurbo"):
    report.merge([b_run, v_run, dict(other_plan, settings=dict(
        other_plan["settings"], modes=["rtpurbo"]))])
  # Other held-out windows conflict only where both runs scored perplexity.
  other_ppl = json.loads(json.dumps(v_run))
  other_ppl["settings"]["ppl_samples"] = 7
  with pytest.raises(ValueError, match="different ppl_samples"):
    report.merge([b_run, other_ppl])
  other_ppl["perplexity"] = {m: {} for m in other_ppl["perplexity"]}
  assert report.merge([b_run, other_ppl])["perplexity"]["dense"] == b_run["perplexity"]["dense"]
  md = report.markdown(merged)
  assert "| **average** | 512 | 4 |" in md and "[" in md

  # Variants table: v (rtpurbo + topk, merged with the baseline run) and the full run. Random
  # weights answer nothing: scores drawn here give the table something to average.
  for e in v_run["examples"]:
    e["scores"]["rtpurbo"] = float(rng.integers(0, 2))
  for name, res in (("base", b_run), ("v", v_run)):
    report.write(res, str(tmp_path / name))
  report.main(["--compare", f"v={tmp_path / 'v'}", f"full={tmp_path / 'base'}",
               f"--baseline={tmp_path / 'base'}", f"--out={tmp_path / 'cmp'}"])
  table = json.loads((tmp_path / "cmp" / "variants.json").read_text())
  rows = {(r["name"], r["length"]): r for r in table["rows"]}
  assert set(rows) == {("baseline dense", 512), ("baseline streaming", 512), ("v", 512),
                       ("v topk", 512)}  # "full" has no rtpurbo: no row
  v = rows[("v", 512)]
  want = np.mean([np.mean([e["scores"]["rtpurbo"] for e in v_run["examples"] if e["task"] == t])
                  for t in ("passkey", "niah_single")])
  assert v["accuracy"]["mean"] == pytest.approx(want) and v["accuracy"]["n"] == 4
  assert (v["accuracy"]["lo"], v["accuracy"]["hi"]) == pytest.approx(
      __import__("rtpurbo_jax.eval.stats", fromlist=["x"]).wilson(want, 4))
  assert v["ppl_vs_dense"]["rel"] == pytest.approx(
      full["perplexity_vs_dense"]["rtpurbo"]["512"]["ppl"]["rel"], rel=1e-5)
  assert v["selected_fraction"] == pytest.approx(
      full["sparsity"]["rtpurbo"]["512"]["selected_fraction"])
  assert rows[("v topk", 512)]["topk_budget"] == full["topk_budget"]["512"]["tokens"]
  # Paired against dense on the same prompts: the difference of the task means, by hand.
  dense = {(e["task"], e["index"]): e["scores"]["dense"] for e in b_run["examples"]}
  by_task = lambda t: [e for e in v_run["examples"] if e["task"] == t]
  want_diff = np.mean([np.mean([e["scores"]["rtpurbo"] - dense[(t, e["index"])]
                                for e in by_task(t)]) for t in ("passkey", "niah_single")])
  assert v["acc_vs_dense"]["diff"] == pytest.approx(want_diff, abs=1e-12)
  assert v["acc_vs_dense"]["n"] == 4 and v["acc_vs_dense"]["lo"] <= want_diff
  assert rows[("baseline dense", 512)]["acc_vs_dense"] is None
  md = (tmp_path / "cmp" / "variants.md").read_text()
  assert "| v | A | 512 |" in md and "| baseline dense | B | 512 |" in md
  assert "Δacc vs dense" in md and "vs v" not in md
  # A reference variant: the others are paired against its rtpurbo, prompt by prompt and
  # window by window; the reference itself gets no such cells.
  lever = json.loads(json.dumps(v_run))
  for e in lever["examples"]:
    e["scores"]["rtpurbo"] = 1.0 - e["scores"]["rtpurbo"]
  lever["perplexity"]["rtpurbo"]["512"]["window_nll"]["all"] = [
      x + 0.01 for x in v_run["perplexity"]["rtpurbo"]["512"]["window_nll"]["all"]]
  report.write(lever, str(tmp_path / "lever"))
  report.main(["--compare", f"v={tmp_path / 'v'}", f"lever={tmp_path / 'lever'}",
               f"--baseline={tmp_path / 'base'}", "--reference=v", f"--out={tmp_path / 'cmp2'}"])
  table = json.loads((tmp_path / "cmp2" / "variants.json").read_text())
  rows = {(r["name"], r["length"]): r for r in table["rows"]}
  assert table["reference"] == "v" and "acc_vs_ref" not in rows[("v", 512)]
  flip = rows[("lever", 512)]
  want_ref = np.mean([np.mean([1 - 2 * e["scores"]["rtpurbo"] for e in by_task(t)])
                      for t in ("passkey", "niah_single")])
  assert flip["acc_vs_ref"]["diff"] == pytest.approx(want_ref, abs=1e-12)
  assert flip["acc_vs_ref"]["changed"] == 4
  assert flip["ppl_vs_ref"]["rel"] == pytest.approx(np.expm1(0.01), rel=1e-9)
  assert flip["ppl_vs_ref"]["lo"] == pytest.approx(np.expm1(0.01), rel=1e-9)
  assert "Δacc vs v" in (tmp_path / "cmp2" / "variants.md").read_text()
  with pytest.raises(SystemExit):
    report.main(["--compare", f"v={tmp_path / 'v'}", "--reference=nope",
                 f"--out={tmp_path / 'cmp3'}"])
  other_prompts = json.loads(json.dumps(lever))
  other_prompts["examples"][0]["answers"] = ["something else"]
  with pytest.raises(ValueError, match="at 512 differs between the runs"):
    report.paired_accuracy(other_prompts, "rtpurbo", v_run, "rtpurbo", 512,
                           ("passkey", "niah_single"), seed)
  # A variant that ran rtpurbo only gets no topk row from a baseline that ran topk.
  only = report.compare({"r": report._only_modes(v_run, ["rtpurbo"])}, baseline=full)
  names = {r["name"] for r in only["rows"]}
  assert "r" in names and "r topk" not in names
  assert {r["name"] for r in report.compare({"v": v_run}, baseline=full)["rows"]} >= {"v topk"}
  # One that ran topk only gets no rtpurbo row from a baseline that ran rtpurbo (the baseline's
  # model is not the variant's); with mode="topk" its topk row comes once.
  only = report.compare({"t": report._only_modes(v_run, ["topk"])}, baseline=full)
  assert [r["name"] for r in only["rows"] if not r["name"].startswith("baseline")] == ["t topk"]
  only = report.compare({"t": report._only_modes(v_run, ["topk"])}, baseline=full, mode="topk")
  assert [r["name"] for r in only["rows"] if not r["name"].startswith("baseline")] == ["t"]


def test_baseline_weights_run_dense_and_streaming(corpus, seed, rng, tmp_path):
  """eval.baseline_model: dense / streaming run the baseline's weights, rtpurbo the model's."""
  import rtpurbo_jax
  from rtpurbo_jax.eval import runner
  cfg = _tiny_config()
  cfg.seed = seed % 1000
  model_a, _ = runner.load_model(cfg)
  # A larger init scale makes the baseline's predictions far from uniform, so its perplexity
  # differs clearly from model_a's (two near-uniform random models can agree to 1e-4).
  other = Transformer(model_a.cfg, rngs=nnx.Rngs(cfg.seed + 1), init_std=0.3)
  rtpurbo_jax.save_pretrained(other, tmp_path / "baseline")
  plan = {str(l): [int(h == l + 1) for h in range(4)] for l in range(2)}
  (tmp_path / "plan.json").write_text(json.dumps(plan))
  cfg.plan.path = str(tmp_path / "plan.json")
  cfg.eval.baseline_model = str(tmp_path / "baseline")
  cfg.eval.update(lengths="512", tasks="passkey", samples="1", ppl_samples=2,
                  sparsity_queries=4, modes="dense,rtpurbo,streaming")
  res = runner.run_from_config(cfg, progress=False, corpus=corpus)
  assert res["meta"]["baseline_model"] == str(tmp_path / "baseline")
  st = runner.EvalSettings.from_config(cfg.eval)
  windows = ppl_lib.heldout_windows(ByteCodec(), corpus.heldout_text(), 512, 2, st.seed)
  hp = res["plan_mask"]
  plan_obj = HeadPlan.from_mask(np.asarray(hp, bool), 2)
  sp = runner.SparseConfig(**res["sparse"])

  def ppl_of(weights, mode):
    m = runner.mode_models(weights, plan_obj, sp, [mode])[mode]
    sq = np.ones(windows.shape, bool) if ppl_lib.decode_style(mode) else None
    return ppl_lib.perplexity(ppl_lib.make_nll_fn(m, sp.chunk_size)(windows, sq))

  got = {m: res["perplexity"][m]["512"]["ppl"] for m in ("dense", "rtpurbo", "streaming")}
  assert got["dense"] == pytest.approx(ppl_of(other, "dense"), rel=1e-5)
  assert got["streaming"] == pytest.approx(ppl_of(other, "streaming"), rel=1e-5)
  assert got["rtpurbo"] == pytest.approx(ppl_of(model_a, "rtpurbo"), rel=1e-5)
  assert abs(got["dense"] / ppl_of(model_a, "dense") - 1) > 1e-2  # really other weights


def test_perplexity_text_replaces_the_heldout_lines(corpus, seed, monkeypatch, tmp_path):
  """eval.ppl_text=moby_dick scores windows of that text (here a stand-in, no download); the
  task haystack stays the plays; unknown names and merges across texts are refused."""
  from rtpurbo_jax import assets
  from rtpurbo_jax.config import ConfigError
  from rtpurbo_jax.eval import runner
  rng = np.random.default_rng(seed)
  words = ["whale", "ship", "sea", "harpoon", "captain", "deck", "mast", "oil"]
  stand_in = "\n".join(" ".join(rng.choice(words, 12)) for _ in range(400))
  monkeypatch.setattr(assets, "moby_dick_text", lambda fetch=True: stand_in)
  other = corpus.with_heldout("moby_dick")
  assert corpus.with_heldout("plays") is corpus
  assert other.haystack is corpus.haystack and other.heldout_text() == stand_in
  with pytest.raises(ConfigError, match="ppl_text"):
    EvalSettings(ppl_text="wikipedia")
  cfg = _tiny_config()
  cfg.seed = seed % 1000
  cfg.eval.update(lengths="256", tasks="passkey", samples="0", ppl_samples=2,
                  sparsity_queries=4, modes="dense", ppl_text="moby_dick",
                  out_dir=str(tmp_path))
  res = runner.run_from_config(cfg, progress=False, corpus=corpus)
  assert res["settings"]["ppl_text"] == "moby_dick"
  model, _ = runner.load_model(cfg)
  nll = ppl_lib.make_nll_fn(model, 256)

  def ppl_on(text):
    return ppl_lib.perplexity(nll(ppl_lib.heldout_windows(ByteCodec(), text, 256, 2,
                                                          cfg.eval.seed), None))

  got = res["perplexity"]["dense"]["256"]["ppl"]
  assert got == pytest.approx(ppl_on(stand_in), rel=1e-5)
  assert abs(got / ppl_on(corpus.heldout_text()) - 1) > 1e-3
  plays = json.loads(json.dumps(res))
  plays["settings"]["ppl_text"] = "plays"
  with pytest.raises(ValueError, match="ppl_text"):
    report.merge([res, plays])
  del plays["settings"]["ppl_text"]  # a run recorded before the setting: the plays
  with pytest.raises(ValueError, match="ppl_text"):
    report.merge([res, plays])


def test_restore_gives_unrecorded_keys_their_generic_default():
  """A record written before a setting existed reproduces with the setting's generic default
  (the behaviour then), not with what a config file now sets; recorded values win, and keys the
  schema no longer has are reported."""
  from rtpurbo_jax.config import run_config
  from rtpurbo_jax.eval import runner
  cfg = run_config()
  cfg.sparse.update(min_blocks=8, top_p=0.5)  # what a config file sets today
  cfg.eval.samples = "7"
  rec = run_config().to_dict()
  del rec["sparse"]["min_blocks"]  # a record from before the key
  rec["sparse"]["top_p"] = 0.8
  rec["eval"]["gone_key"] = 1
  ignored = runner._restore(cfg, rec, run_config())
  assert cfg.sparse.min_blocks == run_config().sparse.min_blocks == 0
  assert cfg.sparse.top_p == 0.8 and cfg.eval.samples == rec["eval"]["samples"]
  assert ignored == ["eval.gone_key"]
  cfg.sparse.min_blocks = 8
  runner._restore(cfg, rec)  # without the generic defaults: the current value stays
  assert cfg.sparse.min_blocks == 8


def test_reproduce_rechecks_a_recorded_run(corpus, seed, tmp_path):
  from rtpurbo_jax.eval import runner
  cfg = _tiny_config()
  cfg.seed = seed % 1000
  plan = {str(l): [int(h == 2 - l) for h in range(4)] for l in range(2)}
  (tmp_path / "plan.json").write_text(json.dumps(plan))
  cfg.plan.path = str(tmp_path / "plan.json")
  cfg.eval.update(lengths="512", tasks="passkey,variable_tracking", samples="2", ppl_samples=2,
                  sparsity_queries=4, batch=3, out_dir=str(tmp_path / "ref"),
                  modes="dense,rtpurbo,topk")
  ref = runner.run_from_config(cfg, progress=False, corpus=corpus)
  report.write(ref, str(tmp_path / "ref"))
  os.remove(tmp_path / "plan.json")  # the recorded plan is used, not the path
  fresh_cfg = _tiny_config()  # the recorded config replaces these values
  out = runner.reproduce(fresh_cfg, str(tmp_path / "ref" / "results.json"),
                         out_dir=str(tmp_path / "ref"))
  assert out["ok"], out["mismatches"]
  assert out["predictions"] == 4 * 3 and out["perplexities"] == 3 * 2
  assert out["fresh"]["settings"]["out_dir"] == str(tmp_path / "ref" / "reproduce")
  # It fails on a changed prediction or a perplexity off by more than 1e-4.
  bad = json.loads(json.dumps(ref))
  bad["examples"][1]["predictions"]["rtpurbo"] += " x"
  bad["perplexity"]["topk"]["512"]["ppl"] *= 1 + 3e-4
  got = runner.compare_results(bad, out["fresh"])
  assert not got["ok"] and len(got["mismatches"]) == 2
  assert "rtpurbo" in got["mismatches"][0] and "topk 512 ppl" in got["mismatches"][1]
  fine = json.loads(json.dumps(ref))
  fine["perplexity"]["dense"]["512"]["ppl"] *= 1 + 5e-5
  assert runner.compare_results(fine, out["fresh"])["ok"]
