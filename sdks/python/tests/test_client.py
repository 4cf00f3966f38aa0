"""The client against a real `realm-host serve`: streaming, chat, concurrency,
cancel (generations, pipelines, invokes), models, pipelines, components, every
error a client can cause, reconnecting after the server dies, and draining."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import signal
import uuid

import pytest

from conftest import Server, new_key_hash
from realm_client import (
    Backoff,
    BadRequest,
    Cancelled,
    Client,
    ClientClosed,
    Completion,
    ConnectionFailed,
    ConnectionLost,
    FrameTooLarge,
    GuestError,
    InvalidInput,
    ModelInfo,
    ModelNotFound,
    NotPermitted,
    PipelineError,
    QuotaExceeded,
    RateLimited,
    RealmError,
    Sampling,
    ShuttingDown,
    TooManyStreams,
    Unauthorized,
)

PARIS = "The capital of France is"
STORY = "Once upon a time"
#: Sampled (not greedy), so the story does not end early.
SAMPLED = Sampling(temperature=0.8, seed=1)


async def within(awaitable, seconds: float = 60.0):  # type: ignore[no-untyped-def]
    """Awaits with a deadline, so a hang fails the test instead of stalling it."""
    return await asyncio.wait_for(awaitable, seconds)


async def eventually(condition, seconds: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Waits until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.02)


async def collect(stream) -> tuple[list[str], Completion]:  # type: ignore[no-untyped-def]
    pieces = [piece async for piece in stream]
    return pieces, await stream.result()


async def test_greedy_generate_streams_pieces_that_make_the_result(server: Server) -> None:
    async with Client.connect(server.url, server.keys["acme"]) as client:
        assert client.tenant == "acme"
        assert client.connected
        stream = client.generate("small", PARIS, max_tokens=8, sampling=Sampling.greedy())
        pieces, done = await within(collect(stream))
        assert stream.id is not None and stream.done
        assert len(pieces) >= 2, pieces
        assert "".join(pieces) == done.text
        assert "Paris" in done.text, done
        assert done.usage.prompt_tokens == 5
        assert 1 <= done.usage.completion_tokens <= 8
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
        assert done.finish in ("stop", "length")
        assert stream.completion == done
        # Awaiting the generation itself gives the same result again.
        assert await stream == done


async def test_non_streaming_completion_matches_the_streamed_one(server: Server) -> None:
    async with Client.connect(server.url, server.keys["acme"]) as client:
        streamed = await within(
            collect(client.generate("small", PARIS, max_tokens=8, sampling=Sampling.greedy()))
        )
        # stream=False: no token frames, only the result.
        quiet = client.generate("small", PARIS, max_tokens=8, sampling={"temperature": 0}, stream=False)
        pieces, done = await within(collect(quiet))
        assert pieces == []
        assert done == streamed[1]
        assert await within(client.complete("small", PARIS, max_tokens=8, sampling=Sampling.greedy())) == done


async def test_stop_strings_end_the_generation(server: Server) -> None:
    async with Client.connect(server.url, server.keys["acme"]) as client:
        done = await within(
            client.complete("small", PARIS, max_tokens=16, sampling=Sampling.greedy(), stop=".")
        )
        assert done.finish == "stop", done
        assert "Paris" in done.text and "\n" not in done.text, done


async def test_response_format_holds_the_output_to_a_schema(server: Server) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "year": {"type": "integer"}},
        "required": ["city", "year"],
        "additionalProperties": False,
    }
    async with Client.connect(server.url, server.keys["acme"]) as client:
        done = await within(
            client.complete_chat(
                "small",
                [{"role": "user", "content": "When and where was the Eiffel tower built?"}],
                max_tokens=64,
                sampling=Sampling.greedy(),
                response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
            )
        )
        value = json.loads(done.text)
        assert set(value) == {"city", "year"} and isinstance(value["year"], int), done
        date = await within(
            client.complete(
                "small",
                "The Berlin wall fell on",
                max_tokens=16,
                response_format={"type": "regex", "pattern": "[0-9]{4}-[0-9]{2}-[0-9]{2}"},
            )
        )
        assert len(date.text) == 10 and date.text[4] == "-", date
        with pytest.raises(InvalidInput, match="invalid JSON schema"):
            await within(
                client.complete(
                    "small",
                    PARIS,
                    response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "nope"}}},
                )
            )


async def test_tools_give_valid_calls_and_a_round_trip(server: Server) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    question = {"role": "user", "content": "What is the weather in Paris?"}
    async with Client.connect(server.url, server.keys["acme"]) as client:
        generation = client.chat(
            "small",
            [question],
            max_tokens=48,
            sampling=Sampling.greedy(),
            tools=[weather],
            tool_choice="required",
            parallel_tool_calls=False,
        )
        pieces = [piece async for piece in generation]
        done = await within(generation.result())
        assert done.finish == "tool_calls" and done.text == "" and pieces == [], done
        (call,) = done.tool_calls
        assert call.name == "get_weather" and set(call.arguments) == {"city"}, call
        result = {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}
        answer = await within(
            client.complete_chat(
                "small",
                [question, {"role": "assistant", "tool_calls": [call.to_wire()]}, result],
                max_tokens=24,
                sampling=Sampling.greedy(),
                tools=[weather],
                tool_choice="none",
            )
        )
        assert answer.text and answer.tool_calls == (), answer
        with pytest.raises(InvalidInput, match="launch"):
            await within(
                client.complete_chat(
                    "small",
                    [question],
                    tools=[weather],
                    tool_choice={"type": "function", "function": {"name": "launch"}},
                )
            )


async def test_chat_streams_and_keeps_history(server: Server) -> None:
    async with Client.connect(server.url, server.keys["acme"]) as client:
        history = [
            {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
        ]
        stream = client.chat("small", history, max_tokens=16, sampling=Sampling.greedy())
        pieces, done = await within(collect(stream))
        assert "".join(pieces) == done.text
        assert "Paris" in done.text, done
        # The chat template wraps the message: more prompt tokens than words.
        assert done.usage.prompt_tokens > 12
        history += [
            {"role": "assistant", "content": done.text},
            {"role": "user", "content": "And of Italy?"},
        ]
        second = await within(
            client.complete_chat("small", history, max_tokens=16, sampling=Sampling.greedy())
        )
        assert second.usage.prompt_tokens > done.usage.prompt_tokens + done.usage.completion_tokens
        assert second.text.strip(), second


async def test_concurrent_requests_share_one_connection(server: Server) -> None:
    prompts = [PARIS, "The capital of Germany is", "One, two, three,"]
    async with Client.connect(server.url, server.keys["acme"]) as client:
        alone = [
            await within(client.complete("small", p, max_tokens=6, sampling=Sampling.greedy()))
            for p in prompts
        ]
        streams = [client.generate("small", p, max_tokens=6, sampling=Sampling.greedy()) for p in prompts]
        results = await within(
            asyncio.gather(*(collect(s) for s in streams), client.models(), client.ping())
        )
        ids = {s.id for s in streams}
        assert len(ids) == len(prompts) and None not in ids
        for (pieces, done), solo in zip(results[: len(prompts)], alone):
            assert "".join(pieces) == done.text
            # Batched or alone, greedy decoding gives the same text.
            assert done == solo
        assert results[len(prompts)][0].name == "small"
        assert results[len(prompts) + 1] >= 0


async def test_cancel_mid_stream_finishes_cancelled(server: Server) -> None:
    async with Client.connect(server.url, server.keys["acme"]) as client:
        stream = client.generate("small", STORY, max_tokens=16, sampling=SAMPLED)
        pieces = [await within(stream.__anext__())]
        assert await within(stream.cancel()) is True
        pieces += [piece async for piece in stream]  # what was already on the way
        done = await within(stream.result())
        assert done.finish == "cancelled", done
        assert done.usage.completion_tokens < 16
        assert "".join(pieces) == done.text
        # Cancelling a finished generation finds nothing.
        assert await stream.cancel() is False
        # The connection goes on.
        assert (await within(client.complete("small", PARIS, max_tokens=4, sampling=Sampling.greedy()))).text


async def test_leaving_a_generation_block_cancels_it(server: Server) -> None:
    async with Client.connect(server.url, server.keys["solo"]) as client:
        async with client.generate("small", STORY, max_tokens=16, sampling=SAMPLED) as stream:
            await within(stream.__anext__())
        done = await within(stream.result())
        assert done.finish == "cancelled", done
        # Its stream slot is free again (solo may run one at a time).
        assert (await within(client.complete("small", PARIS, max_tokens=2))).usage.completion_tokens >= 1


async def test_a_dropped_generation_is_cancelled_and_not_buffered(server: Server) -> None:
    # A one-piece buffer: were the dropped stream's pieces still kept, the
    # connection would stall; were it not cancelled, solo's one slot stays taken.
    async with Client.connect(server.url, server.keys["solo"], stream_buffer=1) as client:
        stream = client.generate("small", STORY, max_tokens=16, sampling=SAMPLED)
        await within(stream.__anext__())
        del stream
        gc.collect()
        for _ in range(100):
            try:
                done = await within(client.complete("small", PARIS, max_tokens=2))
                break
            except TooManyStreams:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the dropped generation kept its stream slot")
        assert done.usage.completion_tokens >= 1


async def test_models_and_ping(server: Server) -> None:
    async with Client.connect(server.url, server.keys["acme"]) as client:
        models = await within(client.models())
        assert len(models) == 1
        assert isinstance(models[0], ModelInfo)
        assert models[0].name == "small"
        assert models[0].architecture == "llama"
        assert models[0].context_length > 0
        assert 0 <= await within(client.ping()) < 10
    async with Client.connect(server.url, server.keys["bare"]) as client:
        assert await within(client.models()) == []


async def test_pipeline_returns_its_outputs(server: Server) -> None:
    namespace = f"sdk-{uuid.uuid4().hex[:8]}"
    text = "Realm runs pipelines. Realm runs   components!"
    async with Client.connect(server.url, server.keys["acme"]) as client:
        first = await within(client.pipeline("report", {"text": text, "namespace": namespace}))
        assert set(first) == {"stats", "chunks", "documents_seen", "top_words"}, first
        assert first["documents_seen"] == 1
        assert isinstance(first["chunks"], list) and first["chunks"]
        assert "realm" in str(first["top_words"]).lower(), first
        # The tally lives in the tenant's kv store: a second run counts two documents.
        second = await within(client.pipeline("report", {"text": text, "namespace": namespace}))
        assert second["documents_seen"] == 2
        with pytest.raises(InvalidInput) as missing:
            await within(client.pipeline("report", {}))
        assert "text" in missing.value.message
        with pytest.raises(NotPermitted) as denied:
            await within(client.pipeline("nope", {"text": "x"}))
        assert "report" in denied.value.message  # it lists what is available
        with pytest.raises(PipelineError) as broken:
            await within(client.pipeline("broken", {"text": "x"}))
        assert "junk" in broken.value.message


async def test_invoke_remembers_and_recalls(server: Server) -> None:
    key = f"k-{uuid.uuid4().hex[:8]}"
    async with Client.connect(server.url, server.keys["acme"]) as client:
        stored = await within(client.invoke({"op": "remember", "key": key, "text": "the SDK was here"}))
        assert stored == {"stored": key}
        recalled = await within(client.invoke({"op": "recall", "key": key}))
        assert recalled == {"key": key, "text": "the SDK was here"}
        assert await within(client.invoke({"op": "recall", "key": key + "-none"})) == {
            "key": key + "-none",
            "text": None,
        }
        with pytest.raises(GuestError) as failed:
            await within(client.invoke({"op": "dance"}))
        assert "unknown op" in failed.value.message
    async with Client.connect(server.url, server.keys["bare"]) as client:
        with pytest.raises(NotPermitted):
            await within(client.invoke({"op": "list"}))


async def test_unknown_model_is_model_not_found(server: Server) -> None:
    async with Client.connect(server.url, server.keys["acme"]) as client:
        stream = client.generate("no-such-model", PARIS, max_tokens=4)
        with pytest.raises(ModelNotFound) as raised:
            async for _ in stream:
                pass
        error = raised.value
        assert isinstance(error, RealmError)
        assert error.code == "model_not_found"
        assert error.request_id == stream.id
        assert "small" in error.message  # it names what the tenant may use
        with pytest.raises(ModelNotFound):
            await stream.result()
        # Another tenant's model looks the same as none.
    async with Client.connect(server.url, server.keys["bare"]) as client:
        with pytest.raises(ModelNotFound):
            await within(client.complete("small", PARIS, max_tokens=4))


async def test_a_wrong_key_is_unauthorized(server: Server) -> None:
    wrong = server.keys["acme"][:-4] + ("0000" if not server.keys["acme"].endswith("0000") else "1111")
    for key in (wrong, "rk_nobody_1234", "not-a-key"):
        with pytest.raises(Unauthorized) as raised:
            await within(Client.connect(server.url, key))
        assert raised.value.code == "unauthorized"
        assert "key" in raised.value.message


async def test_request_rate_is_limited_with_a_retry_hint(server: Server) -> None:
    async with Client.connect(server.url, server.keys["tight"]) as client:
        await within(client.models())  # the one request this minute
        with pytest.raises(RateLimited) as raised:
            await within(client.models())
        error = raised.value
        assert error.code == "rate_limited"
        assert error.retry_after_ms is not None and 1_000 <= error.retry_after_ms <= 60_000
        assert error.retry_after == error.retry_after_ms / 1000
        # Pings are free and the connection stays usable.
        await within(client.ping())


async def test_too_many_streams_and_quota(server: Server) -> None:
    async with Client.connect(server.url, server.keys["solo"]) as client:
        first = client.generate("small", STORY, max_tokens=16, sampling=SAMPLED)
        await within(first.__anext__())
        with pytest.raises(TooManyStreams):
            await within(client.complete("small", PARIS, max_tokens=4))
        await first.cancel()
        assert (await within(first.result())).finish == "cancelled"
    async with Client.connect(server.url, server.keys["frugal"]) as client:
        done = await within(client.complete("small", PARIS, max_tokens=4, sampling=Sampling.greedy()))
        assert done.usage.completion_tokens == 4
        with pytest.raises(QuotaExceeded) as raised:
            await within(client.complete("small", PARIS, max_tokens=4))
        assert raised.value.retry_after_ms is not None and raised.value.retry_after_ms > 0


async def test_invalid_values_are_invalid_input(server: Server) -> None:
    async with Client.connect(server.url, server.keys["acme"]) as client:
        cases = [
            dict(prompt=""),
            dict(prompt=PARIS, max_tokens=0),
            dict(prompt=PARIS, sampling=Sampling(temperature=-1)),
            dict(prompt=PARIS, sampling=Sampling(top_p=1.5)),
            dict(prompt=PARIS, stop=[""]),
        ]
        for case in cases:
            with pytest.raises(InvalidInput, match=r"\w"):
                await within(client.complete("small", **case))  # type: ignore[arg-type]
        # The client checks nothing the server checks: bad fields are the server's call.
        with pytest.raises(BadRequest) as unknown:
            await within(client.complete("small", PARIS, sampling={"temprature": 0}))
        assert "temprature" in unknown.value.message
        with pytest.raises(BadRequest):
            await within(client.complete("small", PARIS, max_tokens=-1))
        # Values JSON cannot carry never leave the client.
        with pytest.raises(ValueError):
            client.generate("small", PARIS, sampling={"temperature": float("nan")})
        with pytest.raises(TypeError):
            await client.pipeline("report", {"text": object()})
        assert await within(client.ping()) >= 0


async def test_a_frame_over_max_frame_fails_only_its_request(server: Server) -> None:
    async with Client.connect(server.url, server.keys["acme"]) as client:
        small = asyncio.ensure_future(client.invoke({"op": "list"}))
        # The server's max-frame is 64 KiB; up to 4x that it reads the id and answers.
        big = client.start_pipeline("report", {"text": "word " * 20_000})
        with pytest.raises(FrameTooLarge) as raised:
            await within(big)
        assert "65536" in raised.value.message
        assert raised.value.request_id == big.id is not None
        assert "keys" in await within(small)
        assert await within(client.ping()) >= 0


async def test_a_slow_reader_gets_backpressure_not_a_big_buffer(server: Server) -> None:
    # A keepalive much shorter than the stall: pongs stuck behind unread
    # frames must not count as a dead server.
    async with Client.connect(server.url, server.keys["acme"], stream_buffer=2, keepalive=0.2) as client:
        streams = [
            client.generate("small", STORY, max_tokens=16, sampling=Sampling(temperature=0.8, seed=seed))
            for seed in (1, 2, 3)
        ]
        first = await within(streams[0].__anext__())
        # Long enough for the server to finish all three (48 tokens, more than
        # the client buffers), were nothing holding it back.
        await asyncio.sleep(2.0)
        assert all(s.buffered <= 2 for s in streams)
        assert not streams[-1].done  # held back: its `done` frame is still on the wire
        assert client.connected
        results = await within(asyncio.gather(*(collect(s) for s in streams)))
        results[0][0].insert(0, first)
        for pieces, done in results:
            assert done.usage.completion_tokens == 16
            assert "".join(pieces) == done.text
        # result() discards unread pieces, so nothing holds the connection.
        other = client.generate("small", STORY, max_tokens=16, sampling=SAMPLED)
        assert (await within(other.result())).usage.completion_tokens == 16
        assert other.buffered == 0


async def test_close_fails_what_runs_and_refuses_new_requests(server: Server) -> None:
    client = await within(Client.connect(server.url, server.keys["acme"]))
    stream = client.generate("small", STORY, max_tokens=16, sampling=SAMPLED)
    await within(stream.__anext__())
    await within(client.close())
    assert client.closed and not client.connected
    with pytest.raises(ClientClosed):
        await within(stream.result())
    with pytest.raises(ClientClosed):
        await client.ping()
    await client.close()  # idempotent


async def test_unreachable_server_is_connection_failed() -> None:
    with pytest.raises(ConnectionFailed) as raised:
        await within(Client.connect("ws://127.0.0.1:9", "rk_acme_00", open_timeout=5))
    assert isinstance(raised.value, ConnectionLost)
    assert "127.0.0.1:9" in str(raised.value)


async def test_reconnects_after_the_server_dies(own_server: Server) -> None:
    server = own_server
    server.listen_on_same_port()
    key = server.keys["acme"]
    patient = await within(
        Client.connect(server.url, key, reconnect=Backoff(initial=0.05, maximum=0.5, max_attempts=200))
    )
    impatient = await within(
        Client.connect(server.url, key, reconnect=Backoff(initial=0.02, maximum=0.05, max_attempts=3))
    )
    try:
        stream = patient.generate("small", STORY, max_tokens=16, sampling=SAMPLED)
        await within(stream.__anext__())
        server.kill()
        # The request in flight fails...
        with pytest.raises(ConnectionLost) as lost:
            await within(stream.result())
        assert lost.value.request_id == stream.id
        assert not patient.connected
        # ...a new one waits for the reconnection...
        waiting = asyncio.ensure_future(patient.ping())
        await asyncio.sleep(0.5)
        assert not waiting.done()
        # ...while a client with 3 attempts gives up.
        with pytest.raises(ConnectionFailed) as gave_up:
            await within(impatient.ping(), 30)
        assert "after 3 attempts" in str(gave_up.value)
        with pytest.raises(ConnectionFailed):
            await impatient.models()

        await asyncio.to_thread(server.start)
        assert await within(waiting, 30) >= 0
        assert patient.connected and patient.reconnects == 1
        done = await within(patient.complete("small", PARIS, max_tokens=8, sampling=Sampling.greedy()))
        assert "Paris" in done.text

        # A key the restarted server refuses is not retried: requests fail fast.
        server.kill()
        await eventually(lambda: not patient.connected)
        text = server.config.read_text()
        start = text.index("[tenants.acme]")
        end = text.index("[tenants.", start + 1)
        other = new_key_hash("acme")
        section = re.sub(r"(?m)^api-keys = .*$", f'api-keys = ["{other}"]', text[start:end])
        server.config.write_text(text[:start] + section + text[end:])
        await asyncio.to_thread(server.start)
        with pytest.raises(Unauthorized):
            await within(patient.ping(), 30)
        with pytest.raises(Unauthorized):
            await patient.models()
        assert patient.reconnects == 1
    finally:
        await patient.close()
        await impatient.close()


async def test_without_reconnect_requests_fail_after_a_drop(own_server: Server) -> None:
    async with Client.connect(own_server.url, own_server.keys["acme"], reconnect=None) as client:
        assert "keys" in await within(client.invoke({"op": "list"}))
        own_server.kill()
        await eventually(lambda: not client.connected)
        with pytest.raises(ConnectionLost) as raised:
            await within(client.ping())
        assert "reconnect" in str(raised.value)


async def test_a_revoked_key_fails_the_connection_for_good(own_server: Server) -> None:
    server = own_server
    async with Client.connect(server.url, server.keys["acme"]) as client:
        assert await within(client.ping()) >= 0
        text = server.config.read_text()
        start = text.index("[tenants.acme]")
        end = text.index("[tenants.", start + 1)
        server.config.write_text(text[:start] + text[end:])
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        await eventually(lambda: "configuration reloaded" in server.log())
        # The server says the key was revoked and closes the connection:
        # every request fails with Unauthorized, and no reconnect can help.
        with pytest.raises(Unauthorized) as raised:
            await within(client.models())
        assert "revoked" in raised.value.message
        with pytest.raises(Unauthorized):
            await within(client.ping())
        assert client.reconnects == 0


async def test_cancelling_a_pipeline_raises_cancelled(server: Server) -> None:
    series = 'realm_errors_total{code="cancelled",tenant="acme"}'
    before = await asyncio.to_thread(server.metric, "acme", series)
    async with Client.connect(server.url, server.keys["acme"]) as client:
        spin = client.start_pipeline("spin")
        await asyncio.sleep(0.3)  # running: its guest spins until a 60 s timeout
        assert not spin.done
        assert await within(spin.cancel()) is True
        with pytest.raises(Cancelled) as raised:
            await within(spin, 10)
        assert raised.value.code == "cancelled"
        assert raised.value.request_id == spin.id
        assert "before it was sent" not in raised.value.message  # the server's answer
        # Cancelling the task that awaits pipeline() stops the pipeline on the server too.
        task = asyncio.ensure_future(client.pipeline("spin"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: server.metric("acme", series) >= before + 2, 10)
        assert "keys" in await within(client.invoke({"op": "list"}))


async def test_cancelling_an_invoke_raises_cancelled(server: Server) -> None:
    async with Client.connect(server.url, server.keys["acme"]) as client:
        # The component generates an answer: slow enough to cancel.
        call = client.start_invoke({"op": "ask", "question": "Tell me a story.", "max_tokens": 16})
        await eventually(lambda: call.id is not None)
        assert await within(call.cancel()) is True
        with pytest.raises(Cancelled) as raised:
            await within(call, 10)
        assert raised.value.request_id == call.id
        # The connection goes on; the model is free for the next request.
        done = await within(client.complete("small", PARIS, max_tokens=4, sampling=Sampling.greedy()))
        assert done.usage.completion_tokens >= 1


async def test_a_draining_server_finishes_what_runs_and_the_client_resends_the_rest(own_server: Server) -> None:
    """SIGTERM: running requests finish, new ones are refused with
    `shutting_down` (a reconnecting client sends them again to the restarted
    server), and each connection closes once nothing runs on it."""
    server = own_server
    server.listen_on_same_port()
    key = server.keys["acme"]
    patient = await within(
        Client.connect(server.url, key, reconnect=Backoff(initial=0.05, maximum=0.3, max_attempts=None))
    )
    plain = await within(Client.connect(server.url, key, reconnect=None))
    try:
        streams = [
            c.generate("small", STORY, max_tokens=16, sampling=SAMPLED) for c in (patient, plain)
        ]
        for stream in streams:
            await within(stream.__anext__())
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        await eventually(lambda: "shutting down" in server.log())
        await asyncio.sleep(0.05)
        # Without reconnection, a new request is refused with its id...
        with pytest.raises(ShuttingDown) as refused:
            await within(plain.models())
        assert refused.value.request_id is not None
        # ...while pings are still answered on the draining connection.
        assert await within(plain.ping()) >= 0
        # A reconnecting client holds the refused request for its next connection.
        waiting = asyncio.ensure_future(patient.models())
        # What was running finishes.
        for stream in streams:
            done = await within(stream.result())
            assert done.finish in ("stop", "length") and done.usage.completion_tokens >= 1, done
        await eventually(lambda: not plain.connected)
        with pytest.raises(ConnectionLost):
            await plain.ping()
        await within(asyncio.to_thread(server.process.wait, 30))
        assert not waiting.done()
        await asyncio.to_thread(server.start)
        assert [m.name for m in await within(waiting, 30)] == ["small"]
        assert patient.reconnects == 1
    finally:
        await patient.close()
        await plain.close()
