// The client against a scripted in-process WebSocket server: exact wire
// frames, flow control, errors with and without ids, cancelling pipelines and
// invokes, `shutting_down` while draining, upgrade refusals, heartbeats.
// (The real server is exercised in server.test.ts and reconnect.test.ts.)

import assert from "node:assert/strict";
import type { IncomingMessage } from "node:http";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { after, describe, it } from "node:test";

import { WebSocketServer, type WebSocket } from "ws";

import {
  Cancelled,
  Client,
  ConnectionFailed,
  ConnectionLost,
  FrameTooLarge,
  InvalidInput,
  ProtocolError,
  RealmError,
  ShuttingDown,
  Unauthorized,
} from "realm-client";

type Frame = Record<string, unknown> & { id: string; type: string };

/** A fake Realm server: authenticates, answers `ready`, hands frames to `onFrame`. */
async function fakeServer(
  onFrame: (frame: Frame, socket: WebSocket) => void,
  options: { key?: string; autoPong?: boolean } = {},
) {
  const key = options.key ?? "rk_test_key";
  const frames: Frame[] = [];
  const headers: IncomingMessage["headers"][] = [];
  const wss = new WebSocketServer({ noServer: true, autoPong: options.autoPong ?? true });
  const http = createServer();
  http.on("upgrade", (request, socket, head) => {
    headers.push(request.headers);
    if (request.headers.authorization !== `Bearer ${key}`) {
      const body = JSON.stringify({ error: { message: "missing or invalid API key", type: "unauthorized", code: "unauthorized" } });
      socket.end(`HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`);
      return;
    }
    wss.handleUpgrade(request, socket, head, (ws) => {
      ws.send(JSON.stringify({ type: "ready", tenant: "test" }));
      ws.on("message", (data) => {
        const frame = JSON.parse(data.toString()) as Frame;
        frames.push(frame);
        onFrame(frame, ws);
      });
    });
  });
  await new Promise<void>((r) => http.listen(0, "127.0.0.1", r));
  const port = (http.address() as AddressInfo).port;
  return {
    url: `ws://127.0.0.1:${port}`,
    frames,
    headers,
    sockets: wss.clients,
    close: async () => {
      for (const ws of wss.clients) ws.terminate();
      wss.close();
      await new Promise<void>((r) => http.close(() => r()));
    },
  };
}

const send = (ws: WebSocket, frame: object): void => ws.send(JSON.stringify(frame));

