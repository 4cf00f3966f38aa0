"""The asyncio client: one WebSocket to ``/v1/ws``, many requests multiplexed by id."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.version import version as websockets_version

from ._version import __version__
from .errors import (
    Cancelled,
    ClientClosed,
    ConnectionFailed,
    ConnectionLost,
    ProtocolError,
    RealmError,
    ShuttingDown,
    Unauthorized,
    error_from_frame,
)
from .generation import Generation
from .types import Backoff, Completion, Message, ModelInfo, Sampling, SamplingLike

__all__ = ["Client", "Connecting", "Request"]

log = logging.getLogger("realm_client")

#: Default number of unread pieces buffered per streaming generation.
DEFAULT_STREAM_BUFFER = 256
#: Default largest frame accepted from the server (a pipeline's result can be big).
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: How many times in a row one request refused with ``shutting_down`` is sent again.
MAX_RESENDS = 3

T = TypeVar("T")


class _Handler(Protocol):
    """What the reader dispatches a request's frames to."""

    #: Set when the request is cancelled before it was sent: it never will be.
    cancelled: bool

    def bind(self, conn: _Connection, request_id: str) -> None: ...

    async def on_frame(self, frame: dict[str, Any]) -> bool: ...

    def fail(self, error: RealmError) -> None: ...


class _Call:
    """A request answered by exactly one frame of type ``expect`` (or an error)."""

    def __init__(self, expect: str) -> None:
        self.expect = expect
        self.future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.cancelled = False
        self.conn: _Connection | None = None
        self.id: str | None = None

    def bind(self, conn: _Connection, request_id: str) -> None:
        self.conn, self.id = conn, request_id

    async def on_frame(self, frame: dict[str, Any]) -> bool:
        kind = frame.get("type")
        if kind == self.expect:
            if not self.future.done():
                self.future.set_result(frame)
        elif kind == "error":
            self.fail(error_from_frame(frame))
        else:
            self.fail(ProtocolError(f"expected a `{self.expect}` frame, got: {frame}"))
        return True

    def fail(self, error: RealmError) -> None:
        if self.future.done():
            return
        if error.request_id is None:
            error.request_id = self.id
        self.future.set_exception(error)


