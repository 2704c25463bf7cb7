"""OpenAI response bodies and server-sent-event chunks, built from the core's deltas."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from edgeagent.engine.interface import Delta, FinishReason, TokenDetail
from edgeagent.server.core import CompletionParts
from edgeagent.server.generation import Admitted

FINISH_REASONS: dict[FinishReason | None, str | None] = {
    None: None,
    FinishReason.MAX_TOKENS: "length",
    FinishReason.TOKEN_LIMIT: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    # OpenAI has no value for a time limit; "length" is what its clients read as "cut short".
    FinishReason.TIME_LIMIT: "length",
    FinishReason.CANCELLED: "abort",
}
JsonDict = dict[str, Any]
Shape = Literal["message", "first", "delta"]


@dataclass
class Reply:
    """What one request's answers share: its kind (chat or text completion) and identity."""

    chat: bool
    admitted: Admitted
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        prefix = "chatcmpl" if self.chat else "cmpl"
        return f"{prefix}-{self.admitted.lease.request_id}"

    def envelope(self, chunk: bool) -> JsonDict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id, "object": f"{kind}.chunk" if chunk and self.chat else kind,
            "created": self.created, "model": self.admitted.lease.serving.model_id,
            "system_fingerprint": self.admitted.version,
        }  # fmt: skip

    def usage(self, completion_tokens: int) -> JsonDict:
        prompt = self.admitted.prepared.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}  # fmt: skip

    def choice(self, index: int, text: str, tokens: list[TokenDetail],
               finish: FinishReason | None, shape: Shape) -> JsonDict:  # fmt: skip
        """A choice: a whole `message`, or a stream's `first` or later `delta`."""
        asked = self.admitted.prepared.options.logprobs is not None
        logprobs = self.logprobs(tokens) if asked else None
        choice: JsonDict = {"index": index, "logprobs": logprobs,
                            "finish_reason": FINISH_REASONS[finish]}  # fmt: skip
        if not self.chat:
            choice["text"] = text
        elif shape == "message":
            choice["message"] = {"role": "assistant", "content": text}
        elif shape == "first":
            choice["delta"] = {"role": "assistant", "content": text}
        else:
            choice["delta"] = {"content": text} if text else {}
        return choice

    def logprobs(self, tokens: list[TokenDetail]) -> JsonDict:
        if self.chat:
            return {"content": [_chat_token(t) for t in tokens]}
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{top.text: top.logprob for top in t.top} for t in tokens],
        }


def _chat_token(token: TokenDetail) -> JsonDict:
    return {
        "token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode()),
        "top_logprobs": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}
                         for t in token.top],
    }  # fmt: skip


def unary_body(reply: Reply, parts: list[CompletionParts]) -> JsonDict:
    choices, completion_tokens = [], 0
    for index, part in enumerate(parts):
        last = part.final
        completion_tokens += last.completion_tokens
        choice = reply.choice(index, part.text, part.tokens, last.finish_reason, "message")
        choices.append(choice)
    return {**reply.envelope(chunk=False), "choices": choices,
            "usage": reply.usage(completion_tokens)}  # fmt: skip


def sse(data: JsonDict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def chunk(reply: Reply, delta: Delta, first: bool, with_usage: bool) -> JsonDict:
    choice = reply.choice(delta.index, delta.text, list(delta.tokens), delta.finish_reason,
                          "first" if first else "delta")  # fmt: skip
    body = {**reply.envelope(chunk=True), "choices": [choice]}
    if with_usage:
        body["usage"] = None
    return body


def usage_chunk(reply: Reply, completion_tokens: int) -> JsonDict:
    return {**reply.envelope(chunk=True), "choices": [], "usage": reply.usage(completion_tokens)}
