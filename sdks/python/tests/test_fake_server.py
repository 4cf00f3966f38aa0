"""How the client copes with what a stand-in server scripts: frames it cannot
use, a missing `ready`, HTTP errors at the upgrade, pongs that never come
(a real server never does these), and exact protocol cases that are hard to
time against a real one: errors with and without ids, `cancel` of a pipeline
or invoke, `shutting_down` while the server drains."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from realm_client import (
    Backoff,
    Cancelled,
    Client,
    ConnectionFailed,
    ConnectionLost,
    FrameTooLarge,
    ProtocolError,
    RateLimited,
    RealmError,
    ShuttingDown,
    Unauthorized,
)

Handler = Callable[[ServerConnection], Awaitable[None]]


@asynccontextmanager
async def fake(handler: Handler, **options: Any) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0, **options) as server:
        host, port = next(iter(server.sockets)).getsockname()[:2]
        yield f"ws://{host}:{port}"


def send(ws: ServerConnection, frame: dict[str, Any]) -> Awaitable[None]:
    return ws.send(json.dumps(frame))


async def misbehaving(ws: ServerConnection) -> None:
    await send(ws, {"type": "ready", "tenant": "fake"})
    async for message in ws:
        frame = json.loads(message)
        rid, kind = frame["id"], frame["type"]
        if kind == "ping":
            await ws.send("this is not JSON")
            await ws.send("[1, 2]")
            await send(ws, {"type": "pong", "id": "no-such-request"})
            await send(ws, {"type": "pong"})
            await send(ws, {"type": "pong", "id": rid})
        elif kind == "models":
            await send(ws, {"type": "result", "id": rid, "output": 1})
        elif kind == "generate":
            await send(ws, {"type": "token", "id": rid, "text": "a"})
            await send(ws, {"type": "done", "id": rid, "text": "a"})  # no usage
        elif kind == "chat":
            await send(ws, {"type": "token", "id": rid})  # no text
        elif kind == "pipeline":
            await send(
                ws,
                {"type": "error", "id": rid, "code": "rate_limited", "message": "m", "retry_after_ms": 5},
            )
        elif kind == "invoke":
            await ws.close(1011, "boom")


async def test_frames_that_make_no_sense_are_protocol_errors() -> None:
    async with fake(misbehaving) as url:
        async with Client.connect(url, "rk_fake_1", reconnect=None) as client:
            assert client.tenant == "fake"
            # Junk and frames for nobody are skipped; the real pong still lands.
            assert await asyncio.wait_for(client.ping(), 10) >= 0
            with pytest.raises(ProtocolError, match="expected a `models` frame"):
                await client.models()
            with pytest.raises(ProtocolError, match="malformed done"):
                await client.complete("m", "p")
            stream = client.chat("m", [{"role": "user", "content": "hi"}])
            with pytest.raises(ProtocolError, match="without text"):
                async for _ in stream:
                    pass
            with pytest.raises(RateLimited) as limited:
                await client.pipeline("p")
            assert limited.value.retry_after_ms == 5
            # The connection stays usable after each of those.
            assert await client.ping() >= 0
            # A close by the server fails what runs, with its code and reason.
            with pytest.raises(ConnectionLost, match=r"code 1011: boom"):
                await client.invoke({})


async def test_a_missing_or_wrong_first_frame_fails_the_connect() -> None:
    async def refuses(ws: ServerConnection) -> None:
        await send(ws, {"type": "error", "code": "unauthorized", "message": "send an `auth` frame"})

    async def chatty(ws: ServerConnection) -> None:
        await send(ws, {"type": "pong", "id": "1"})
        await ws.wait_closed()

    async def silent(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with fake(refuses) as url:
        with pytest.raises(Unauthorized, match="auth"):
            await Client.connect(url, "rk_fake_1")
    async with fake(chatty) as url:
        with pytest.raises(ProtocolError, match="ready"):
            await Client.connect(url, "rk_fake_1")
    async with fake(silent) as url:
        with pytest.raises(ConnectionFailed, match="no `ready` frame"):
            await Client.connect(url, "rk_fake_1", open_timeout=0.3)


async def test_http_errors_at_the_upgrade() -> None:
    def status(code: int, body: str) -> Callable[[ServerConnection, Request], Response]:
        def process_request(connection: ServerConnection, request: Request) -> Response:
            return connection.respond(code, body)

        return process_request

    unauthorized = json.dumps({"error": {"message": "missing or invalid API key", "code": "unauthorized"}})
    async with fake(misbehaving, process_request=status(401, unauthorized)) as url:
        with pytest.raises(Unauthorized, match="missing or invalid API key"):
            await Client.connect(url, "rk_fake_1")
    async with fake(misbehaving, process_request=status(503, "draining")) as url:
        with pytest.raises(ConnectionFailed, match="HTTP 503: draining"):
            await Client.connect(url, "rk_fake_1")


async def test_a_server_that_stops_answering_pings_is_dropped() -> None:
    """A peer that completes the handshake, says `ready`, then goes silent
    (reads nothing, answers no ping): the keepalive notices."""

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        key = next(
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("sec-websocket-key:")
        )
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        writer.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
        )
        ready = json.dumps({"type": "ready", "tenant": "mute"}).encode()
        writer.write(bytes([0x81, len(ready)]) + ready)
        await writer.drain()
        await reader.read()  # ignore everything until the client hangs up
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        client = await Client.connect(f"ws://{host}:{port}", "rk_mute_1", keepalive=0.3, reconnect=None)
        try:
            with pytest.raises(ConnectionLost, match="keepalive"):
                await asyncio.wait_for(client.ping(), 10)
            assert not client.connected
        finally:
            await asyncio.wait_for(client.close(), 10)
    finally:
        server.close()


def test_every_error_is_a_realm_error() -> None:
    for cls in (ProtocolError, ConnectionLost, ConnectionFailed, Unauthorized, Cancelled, ShuttingDown):
        assert issubclass(cls, RealmError)


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.01)


def done_frame(rid: str, text: str = "a") -> dict[str, Any]:
    return {
        "type": "done",
        "id": rid,
        "text": text,
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        "finish": "stop",
    }


async def test_errors_with_an_id_fail_only_their_request() -> None:
    """What the server sends for a removed tenant or an oversized frame: the
    request's id, so only that request fails and the connection goes on."""

    async def server(ws: ServerConnection) -> None:
        await send(ws, {"type": "ready", "tenant": "fake"})
        async for message in ws:
            frame = json.loads(message)
            rid, kind = frame["id"], frame["type"]
            if kind == "invoke":
                await send(ws, {"type": "error", "id": rid, "code": "unauthorized", "message": "this tenant no longer exists"})
            elif kind == "pipeline":
                await send(ws, {"type": "error", "id": rid, "code": "frame_too_large", "message": "the frame has 9 bytes; the limit is 8"})
            elif kind == "ping":
                await send(ws, {"type": "pong", "id": rid})

    async with fake(server) as url:
        async with Client.connect(url, "rk_fake_1", reconnect=Backoff(initial=0.01)) as client:
            call = client.start_invoke({"op": "list"})
            with pytest.raises(Unauthorized, match="no longer exists") as refused:
                await asyncio.wait_for(call, 10)
            assert refused.value.request_id == call.id is not None
            with pytest.raises(FrameTooLarge) as too_large:
                await asyncio.wait_for(client.pipeline("p", {"text": "x"}), 10)
            assert too_large.value.request_id is not None
            # Neither ends the connection: the server answers each request.
            assert await asyncio.wait_for(client.ping(), 10) >= 0
            assert client.connected and client.reconnects == 0


