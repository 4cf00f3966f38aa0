"""Typed errors: one class per server error code, plus client-side failures.

Every error the SDK raises is a :class:`RealmError`. Errors the server sends
(``{"type": "error", "code": ...}``) become the subclass registered for their
code; a code this SDK does not know yet becomes a plain :class:`RealmError`
with that code, so newer servers never break older clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "RealmError",
    "BadRequest",
    "UnknownType",
    "FrameTooLarge",
    "Unauthorized",
    "ModelNotFound",
    "NotPermitted",
    "RateLimited",
    "QuotaExceeded",
    "TooManyStreams",
    "InvalidInput",
    "DuplicateId",
    "GuestError",
    "PipelineError",
    "Cancelled",
    "ShuttingDown",
    "Overloaded",
    "InternalError",
    "ConnectionLost",
    "ConnectionFailed",
    "ClientClosed",
    "ProtocolError",
    "error_from_frame",
]


class RealmError(Exception):
    """An error from Realm or from this client.

    ``code`` is the server's stable error code (``"rate_limited"``, ...) or a
    client-side one (``"connection_lost"``, ...); ``retry_after_ms`` is the
    server's hint for when trying again can succeed (rate limits, quotas);
    ``request_id`` is the id of the request that failed, when known.
    """

    #: The code this class stands for (empty for the base class).
    CODE: ClassVar[str] = ""

    code: str
    message: str
    retry_after_ms: int | None
    request_id: str | None

    def __init__(
        self,
        code: str,
        message: str,
        retry_after_ms: int | None = None,
        *,
        request_id: str | None = None,
    ) -> None:
        super().__init__(code, message, retry_after_ms)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.request_id = request_id

    @property
    def retry_after(self) -> float | None:
        """The retry hint in seconds, or ``None`` when the server gave none."""
        return None if self.retry_after_ms is None else self.retry_after_ms / 1000.0

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}" if self.code else self.message
        if self.retry_after_ms is not None:
            text += f" (retry after {self.retry_after_ms} ms)"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"retry_after_ms={self.retry_after_ms!r}, request_id={self.request_id!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take (message, retry_after_ms); rebuild through the
        # factory so pickling works for every class.
        return (
            _rebuild,
            (type(self), self.code, self.message, self.retry_after_ms, self.request_id),
        )

    def _copy(self) -> RealmError:
        """A fresh instance with the same fields (to raise the same error again)."""
        return _rebuild(type(self), self.code, self.message, self.retry_after_ms, self.request_id)


def _rebuild(
    cls: type[RealmError],
    code: str,
    message: str,
    retry_after_ms: int | None,
    request_id: str | None,
) -> RealmError:
    error = RealmError.__new__(cls)
    RealmError.__init__(error, code, message, retry_after_ms, request_id=request_id)
    return error


class _Coded(RealmError):
    """A :class:`RealmError` whose code is fixed by its class."""

    def __init__(
        self,
        message: str,
        retry_after_ms: int | None = None,
        *,
        request_id: str | None = None,
    ) -> None:
        super().__init__(self.CODE, message, retry_after_ms, request_id=request_id)


class BadRequest(_Coded):
    """The frame was not JSON, lacked a field or had an unknown one (``bad_request``)."""

    CODE = "bad_request"


class UnknownType(_Coded):
    """The server does not know the frame's ``type`` (``unknown_type``)."""

    CODE = "unknown_type"


class FrameTooLarge(_Coded):
    """The request frame was larger than the server's ``max-frame`` (``frame_too_large``).

    Only that request fails. (Frames over four times the limit make the
    server close the connection: every request on it fails with
    :class:`ConnectionLost`.)
    """

    CODE = "frame_too_large"


class Unauthorized(_Coded):
    """The API key is missing or wrong, or was revoked (``unauthorized``).

    At connect: the key was refused. On an open connection: a configuration
    reload revoked the key (or removed its tenant), and the server closed it.
    """

    CODE = "unauthorized"


class ModelNotFound(_Coded):
    """No such model for this tenant (``model_not_found``)."""

    CODE = "model_not_found"


