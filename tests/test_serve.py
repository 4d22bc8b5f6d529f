"""The OpenAI-compatible server (rtpurbo_jax/serve, serve.py) on the tiny config, on CPU.

One server (8 slots, random weights with sharp logits, the byte tokenizer) runs in a thread
for the module; the official `openai` client talks to it over localhost. Checked:
  - greedy outputs of concurrent requests of different lengths (more requests than slots, so
    rows are reused) == each prompt alone through `rtpurbo_jax.generate`;
  - streaming == non-streaming text (completions and chat), stop strings, eos, seeded sampling
    independent of the batch it shares;
  - bad requests: one 4xx JSON error each, the server stays up; a full queue gets a 503;
  - a client that disconnects frees its slot;
  - 64 concurrent requests (streaming and not): none lost or duplicated, the same answers;
  - serve.py starts and answers; benchmarks/serve_load.py --tiny writes its JSON.
Unit checks of the detokenizer / stop strings and per-row sampling need no server.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import jax
import numpy as np
import openai
import pytest
from flax import nnx

from rtpurbo_jax.config import model_config_from, sparse_config_from
from rtpurbo_jax.infer import sampling as sampling_lib
from rtpurbo_jax.infer.generate import generate
from rtpurbo_jax.infer.memory import synthetic_plan
from rtpurbo_jax.models.transformer import Transformer
from rtpurbo_jax.serve import build
from rtpurbo_jax.serve.sampling import sample_rows
from rtpurbo_jax.serve.text import Codec, TextStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "tiny"
SLOTS = 8
MAX_LEN = 512
CHUNK = 64


def _tiny_config():
  import importlib.util

  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs/tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.fixture(scope="module")
def server():
  cfg = _tiny_config()
  mc, sp = model_config_from(cfg.model), sparse_config_from(cfg.sparse)
  # init_std 0.3: sharp logits, so greedy ties (which fp32 rounding could break either way)
  # do not happen.
  model = Transformer(mc, sparse=sp, plan=synthetic_plan(mc, 0.25, 0), rngs=nnx.Rngs(1),
                      init_std=0.3)
  srv = build.build_server(model, Codec.bytes(mc.vocab_size), NAME, slots=SLOTS,
                           max_len=MAX_LEN, prefill_chunk=CHUNK)
  with build.serve_in_thread(srv.app) as url:
    srv.url = url
    yield srv
  srv.scheduler.stop()


@pytest.fixture
def client(server):
  return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _async_client(server):
  return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                            timeout=300)


def _alone(model, ids, max_tokens, eos, pad_to=320, new=32):
  """Greedy tokens of one prompt alone through `generate`, cut after the first eos.

  The prompt is right-padded to `pad_to` (with its length in prompt_lengths) and `new` tokens
  are generated, so that every prompt shares one compilation."""
  assert len(ids) <= pad_to and max_tokens <= new
  padded = np.zeros((1, pad_to), np.int32)
  padded[0, :len(ids)] = ids
  out = generate(model, padded, new, prompt_lengths=[len(ids)], eos_token_id=eos,
                 max_len=pad_to + new)[0, :max_tokens].tolist()
  for i, t in enumerate(out):
    if t in eos:
      return out[:i + 1]
  return out


def _wait_for(pred, what: str, timeout: float = 60.0):
  deadline = time.monotonic() + timeout
  while not pred():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.05)


def _metrics(server) -> dict:
  return httpx.get(server.url + "/metrics", params={"format": "json"}).json()


# ---------------------------------------------------------------------------------------------
# No server.


def test_text_stream_stop_strings_and_holdback():
  codec = Codec.bytes(512)
  ids = codec.encode("héllo wor|d, bye")
  s = TextStream(codec, stop=("|d", "zz"))
  out = []
  for i in ids:
    out.append(s.push(i))
    if s.stopped:
      break
  # "é" is two bytes: nothing is released until the second arrives.
  assert out[1] == "" and out[2] == "é"
  assert s.stopped and "".join(out) == "héllo wor" and len(out) == len("héllo wor|d") + 1
  s = TextStream(codec, stop=("wor",))
  parts = []
  for i in codec.encode("a wo") + codec.encode("x"):
    parts.append(s.push(i))
  assert parts[-2:] == ["", "wox"] and not s.stopped  # "wo" held back, released once broken
  s = TextStream(codec)
  text = "".join(s.push(i) for i in codec.encode("ok ") + [codec.encode("é")[0]]) + s.finish()
  assert text == "ok \ufffd"  # an incomplete character at the very end still comes out


def test_sample_rows_matches_infer_sampling(seed):
  rng = np.random.default_rng(seed)
  logits = jax.numpy.asarray(rng.normal(size=(4, 97)) * 3, jax.numpy.float32)
  sample = jax.jit(sample_rows)
  greedy = sample(logits, np.zeros(4, np.float32), np.zeros(4, np.int32),
                  np.ones(4, np.float32), np.zeros(4, np.uint32), np.zeros(4, np.int32))
  np.testing.assert_array_equal(greedy, sampling_lib.sample(logits, jax.random.key(0)))
  # Mixed rows: every sampled token lies in its own row's filtered support.
  temp = np.asarray([0.0, 0.7, 1.0, 1.3], np.float32)
  top_k = np.asarray([0, 5, 0, 3], np.int32)
  top_p = np.asarray([1.0, 1.0, 0.5, 0.9], np.float32)
  allowed = [np.isfinite(np.asarray(sampling_lib.filter_logits(
      logits[r:r + 1], temperature=float(temp[r]), top_k=int(top_k[r]),
      top_p=float(top_p[r]))[0])) for r in range(4)]
  seen = [set() for _ in range(4)]
  for step in range(16):
    tok = np.asarray(sample(logits, temp, top_k, top_p, np.arange(4, dtype=np.uint32),
                            np.full(4, step, np.int32)))
    assert tok[0] == int(greedy[0])
    for r in (1, 2, 3):
      assert allowed[r][tok[r]], (r, step)
      seen[r].add(int(tok[r]))
  assert max(len(s) for s in seen) > 1  # it does sample


# ---------------------------------------------------------------------------------------------
# The server.


def test_models_health_metrics(server, client):
  assert [m.id for m in client.models.list().data] == [NAME]
  assert httpx.get(server.url + "/health").json() == {"status": "ok"}
  text = httpx.get(server.url + "/metrics").text
  for name in ("rtpurbo_queue_depth", "rtpurbo_slots_total 8", "rtpurbo_generated_tokens",
               "rtpurbo_tokens_per_second", 'rtpurbo_requests_finished{reason="stop"}'):
    assert name in text


def test_concurrent_greedy_equals_generate_alone(server, rng):
  model, eos = server.slot_model.model, server.codec.eos_ids
  lengths = [3, 64, 65, 130, 9, 200, 40, 1, 257, 17]  # 10 requests > 8 slots
  max_tokens = [12, 20, 7, 16, 24, 9, 13, 18, 11, 15]
  prompts = [rng.integers(0, 512, n).tolist() for n in lengths]

  async def run():
    async with _async_client(server) as c:
      return await asyncio.gather(*[
          c.completions.create(model=NAME, prompt=p, max_tokens=m, temperature=0,
                               extra_body={"return_token_ids": True})
          for p, m in zip(prompts, max_tokens)])

  results = asyncio.run(run())
  for p, m, r in zip(prompts, max_tokens, results):
    want = _alone(model, p, m, eos)
    got = r.choices[0].token_ids
    assert got == want, (len(p), m)
    assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == len(got)
    assert r.choices[0].finish_reason == ("stop" if got[-1] in eos else "length")


def test_streaming_equals_non_streaming(client):
  for prompt in ("Once upon a time", "x" * 150):
    full = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=30,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason == "length"
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
  full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=25,
                                        temperature=0)
  chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=25,
                                               temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == full.choices[0].message.content
  assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
  assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens > 10  # the template


def test_stop_strings_and_stop_tokens(client):
  kw = dict(model=NAME, prompt="The stop test", max_tokens=40, temperature=0)
  full = client.completions.create(**kw, extra_body={"ignore_eos": True,
                                                     "return_token_ids": True})
  text, ids = full.choices[0].text, full.choices[0].token_ids
  cut = next(i for i in range(5, len(text) - 2) if "\ufffd" not in text[i:i + 2])
  stop = text[cut:cut + 2]
  want = text[:text.find(stop)]
  for stream in (False, True):
    r = client.completions.create(**kw, stop=[stop, "never-seen"], stream=stream,
                                  extra_body={"ignore_eos": True})
    chunks = list(r) if stream else [r]
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
  # A stop token ends the request right after it is generated.
  r = client.completions.create(**kw, extra_body={"stop_token_ids": [ids[5]],
                                                  "ignore_eos": True,
                                                  "return_token_ids": True})
  assert r.choices[0].token_ids == ids[:ids.index(ids[5]) + 1]
  assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_independent_of_the_batch(server, client):
  kw = dict(model=NAME, prompt="sample me", max_tokens=24, temperature=1.0, top_p=0.95,
            extra_body={"return_token_ids": True, "ignore_eos": True, "top_k": 40})
  alone = client.completions.create(**kw, seed=7).choices[0].token_ids

  async def crowded():
    async with _async_client(server) as c:
      others = [c.completions.create(model=NAME, prompt=f"noise {i}", max_tokens=30,
                                     temperature=0.9, seed=i) for i in range(5)]
      mine = c.completions.create(**kw, seed=7)
      other = c.completions.create(**kw, seed=8)
      return await asyncio.gather(mine, other, *others)

  mine, other, *_ = asyncio.run(crowded())
  assert mine.choices[0].token_ids == alone
  assert other.choices[0].token_ids != alone


def test_bad_requests_get_one_clear_4xx(server, client):
  def post(body: str, path="/v1/completions"):
    return httpx.post(server.url + path, content=body,
                      headers={"content-type": "application/json"})

  cases = [
      (post('{"model": "tiny", "prompt": "a",'), 400, "not valid JSON"),
      (post('{"model": "gpt-4", "prompt": "a"}'), 404, "does not exist"),
      (post('{"model": "tiny", "prompt": "a", "max_tokens": -3}'), 400, "max_tokens"),
      (post('{"model": "tiny", "prompt": "a", "max_tokens": 600}'), 400, "context"),
      (post(json.dumps({"model": "tiny", "prompt": "a" * 600})), 400, "context"),
      (post('{"model": "tiny", "prompt": ""}'), 400, "empty"),
      (post('{"model": "tiny", "prompt": [1, 2, 999]}'), 400, "vocabulary"),
      (post('{"model": "tiny", "prompt": "a", "n": 2}'), 400, "n=1"),
      (post('{"model": "tiny", "prompt": "a", "temperature": 7}'), 400, "temperature"),
      (post('{"model": "tiny"}'), 400, "prompt"),
      (post('{"model": "tiny", "messages": []}', "/v1/chat/completions"), 400, "messages"),
  ]
  for r, status, words in cases:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}
  # The client raises the matching errors.
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="nope", prompt="a")
  with pytest.raises(openai.BadRequestError, match="context"):
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}],
                                   max_tokens=MAX_LEN)
  assert httpx.get(server.url + "/health").status_code == 200
  assert client.completions.create(model=NAME, prompt="still up", max_tokens=2).usage


def test_full_queue_gets_503(server, client):
  server.scheduler.max_queue = 0  # nothing may wait: every submission finds the queue full
  try:
    with pytest.raises(openai.APIStatusError) as e:
      client.completions.create(model=NAME, prompt="a", max_tokens=2)
    assert e.value.status_code == 503 and "busy" in e.value.message
  finally:
    server.scheduler.max_queue = 256
  assert client.completions.create(model=NAME, prompt="a", max_tokens=2).choices


def test_disconnect_cancels_and_frees_the_slot(server, monkeypatch):
  decode = server.slot_model.decode

  def slow_decode(*args, **kwargs):  # a slow device: requests outlive their clients
    time.sleep(0.02)
    return decode(*args, **kwargs)

  monkeypatch.setattr(server.slot_model, "decode", slow_decode)
  before = _metrics(server)["requests_finished"]["cancelled"]
  body = {"model": NAME, "prompt": "go on", "max_tokens": 400, "temperature": 0,
          "ignore_eos": True}
  with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                    timeout=60) as r:
    lines = r.iter_lines()
    assert next(l for l in lines if l.startswith("data:"))
  # A non-streaming client that gives up (its read times out) cancels too.
  with pytest.raises(httpx.ReadTimeout):
    httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
  _wait_for(lambda: _metrics(server)["requests_finished"]["cancelled"] >= before + 2,
            "two cancellations")
  _wait_for(lambda: _metrics(server)["slots_used"] == 0, "the slots to be freed")


def test_load_64_requests_none_lost_or_duplicated(server):
  prompts = [f"request {i % 8}: " + "abc" * (i % 8) * 5 for i in range(64)]
  before = _metrics(server)

  async def one(c, i):
    kw = dict(model=NAME, prompt=prompts[i], max_tokens=6, temperature=0,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    if i % 2:
      chunks = [ch async for ch in await c.completions.create(**kw, stream=True)]
      return (chunks[0].id, "".join(ch.choices[0].text for ch in chunks),
              sum((ch.choices[0].token_ids or [] for ch in chunks), []))
    r = await c.completions.create(**kw)
    return r.id, r.choices[0].text, r.choices[0].token_ids

  async def run():
    async with _async_client(server) as c:
      return await asyncio.gather(*[one(c, i) for i in range(64)])

  results = asyncio.run(run())
  assert len(results) == 64 and len({r[0] for r in results}) == 64
  for i, (_, text, ids) in enumerate(results):
    assert len(ids) == 6
    first = results[i % 8]
    assert (text, ids) == first[1:], i  # same prompt, same greedy answer, streamed or not
  after = _metrics(server)
  done = lambda m: m["requests_finished"]["length"] + m["requests_finished"]["stop"]
  assert done(after) - done(before) == 64
  assert after["requests_finished"]["error"] == 0
  assert after["generated_tokens"] - before["generated_tokens"] == 64 * 6
  assert after["queue_depth"] == 0 and after["slots_used"] == 0
  assert httpx.get(server.url + "/health").status_code == 200


# ---------------------------------------------------------------------------------------------
# The command line and the benchmark.


def test_serve_py_starts_and_answers(tmp_path):
  port = build.free_port()
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "serve.py"), "--config=configs/tiny.py",
       f"--port={port}", "--slots=2", "--ctx=256", "--prefill_chunk=64"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    url = f"http://127.0.0.1:{port}"

    def up():
      assert proc.poll() is None, proc.stdout.read()
      try:
        return httpx.get(url + "/health").status_code == 200
      except httpx.TransportError:
        return False

    _wait_for(up, "serve.py to start", timeout=120)
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    assert c.models.list().data[0].id == "tiny"
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
  finally:
    proc.terminate()
    proc.wait(30)
  bad = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"),
                        "--config=configs/tiny.py", "--slots=0"], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "--slots >= 1" in bad.stderr


def test_serve_load_benchmark_tiny(tmp_path):
  out = tmp_path / "serve_load.json"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "serve_load.py"),
                      "--tiny", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  res = json.loads(out.read_text())
  row = res["results"][0]
  assert row["completed"] == row["requests"] > 0 and row["failed"] == 0
  assert row["output_tokens"] == row["requests"] * row["max_tokens"]
  for key in ("ttft_s", "tpot_s", "e2e_s"):
    assert set(row[key]) >= {"p50", "p90", "p99"} and row[key]["p50"] > 0
  assert row["output_tok_s"] > 0
