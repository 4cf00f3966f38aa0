"""Plain values the client sends and returns."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, TypedDict, Union

__all__ = [
    "Backoff",
    "Completion",
    "FinishReason",
    "Message",
    "ModelInfo",
    "Sampling",
    "SamplingLike",
    "ToolCall",
    "Usage",
]

#: Why a generation ended: an end-of-generation token or stop string, ``max_tokens``, a cancel,
#: or (with ``tools``) the model made tool calls.
FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


class Message(TypedDict, total=False):
    """One chat message, e.g. ``{"role": "user", "content": "Hi!"}``.

    An assistant message that made calls has ``tool_calls`` (see
    :meth:`ToolCall.to_wire`); a ``tool`` message holds a call's result and
    names it by ``tool_call_id``.
    """

    role: str
    content: str
    tool_calls: list[dict[str, Any]]
    tool_call_id: str
    name: str


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of a generation; ``None`` fields take the server's defaults.

    ``temperature=0`` is greedy decoding (the server's default temperature is 0.8).
    """

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    #: OpenAI's presence penalty (-2..=2): lowers every token already generated.
    presence_penalty: float | None = None
    #: OpenAI's frequency penalty (-2..=2): lowers a token once per time it was generated.
    frequency_penalty: float | None = None
    seed: int | None = None

    @classmethod
    def greedy(cls) -> Sampling:
        """Greedy decoding: always the most likely token (deterministic)."""
        return cls(temperature=0.0)

    def to_wire(self) -> dict[str, float | int]:
        """The ``sampling`` object of a request frame (unset fields left out)."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}


#: A :class:`Sampling` or the equivalent mapping (sent as is; the server rejects unknown fields).
SamplingLike = Union[Sampling, Mapping[str, Any]]


@dataclass(frozen=True)
class Usage:
    """Token counts of a generation."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ToolCall:
    """A call of one of the offered ``tools`` that the model made."""

    #: Its id: a ``{"role": "tool", "tool_call_id": id, ...}`` message answers it.
    id: str
    #: The function's name.
    name: str
    #: The arguments, valid against the function's ``parameters`` schema.
    arguments: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        """The call as an assistant message's ``tool_calls`` entry (OpenAI's shape)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }


@dataclass(frozen=True)
class Completion:
    """A finished generation: its text, tool calls, token counts and why it ended."""

    text: str
    usage: Usage
    finish: FinishReason
    #: The calls the model made (with ``tools``); their text is not in ``text``.
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """A model the tenant may use."""

    name: str
    architecture: str
    context_length: int


@dataclass(frozen=True)
class Backoff:
    """How the client reconnects after its connection drops.

    Attempt ``n`` (from 0) waits ``min(maximum, initial * multiplier**n)``
    seconds, shortened by a random fraction of up to ``jitter`` (0 = no
    jitter, 1 = anywhere between 0 and the full delay), so that many clients
    do not reconnect in lockstep. After ``max_attempts`` failed attempts
    (``None`` = never give up) the client stops trying and requests fail with
    :class:`~realm_client.ConnectionFailed`. A refused key is never retried.
    """

    initial: float = 0.25
    maximum: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = 10

    def __post_init__(self) -> None:
        if not self.initial >= 0:
            raise ValueError(f"Backoff.initial must be >= 0, not {self.initial!r}")
        if not self.maximum >= self.initial:
            raise ValueError(
                f"Backoff.maximum ({self.maximum!r}) must be >= initial ({self.initial!r})"
            )
        if not self.multiplier >= 1:
            raise ValueError(f"Backoff.multiplier must be >= 1, not {self.multiplier!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"Backoff.jitter must be within 0..=1, not {self.jitter!r}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"Backoff.max_attempts must be >= 1 or None, not {self.max_attempts!r}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (counted from 0)."""
        if attempt < 0:
            raise ValueError("attempt counts from 0")
        try:
            base = min(self.maximum, self.initial * self.multiplier**attempt)
        except OverflowError:
            base = self.maximum
        fraction = (rng or random).random()
        return base * (1.0 - self.jitter * fraction)