async def test_errors_without_an_id_answer_no_request() -> None:
    async def server(ws: ServerConnection) -> None:
        await send(ws, {"type": "ready", "tenant": "fake"})
        async for message in ws:
            frame = json.loads(message)
            if frame["type"] == "ping":
                await send(ws, {"type": "error", "code": "frame_too_large", "message": "the frame has 99 bytes"})
                await send(ws, {"type": "error", "code": "bad_request", "message": "the frame is not JSON"})
                await send(ws, {"type": "pong", "id": frame["id"]})

    async with fake(server) as url:
        async with Client.connect(url, "rk_fake_1") as client:
            # Logged, not matched to the request by its size or anything else.
            assert await asyncio.wait_for(client.ping(), 10) >= 0
            assert client.connected


async def test_an_unauthorized_without_an_id_is_final() -> None:
    """Fallback for a server that sends a removed tenant's refusals without ids."""

    async def server(ws: ServerConnection) -> None:
        await send(ws, {"type": "ready", "tenant": "fake"})
        async for message in ws:
            if json.loads(message)["type"] == "invoke":
                await send(ws, {"type": "error", "code": "unauthorized", "message": "this tenant no longer exists"})

    async with fake(server) as url:
        async with Client.connect(url, "rk_fake_1", reconnect=Backoff(initial=0.01)) as client:
            with pytest.raises(Unauthorized, match="no longer exists"):
                await asyncio.wait_for(client.invoke({}), 10)
            await until(lambda: not client.connected)
            with pytest.raises(Unauthorized):
                await client.ping()
            assert client.reconnects == 0


