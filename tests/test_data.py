"""Data: sources, packing, shuffling, sharding, checkpointable iterators, synthetic documents."""

import json

import numpy as np
import pytest

from rtpurbo_jax.train import data as data_lib

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def write_corpus(tmp_path, rng, n_txt=3, n_jsonl=5):
  docs = []
  for i in range(n_txt):
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60))))
    (tmp_path / f"doc{i}.txt").write_text(text)
    docs.append(text)
  with open(tmp_path / "more.jsonl", "w") as f:
    for i in range(n_jsonl):
      text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40))))
      f.write(json.dumps({"text": text}) + "\n")
      docs.append(text)
      if i == 1:
        f.write("\n")  # blank lines are skipped
  return docs


def test_source_reads_txt_and_jsonl(tmp_path, rng):
  docs = write_corpus(tmp_path, rng)
  src = data_lib.TextSource(f"{tmp_path}/*.txt,{tmp_path}/more.jsonl")
  assert len(src) == len(docs)
  assert sorted(src[i]["text"] for i in range(len(src))) == sorted(docs)


def test_packing_is_deterministic_and_conserves_tokens(tmp_path, rng, seed):
  docs = write_corpus(tmp_path, rng)
  tok = data_lib.TokenFn(data_lib.ByteTokenizer())
  src = data_lib.TextSource(str(tmp_path / "*"))

  def take(seed, n, seq):
    it = iter(data_lib.packed_dataset(src, tok, seq, 2, seed=seed, process_index=0,
                                      process_count=1))
    return np.concatenate([next(it)["ids"] for _ in range(n)])

  a, b = take(seed, 12, 37), take(seed, 12, 37)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (24, 37) and a.dtype == np.int32
  assert not np.array_equal(a, take(seed + 1, 12, 37))
  # With windows longer than any document (no document passes through whole), the stream of
  # the first epoch is a permutation of the documents, each followed by EOS.
  seq = max(len(d.encode()) + 1 for d in docs) + 1
  total = sum(len(d.encode()) + 1 for d in docs)
  stream = take(seed, -(-total // (2 * seq)) + 1, seq).reshape(-1)
  first = stream[:total]
  pieces = np.split(first, np.nonzero(first == tok.eos_id)[0] + 1)[:-1]
  assert sorted(tok.decode(p[:-1]) for p in pieces) == sorted(docs)


def test_iterator_state_roundtrip_resumes_exactly(tmp_path, rng, seed):
  write_corpus(tmp_path, rng)
  tok = data_lib.TokenFn(data_lib.ByteTokenizer())
  ds = data_lib.packed_dataset(data_lib.TextSource(str(tmp_path / "*")), tok, 29, 1, seed=seed,
                               process_index=0, process_count=1)
  # From the start (no packing remainder: a state JSON alters) and from a random point.
  for n in (0, int(rng.integers(1, 15))):
    it = iter(ds)
    for _ in range(n):
      next(it)
    # What the checkpoint stores and gives back.
    state = data_lib.state_from_json(json.loads(json.dumps(it.get_state())))
    want = [next(it)["ids"] for _ in range(6)]
    it2 = iter(ds)
    it2.set_state(state)
    for w in want:
      np.testing.assert_array_equal(next(it2)["ids"], w)


def test_process_sharding_is_disjoint_and_complete(seed):
  load = lambda i: {"i": np.int64(i)}
  seen = []
  for p in range(3):
    it = iter(data_lib.indexed_dataset(10, load, 1, seed=seed, process_index=p,
                                       process_count=3))
    n = len(range(p, 10, 3))
    seen.append([int(next(it)["i"][0]) for _ in range(n)])
  assert sorted(sum(seen, [])) == list(range(10))
  assert all(set(s) <= set(range(p, 10, 3)) for p, s in enumerate(seen))


def test_examples_labels_and_truncation():
  tok = data_lib.TokenFn(data_lib.ByteTokenizer())
  ex = data_lib.make_example({"prompt": "abcdefgh", "response": "XYZ"}, tok, 8, 300)
  # 8 + 3 + eos = 12 tokens, truncated from the left: the response survives.
  assert tok.decode(ex["ids"]) == "efghXYZ"
  np.testing.assert_array_equal(ex["labels"], [0, 0, 0, 0, 1, 1, 1, 1])
  assert ex["ids"][-1] == tok.eos_id and ex["valid"].all()
  ex = data_lib.make_example({"text": "hello"}, tok, 8, 3)
  np.testing.assert_array_equal(ex["valid"], [1] * 5 + [0] * 3)
  np.testing.assert_array_equal(ex["labels"], [0, 0, 1, 1, 1, 0, 0, 0])
  assert list(ex["ids"][5:]) == [0, 0, 0]


def test_example_windows_cover_each_text(tmp_path):
  tok = data_lib.TokenFn(data_lib.ByteTokenizer())
  texts = {"a.txt": "".join(chr(97 + i % 26) for i in range(50)), "b.txt": "short",
           "c.jsonl": json.dumps({"prompt": "pq", "response": "rs"}) + "\n"}
  for name, t in texts.items():
    (tmp_path / name).write_text(t)
  src = data_lib.TextSource(str(tmp_path / "*"))
  first = data_lib.ExampleSource(src, tok, 16, 4)
  ex = data_lib.ExampleSource(src, tok, 16, 4, windows=True)
  assert len(first) == 3
  # a.txt: 50 tokens -> 3 whole windows (the 2-token tail dropped); b.txt: one padded; c: one.
  assert len(ex) == 5
  a = texts["a.txt"].encode()
  for k in range(3):
    e = ex[k]
    assert bytes(tok.decode(e["ids"]), "utf-8") == a[16 * k:16 * (k + 1)]
    assert e["valid"].all()
    np.testing.assert_array_equal(e["labels"], np.arange(16) >= 12)
  for name, e in ((1, ex[0]), (3, ex[3]), (4, ex[4])):
    ref = first[{1: 0, 3: 1, 4: 2}[name]]
    for key in ("ids", "valid", "labels"):
      np.testing.assert_array_equal(e[key], ref[key])
  assert ex[3]["valid"].sum() == 5 and ex[3]["labels"].sum() == 4


def test_spread_subset_samples_the_whole_source():
  sub = data_lib.SpreadSubset(list(range(10)), 4)
  assert [sub[i] for i in range(len(sub))] == [0, 3, 6, 9]
  assert [data_lib.SpreadSubset(list(range(5)), 5)[i] for i in range(5)] == list(range(5))
  with pytest.raises(data_lib.DataError, match="cannot take 6 of 5"):
    data_lib.SpreadSubset(list(range(5)), 6)


def test_jsonl_messages_and_bad_records(tmp_path):
  p = tmp_path / "chat.jsonl"
  p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "yo"}]}) + "\n"
               + json.dumps({"foo": 1}) + "\n" + "{not json\n")
  src = data_lib.TextSource(str(p))
  assert src[0] == {"prompt": "user: hi\nassistant: ", "response": "yo"}
  with pytest.raises(data_lib.DataError, match="none of the keys"):
    src[1]
  with pytest.raises(data_lib.DataError, match="not a JSON line"):
    src[2]


def test_missing_and_unsupported_files(tmp_path):
  with pytest.raises(data_lib.DataError, match="not found"):
    data_lib.TextSource(str(tmp_path / "nope*.txt"))
  with pytest.raises(data_lib.DataError, match="no data files"):
    data_lib.TextSource("")
  (tmp_path / "x.csv").write_text("a,b")
  with pytest.raises(data_lib.DataError, match="unsupported"):
    data_lib.TextSource(str(tmp_path / "x.csv"))


FILLER = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
          "it was the age of foolishness. ") * 20


def test_filler_tokens_wrap_around(seed):
  tok = data_lib.TokenFn(data_lib.ByteTokenizer())
  fill = data_lib.filler_tokens(tok, FILLER, 5000, seed)
  assert len(fill) == 5000 and tok.decode(fill[:200]) in FILLER + FILLER
  assert fill == data_lib.filler_tokens(tok, FILLER, 5000, seed)
  with pytest.raises(data_lib.DataError, match="empty"):
    data_lib.filler_tokens(tok, "  ", 10, seed)
