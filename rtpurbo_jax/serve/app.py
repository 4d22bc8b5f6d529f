"""The FastAPI application: OpenAI-compatible routes over a running `Scheduler`.

  POST /v1/completions         prompt (text, or token ids) -> text; SSE with "stream": true
  POST /v1/chat/completions    messages -> the tokenizer's chat template -> text
  GET  /v1/models              the one served model (+ its per-request context)
  GET  /health                 200 while the engine loop runs, else 503
  GET  /metrics                Prometheus text (`?format=json`: the same as JSON)

Handlers never touch the model: they validate, tokenize, `Scheduler.submit` a `Request`
whose sink feeds an asyncio queue, and read events from it. A request is refused at once
(one JSON error, nothing queued) when it is malformed (400), names another model (404),
cannot fit a slot (400, code `context_length_exceeded`), or the queue is full (503).
A client that disconnects cancels its request; the engine frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rtpurbo_jax.serve import protocol as P
from rtpurbo_jax.serve.metrics import render_prometheus
from rtpurbo_jax.serve.scheduler import Event, NotServing, QueueFull, Request, Scheduler, TooLong
from rtpurbo_jax.serve.text import Codec

_DISCONNECT_POLL_S = 0.25


def create_app(scheduler: Scheduler, codec: Codec, model_name: str) -> FastAPI:
  app = FastAPI(title="rtpurbo_jax", version="0.1.0")
  metrics = scheduler.metrics
  created = int(time.time())

  # -- errors --------------------------------------------------------------------------------

  @app.exception_handler(P.APIError)
  async def _api_error(_, e: P.APIError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(RequestValidationError)
  async def _invalid(_, e: RequestValidationError):
    metrics.count_received()
    metrics.count_rejected()
    err = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
      msg, param = f"the request body is not valid JSON: {err.get('msg', '')}", None
    else:
      param = ".".join(loc) or None
      msg = f"{param or 'body'}: {err.get('msg', 'invalid value')}"
    return JSONResponse(P.error_body(msg, param=param), status_code=400)

  @app.exception_handler(StarletteHTTPException)
  async def _http(_, e: StarletteHTTPException):
    return JSONResponse(P.error_body(str(e.detail), code=str(e.status_code)),
                        status_code=e.status_code)

  # -- info ----------------------------------------------------------------------------------

  @app.get("/health")
  async def health():
    if scheduler.healthy:
      return {"status": "ok"}
    return JSONResponse({"status": "error", "error": scheduler.error or "not running"}, 503)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{
        "id": model_name, "object": "model", "created": created, "owned_by": "rtpurbo_jax",
        "max_model_len": scheduler.capacity}]}

  @app.get("/metrics")
  async def get_metrics(format: str = "prometheus"):
    snap = metrics.snapshot()
    if format == "json":
      return snap
    return PlainTextResponse(render_prometheus(snap),
                             media_type="text/plain; version=0.0.4; charset=utf-8")

  # -- generation ----------------------------------------------------------------------------

  @app.post("/v1/completions")
  async def completions(body: P.CompletionRequest, http: HTTPRequest):
    _check(body)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
      if len(prompt) != 1:
        _reject(400, "only one prompt per request is supported (n=1)", "prompt")
      prompt = prompt[0]
    if isinstance(prompt, str):
      ids = await run_in_threadpool(codec.encode, prompt)
    else:
      ids = [int(i) for i in prompt]
      bad = [i for i in ids if not 0 <= i < codec.vocab_size]
      if bad:
        _reject(400, f"prompt token id {bad[0]} is outside the vocabulary "
                f"[0, {codec.vocab_size})", "prompt")
    return await _generate(http, body, ids, body.max_tokens, chat=False)

  @app.post("/v1/chat/completions")
  async def chat(body: P.ChatRequest, http: HTTPRequest):
    _check(body)
    try:
      messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    except ValueError as e:
      _reject(400, str(e), "messages")
    ids = await run_in_threadpool(codec.encode_chat, messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:  # OpenAI's default: the rest of the context
      max_tokens = max(1, scheduler.capacity - len(ids))
    return await _generate(http, body, ids, max_tokens, chat=True)

  def _reject(status: int, message: str, param: str | None = None, code: str | None = None,
              type: str = "invalid_request_error"):
    metrics.count_rejected()
    raise P.APIError(status, message, param=param, code=code, type=type)

  def _check(body) -> None:
    metrics.count_received()
    if body.model != model_name:
      _reject(404, f"the model '{body.model}' does not exist; this server serves "
              f"'{model_name}'", "model", "model_not_found")
    bad = body.unsupported()
    if bad:
      _reject(400, bad[1], bad[0], "unsupported_parameter")

  async def _generate(http: HTTPRequest, body, ids: list[int], max_tokens: int, chat: bool):
    if not ids:
      _reject(400, "the prompt is empty", "prompt")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    stop_ids = set(body.stop_token_ids or ())
    if not body.ignore_eos:
      stop_ids.update(codec.eos_ids)
    req = Request(ids, max_tokens, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
                  temperature=body.temperature, top_k=body.top_k_value(), top_p=body.top_p,
                  seed=body.seed, stop=tuple(body.stop or ()), stop_ids=frozenset(stop_ids))
    try:
      scheduler.submit(req)
    except TooLong as e:
      _reject(400, str(e), "max_tokens", "context_length_exceeded")
    except QueueFull as e:
      metrics.count_rejected()
      return JSONResponse(P.error_body(f"the server is busy: {e}", "server_overloaded",
                                       code="queue_full"), 503, headers={"Retry-After": "1"})
    except NotServing as e:
      metrics.count_rejected()
      return JSONResponse(P.error_body(f"the server cannot take requests: {e}",
                                       "server_error", code="not_serving"), 503)
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    with_ids = body.return_token_ids
    if body.stream:
      usage = body.stream_options is not None and body.stream_options.include_usage
      return StreamingResponse(_stream(req, queue, rid, chat, with_ids, usage),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    text, tokens, last = [], [], None
    checked = loop.time()
    try:
      while last is None:
        ev = None
        try:
          ev = await asyncio.wait_for(queue.get(), _DISCONNECT_POLL_S)
        except TimeoutError:
          pass
        # Poll for a disconnect every so often, also while tokens keep coming.
        if loop.time() - checked >= _DISCONNECT_POLL_S:
          checked = loop.time()
          if await http.is_disconnected():
            req.cancel()
            return JSONResponse(P.error_body("client disconnected"), 499)
        if ev is None:
          continue
        text.append(ev.text)
        tokens.extend(ev.token_ids)
        if ev.finish_reason is not None:
          last = ev
    finally:
      if last is None:
        req.cancel()
    _raise_for(last)
    make = P.chat_body if chat else P.completion_body
    return make(rid, model_name, "".join(text), last.finish_reason, last.prompt_tokens,
                last.completion_tokens, tokens if with_ids else None)

  async def _stream(req: Request, queue: asyncio.Queue, rid: str, chat: bool, with_ids: bool,
                    usage: bool):
    """SSE: a chunk per event with text (or ids), the finish chunk, usage, [DONE]."""
    done = False
    try:
      if chat:
        yield _sse(P.chat_chunk(rid, model_name, {"role": "assistant", "content": ""}, None))
      while True:
        ev = await queue.get()  # on disconnect Starlette cancels this task: see finally
        finish = ev.finish_reason
        if finish in ("error", "cancelled"):
          done = True
          yield _sse(P.error_body(ev.error or "the request was cancelled by the server",
                                  "server_error"))
          break
        ids = ev.token_ids if with_ids else None
        if ev.text or finish is not None or with_ids:
          if chat:
            delta = {"content": ev.text} if ev.text else {}
            yield _sse(P.chat_chunk(rid, model_name, delta, finish, ids))
          else:
            yield _sse(P.completion_chunk(rid, model_name, ev.text, finish, ids))
        if finish is not None:
          done = True
          if usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield _sse(P.usage_chunk(rid, model_name, obj, ev.prompt_tokens,
                                     ev.completion_tokens))
          break
      yield "data: [DONE]\n\n"
    finally:
      if not done:
        req.cancel()

  def _raise_for(ev: Event) -> None:
    if ev.finish_reason == "error":
      raise P.APIError(500, ev.error or "engine error", type="server_error")
    if ev.finish_reason == "cancelled":
      raise P.APIError(503, "the request was cancelled: the server is stopping",
                       type="server_error")

  return app


def _sse(obj: dict) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