/** Resolves once `test()` holds (polling; fails after `ms`). */
async function until(test: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!test()) {
    if (Date.now() > deadline) assert.fail(`timed out after ${ms} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const done = (id: string) => ({ type: "done", id, text: "a", usage: { prompt_tokens: 1, completion_tokens: 1 }, finish: "stop" });

const servers: { close(): Promise<void> }[] = [];
after(async () => {
  for (const server of servers) await server.close();
});

describe("against a scripted server", () => {
  it("sends the key at upgrade and snake_case options on the wire", async () => {
    const server = await fakeServer((frame, ws) => {
      if (frame.type === "generate" || frame.type === "chat") {
        send(ws, { type: "token", id: frame.id, text: "a" });
        send(ws, { type: "done", id: frame.id, text: "a", usage: { prompt_tokens: 3, completion_tokens: 1 }, finish: "stop" });
      }
    });
    servers.push(server);
    const client = await Client.connect(server.url, "rk_test_key", { headers: { "x-trace": "t1" } });
    assert.equal(client.tenant, "test");
    assert.equal(client.state, "open");
    assert.equal(server.headers[0]?.authorization, "Bearer rk_test_key");
    assert.equal(server.headers[0]?.["x-trace"], "t1");

    const gen = client.generate("small", "hi", {
      maxTokens: 5,
      stop: ["\n"],
      sampling: { temperature: 0.5, topK: 40, topP: 0.9, minP: 0.05, repeatPenalty: 1.1, seed: 7 },
    });
    assert.deepEqual(await gen.result(), { text: "a", usage: { promptTokens: 3, completionTokens: 1 }, finish: "stop", toolCalls: [] });
    await client.chat("small", [{ role: "user", content: "hello" }]).result();
    assert.deepEqual(server.frames[0], {
      id: gen.id,
      type: "generate",
      model: "small",
      prompt: "hi",
      max_tokens: 5,
      stop: ["\n"],
      sampling: { temperature: 0.5, top_k: 40, top_p: 0.9, min_p: 0.05, repeat_penalty: 1.1, seed: 7 },
    });
    assert.deepEqual(server.frames[1], {
      id: server.frames[1]?.id,
      type: "chat",
      model: "small",
      messages: [{ role: "user", content: "hello" }],
    });
    assert.notEqual(server.frames[0]?.id, server.frames[1]?.id);
    await client.close();
    assert.equal(client.state, "closed");
  });

  it("checks numbers JSON cannot carry before sending", async () => {
    const server = await fakeServer(() => {});
    servers.push(server);
    const client = await Client.connect(server.url, "rk_test_key");
    await assert.rejects(client.generate("small", "hi", { sampling: { temperature: NaN } }).result(), InvalidInput);
    await assert.rejects(client.generate("small", "hi", { sampling: { seed: -1 } }).result(), /seed/);
    assert.equal(server.frames.length, 0);
    await client.close();
  });

  it("bounds the pieces a slow consumer holds by pausing the socket", async () => {
    const total = 20_000;
    const server = await fakeServer((frame, ws) => {
      if (frame.type === "generate") {
        let text = "";
        for (let i = 0; i < total; i++) {
          send(ws, { type: "token", id: frame.id, text: `${i} ` });
          text += `${i} `;
        }
        send(ws, { type: "done", id: frame.id, text, usage: { prompt_tokens: 1, completion_tokens: total }, finish: "length" });
      } else if (frame.type === "ping") {
        send(ws, { type: "pong", id: frame.id });
      }
    });
    servers.push(server);
    const client = await Client.connect(server.url, "rk_test_key", { highWaterMark: 32 });
    const gen = client.generate("small", "count");
    let count = 0;
    let maxBuffered = 0;
    let expected = 0;
    for await (const piece of gen) {
      assert.equal(piece, `${expected} `, "pieces arrive in order, none lost");
      expected += 1;
      count += 1;
      maxBuffered = Math.max(maxBuffered, gen.buffered);
      if (count % 500 === 0) {
        await new Promise((r) => setTimeout(r, 5));
      }
    }
    assert.equal(count, total);
    // 32 pieces, plus what had already arrived in the socket's read buffer
    // when it paused (one read: at most 64 KiB, ~2500 of these frames).
    assert.ok(maxBuffered < 3000, `held ${maxBuffered} pieces`);
    assert.equal((await gen.result()).usage.completionTokens, total);
    assert.ok((await client.ping()) >= 0, "the connection reads again");
    await client.close();
  });

  it("drops the pieces of a generation whose result alone is awaited instead of stalling", async () => {
    const total = 5_000;
    const server = await fakeServer((frame, ws) => {
      if (frame.type === "generate") {
        for (let i = 0; i < total; i++) send(ws, { type: "token", id: frame.id, text: "x" });
        send(ws, { type: "done", id: frame.id, text: "x".repeat(total), usage: { prompt_tokens: 1, completion_tokens: total }, finish: "length" });
      }
    });
    servers.push(server);
    const client = await Client.connect(server.url, "rk_test_key", { highWaterMark: 16 });
    const gen = client.generate("small", "x");
    const completion = await gen.result();
    assert.equal(completion.text.length, total);
    assert.equal(gen.buffered, 0);
    // Iterating now would have a gap: it says so instead of yielding a partial text.
    await assert.rejects(async () => {
      for await (const _ of gen) {
        // unreachable
      }
    }, /dropped/);
    await client.close();
  });

  it("fails requests in flight with ConnectionLost when the socket drops, and reconnects", async () => {
    let drop = true;
    const server = await fakeServer((frame, ws) => {
      if (frame.type === "generate" && drop) {
        send(ws, { type: "token", id: frame.id, text: "partial" });
        setTimeout(() => ws.terminate(), 20);
      } else if (frame.type === "ping") {
        send(ws, { type: "pong", id: frame.id });
      }
    });
    servers.push(server);
    const states: string[] = [];
    const client = await Client.connect(server.url, "rk_test_key", {
      reconnect: { baseMs: 10, capMs: 50, maxAttempts: 5 },
      onStateChange: (change) => states.push(change.state),
    });
    const gen = client.generate("small", "x");
    const pieces: string[] = [];
    await assert.rejects(async () => {
      for await (const piece of gen) pieces.push(piece);
    }, ConnectionLost);
    assert.deepEqual(pieces, ["partial"], "pieces received before the drop are still delivered");
    await assert.rejects(gen.result(), (e: unknown) => e instanceof ConnectionLost && e.requestId === gen.id);
    drop = false;
    assert.ok((await client.ping()) >= 0);
    assert.deepEqual(states, ["open", "reconnecting", "open"]);
    await client.close();
  });

  it("reports an error frame without an id through onError and keeps going", async () => {
    const server = await fakeServer((frame, ws) => {
      if (frame.type === "ping") {
        send(ws, { type: "error", code: "bad_request", message: "the frame is not JSON" });
        send(ws, { type: "error", code: "frame_too_large", message: "the frame has 99 bytes" });
        send(ws, { type: "token", id: "nobody", text: "?" });
        send(ws, { type: "pong", id: frame.id });
      }
    });
    servers.push(server);
    const reported: RealmError[] = [];
    const client = await Client.connect(server.url, "rk_test_key", { onError: (e) => reported.push(e) });
    await client.ping();
    assert.equal(reported.length, 3);
    assert.equal(reported[0]?.code, "bad_request");
    assert.ok(reported[1] instanceof FrameTooLarge, "reported, not matched to a request");
    assert.ok(reported[2] instanceof ProtocolError);
    await client.close();
  });

  it("fails only its request for an error with an id (removed tenant, oversized frame)", async () => {
    const server = await fakeServer((frame, ws) => {
      if (frame.type === "invoke") {
        send(ws, { type: "error", id: frame.id, code: "unauthorized", message: "this tenant no longer exists" });
      } else if (frame.type === "pipeline") {
        send(ws, { type: "error", id: frame.id, code: "frame_too_large", message: "the frame has 9 bytes; the limit is 8" });
      } else if (frame.type === "ping") {
        send(ws, { type: "pong", id: frame.id });
      }
    });
    servers.push(server);
    const reported: RealmError[] = [];
    const client = await Client.connect(server.url, "rk_test_key", { reconnect: { baseMs: 10 }, onError: (e) => reported.push(e) });
    await assert.rejects(client.invoke({ op: "list" }), (e: unknown) => {
      assert.ok(e instanceof Unauthorized && /no longer exists/.test(e.message), String(e));
      assert.equal(e.requestId, server.frames[0]?.id);
      return true;
    });
    await assert.rejects(client.pipeline("p", { text: "x" }), (e: unknown) => e instanceof FrameTooLarge && e.requestId === server.frames[1]?.id);
    // The server answers each request; the connection goes on.
    assert.ok((await client.ping()) >= 0);
    assert.equal(client.state, "open");
    assert.deepEqual(reported, []);
    await client.close();
  });

  it("cancels a pipeline or invoke through its signal: the call rejects with Cancelled", async () => {
    const server = await fakeServer((frame, ws) => {
      if (frame.type === "cancel") {
        const target = frame.target as string;
        const running = server.frames.some((f) => f.id === target && (f.type === "pipeline" || f.type === "invoke"));
        send(ws, { type: "cancelled", id: frame.id, target, found: running });
        if (running) send(ws, { type: "error", id: target, code: "cancelled", message: "the request was cancelled" });
      } else if (frame.type === "ping") {
        send(ws, { type: "pong", id: frame.id });
      }
      // pipelines and invokes run until cancelled
    });
    servers.push(server);
    const sent = (type: string) => server.frames.filter((f) => f.type === type);
    const client = await Client.connect(server.url, "rk_test_key");

    const controller = new AbortController();
    const pipeline = client.pipeline("slow", { text: "x" }, { signal: controller.signal });
    await until(() => sent("pipeline").length === 1);
    controller.abort();
    await assert.rejects(pipeline, (e: unknown) => {
      assert.ok(e instanceof Cancelled, String(e));
      assert.equal(e.code, "cancelled");
      assert.equal(e.requestId, sent("pipeline")[0]?.id);
      assert.match(e.message, /was cancelled/);
      return true;
    });
    assert.equal(sent("cancel")[0]?.target, sent("pipeline")[0]?.id);

    const second = new AbortController();
    const invoke = client.invoke({ op: "slow" }, { signal: second.signal });
    await until(() => sent("invoke").length === 1);
    second.abort();
    await assert.rejects(invoke, Cancelled);
    assert.equal(sent("cancel")[1]?.target, sent("invoke")[0]?.id);

    // Aborted before it is sent: it never is.
    await assert.rejects(client.invoke({ op: "never" }, { signal: AbortSignal.abort() }), (e: unknown) => e instanceof Cancelled && /before it was sent/.test(e.message));
    assert.ok((await client.ping()) >= 0);
    assert.equal(sent("invoke").length, 1);
    await client.close();
  });

  it("sends requests refused while the server drains again on the next connection", async () => {
    const connections: WebSocket[] = [];
    const seen: Frame[][] = [];
    const server = await fakeServer((frame, ws) => {
      if (!connections.includes(ws)) {
        connections.push(ws);
        seen.push([]);
      }
      const index = connections.indexOf(ws);
      seen[index]?.push(frame);
      if (frame.type === "ping") {
        send(ws, { type: "pong", id: frame.id });
      } else if (index === 0) {
        send(ws, { type: "error", id: frame.id, code: "shutting_down", message: "the server is shutting down" });
        // Nothing left running: the server closes the connection.
        if (seen[0]?.length === 2) setTimeout(() => ws.close(1000), 300);
      } else if (frame.type === "generate") {
        send(ws, { type: "token", id: frame.id, text: "a" });
        send(ws, done(frame.id));
      } else if (frame.type === "models") {
        send(ws, { type: "models", id: frame.id, models: [] });
      } else if (frame.type === "invoke") {
        send(ws, { type: "result", id: frame.id, output: { ok: true } });
      }
    });
    servers.push(server);
    const states: string[] = [];
    const client = await Client.connect(server.url, "rk_test_key", {
      reconnect: { baseMs: 10, capMs: 50 },
      onStateChange: (change) => states.push(change.state),
    });
    const gen = client.generate("small", "hi");
    const models = client.models();
    await until(() => (seen[0]?.length ?? 0) === 2);
    // A new request waits for the next connection; a ping still goes on this one.
    const invoked = client.invoke({ op: "x" });
    assert.ok((await client.ping()) >= 0);
    assert.deepEqual(await invoked, { ok: true });
    assert.deepEqual(await models, []);
    const pieces: string[] = [];
    for await (const piece of gen) pieces.push(piece);
    assert.deepEqual(pieces, ["a"]);
    assert.equal((await gen.result()).finish, "stop");
    assert.deepEqual(seen.map((frames) => frames.map((f) => f.type).sort()), [
      ["generate", "models", "ping"],
      ["generate", "invoke", "models"],
    ]);
    assert.equal(gen.id, seen[1]?.find((f) => f.type === "generate")?.id);
    assert.deepEqual(states, ["open", "reconnecting", "open"]);
    await client.close();

    // Without reconnection the refusal reaches the caller.
    connections.length = 0;
    seen.length = 0;
    const plain = await Client.connect(server.url, "rk_test_key", { reconnect: false });
    await assert.rejects(plain.models(), (e: unknown) => e instanceof ShuttingDown && e.requestId !== undefined);
    await assert.rejects(plain.generate("small", "hi").result(), ShuttingDown);
    await plain.close();
  });

  it("treats an unauthorized error without an id (an older server's removed tenant) as final", async () => {
    const server = await fakeServer((frame, ws) => {
      if (frame.type === "invoke") send(ws, { type: "error", code: "unauthorized", message: "this tenant no longer exists" });
    });
    servers.push(server);
    const client = await Client.connect(server.url, "rk_test_key", { reconnect: { baseMs: 10 } });
    await assert.rejects(client.invoke({ op: "list" }), (e: unknown) => e instanceof Unauthorized && /no longer exists/.test(e.message));
    assert.equal(client.state, "failed");
    await assert.rejects(client.ping(), Unauthorized, "not retried");
    await client.close();
  });

  it("fails a request whose reply is malformed with ProtocolError", async () => {
    const server = await fakeServer((frame, ws) => {
      if (frame.type === "models") send(ws, { type: "models", id: frame.id, models: [{ name: 1 }] });
    });
    servers.push(server);
    const client = await Client.connect(server.url, "rk_test_key", { onError: () => {} });
    await assert.rejects(client.models(), ProtocolError);
    await client.close();
  });

  it("refuses frames over maxFrameBytes without sending them", async () => {
    const server = await fakeServer(() => {});
    servers.push(server);
    const client = await Client.connect(server.url, "rk_test_key", { maxFrameBytes: 1000 });
    await assert.rejects(client.invoke({ text: "x".repeat(2000) }), FrameTooLarge);
    assert.equal(server.frames.length, 0);
    await client.close();
  });

  it("turns HTTP 401 at upgrade into Unauthorized and other refusals into ConnectionFailed", async () => {
    const server = await fakeServer(() => {});
    servers.push(server);
    await assert.rejects(Client.connect(server.url, "rk_test_wrong"), (e: unknown) => {
      assert.ok(e instanceof Unauthorized);
      assert.match(e.message, /missing or invalid API key/);
      return true;
    });
    await assert.rejects(Client.connect(server.url.replace(/:\d+$/, ":1"), "rk_test_key"), ConnectionFailed);
  });

  it("drops a connection whose pings go unanswered", async () => {
    const server = await fakeServer(() => {}, { autoPong: false });
    servers.push(server);
    const client = await Client.connect(server.url, "rk_test_key", { heartbeatMs: 50, reconnect: false });
    const hanging = client.invoke({ op: "never answered" });
    await assert.rejects(hanging, (e: unknown) => e instanceof ConnectionLost && /ping/.test(e.message));
    assert.equal(client.state, "failed");
    await assert.rejects(client.ping(), ConnectionLost, "with reconnection off, later requests fail at once");
    await client.close();
  });
});