class _Connection:
    """One open WebSocket: its running requests, reader and keepalive."""

    def __init__(self, client: Client, ws: ClientConnection, tenant: str) -> None:
        self.client = client
        self.ws = ws
        self.tenant = tenant
        self.pending: dict[str, _Handler] = {}
        self.lost = False
        #: The server said `shutting_down`: it takes no new requests here and
        #: closes the connection once what runs has finished.
        self.draining = False
        #: Raised to requests when the connection ends (default: ConnectionLost).
        self.end_error: RealmError | None = None
        #: Readers held back by a full stream buffer (backpressure), and how often that began.
        self.paused = 0
        self.pause_epoch = 0
        self._send_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        self.reader = loop.create_task(self._read(), name="realm-client-reader")
        self.keepalive: asyncio.Task[None] | None = None
        if client._keepalive is not None:
            self.keepalive = loop.create_task(
                self._keep_alive(client._keepalive), name="realm-client-keepalive"
            )
        self._closing: asyncio.Task[None] | None = None

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send(text)

    async def close(self, error: RealmError) -> None:
        """Fails what runs with ``error`` and closes the socket."""
        self.end_error = error
        self._fail_pending()
        try:
            await self.ws.close()
        except Exception:  # noqa: BLE001 - the socket is going away either way
            log.debug("closing the WebSocket failed", exc_info=True)
        await asyncio.gather(self.reader, return_exceptions=True)

    # -- reading --------------------------------------------------------------

    async def _read(self) -> None:
        reason = "the connection closed"
        try:
            while True:
                message = await self.ws.recv()
                if isinstance(message, bytes):
                    message = message.decode("utf-8", "replace")
                try:
                    frame = json.loads(message)
                except ValueError:
                    log.warning("ignoring a frame that is not JSON: %.200r", message)
                    continue
                if not isinstance(frame, dict):
                    log.warning("ignoring a frame that is not a JSON object: %.200r", message)
                    continue
                await self._dispatch(frame)
        except ConnectionClosed as e:
            reason = _describe_close(e)
        except asyncio.CancelledError:
            reason = "the client stopped reading"
            raise
        except Exception as e:  # a bug here must not leave requests hanging
            log.exception("the connection's reader failed")
            reason = f"the client's reader failed: {e!r}"
        finally:
            self._on_end(reason)

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "error" and frame.get("code") == ShuttingDown.CODE and not self.draining:
            self.draining = True
            log.info("the server is shutting down; new requests wait for the next connection")
        request_id = frame.get("id")
        if not isinstance(request_id, str):
            self._orphan(frame)
            return
        handler = self.pending.get(request_id)
        if handler is None:
            # E.g. the reply to a request whose caller gave up (task cancelled).
            log.debug("dropping a `%s` frame for request %s, which nobody waits for", frame.get("type"), request_id)
            return
        if await handler.on_frame(frame) and self.pending.get(request_id) is handler:
            del self.pending[request_id]

    def _orphan(self, frame: dict[str, Any]) -> None:
        """An error frame without a request id.

        The server puts the id on every error that answers a frame whose id
        it could read, and the client always sends a readable one: an error
        without an id answers no request of ours, and is logged (except the
        ``unauthorized`` fallback below).
        """
        if frame.get("type") != "error":
            log.warning("ignoring a frame without an id: %.300s", frame)
            return
        error = error_from_frame(frame)
        if error.code == Unauthorized.CODE:
            # The server revoked this connection's key (a reload removed it or
            # its tenant) and closes the connection; older servers answered a
            # removed tenant's requests this way. Nothing on this connection
            # (or a new one with this key) can succeed.
            self.client._set_fatal(error)
            self.end_error = error
            self._fail_pending()
            self._closing = asyncio.get_running_loop().create_task(self.ws.close())
            return
        log.warning("the server reported an error for no request in particular: %s", error)

    def _fail_pending(self) -> None:
        pending = list(self.pending.values())
        self.pending.clear()
        for handler in pending:
            error = self.end_error
            handler.fail(error._copy() if error is not None else ConnectionLost("the connection closed"))

    def _on_end(self, reason: str) -> None:
        if self.lost:
            return
        self.lost = True
        if self.end_error is None:
            self.end_error = ConnectionLost(f"{reason}; the request did not finish")
        self._fail_pending()
        if self.keepalive is not None and self.keepalive is not asyncio.current_task():
            self.keepalive.cancel()
        self.client._on_connection_end(self, reason)

    # -- keepalive ----------------------------------------------------------

    async def _keep_alive(self, interval: float) -> None:
        """Pings every ``interval`` s and drops the connection if no pong comes back in time.

        While the reader is held back by a slow consumer, the pong waits in
        the unread socket data; those rounds do not count as failures.
        """
        while True:
            await asyncio.sleep(interval)
            if self.paused:
                continue
            epoch = self.pause_epoch
            try:
                pong = await self.ws.ping()
                await asyncio.wait_for(asyncio.shield(pong), interval)
            except ConnectionClosed:
                return
            except asyncio.TimeoutError:
                if self.paused or self.pause_epoch != epoch:
                    continue
                log.warning("no pong within %.1f s; dropping the connection", interval)
                self.end_error = ConnectionLost(
                    f"the server did not answer a keepalive ping within {interval:g} s"
                )
                self._on_end("keepalive ping timeout")
                # The peer is unresponsive: no closing handshake, just drop it.
                transport = getattr(self.ws, "transport", None)
                if transport is not None:
                    transport.abort()
                else:
                    self.client._background(self.ws.close(code=1011, reason="keepalive ping timeout"))
                return


def _describe_close(closed: ConnectionClosed) -> str:
    frame = closed.rcvd
    if frame is None or int(frame.code) == 1006:
        return "the connection was lost"
    reason = f": {frame.reason}" if frame.reason else ""
    return f"the server closed the connection (code {int(frame.code)}{reason})"


