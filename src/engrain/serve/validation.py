"""What a request may ask of ``engrain serve``: its body read within the size limit, parsed into OpenAI's request
shapes, and checked, every refusal an ``ApiError`` that the app turns into OpenAI's error shape."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """A refused request: its HTTP status and the fields of OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ------------------------------------------------------------------------------------------------------
# Request bodies
# ------------------------------------------------------------------------------------------------------


class RequestBody(BaseModel):
    """What both completion endpoints accept (fields OpenAI defines that engrain does not use are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(max_length=200)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    n: int = 1
    ignore_eos: bool = False  # as in vLLM: keep generating to max_tokens (load tests)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(RequestBody):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(RequestBody):
    prompt: str | list[str]


def text_of(content) -> str:
    """A message's text: a string, or the text parts of OpenAI's content array."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, "Only text content parts are supported.", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def chat_messages(body: ChatBody) -> list[dict]:
    """The conversation as plain role/content dicts (a ``developer`` message is a system message)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": text_of(m.content)}
            for m in body.messages]


def single_prompt(body: CompletionBody) -> str:
    """The one prompt of a completion request (a list of exactly one is accepted too)."""
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "Send one prompt per request.", param="prompt", code="invalid_value")
        prompt = prompt[0]
    return prompt


# ------------------------------------------------------------------------------------------------------
# Reading and checking
# ------------------------------------------------------------------------------------------------------


async def read_json(request: Request, max_body_bytes: int) -> dict:
    """The request's JSON object, refused past ``max_body_bytes`` (counted as it arrives, not trusted from a header)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body_bytes:
        raise ApiError(413, f"The request body is over the limit of {max_body_bytes} bytes.", code="request_too_large")
    body = bytearray()
    async for piece in request.stream():  # counted as it arrives: a missing or false length does not help
        body += piece
        if len(body) > max_body_bytes:
            raise ApiError(413, f"The request body is over the limit of {max_body_bytes} bytes.",
                           code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON ({exc}).", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


def parse(cls: type[BaseModel], data: dict) -> Any:
    """``data`` as the request model ``cls``; the first invalid field named in the error."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise ApiError(400, f"Invalid '{param}': {first.get('msg')}.", param=param, code="invalid_value") from exc


@dataclass(frozen=True)
class Limits:
    """What one request may ask for on this server."""

    max_body_bytes: int
    max_tokens_limit: int
    default_max_tokens: int


def sampling_options(body: RequestBody, limits: Limits) -> dict:
    """The decoding settings a ``Job`` takes from a request: token budget, sampling, stop strings."""
    if body.n != 1:
        raise ApiError(400, "Only n=1 is supported.", param="n", code="invalid_value")
    max_tokens = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
    if max_tokens < 1 or max_tokens > limits.max_tokens_limit:
        raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens_limit} on this server, not "
                            f"{max_tokens}.", param="max_tokens", code="invalid_value")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s or len(s) > 64 for s in stop):
        raise ApiError(400, "stop takes up to 4 non-empty strings of up to 64 characters.", param="stop",
                       code="invalid_value")
    return dict(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=stop,
                ignore_eos=body.ignore_eos)
