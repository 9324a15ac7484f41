"""Server-sent events in OpenAI's streaming format: ``text_completion`` chunks (``choices[0].text``) or
``chat.completion.chunk`` chunks (``choices[0].delta``), a last ``data: [DONE]``, and with
``stream_options.include_usage`` a chunk with empty ``choices`` and the ``usage`` before it (every other chunk then
carries ``"usage": null``, as OpenAI's do)."""

from __future__ import annotations

import json
import time
import uuid

DONE = "data: [DONE]\n\n"


def event(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class ChunkWriter:
    """The chunks of one streamed answer (one choice)."""

    def __init__(self, chat: bool, model: str, include_usage: bool) -> None:
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _chunk(self, choices: list[dict], **extra) -> str:
        body = {
            "id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created, "model": self.model, "choices": choices, **extra,
        }
        if self.include_usage and "usage" not in body:
            body["usage"] = None
        return event(body)

    def start(self) -> list[str]:
        """Chat opens with the assistant's role (and empty content), as OpenAI's stream does."""
        if not self.chat:
            return []
        return [self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])]

    def piece(self, text: str, finish_reason: str | None = None) -> str:
        if self.chat:
            delta = {"content": text} if text else {}
            return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}])

    def usage(self, counts: dict[str, int]) -> str:
        return self._chunk([], usage=counts)


async def collect(stream) -> tuple[str, str, int]:
    """A replica's events joined: (text, finish_reason, completion tokens)."""
    pieces, reason, tokens = [], "stop", 0
    async for event in stream:
        pieces.append(event.text)
        reason, tokens = event.finish_reason or reason, event.completion_tokens
    return "".join(pieces), reason, tokens


async def sse_body(stream, writer: ChunkWriter, prompt_tokens: int):
    """The SSE body; a client that goes away cancels the replica's stream, which frees the row."""
    tokens = 0
    try:
        for chunk in writer.start():
            yield chunk
        async for item in stream:
            tokens = item.completion_tokens
            if item.text or item.finish_reason:
                yield writer.piece(item.text, item.finish_reason)
        if writer.include_usage:
            yield writer.usage({"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens})
        yield DONE
    finally:
        stream.cancel()
