// Round trips against a real `realm-host serve` (see fixture.ts).

import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import {
  Cancelled,
  Client,
  type Completion,
  FrameTooLarge,
  GuestError,
  InvalidInput,
  ModelNotFound,
  NotPermitted,
  QuotaExceeded,
  RateLimited,
  RealmError,
  TooManyStreams,
  type Tool,
  toolCallsMessage,
  Unauthorized,
} from "realm-client";

import { REPO, RealmServer, drain, guest } from "./fixture.js";

const FRANCE = "The capital of France is";
const GREEDY = { temperature: 0 };

let server: RealmServer;
let client: Client;
let pipelines: string;

/** A pipeline whose one step spins until its 60 s timeout: one to cancel. */
async function spinPipeline(dir: string): Promise<string> {
  const path = join(dir, "spin.toml");
  await writeFile(
    path,
    [
      'name = "spin"',
      "[components.abuse]",
      `wasm = ${JSON.stringify(guest("abuse"))}`,
      'limits = { fuel = 1_000_000_000_000, timeout = "60s" }',
      "[[steps]]",
      'id = "spin"',
      'component = "abuse"',
      'input = { mode = "spin" }',
      "",
    ].join("\n"),
  );
  return path;
}

before(async () => {
  pipelines = await mkdtemp(join(tmpdir(), "realm-sdk-ts-pipelines-"));
  const spin = await spinPipeline(pipelines);
  server = await RealmServer.start({
    tenants: {
      acme: [
        'models = ["small"]',
        `pipelines = { report = ${JSON.stringify(`${REPO}/pipelines/text-report.toml`)}, spin = ${JSON.stringify(spin)} }`,
        `component = ${JSON.stringify(guest("notes"))}`,
      ].join("\n"),
      // One request a minute: the second is rate limited.
      slow: 'models = ["small"]\nrate = { requests-per-minute = 1 }',
      // One generation at a time.
      solo: 'models = ["small"]\nrate = { concurrent-streams = 1 }',
      // Eight tokens a day (prompt and generated tokens count).
      frugal: 'models = ["small"]\nrate = { tokens-per-day = 8 }',
      // No models, pipelines or component.
      bare: "weight = 1",
      // Removed by a reload, then brought back.
      gone: "weight = 1",
    },
  });
  client = await Client.connect(server.url, key("acme"));
});

after(async () => {
  await client?.close();
  await server?.stop();
  if (pipelines !== undefined) await rm(pipelines, { recursive: true, force: true });
});

function key(tenant: string): string {
  const value = server.keys[tenant];
  assert.ok(value !== undefined, `no key for ${tenant}`);
  return value;
}

/** Asserts that `promise` rejects with an instance of `Class` and returns the error. */
async function rejection<E extends RealmError>(promise: Promise<unknown>, Class: new (...args: never[]) => E): Promise<E> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof Class, `expected ${Class.name}, got ${String(error)}`);
    return error;
  }
  assert.fail(`expected ${Class.name}, but the request succeeded`);
}

