"""Parts of the client that need no server: errors, backoff, URLs, frames."""

from __future__ import annotations

import pickle
import random

import pytest

import realm_client
from realm_client import (
    Backoff,
    Client,
    ConnectionFailed,
    ConnectionLost,
    RateLimited,
    RealmError,
    Sampling,
    Unauthorized,
    error_from_frame,
)
from realm_client.client import _ws_url

#: Every code the server's ErrorCode enum has (host/src/server/protocol.rs).
SERVER_CODES = {
    "bad_request": "BadRequest",
    "unknown_type": "UnknownType",
    "frame_too_large": "FrameTooLarge",
    "unauthorized": "Unauthorized",
    "model_not_found": "ModelNotFound",
    "not_permitted": "NotPermitted",
    "rate_limited": "RateLimited",
    "quota_exceeded": "QuotaExceeded",
    "too_many_streams": "TooManyStreams",
    "invalid_input": "InvalidInput",
    "duplicate_id": "DuplicateId",
    "guest_error": "GuestError",
    "pipeline_error": "PipelineError",
    "cancelled": "Cancelled",
    "shutting_down": "ShuttingDown",
    "overloaded": "Overloaded",
    "internal": "InternalError",
}


@pytest.mark.parametrize(("code", "name"), SERVER_CODES.items())
def test_every_server_code_has_its_class(code: str, name: str) -> None:
    error = error_from_frame({"type": "error", "id": "7", "code": code, "message": "m"})
    assert type(error) is getattr(realm_client, name)
    assert isinstance(error, RealmError)
    assert (error.code, error.message, error.request_id, error.retry_after_ms) == (code, "m", "7", None)


def test_unknown_codes_and_odd_frames_become_the_base_class() -> None:
    error = error_from_frame({"type": "error", "code": "brand_new", "message": "later"})
    assert type(error) is RealmError
    assert error.code == "brand_new" and error.request_id is None
    odd = error_from_frame({"type": "error", "retry_after_ms": True})
    assert type(odd) is RealmError and odd.code == "unknown" and odd.retry_after_ms is None


def test_errors_format_pickle_and_copy() -> None:
    error = error_from_frame(
        {"type": "error", "id": "9", "code": "rate_limited", "message": "slow down", "retry_after_ms": 1200}
    )
    assert isinstance(error, RateLimited)
    assert str(error) == "rate_limited: slow down (retry after 1200 ms)"
    assert error.retry_after == 1.2
    for clone in (pickle.loads(pickle.dumps(error)), error._copy()):
        assert type(clone) is RateLimited and clone is not error
        assert (clone.code, clone.message, clone.retry_after_ms, clone.request_id) == (
            "rate_limited",
            "slow down",
            1200,
            "9",
        )
    failed = ConnectionFailed("nope")
    assert isinstance(failed, ConnectionLost) and failed.code == "connection_failed"
    assert type(pickle.loads(pickle.dumps(failed))) is ConnectionFailed
    assert Unauthorized("bad key").code == "unauthorized"
    assert RealmError("x_y", "z").code == "x_y"


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    plain = Backoff(initial=0.5, maximum=4, multiplier=2, jitter=0)
    assert [plain.delay(n) for n in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert plain.delay(10_000) == 4  # no overflow
    jittery = Backoff(initial=1, maximum=8, jitter=0.5)
    rng = random.Random(7)
    delays = [jittery.delay(3, rng) for _ in range(200)]
    assert all(4 <= d <= 8 for d in delays)
    assert max(delays) - min(delays) > 2  # actually spread out
    for bad in (
        dict(initial=-1),
        dict(initial=2, maximum=1),
        dict(multiplier=0.5),
        dict(jitter=1.5),
        dict(max_attempts=0),
    ):
        with pytest.raises(ValueError):
            Backoff(**bad)  # type: ignore[arg-type]
    assert Backoff(max_attempts=None).max_attempts is None


def test_urls_are_normalized() -> None:
    assert _ws_url("ws://127.0.0.1:8080") == "ws://127.0.0.1:8080/v1/ws"
    assert _ws_url("http://h:1/") == "ws://h:1/v1/ws"
    assert _ws_url("https://h/v1/ws") == "wss://h/v1/ws"
    assert _ws_url("wss://h/custom?x=1") == "wss://h/custom?x=1"
    for bad in ("127.0.0.1:8080", "ftp://h", "ws://"):
        with pytest.raises(ValueError):
            _ws_url(bad)


def test_client_options_are_checked() -> None:
    with pytest.raises(ValueError):
        Client("ws://h", "")
    with pytest.raises(ValueError):
        Client("ws://h", "rk_a_b", stream_buffer=0)
    with pytest.raises(ValueError):
        Client("ws://h", "rk_a_b", keepalive=0)


def test_sampling_sends_only_what_is_set() -> None:
    assert Sampling().to_wire() == {}
    assert Sampling.greedy().to_wire() == {"temperature": 0.0}
    assert Sampling(top_k=40, seed=3).to_wire() == {"top_k": 40, "seed": 3}


async def test_generation_frames_carry_the_options() -> None:
    client = Client("ws://127.0.0.1:9", "rk_a_b")
    frame = client._generation_frame(
        "generate", "m", 8, Sampling(temperature=0), "\n", False, {"type": "json_object"}
    )
    assert frame == {
        "type": "generate",
        "model": "m",
        "response_format": {"type": "json_object"},
        "max_tokens": 8,
        "sampling": {"temperature": 0},
        "stop": ["\n"],
        "stream": False,
    }
    assert client._generation_frame("chat", "m", None, None, None, True, None) == {
        "type": "chat",
        "model": "m",
    }
    # Not connected: requests say so instead of hanging.
    with pytest.raises(ConnectionLost, match="not connected"):
        await client.ping()
    stream = client.generate("m", "p")
    with pytest.raises(ConnectionLost):
        await stream
    assert await stream.cancel() is False