async def test_cancelling_a_pipeline_or_invoke_raises_cancelled() -> None:
    received: list[dict[str, Any]] = []

    async def server(ws: ServerConnection) -> None:
        await send(ws, {"type": "ready", "tenant": "fake"})
        async for message in ws:
            frame = json.loads(message)
            received.append(frame)
            rid, kind = frame["id"], frame["type"]
            if kind == "cancel":
                target = frame["target"]
                running = any(f["id"] == target and f["type"] in ("pipeline", "invoke") for f in received)
                await send(ws, {"type": "cancelled", "id": rid, "target": target, "found": running})
                if running:
                    await send(ws, {"type": "error", "id": target, "code": "cancelled", "message": "the request was cancelled"})
            elif kind == "ping":
                await send(ws, {"type": "pong", "id": rid})
            # pipelines and invokes run until cancelled

    def sent(kind: str) -> list[dict[str, Any]]:
        return [f for f in received if f["type"] == kind]

    async with fake(server) as url:
        async with Client.connect(url, "rk_fake_1") as client:
            # Cancelled on the server: the awaiting call raises Cancelled.
            pipeline = client.start_pipeline("slow", {"text": "x"})
            await until(lambda: len(sent("pipeline")) == 1)
            assert pipeline.id == sent("pipeline")[0]["id"] and not pipeline.done
            assert await asyncio.wait_for(pipeline.cancel(), 10) is True
            with pytest.raises(Cancelled, match="was cancelled") as raised:
                await asyncio.wait_for(pipeline, 10)
            assert raised.value.code == "cancelled" and raised.value.request_id == pipeline.id
            assert sent("cancel")[-1]["target"] == pipeline.id
            assert pipeline.done and await pipeline.cancel() is False

            # Cancelling the task that awaits invoke() cancels it on the server.
            task = asyncio.ensure_future(client.invoke({"op": "slow"}))
            await until(lambda: len(sent("invoke")) == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: len(sent("cancel")) == 2)
            assert sent("cancel")[-1]["target"] == sent("invoke")[0]["id"]

            # Cancelled before it was sent: it never is.
            early = client.start_invoke({"op": "never"})
            assert await early.cancel() is True
            with pytest.raises(Cancelled, match="before it was sent"):
                await early
            generation = client.generate("m", "p")
            assert await generation.cancel() is True
            done = await generation
            assert done.finish == "cancelled" and done.text == ""
            assert await asyncio.wait_for(client.ping(), 10) >= 0
            assert len(sent("invoke")) == 1 and not sent("generate")


async def test_requests_refused_while_draining_are_sent_again_after_reconnecting() -> None:
    """`shutting_down` means the request did not run: a reconnecting client
    sends it again on its next connection; without reconnection it raises."""
    connections: list[list[dict[str, Any]]] = []

    async def server(ws: ServerConnection) -> None:
        await send(ws, {"type": "ready", "tenant": "fake"})
        seen: list[dict[str, Any]] = []
        connections.append(seen)
        draining = len(connections) == 1
        async for message in ws:
            frame = json.loads(message)
            seen.append(frame)
            rid, kind = frame["id"], frame["type"]
            if kind == "ping":
                await send(ws, {"type": "pong", "id": rid})
            elif draining:
                await send(ws, {"type": "error", "id": rid, "code": "shutting_down", "message": "the server is shutting down"})
                if len(seen) == 2:
                    # Nothing left running here: the server closes the connection.
                    asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(ws.close()))
            elif kind == "generate":
                await send(ws, {"type": "token", "id": rid, "text": "a"})
                await send(ws, done_frame(rid))
            elif kind == "models":
                await send(ws, {"type": "models", "id": rid, "models": []})
            elif kind == "invoke":
                await send(ws, {"type": "result", "id": rid, "output": {"ok": True}})

    async with fake(server) as url:
        async with Client.connect(url, "rk_fake_1", reconnect=Backoff(initial=0.01, maximum=0.05)) as client:
            stream = client.generate("m", "p")
            models = asyncio.ensure_future(client.models())
            await until(lambda: len(connections[0]) == 2)
            await asyncio.sleep(0.05)
            # Refused and held; a ping is still answered on the draining connection,
            # while new requests wait for the next one.
            assert not models.done() and not stream.done
            invoked = asyncio.ensure_future(client.invoke({"op": "x"}))
            assert await asyncio.wait_for(client.ping(), 10) >= 0
            assert client.reconnects == 0
            assert await asyncio.wait_for(invoked, 10) == {"ok": True}
            assert await asyncio.wait_for(models, 10) == []
            pieces = [piece async for piece in stream]
            assert pieces == ["a"] and (await stream).finish == "stop"
            assert client.reconnects == 1
            kinds = [[f["type"] for f in seen] for seen in connections]
            assert sorted(kinds[0]) == ["generate", "models", "ping"], kinds
            assert sorted(kinds[1]) == ["generate", "invoke", "models"], kinds
            assert stream.id == next(f["id"] for f in connections[1] if f["type"] == "generate")

    connections.clear()
    async with fake(server) as url:
        async with Client.connect(url, "rk_fake_1", reconnect=None) as client:
            with pytest.raises(ShuttingDown) as refused:
                await asyncio.wait_for(client.models(), 10)
            assert refused.value.request_id is not None
            with pytest.raises(ShuttingDown):
                await asyncio.wait_for(client.complete("m", "p"), 10)
