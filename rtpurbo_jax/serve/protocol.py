"""The OpenAI API subset served: request models (validated) and response bodies.

Supported: one prompt / conversation per request (`n` = 1), `max_tokens`, `temperature`,
`top_p`, `seed`, `stop`, `stream` (+ `stream_options.include_usage`). Extensions (as vLLM
names them; pass them with the openai client's `extra_body`): `top_k`, `stop_token_ids`,
`ignore_eos`, `return_token_ids` (the generated token ids in each choice / final chunk).
Parameters the server cannot honour (`n` > 1, `logprobs`, `echo`, `best_of` > 1, penalties,
`logit_bias`, `suffix`, tools) are refused with a 400 rather than silently ignored; unknown
fields are ignored.

Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
  """An error answered as JSON with an HTTP status."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = (status, message, type,
                                                                   param, code)

  def body(self) -> dict:
    return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
  return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
  include_usage: bool = False


class _Common(BaseModel):
  model_config = ConfigDict(extra="ignore")

  model: str
  max_tokens: int | None = Field(default=None, ge=1)
  temperature: float = Field(default=1.0, ge=0.0, le=2.0)
  top_p: float = Field(default=1.0, gt=0.0, le=1.0)
  top_k: int = Field(default=0, ge=-1)  # 0 or -1: off
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: int = 1
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: dict | None = None
  user: str | None = None
  stop_token_ids: list[int] | None = None
  ignore_eos: bool = False
  return_token_ids: bool = False

  @field_validator("stop")
  @classmethod
  def _stops(cls, v):
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > 4:
      raise ValueError("at most 4 stop sequences")
    if any(not s for s in stops):
      raise ValueError("stop sequences must not be empty")
    return stops

  def unsupported(self) -> tuple[str, str] | None:
    """(param, message) for the first setting this server does not implement."""
    if self.n != 1:
      return "n", "only n=1 is supported"
    if self.presence_penalty or self.frequency_penalty:
      return "presence_penalty", "presence / frequency penalties are not supported"
    if self.logit_bias:
      return "logit_bias", "logit_bias is not supported"
    return None

  def top_k_value(self) -> int:
    return max(self.top_k, 0)


class CompletionRequest(_Common):
  prompt: str | list[str] | list[int] | list[list[int]]
  max_tokens: int | None = Field(default=16, ge=1)
  echo: bool = False
  logprobs: int | None = None
  best_of: int | None = None
  suffix: str | None = None

  def unsupported(self):
    if self.echo:
      return "echo", "echo is not supported"
    if self.logprobs is not None:
      return "logprobs", "logprobs are not supported"
    if self.best_of not in (None, 1):
      return "best_of", "only best_of=1 is supported"
    if self.suffix:
      return "suffix", "suffix is not supported"
    return super().unsupported()


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="ignore")

  role: Literal["system", "user", "assistant", "developer"]
  content: str | list[dict]

  def text(self) -> str:
    if isinstance(self.content, str):
      return self.content
    parts = []
    for p in self.content:
      if p.get("type") != "text" or not isinstance(p.get("text"), str):
        raise ValueError("only text content parts are supported")
      parts.append(p["text"])
    return "".join(parts)


class ChatRequest(_Common):
  messages: list[ChatMessage] = Field(min_length=1)
  max_completion_tokens: int | None = Field(default=None, ge=1)
  logprobs: bool = False
  tools: list | None = None

  def unsupported(self):
    if self.logprobs:
      return "logprobs", "logprobs are not supported"
    if self.tools:
      return "tools", "tools are not supported"
    return super().unsupported()


# ---------------------------------------------------------------------------------------------
# Responses.


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt: int, completion: int) -> dict:
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


def completion_body(rid: str, model: str, text: str, finish: str, prompt: int, completion: int,
                    token_ids=None) -> dict:
  choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
  if token_ids is not None:
    choice["token_ids"] = list(token_ids)
  return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
          "choices": [choice], "usage": usage(prompt, completion)}


def completion_chunk(rid: str, model: str, text: str, finish: str | None,
                     token_ids=None) -> dict:
  choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
  if token_ids is not None:
    choice["token_ids"] = list(token_ids)
  return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
          "choices": [choice]}


def chat_body(rid: str, model: str, text: str, finish: str, prompt: int, completion: int,
              token_ids=None) -> dict:
  choice = {"index": 0, "message": {"role": "assistant", "content": text},
            "finish_reason": finish, "logprobs": None}
  if token_ids is not None:
    choice["token_ids"] = list(token_ids)
  return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
          "choices": [choice], "usage": usage(prompt, completion)}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, token_ids=None) -> dict:
  choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
  if token_ids is not None:
    choice["token_ids"] = list(token_ids)
  return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
          "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, obj: str, prompt: int, completion: int) -> dict:
  return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
          "choices": [], "usage": usage(prompt, completion)}
