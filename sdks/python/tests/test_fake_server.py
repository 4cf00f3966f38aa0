"""How the client copes with servers that misbehave: frames it cannot use,
a missing `ready`, HTTP errors at the upgrade, pongs that never come.
(A real server never does these; a stand-in plays them.)"""

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
    Client,
    ConnectionFailed,
    ConnectionLost,
    ProtocolError,
    RateLimited,
    RealmError,
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
    for cls in (ProtocolError, ConnectionLost, ConnectionFailed, Unauthorized):
        assert issubclass(cls, RealmError)
