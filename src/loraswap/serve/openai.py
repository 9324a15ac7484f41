"""OpenAI-compatible request and response bodies (pydantic) and OpenAI's error JSON.

Text requests declare the fields loraswap honours; any other field is kept (``extra="allow"``) and
:meth:`TextBody.unsupported` names the first one that would change the answer, so the endpoint answers 400
instead of silently ignoring it. Fields at their neutral value (``n: 1``, ``logprobs: false``, a zero
penalty, ``user``) are accepted, so clients that send their defaults keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Fields loraswap does not serve, with the values that mean "not used" (accepted); any other value is a 400.
NEUTRAL: dict[str, tuple] = {
    "n": (1, None),
    "best_of": (1, None),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (False, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "suffix": (None, ""),
}
IGNORABLE = {"user", "parallel_tool_calls", "store", "metadata", "service_tier"}  # no effect on the answer


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextBody(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    lora_scale: float = Field(1.0, ge=-8.0, le=8.0)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(stop for stop in ([self.stop] if isinstance(self.stop, str) else self.stop) if stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> tuple[str, Any] | None:
        """The first field this server does not serve, with its value (None when every field is served)."""
        for name, value in (self.model_extra or {}).items():
            if name in IGNORABLE:
                continue
            if name not in NEUTRAL or value not in NEUTRAL[name]:
                return name, value
        return None


class CompletionRequest(TextBody):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=1 << 20)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str | None:
        """The content as text; None when it holds a part that is not text."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.get("type") != "text" for part in self.content):
            return None
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(TextBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name) or ``max_tokens``; None: up to the context's end."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def plain_messages(self) -> list[dict[str, str]] | str:
        """``[{"role", "content"}]`` for the chat template, or the reason one cannot be made."""
        plain = []
        for index, message in enumerate(self.messages):
            text = message.text()
            if text is None:
                return f"messages[{index}].content holds a part that is not text; this server serves text only"
            plain.append({"role": message.role, "content": text})
        return plain


class ImageRequest(BaseModel):
    model: str
    prompt: str
    n: int = Field(1, ge=1, le=8)
    size: str | None = Field(None, pattern=r"^\d+x\d+$")  # None: the server's first size (the pipeline's own)
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = None
    num_inference_steps: int = Field(4, ge=1, le=200)
    guidance_scale: float = 7.5
    lora_scale: float = 1.0

    def height_width(self) -> tuple[int, int]:
        width, height = (int(part) for part in self.size.split("x"))
        return height, width


def completion_response(model: str, texts: list[str], finish_reasons: list[str], usage: dict[str, int]) -> dict:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
            for index, (text, reason) in enumerate(zip(texts, finish_reasons))
        ],
        "usage": usage,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chat_response(model: str, text: str, finish_reason: str, counts: dict[str, int]) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": counts,
    }


def images_response(images_b64: list[str]) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": image} for image in images_b64]}


def model_list(base: str, adapters: list[str]) -> dict:
    """``/v1/models`` as vLLM lists LoRAs: the base first, then each adapter with ``parent`` = base."""
    created = int(time.time())
    entries = [{"id": base, "object": "model", "created": created, "owned_by": "loraswap", "root": base, "parent": None}]
    entries += [
        {"id": name, "object": "model", "created": created, "owned_by": "loraswap", "root": name, "parent": base}
        for name in adapters
    ]
    return {"object": "list", "data": entries}


ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 500: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}