describe("realm-host serve", () => {
  let france: Completion;

  it("streams a greedy generation whose pieces add up to the done text", async () => {
    const gen = client.generate("small", FRANCE, { maxTokens: 8, sampling: GREEDY });
    const { pieces, completion } = await drain(gen);
    france = completion;
    assert.ok(pieces.length >= 1, "at least one token frame");
    assert.equal(pieces.join(""), completion.text);
    assert.match(completion.text, /Paris/);
    assert.equal(completion.usage.promptTokens, 5);
    assert.ok(completion.usage.completionTokens >= 1 && completion.usage.completionTokens <= 8);
    assert.ok(completion.finish === "stop" || completion.finish === "length");
    assert.match(gen.id ?? "", /.+/);
  });

  it("chats, keeping the conversation", async () => {
    const messages = [{ role: "user", content: "What is the capital of France? Answer in one sentence." }];
    const first = client.chat("small", messages, { maxTokens: 16, sampling: GREEDY });
    const { pieces, completion } = await drain(first);
    assert.equal(pieces.join(""), completion.text);
    assert.match(completion.text, /Paris/);
    assert.ok(completion.usage.promptTokens > 10, "the chat template adds tokens");

    const followUp = await client
      .chat(
        "small",
        [...messages, { role: "assistant", content: completion.text }, { role: "user", content: "And of Italy?" }],
        { maxTokens: 12, sampling: GREEDY },
      )
      .result();
    assert.ok(followUp.text.length > 0);
    assert.ok(followUp.usage.promptTokens > completion.usage.promptTokens, "the history is part of the prompt");
  });

  it("holds the output to a response format", async () => {
    const schema = {
      type: "object",
      properties: { city: { type: "string", maxLength: 20 }, year: { type: "integer" } },
      required: ["city", "year"],
      additionalProperties: false,
    };
    const messages = [{ role: "user", content: "When and where was the Eiffel tower built?" }];
    const done = await client
      .chat("small", messages, {
        maxTokens: 64,
        sampling: GREEDY,
        responseFormat: { type: "json_schema", json_schema: { name: "t", schema } },
      })
      .result();
    const value = JSON.parse(done.text) as Record<string, unknown>;
    assert.deepEqual(Object.keys(value).sort(), ["city", "year"]);
    assert.ok(Number.isInteger(value.year), done.text);
    const date = await client
      .generate("small", "The Berlin wall fell on", {
        maxTokens: 16,
        responseFormat: { type: "regex", pattern: "[0-9]{4}-[0-9]{2}-[0-9]{2}" },
      })
      .result();
    assert.match(date.text, /^[0-9]{4}-[0-9]{2}-[0-9]{2}$/);
  });

  it("gives valid tool calls and answers after a round trip", async () => {
    const weather: Tool = {
      type: "function",
      function: {
        name: "get_weather",
        description: "The current weather in a city.",
        parameters: {
          type: "object",
          properties: { city: { type: "string", maxLength: 20 } },
          required: ["city"],
          additionalProperties: false,
        },
      },
    };
    const question = { role: "user", content: "What is the weather in Paris?" };
    const generation = client.chat("small", [question], {
      maxTokens: 48,
      sampling: GREEDY,
      tools: [weather],
      toolChoice: "required",
      parallelToolCalls: false,
    });
    const { pieces, completion } = await drain(generation);
    assert.deepEqual(pieces, [], "a forced call streams no text");
    assert.equal(completion.finish, "tool_calls");
    assert.equal(completion.toolCalls.length, 1);
    const call = completion.toolCalls[0]!;
    assert.equal(call.name, "get_weather");
    assert.deepEqual(Object.keys(call.arguments), ["city"]);
    const answer = await client
      .chat(
        "small",
        [question, toolCallsMessage([call]), { role: "tool", tool_call_id: call.id, content: '{"sky": "sunny"}' }],
        { maxTokens: 24, sampling: GREEDY, tools: [weather], toolChoice: "none" },
      )
      .result();
    assert.ok(answer.text.length > 0 && answer.toolCalls.length === 0, answer.text);
    await assert.rejects(
      client.chat("small", [question], { tools: [weather], toolChoice: { type: "function", function: { name: "launch" } } }).result(),
      (e: unknown) => e instanceof InvalidInput && /launch/.test(e.message),
    );
  });

  it("runs generations and other requests concurrently on one connection", async () => {
    const prompts = [FRANCE, "1, 2, 3, 4,", "Once upon a time"];
    const gens = prompts.map((p) => client.generate("small", p, { maxTokens: 8, sampling: GREEDY }));
    const [results, models, rtt] = await Promise.all([Promise.all(gens.map(drain)), client.models(), client.ping()]);
    assert.equal(new Set(gens.map((g) => g.id)).size, 3, "ids are unique");
    for (const { pieces, completion } of results) {
      assert.equal(pieces.join(""), completion.text, "each stream matches its own result");
    }
    // Batched with others, a greedy generation says what it said alone.
    assert.equal(results[0]?.completion.text, france.text);
    assert.match(results[1]?.completion.text ?? "", /5/);
    assert.equal(models[0]?.name, "small");
    assert.ok(rtt >= 0);
  });

  it("cancels a generation mid-stream: it ends with finish cancelled", async () => {
    const gen = client.generate("small", "Once upon a time", { maxTokens: 16, sampling: GREEDY });
    const pieces: string[] = [];
    let found: boolean | undefined;
    for await (const piece of gen) {
      pieces.push(piece);
      if (found === undefined) {
        found = await gen.cancel();
      }
    }
    const completion = await gen.result();
    assert.equal(found, true, "the generation was running");
    assert.equal(completion.finish, "cancelled");
    assert.ok(completion.usage.completionTokens < 16, `stopped early (${completion.usage.completionTokens} tokens)`);
    assert.equal(pieces.join(""), completion.text);
    assert.equal(await gen.cancel(), true, "cancel is idempotent: it repeats its first answer");
    const finished = client.generate("small", FRANCE, { maxTokens: 2, sampling: GREEDY });
    await finished.result();
    assert.equal(await finished.cancel(), false, "cancelling a finished generation is a no-op");
  });

  it("cancels when the loop is left early, and through an AbortSignal", async () => {
    const gen = client.generate("small", "Once upon a time", { maxTokens: 16, sampling: GREEDY });
    for await (const _ of gen) {
      break;
    }
    assert.equal((await gen.result()).finish, "cancelled");

    const controller = new AbortController();
    const aborted = client.generate("small", "Once upon a time", { maxTokens: 16, sampling: GREEDY, signal: controller.signal });
    for await (const _ of aborted) {
      controller.abort();
    }
    const completion = await aborted.result();
    assert.equal(completion.finish, "cancelled");
    assert.ok(completion.usage.completionTokens < 16);
  });

  it("lists the tenant's models", async () => {
    const models = await client.models();
    assert.equal(models.length, 1);
    assert.equal(models[0]?.name, "small");
    assert.equal(models[0]?.architecture, "llama");
    assert.ok((models[0]?.contextLength ?? 0) >= 2048);
  });

  it("runs a granted pipeline", async () => {
    const output = await client.pipeline("report", { text: "Hello hello world. The cat sat." });
    assert.deepEqual(output.stats, { chars: 31, sentences: 2, words: 6 });
    assert.deepEqual(output.chunks, ["Hello hello world. The cat sat."]);
    assert.deepEqual((output.top_words as unknown[])[0], ["hello", 2]);
    assert.equal(typeof output.documents_seen, "number");
  });

  it("invokes the tenant's component: remember, then recall", async () => {
    assert.deepEqual(await client.invoke({ op: "remember", key: "k", text: "the sdk was here" }), { stored: "k" });
    assert.deepEqual(await client.invoke({ op: "recall", key: "k" }), { key: "k", text: "the sdk was here" });
    assert.deepEqual(await client.invoke({ op: "recall", key: "missing" }), { key: "missing", text: null });
  });

  it("raises ModelNotFound for a model the tenant does not have", async () => {
    const gen = client.generate("nope", "hi", { maxTokens: 4 });
    const error = await rejection(gen.result(), ModelNotFound);
    assert.equal(error.code, "model_not_found");
    assert.match(error.message, /small/, "the message lists the available models");
    assert.equal(error.requestId, gen.id);
    // Iterating raises the same error.
    await assert.rejects(async () => {
      for await (const _ of gen) {
        // no pieces
      }
    }, ModelNotFound);
  });

  it("raises InvalidInput for bad values, and the connection stays usable", async () => {
    const temperature = await rejection(
      client.generate("small", "hi", { sampling: { temperature: -1 } }).result(),
      InvalidInput,
    );
    assert.match(temperature.message, /temperature/);
    await rejection(client.generate("small", "hi", { maxTokens: 0 }).result(), InvalidInput);
    await rejection(client.generate("small", "", { maxTokens: 4 }).result(), InvalidInput);
    await rejection(client.chat("small", [], { maxTokens: 4 }).result(), InvalidInput);
    await rejection(client.pipeline("report", { text: 42 }), InvalidInput);
    assert.ok((await client.ping()) >= 0);
  });

  it("raises NotPermitted and GuestError", async () => {
    const pipeline = await rejection(client.pipeline("not-granted", {}), NotPermitted);
    assert.match(pipeline.message, /report/, "the message lists the granted pipelines");
    const guestError = await rejection(client.invoke({ op: "dance" }), GuestError);
    assert.match(guestError.message, /unknown op/);
    const bare = await Client.connect(server.url, key("bare"));
    try {
      await rejection(bare.invoke({ op: "list" }), NotPermitted);
      assert.deepEqual(await bare.models(), []);
    } finally {
      await bare.close();
    }
  });

  it("raises Unauthorized for a wrong key at connect", async () => {
    const error = await rejection(Client.connect(server.url, "rk_acme_0000"), Unauthorized);
    assert.equal(error.code, "unauthorized");
    await rejection(Client.connect(server.url, `${key("acme")}x`), Unauthorized);
  });

  it("raises RateLimited with a retry hint", async () => {
    const slow = await Client.connect(server.url, key("slow"));
    try {
      assert.equal((await slow.models()).length, 1);
      const error = await rejection(slow.models(), RateLimited);
      assert.equal(error.code, "rate_limited");
      assert.ok(error.retryAfterMs !== undefined && error.retryAfterMs > 0 && error.retryAfterMs <= 60_000, String(error.retryAfterMs));
      assert.ok((await slow.ping()) >= 0, "pings are not rate-limited; the connection stays usable");
    } finally {
      await slow.close();
    }
  });

  it("raises TooManyStreams past the concurrent-stream limit", async () => {
    const solo = await Client.connect(server.url, key("solo"));
    try {
      const first = solo.generate("small", "Once upon a time", { maxTokens: 16, sampling: GREEDY });
      const iterator = first[Symbol.asyncIterator]();
      assert.equal((await iterator.next()).done, false, "the first generation is running");
      const error = await rejection(solo.generate("small", "hi", { maxTokens: 2 }).result(), TooManyStreams);
      assert.equal(error.code, "too_many_streams");
      await first.cancel();
      while (!(await iterator.next()).done) {
        // drain the rest
      }
      assert.equal((await first.result()).finish, "cancelled");
    } finally {
      await solo.close();
    }
  });

  it("raises QuotaExceeded once the daily tokens are spent", async () => {
    const frugal = await Client.connect(server.url, key("frugal"));
    try {
      const spent = await frugal.generate("small", "Hello", { maxTokens: 4, sampling: GREEDY }).result();
      assert.equal(spent.usage.completionTokens, 4);
      const error = await rejection(frugal.generate("small", "Hello", { maxTokens: 4 }).result(), QuotaExceeded);
      assert.ok((error.retryAfterMs ?? 0) > 0, "retry after midnight UTC");
    } finally {
      await frugal.close();
    }
  });

  it("cancels a pipeline through its signal: it rejects with Cancelled", async () => {
    const controller = new AbortController();
    const spin = client.pipeline("spin", {}, { signal: controller.signal });
    await new Promise((r) => setTimeout(r, 300)); // running: its guest spins until a 60 s timeout
    const started = Date.now();
    controller.abort();
    const error = await rejection(spin, Cancelled);
    assert.equal(error.code, "cancelled");
    assert.match(error.requestId ?? "", /.+/);
    assert.doesNotMatch(error.message, /before it was sent/, "the server's answer");
    assert.ok(Date.now() - started < 5000, "stopped at once");
    assert.ok((await client.ping()) >= 0);
  });

  it("cancels an invoke of a slow op: it rejects with Cancelled", async () => {
    const controller = new AbortController();
    // The component generates an answer: slow enough to cancel.
    const ask = client.invoke({ op: "ask", question: "Tell me a story.", max_tokens: 16 }, { signal: controller.signal });
    await new Promise((r) => setTimeout(r, 20));
    controller.abort();
    const error = await rejection(ask, Cancelled);
    assert.doesNotMatch(error.message, /before it was sent/, "the server's answer");
    const after = await client.generate("small", FRANCE, { maxTokens: 4, sampling: GREEDY }).result();
    assert.ok(after.usage.completionTokens >= 1, "the connection and the model go on");
  });

  it("answers a frame over max-frame with FrameTooLarge for that request only", async () => {
    // Past the server's 1 MiB max-frame but within 4x: the server reads the id and answers.
    const big = await Client.connect(server.url, key("acme"), { maxFrameBytes: 8 * 1024 * 1024 });
    try {
      const small = big.invoke({ op: "list" });
      const error = await rejection(big.invoke({ op: "remember", key: "big", text: "x".repeat(2 * 1024 * 1024) }), FrameTooLarge);
      assert.match(error.message, /1048576/);
      assert.match(error.requestId ?? "", /.+/);
      assert.ok("keys" in ((await small) as object));
      assert.ok((await big.ping()) >= 0);
    } finally {
      await big.close();
    }
  });

  it("fails a connection whose key a reload revoked with Unauthorized, for good", async () => {
    const gone = await Client.connect(server.url, key("gone"));
    let original = "";
    try {
      assert.deepEqual(await gone.models(), []);
      await server.reload((config) => {
        original = config;
        // Drop the `[tenants.gone]` table: its lines up to the next table.
        return config.replace(/^\[tenants\.gone\]\n(?:(?!\[)[^\n]*\n?)*/m, "");
      });
      // The server says so and closes the connection; the key stays refused.
      const error = await rejection(gone.models(), Unauthorized);
      assert.match(error.message, /revoked|refused/);
      await rejection(gone.ping(), Unauthorized);
    } finally {
      await gone.close();
      if (original) {
        await server.reload(() => original);
      }
    }
  });
});
