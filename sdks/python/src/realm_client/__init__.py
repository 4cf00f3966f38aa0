"""Python client for Realm's WebSocket API (``/v1/ws``).

>>> import asyncio
>>> from realm_client import Client, Sampling
>>> async def main() -> None:
...     async with Client.connect("ws://127.0.0.1:8080", "rk_acme_...") as client:
...         stream = client.generate("small", "The capital of France is",
...                                  max_tokens=8, sampling=Sampling.greedy())
...         async for piece in stream:
...             print(piece, end="", flush=True)
...         print((await stream).usage)
"""

from ._version import __version__
from .client import Client, Connecting, Request
from .errors import (
    BadRequest,
    Cancelled,
    ClientClosed,
    ConnectionFailed,
    ConnectionLost,
    DuplicateId,
    FrameTooLarge,
    GuestError,
    InternalError,
    InvalidInput,
    ModelNotFound,
    NotPermitted,
    PipelineError,
    ProtocolError,
    QuotaExceeded,
    RateLimited,
    RealmError,
    ShuttingDown,
    Overloaded,
    TooManyStreams,
    Unauthorized,
    UnknownType,
    error_from_frame,
)
from .generation import Generation
from .types import (
    Backoff,
    Completion,
    FinishReason,
    Message,
    ModelInfo,
    Sampling,
    SamplingLike,
    ToolCall,
    Usage,
)

__all__ = [
    "__version__",
    "Backoff",
    "BadRequest",
    "Cancelled",
    "Client",
    "ClientClosed",
    "Completion",
    "Connecting",
    "ConnectionFailed",
    "ConnectionLost",
    "DuplicateId",
    "FinishReason",
    "FrameTooLarge",
    "Generation",
    "GuestError",
    "InternalError",
    "InvalidInput",
    "Message",
    "ModelInfo",
    "ModelNotFound",
    "NotPermitted",
    "PipelineError",
    "ProtocolError",
    "QuotaExceeded",
    "RateLimited",
    "RealmError",
    "Request",
    "Sampling",
    "SamplingLike",
    "ToolCall",
    "ShuttingDown",
    "Overloaded",
    "TooManyStreams",
    "Unauthorized",
    "UnknownType",
    "Usage",
    "error_from_frame",
]