def _ws_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"expected a ws://, wss://, http:// or https:// URL, not {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/v1/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _http_error_message(error: InvalidStatus) -> str:
    body = getattr(error.response, "body", None) or b""
    try:
        message = json.loads(body)["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    text = body.decode("utf-8", "replace").strip()
    return text[:300] or f"HTTP {error.response.status_code}"


def _encode(frame: Mapping[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class Client:
    """A connection to a Realm server's WebSocket API (``/v1/ws``).

    Make one with ``await Client.connect(url, key)`` or ``async with
    Client.connect(url, key) as client``. Requests run concurrently over the
    one connection. When the connection drops, requests in flight fail with
    :class:`ConnectionLost` and the client reconnects in the background as
    ``reconnect`` says; requests made meanwhile wait for the new connection.
    While the server drains (SIGTERM), requests it refuses with
    ``shutting_down`` (which did not run) and new ones wait for the next
    connection and are sent there.
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        reconnect: Backoff | None = Backoff(),
        open_timeout: float = 10.0,
        keepalive: float | None = 20.0,
        stream_buffer: int = DEFAULT_STREAM_BUFFER,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        """Prepares a client without connecting; prefer :meth:`connect`."""
        if not isinstance(key, str) or not key.strip():
            raise ValueError("key must be a non-empty API key (rk_<tenant>_...)")
        if open_timeout <= 0:
            raise ValueError("open_timeout must be positive")
        if keepalive is not None and keepalive <= 0:
            raise ValueError("keepalive must be positive or None")
        if stream_buffer < 1:
            raise ValueError("stream_buffer must be at least 1")
        self._url = _ws_url(url)
        self._key = key.strip()
        self._reconnect = reconnect
        self._open_timeout = open_timeout
        self._keepalive = keepalive
        self._stream_buffer = stream_buffer
        self._max_message_size = max_message_size
        self._ids = itertools.count(1)
        self._conn: _Connection | None = None
        self._tenant: str | None = None
        self._closed = False
        self._fatal: RealmError | None = None
        self._changed = asyncio.Event()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._reconnects = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        url: str,
        key: str,
        *,
        reconnect: Backoff | None = Backoff(),
        open_timeout: float = 10.0,
        keepalive: float | None = 20.0,
        stream_buffer: int = DEFAULT_STREAM_BUFFER,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> Connecting:
        """Connects to ``url`` with API key ``key``; await it, or use it with ``async with``.

        ``url`` is the server's ``ws://host:port`` (or ``http://``; the path
        defaults to ``/v1/ws``). ``reconnect`` is the backoff for reconnecting
        after a drop (``None``: never reconnect). ``open_timeout`` bounds each
        connection attempt, ``keepalive`` is the WebSocket ping interval and
        pong timeout in seconds (``None``: off), ``stream_buffer`` the unread
        pieces kept per generation before the client applies backpressure,
        ``max_message_size`` the largest frame accepted from the server.

        Raises :class:`Unauthorized` for a wrong key and
        :class:`ConnectionFailed` when the server cannot be reached (the
        first connection is not retried).
        """
        client = cls(
            url,
            key,
            reconnect=reconnect,
            open_timeout=open_timeout,
            keepalive=keepalive,
            stream_buffer=stream_buffer,
            max_message_size=max_message_size,
        )
        return Connecting(client)

    async def _start(self) -> None:
        if self._conn is not None:
            return
        if self._closed:
            raise ClientClosed("the client is closed")
        self._conn = await self._open()
        self._tenant = self._conn.tenant

    async def close(self) -> None:
        """Closes the connection; requests still running fail with :class:`ClientClosed`.

        The server cancels the generations the connection started. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._notify()
        task = self._reconnect_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn = self._conn
        if conn is not None and not conn.lost:
            await conn.close(ClientClosed("the client was closed before the request finished"))
        for background in list(self._tasks):
            background.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Client:
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """The WebSocket URL the client connects to."""
        return self._url

    @property
    def tenant(self) -> str | None:
        """The tenant the key belongs to, as the server's ``ready`` frame said."""
        return self._tenant

    @property
    def connected(self) -> bool:
        """Whether a connection is open right now."""
        return self._conn is not None and not self._conn.lost and not self._closed

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def reconnects(self) -> int:
        """How many times the client has reconnected after a drop."""
        return self._reconnects

    # -- requests ---------------------------------------------------------------

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int | None = None,
        sampling: SamplingLike | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = True,
        response_format: Mapping[str, Any] | None = None,
    ) -> Generation:
        """Starts completing ``prompt`` with ``model``; returns the running :class:`Generation`.

        ``max_tokens`` defaults to the server's (256); ``sampling`` is a
        :class:`Sampling` or the same as a dict; ``stop`` is a stop string or a
        list of them. With ``stream=False`` the server sends no pieces, only
        the result. ``response_format`` holds the output to a format the
        server enforces while decoding, OpenAI-shaped:
        ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``,
        ``{"type": "json_object"}``, ``{"type": "regex", "pattern": ...}`` or
        ``{"type": "grammar", "grammar": ...}`` (docs/structured-output.md).
        """
        frame = self._generation_frame(
            "generate", model, max_tokens, sampling, stop, stream, response_format
        )
        frame["prompt"] = prompt
        return self._start_generation(frame)

    def chat(
        self,
        model: str,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        sampling: SamplingLike | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = True,
        response_format: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> Generation:
        """Starts answering chat ``messages`` (``{"role", "content"}`` dicts) with ``model``.

        Options are as for :meth:`generate`; the model's chat template formats
        the messages. ``tools`` offers functions in OpenAI's shape
        (``{"type": "function", "function": {"name", "description",
        "parameters"}}``); ``tool_choice`` is ``"auto"`` (the default),
        ``"none"``, ``"required"`` or ``{"type": "function", "function":
        {"name": ...}}``. The calls the model makes, with arguments valid
        against their schema, are the result's ``tool_calls``
        (docs/structured-output.md).
        """
        frame = self._generation_frame(
            "chat", model, max_tokens, sampling, stop, stream, response_format
        )
        frame["messages"] = [dict(m) for m in messages]
        if tools is not None:
            frame["tools"] = [dict(t) for t in tools]
        if tool_choice is not None:
            frame["tool_choice"] = tool_choice if isinstance(tool_choice, str) else dict(tool_choice)
        if parallel_tool_calls is not None:
            frame["parallel_tool_calls"] = parallel_tool_calls
        return self._start_generation(frame)

    async def complete(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int | None = None,
        sampling: SamplingLike | None = None,
        stop: str | Sequence[str] | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> Completion:
        """Completes ``prompt`` without streaming and returns the :class:`Completion`."""
        return await self.generate(
            model,
            prompt,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=stop,
            stream=False,
            response_format=response_format,
        )

    async def complete_chat(
        self,
        model: str,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        sampling: SamplingLike | None = None,
        stop: str | Sequence[str] | None = None,
        response_format: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> Completion:
        """Answers chat ``messages`` without streaming and returns the :class:`Completion`."""
        return await self.chat(
            model,
            messages,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=stop,
            stream=False,
            response_format=response_format,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
        )

    async def pipeline(self, name: str, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Runs the tenant's pipeline ``name`` on ``inputs``; returns its outputs object.

        Cancelling the task that awaits it also stops the pipeline on the
        server. To cancel it and get :class:`Cancelled` here instead, use
        :meth:`start_pipeline`.
        """
        return await self.start_pipeline(name, inputs)._await_or_cancel()

    def start_pipeline(
        self, name: str, inputs: Mapping[str, Any] | None = None
    ) -> Request[dict[str, Any]]:
        """Starts pipeline ``name`` on ``inputs``; returns the running :class:`Request`.

        ``await`` it for the outputs object; ``await request.cancel()`` stops
        it, and awaiting it then raises :class:`Cancelled`.
        """
        frame = {"type": "pipeline", "pipeline": name, "inputs": dict(inputs or {})}
        return Request(self, frame, "result", _pipeline_output)

    async def invoke(self, request: Any) -> Any:
        """Calls the tenant's own component with ``request`` (any JSON); returns its JSON reply.

        Cancelling the task that awaits it also stops the call on the server;
        see :meth:`start_invoke` to cancel it and get :class:`Cancelled`.
        """
        return await self.start_invoke(request)._await_or_cancel()

    def start_invoke(self, request: Any) -> Request[Any]:
        """Starts calling the tenant's own component; returns the running :class:`Request`.

        ``await`` it for the component's JSON reply; ``await call.cancel()``
        stops it, and awaiting it then raises :class:`Cancelled`.
        """
        return Request(self, {"type": "invoke", "request": request}, "result", _invoke_output)

    async def models(self) -> list[ModelInfo]:
        """The models this tenant may use."""
        reply = await self._call({"type": "models"}, "models")
        try:
            return [
                ModelInfo(str(m["name"]), str(m["architecture"]), int(m["context_length"]))
                for m in reply["models"]
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"a malformed models frame ({e!r}): {reply}") from None

    async def ping(self) -> float:
        """Sends ``ping`` and waits for ``pong``; returns the round trip in seconds."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._call({"type": "ping"}, "pong", draining_ok=True)
        return loop.time() - started

    # -- internals --------------------------------------------------------------

    def _generation_frame(
        self,
        kind: str,
        model: str,
        max_tokens: int | None,
        sampling: SamplingLike | None,
        stop: str | Sequence[str] | None,
        stream: bool,
        response_format: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": kind, "model": model}
        if response_format is not None:
            frame["response_format"] = dict(response_format)
        if max_tokens is not None:
            frame["max_tokens"] = max_tokens
        if sampling is not None:
            frame["sampling"] = sampling.to_wire() if isinstance(sampling, Sampling) else dict(sampling)
        if stop is not None:
            frame["stop"] = [stop] if isinstance(stop, str) else list(stop)
        if not stream:
            frame["stream"] = False
        return frame

    def _start_generation(self, frame: dict[str, Any]) -> Generation:
        _encode(frame)  # raise TypeError/ValueError for values JSON cannot carry, here
        return Generation(self, frame, self._stream_buffer)

    async def _call(
        self,
        frame: dict[str, Any],
        expect: str,
        *,
        conn: _Connection | None = None,
        request: Request[Any] | None = None,
        draining_ok: bool = False,
    ) -> dict[str, Any]:
        """Sends a one-reply request and waits for its ``expect`` frame.

        A request the server refuses with ``shutting_down`` did not run: it is
        sent again on the next connection (unless ``conn`` pins it to this one,
        or the client does not reconnect). ``request`` is told each attempt.
        ``draining_ok``: the request may go on a connection the server drains
        (``ping``, which it still answers).
        """
        resends = 0
        while True:
            call = _Call(expect)
            if request is not None:
                request._current = call
            try:
                await self._send_request(frame, call, conn=conn, draining_ok=draining_ok)
                return await call.future
            except ShuttingDown:
                if conn is not None or (request is not None and request._cancelling):
                    raise
                if not self._may_resend(resends):
                    raise
                resends += 1
                log.info("request %s was refused: the server is shutting down; sending it again once reconnected", call.id)
            finally:
                if not call.future.done():
                    # The caller gave up (cancelled): forget the request.
                    call.future.cancel()
                    if call.conn is not None and call.id is not None:
                        call.conn.pending.pop(call.id, None)

    def _may_resend(self, resends: int) -> bool:
        """Whether a request refused with ``shutting_down`` is sent again on the next connection."""
        return (
            self._reconnect is not None
            and not self._closed
            and self._fatal is None
            and resends < MAX_RESENDS
        )

    async def _send_request(
        self,
        frame: dict[str, Any],
        handler: _Handler,
        *,
        conn: _Connection | None = None,
        draining_ok: bool = False,
    ) -> None:
        """Gives ``frame`` a fresh id, registers ``handler`` for its replies and sends it."""
        if conn is None:
            conn = await self._ready_connection(draining_ok=draining_ok)
        elif conn.lost or self._closed:
            raise ConnectionLost("the request's connection is gone")
        if handler.cancelled:
            raise Cancelled("the request was cancelled before it was sent")
        request_id = str(next(self._ids))
        text = _encode({"id": request_id, **frame})
        handler.bind(conn, request_id)
        conn.pending[request_id] = handler
        try:
            await conn.send(text)
        except ConnectionClosed as e:
            conn.pending.pop(request_id, None)
            raise ConnectionLost(
                f"the connection closed while sending the request: {e}", request_id=request_id
            ) from None

    async def _ready_connection(self, *, draining_ok: bool = False) -> _Connection:
        """The open connection, waiting while the client reconnects (or the server drains)."""
        while True:
            if self._closed:
                raise ClientClosed("the client is closed")
            if self._fatal is not None:
                raise self._fatal._copy()
            conn = self._conn
            if conn is not None and not conn.lost:
                if draining_ok or not conn.draining or self._reconnect is None:
                    return conn
                # The server is draining: it refuses new requests on this
                # connection, then closes it; wait for the next one.
            elif conn is None:
                raise ConnectionLost("the client is not connected; use `await Client.connect(...)`")
            elif self._reconnect is None:
                raise ConnectionLost("the connection was lost and reconnecting is off (reconnect=None)")
            changed = self._changed
            await changed.wait()

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Runs ``coroutine`` as a task the client keeps (and cancels on close)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_quietly(self, conn: _Connection, request_id: str) -> None:
        """Cancels request ``request_id`` on ``conn``, ignoring failures (nobody waits)."""
        try:
            await self._call({"type": "cancel", "target": request_id}, "cancelled", conn=conn)
        except RealmError as e:
            log.debug("cancelling abandoned request %s failed: %s", request_id, e)

    def _notify(self) -> None:
        """Wakes requests waiting for the connection's state to change."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_fatal(self, error: RealmError) -> None:
        self._fatal = error
        self._notify()

    def _on_connection_end(self, conn: _Connection, reason: str) -> None:
        if conn is not self._conn:
            return
        self._notify()
        if self._closed or self._fatal is not None or self._reconnect is None:
            if not self._closed and self._reconnect is None:
                log.warning("%s; not reconnecting (reconnect=None)", reason)
            return
        log.warning("%s; reconnecting", reason)
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect_loop(self._reconnect), name="realm-client-reconnect"
            )

    async def _reconnect_loop(self, backoff: Backoff) -> None:
        attempt = 0
        last: RealmError | None = None
        while not self._closed:
            if backoff.max_attempts is not None and attempt >= backoff.max_attempts:
                self._set_fatal(
                    ConnectionFailed(
                        f"gave up reconnecting to {self._url} after {attempt} attempts"
                        + (f"; the last one failed with: {last}" if last else "")
                    )
                )
                log.error("gave up reconnecting to %s after %d attempts", self._url, attempt)
                return
            await asyncio.sleep(backoff.delay(attempt))
            attempt += 1
            try:
                conn = await self._open()
            except Unauthorized as e:
                # A refused key stays refused: do not retry.
                log.error("reconnecting to %s: the key was refused: %s", self._url, e)
                self._set_fatal(e)
                return
            except RealmError as e:
                last = e
                log.info("reconnect attempt %d to %s failed: %s", attempt, self._url, e)
                continue
            except Exception as e:  # unforeseen: count it as a failed attempt, never stall
                last = ConnectionFailed(f"{type(e).__name__}: {e}")
                log.warning("reconnect attempt %d to %s failed", attempt, self._url, exc_info=True)
                continue
            if self._closed:
                await conn.close(ClientClosed("the client was closed"))
                return
            self._conn = conn
            self._tenant = conn.tenant
            self._reconnects += 1
            log.info("reconnected to %s after %d attempt(s)", self._url, attempt)
            self._notify()
            return

    async def _open(self) -> _Connection:
        """Opens a WebSocket, authenticates, and waits for ``ready``."""
        try:
            ws = await ws_connect(
                self._url,
                additional_headers={"Authorization": f"Bearer {self._key}"},
                user_agent_header=f"realm-client-python/{__version__} websockets/{websockets_version}",
                compression=None,
                open_timeout=self._open_timeout,
                ping_interval=None,  # the connection runs its own keepalive
                close_timeout=min(self._open_timeout, 5.0),
                max_size=self._max_message_size,
            )
        except InvalidStatus as e:
            status = e.response.status_code
            message = _http_error_message(e)
            if status == 401:
                raise Unauthorized(message) from None
            raise ConnectionFailed(
                f"{self._url} answered the WebSocket upgrade with HTTP {status}: {message}"
            ) from None
        except (OSError, asyncio.TimeoutError, WebSocketException) as e:
            raise ConnectionFailed(f"cannot connect to {self._url}: {e or type(e).__name__}") from None
        try:
            raw = await asyncio.wait_for(ws.recv(), self._open_timeout)
            frame = json.loads(raw)
        except asyncio.TimeoutError:
            await ws.close()
            raise ConnectionFailed(f"{self._url} sent no `ready` frame within {self._open_timeout:g} s") from None
        except ConnectionClosed as e:
            raise ConnectionFailed(f"{self._url}: {_describe_close(e)} before `ready`") from None
        except ValueError:
            await ws.close()
            raise ProtocolError(f"{self._url} sent a first frame that is not JSON: {raw!r:.200}") from None
        if isinstance(frame, dict) and frame.get("type") == "ready":
            return _Connection(self, ws, str(frame.get("tenant", "")))
        await ws.close()
        if isinstance(frame, dict) and frame.get("type") == "error":
            raise error_from_frame(frame)
        raise ProtocolError(f"expected a `ready` frame first, got: {frame!r:.300}")


def _pipeline_output(reply: dict[str, Any]) -> dict[str, Any]:
    output = reply.get("output")
    if not isinstance(output, dict):
        raise ProtocolError(f"a pipeline result that is not an object: {reply}")
    return output


def _invoke_output(reply: dict[str, Any]) -> Any:
    return reply.get("output")


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a future's exception as retrieved (nobody may wait for it)."""
    if not future.cancelled():
        future.exception()


class Request(Generic[T]):
    """A running ``pipeline`` or ``invoke`` request, from :meth:`Client.start_pipeline`
    or :meth:`Client.start_invoke`.

    ``await request`` (or ``await request.result()``) gives its output;
    ``await request.cancel()`` asks the server to stop it, after which awaiting
    it raises :class:`Cancelled`. Awaiting it from a task that is then
    cancelled does not cancel the request (cancel it explicitly).
    """

    def __init__(
        self,
        client: Client,
        frame: dict[str, Any],
        expect: str,
        convert: Callable[[dict[str, Any]], T],
    ) -> None:
        _encode(frame)  # raise TypeError/ValueError for values JSON cannot carry, here
        self._client = client
        loop = asyncio.get_running_loop()
        #: The current attempt (a request refused while the server drains is sent again).
        self._current: _Call | None = None
        self._cancelling = False
        self._outcome: asyncio.Future[T] = loop.create_future()
        self._outcome.add_done_callback(_retrieve)
        self._task = loop.create_task(self._run(frame, expect, convert), name="realm-client-request")

    async def _run(self, frame: dict[str, Any], expect: str, convert: Callable[[dict[str, Any]], T]) -> None:
        try:
            result = convert(await self._client._call(frame, expect, request=self))
        except asyncio.CancelledError:
            self._settle(error=ClientClosed("the request was stopped before it was sent"))
            raise
        except Exception as e:  # noqa: BLE001 - handed to whoever awaits the request
            self._settle(error=e)
        else:
            self._settle(result=result)

    def _settle(self, *, result: Any = None, error: BaseException | None = None) -> None:
        if self._outcome.done():
            return
        if error is None:
            self._outcome.set_result(result)
            return
        if isinstance(error, RealmError) and error.request_id is None and self._current is not None:
            error.request_id = self._current.id
        self._outcome.set_exception(error)

    @property
    def id(self) -> str | None:
        """The request id on the wire (``None`` until sent; a re-sent request gets a new one)."""
        return None if self._current is None else self._current.id

    @property
    def done(self) -> bool:
        """Whether the request has finished (with a result or an error)."""
        return self._outcome.done()

    async def result(self) -> T:
        """Waits for the request's output; raises its :class:`RealmError` if it failed."""
        return await asyncio.shield(self._outcome)

    def __await__(self) -> Generator[Any, None, T]:
        return self.result().__await__()

    async def cancel(self) -> bool:
        """Asks the server to stop the request.

        Returns whether it was still running; if so, awaiting the request
        raises :class:`Cancelled` (unless its result was already on the way).
        A request not sent yet is never sent.
        """
        if self._outcome.done():
            return False
        self._cancelling = True
        call = self._current
        if call is None or call.id is None or call.conn is None or call.future.done():
            # Not sent (waiting for a connection), or between two attempts.
            if call is not None:
                call.cancelled = True
            self._settle(error=Cancelled("the request was cancelled before it was sent"))
            self._task.cancel()
            return True
        try:
            reply = await self._client._call(
                {"type": "cancel", "target": call.id}, "cancelled", conn=call.conn
            )
        except RealmError:
            if self._outcome.done():
                return False  # the connection went, and the request with it
            raise
        return bool(reply.get("found"))

    async def _await_or_cancel(self) -> T:
        """Awaits the output; if the awaiting task is cancelled, cancels the request too."""
        try:
            return await asyncio.shield(self._outcome)
        except asyncio.CancelledError:
            if not self._outcome.done():
                self._client._background(self._cancel_quietly())
            raise

    async def _cancel_quietly(self) -> None:
        try:
            await self.cancel()
        except RealmError as e:
            log.debug("cancelling abandoned request %s failed: %s", self.id, e)

    def __repr__(self) -> str:
        return f"<Request id={self.id!r} {'done' if self.done else 'running'}>"


class Connecting:
    """The pending result of :meth:`Client.connect`: await it for the :class:`Client`,
    or use it as ``async with`` to close the client at the end of the block."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def _connect(self) -> Client:
        await self._client._start()
        return self._client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._connect().__await__()

    async def __aenter__(self) -> Client:
        return await self._connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.close()
