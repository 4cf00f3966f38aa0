"""A running generation: stream its text pieces, await its result, cancel it."""

from __future__ import annotations

import asyncio
import collections
import json
import weakref
from collections.abc import AsyncIterator, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import ClientClosed, ProtocolError, RealmError, ShuttingDown, error_from_frame
from .types import Completion, ToolCall, Usage

if TYPE_CHECKING:
    from .client import Client, _Connection

__all__ = ["Generation"]


class _Stream:
    """A generation's state, as the connection's reader drives it.

    Kept apart from :class:`Generation` so that the connection does not keep
    the user's object alive: when the user drops a generation unfinished, it
    is cancelled and its pieces are no longer buffered.
    """

    def __init__(self, client: Client, buffer_limit: int) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.limit = max(1, buffer_limit)
        self.pieces: collections.deque[str] = collections.deque()
        self.discard = False
        self.abandoned = False
        self.completion: Completion | None = None
        self.error: RealmError | None = None
        self.finished = asyncio.Event()
        self.readable = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.conn: _Connection | None = None
        self.id: str | None = None
        self.frame: dict[str, Any] = {}
        #: Cancelled before it was sent: it never will be.
        self.cancelled = False
        #: cancel() was called (a refused request is then not sent again).
        self.cancelling = False
        #: Whether a token frame arrived.
        self.streamed = False
        #: Times the request was sent again after a ``shutting_down`` refusal.
        self.resends = 0

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    async def send(self, frame: dict[str, Any]) -> None:
        self.frame = frame
        try:
            await self.client._send_request(frame, self)
        except RealmError as error:
            self.fail(error)
            return
        except asyncio.CancelledError:
            self.fail(ClientClosed("the client was closed before the request was sent"))
            raise
        if self.abandoned:
            self.cancel_soon()

    def bind(self, conn: _Connection, request_id: str) -> None:
        """Records the connection and id the request is sent with."""
        self.conn, self.id = conn, request_id

    async def on_frame(self, frame: dict[str, Any]) -> bool:
        """Handles one frame for this request; returns True on its last frame."""
        kind = frame.get("type")
        if kind == "token":
            text = frame.get("text")
            if not isinstance(text, str):
                self.fail(ProtocolError(f"a token frame without text: {frame}"))
                return True
            self.streamed = True
            await self.push(text)
            return False
        if kind == "tool_call":
            # The call is listed again in the `done` frame's `tool_calls`.
            self.streamed = True
            return False
        if kind == "done":
            try:
                usage = frame["usage"]
                completion = Completion(
                    text=str(frame["text"]),
                    usage=Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"])),
                    finish=frame["finish"],
                    tool_calls=tuple(_tool_call(c) for c in frame.get("tool_calls", [])),
                )
            except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
                self.fail(ProtocolError(f"a malformed done frame ({e!r}): {frame}"))
                return True
            self.completion = completion
            self.finish()
            return True
        if kind == "error":
            error = error_from_frame(frame)
            if (
                isinstance(error, ShuttingDown)
                and not self.streamed
                and not self.cancelling
                and not self.abandoned
                and not self.done
                and self.client._may_resend(self.resends)
            ):
                # Refused before it started: send it again on the next connection.
                self.resends += 1
                self.conn, self.id = None, None
                self.client._background(self.send(self.frame))
                return True
            self.fail(error)
            return True
        self.fail(ProtocolError(f"unexpected `{kind}` frame for a generation: {frame}"))
        return True

    def fail(self, error: RealmError) -> None:
        """Ends the generation with ``error`` (no-op once finished)."""
        if self.done:
            return
        if error.request_id is None:
            error.request_id = self.id
        self.error = error
        self.finish()

    async def push(self, text: str) -> None:
        conn = self.conn
        while len(self.pieces) >= self.limit and not self.discard and not self.done:
            # Backpressure: the connection's reader waits here, so the socket
            # is not read and the server pauses this connection's generations.
            self.room.clear()
            if conn is not None:
                conn.paused += 1
                conn.pause_epoch += 1
            try:
                await self.room.wait()
            finally:
                if conn is not None:
                    conn.paused -= 1
        if self.discard or self.done:
            return
        self.pieces.append(text)
        self.readable.set()

    def discard_pieces(self) -> None:
        self.discard = True
        self.pieces.clear()
        self.room.set()

    def finish(self) -> None:
        self.finished.set()
        self.readable.set()
        self.room.set()

    def abandon(self) -> None:
        """The user dropped the generation: stop buffering and cancel it (any thread)."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self._abandon)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _abandon(self) -> None:
        self.abandoned = True
        self.discard_pieces()
        if self.id is not None:
            self.cancel_soon()
        else:
            self.cancelled = True  # not sent yet: never send it

    def cancel_soon(self) -> None:
        if self.done or self.conn is None or self.id is None:
            return
        self.client._background(self.client._cancel_quietly(self.conn, self.id))


class Generation:
    """A ``generate`` or ``chat`` request, started by :meth:`Client.generate` or :meth:`Client.chat`.

    ``async for piece in generation`` yields the text pieces as the server's
    ``token`` frames arrive; ``await generation.result()`` (or just
    ``await generation``) gives the :class:`Completion`; ``await
    generation.cancel()`` asks the server to stop it (it then finishes with
    ``finish == "cancelled"`` and the text so far). Used as ``async with``,
    a generation still running at the end of the block is cancelled, and so
    is one that is dropped (garbage-collected) unfinished.

    Pieces not yet read are buffered up to the client's ``stream_buffer``;
    beyond that the client stops reading the connection until they are read,
    which pauses the server's generations on this connection (backpressure).
    So read every streaming generation you keep, or await its
    :meth:`result` (which discards unread pieces), or cancel it.
    """

    def __init__(self, client: Client, frame: dict[str, Any], buffer_limit: int) -> None:
        self._client = client
        self._state = _Stream(client, buffer_limit)
        self._start = asyncio.get_running_loop().create_task(
            self._state.send(frame), name="realm-client-send"
        )
        finalizer = weakref.finalize(self, _Stream.abandon, self._state)
        finalizer.atexit = False

    @property
    def id(self) -> str | None:
        """The request id on the wire (``None`` until the request is sent)."""
        return self._state.id

    @property
    def done(self) -> bool:
        """Whether the generation has finished (with a result or an error)."""
        return self._state.done

    @property
    def completion(self) -> Completion | None:
        """The result once finished successfully, else ``None``."""
        return self._state.completion

    @property
    def buffered(self) -> int:
        """Pieces received but not yet read by the iterator."""
        return len(self._state.pieces)

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        state = self._state
        while True:
            if state.pieces:
                piece = state.pieces.popleft()
                state.room.set()
                return piece
            if state.done:
                if state.error is not None:
                    raise state.error
                raise StopAsyncIteration
            state.readable.clear()
            await state.readable.wait()

    async def result(self) -> Completion:
        """Waits for the ``done`` frame and returns the :class:`Completion`.

        Raises the request's :class:`RealmError` if it failed. Pieces not yet
        read by an iterator are discarded (the completion holds all the text).
        """
        state = self._state
        state.discard_pieces()
        await state.finished.wait()
        if state.error is not None:
            raise state.error
        assert state.completion is not None
        return state.completion

    def __await__(self) -> Generator[Any, None, Completion]:
        return self.result().__await__()

    async def cancel(self) -> bool:
        """Asks the server to stop this generation.

        Returns whether it was still running (``found``). The generation then
        ends with ``finish == "cancelled"``; read the rest of it or await
        :meth:`result` as usual. A generation not sent yet (waiting for a
        connection) is never sent: it ends at once, cancelled, with no text.
        """
        state = self._state
        if state.done:
            return False
        state.cancelling = True
        conn, request_id = state.conn, state.id
        if conn is None or request_id is None:
            state.cancelled = True
            state.completion = Completion(text="", usage=Usage(0, 0), finish="cancelled")
            state.finish()
            return True
        try:
            reply = await self._client._call(
                {"type": "cancel", "target": request_id}, "cancelled", conn=conn
            )
        except RealmError:
            if state.done:
                return False  # the connection went, and the generation with it
            raise
        return bool(reply.get("found"))

    async def aclose(self) -> None:
        """Cancels the generation if it still runs and discards unread pieces."""
        self._state.discard_pieces()
        if not self.done:
            try:
                await self.cancel()
            except RealmError:
                pass  # the connection is gone: so is the generation

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Generation id={self.id!r} {'done' if self.done else 'running'}>"


def _tool_call(wire: dict[str, Any]) -> ToolCall:
    """A ``tool_calls`` entry of a ``done`` frame."""
    function = wire["function"]
    arguments = json.loads(function["arguments"])
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call arguments are not an object: {arguments!r}")
    return ToolCall(str(wire["id"]), str(function["name"]), arguments)
