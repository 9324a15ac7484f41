"""OpenAI-compatible request and response bodies (pydantic) and OpenAI's error JSON.

Only the fields loraswap honours are declared; unknown fields are ignored, as OpenAI-compatible
servers do, so clients that send e.g. ``stream: false`` keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field


class CompletionRequest(BaseModel):
    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    seed: int | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ImageRequest(BaseModel):
    model: str
    prompt: str
    n: int = Field(1, ge=1, le=8)
    size: str = Field("64x64", pattern=r"^\d+x\d+$")
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