class NotPermitted(_Coded):
    """The tenant may not run this pipeline, or has no component to invoke (``not_permitted``)."""

    CODE = "not_permitted"


class RateLimited(_Coded):
    """Over ``requests-per-minute`` or ``tokens-per-minute``; see ``retry_after_ms`` (``rate_limited``)."""

    CODE = "rate_limited"


class QuotaExceeded(_Coded):
    """The tenant's ``tokens-per-day`` are spent; see ``retry_after_ms`` (``quota_exceeded``)."""

    CODE = "quota_exceeded"


class TooManyStreams(_Coded):
    """The tenant's ``concurrent-streams`` generations are already running (``too_many_streams``)."""

    CODE = "too_many_streams"


class InvalidInput(_Coded):
    """The request's values do not fit: empty prompt, too long, bad sampling (``invalid_input``)."""

    CODE = "invalid_input"


class DuplicateId(_Coded):
    """A request with this id is still running on the connection (``duplicate_id``)."""

    CODE = "duplicate_id"


class GuestError(_Coded):
    """A WebAssembly component trapped, hit a limit or returned an error (``guest_error``)."""

    CODE = "guest_error"


class PipelineError(_Coded):
    """A pipeline failed for a reason other than a guest (``pipeline_error``)."""

    CODE = "pipeline_error"


class Cancelled(_Coded):
    """A pipeline or invoke was stopped by a cancel before it finished (``cancelled``).

    (A cancelled generation is no error: it ends with ``finish == "cancelled"``.)
    """

    CODE = "cancelled"


class ShuttingDown(_Coded):
    """The server is draining and refused the request, which did not run (``shutting_down``).

    A client that reconnects sends such a request again once it has a new
    connection, so this reaches the caller only with ``reconnect=None`` (or
    after several refusals in a row).
    """

    CODE = "shutting_down"


class Overloaded(_Coded):
    """The model could not be loaded in time: the server's memory budget is
    held by other models in use, or the load failed (``overloaded``). The
    request did not run; ``retry_after_ms`` says when to try again.
    """

    CODE = "overloaded"


class InternalError(_Coded):
    """A bug inside the server (``internal``)."""

    CODE = "internal"


class ConnectionLost(_Coded):
    """The connection dropped before the request finished, or there is none to send it on."""

    CODE = "connection_lost"


class ConnectionFailed(ConnectionLost):
    """Connecting (or reconnecting) to the server failed."""

    CODE = "connection_failed"


class ClientClosed(_Coded):
    """The client was closed (by :meth:`Client.close`) before or while the request ran."""

    CODE = "client_closed"


class ProtocolError(_Coded):
    """The server sent a frame this client cannot make sense of."""

    CODE = "protocol_error"


_BY_CODE: dict[str, type[_Coded]] = {
    cls.CODE: cls
    for cls in (
        BadRequest,
        UnknownType,
        FrameTooLarge,
        Unauthorized,
        ModelNotFound,
        NotPermitted,
        RateLimited,
        QuotaExceeded,
        TooManyStreams,
        InvalidInput,
        DuplicateId,
        GuestError,
        PipelineError,
        Cancelled,
        ShuttingDown,
        Overloaded,
        InternalError,
    )
}


def error_from_frame(frame: Mapping[str, Any]) -> RealmError:
    """The exception for a server ``error`` frame (unknown codes give a :class:`RealmError`)."""
    code = frame.get("code")
    code = code if isinstance(code, str) and code else "unknown"
    message = frame.get("message")
    message = message if isinstance(message, str) else "(the server sent no message)"
    retry = frame.get("retry_after_ms")
    retry_after_ms = retry if isinstance(retry, int) and not isinstance(retry, bool) else None
    request_id = frame.get("id")
    request_id = request_id if isinstance(request_id, str) else None
    cls = _BY_CODE.get(code)
    if cls is None:
        return RealmError(code, message, retry_after_ms, request_id=request_id)
    return cls(message, retry_after_ms, request_id=request_id)
