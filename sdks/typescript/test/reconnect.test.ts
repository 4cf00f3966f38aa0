// Reconnection against a real `realm-host serve` that is killed (or drained
// with SIGTERM) and restarted on the same port (see fixture.ts).

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import {
  Client,
  ConnectionFailed,
  ConnectionLost,
  ShuttingDown,
  type StateChange,
  Unauthorized,
} from "realm-client";

import { RealmServer, sleep } from "./fixture.js";

let server: RealmServer;
const clients: Client[] = [];

before(async () => {
  server = await RealmServer.start({ tenants: { acme: 'models = ["small"]' } });
});

after(async () => {
  for (const client of clients) await client.close();
  await server?.stop();
});

async function connect(options: Parameters<typeof Client.connect>[2]): Promise<Client> {
  const client = await Client.connect(server.url, server.keys.acme ?? "", options);
  clients.push(client);
  return client;
}

/** Resolves once `changes` has a change matching `test` (polling; fails after `ms`). */
async function until(changes: StateChange[], test: (c: StateChange) => boolean, ms = 10_000): Promise<StateChange> {
  const deadline = Date.now() + ms;
  for (;;) {
    const found = changes.find(test);
    if (found !== undefined) return found;
    if (Date.now() > deadline) assert.fail(`no such state change within ${ms} ms: ${JSON.stringify(changes)}`);
    await sleep(20);
  }
}

describe("reconnection", () => {
  it("fails the in-flight request with ConnectionLost, then serves a new request after the server returns", async () => {
    const changes: StateChange[] = [];
    const client = await connect({
      reconnect: { baseMs: 100, capMs: 800, maxAttempts: 100 },
      onStateChange: (change) => changes.push(change),
    });
    // A second client that gives up quickly.
    const quitter = await connect({ reconnect: { baseMs: 20, capMs: 50, maxAttempts: 3 } });

    const gen = client.generate("small", "Once upon a time", { maxTokens: 16, sampling: { temperature: 0 } });
    const iterator = gen[Symbol.asyncIterator]();
    assert.equal((await iterator.next()).done, false, "the generation is streaming");
    await server.kill();

    await assert.rejects(
      (async () => {
        while (!(await iterator.next()).done) {
          // pieces that arrived before the kill
        }
      })(),
      ConnectionLost,
    );
    const lost = await gen.result().then(
      () => assert.fail("the generation cannot finish"),
      (error: unknown) => error,
    );
    assert.ok(lost instanceof ConnectionLost);
    assert.equal(lost.requestId, gen.id);

    // A request made while the server is down waits for the reconnection.
    const started = Date.now();
    const models = client.models();
    let settled = false;
    models.then(
      () => (settled = true),
      () => (settled = true),
    );
    await until(changes, (c) => c.state === "reconnecting" && (c.attempt ?? 0) >= 2);
    assert.equal(settled, false, "the request waits while reconnecting");
    assert.equal(client.state, "reconnecting");

    // The quick quitter has run out of attempts meanwhile.
    await assert.rejects(quitter.ping(), (e: unknown) => e instanceof ConnectionFailed && /3 attempt/.test(e.message));
    assert.equal(quitter.state, "failed");

    await server.spawn();
    const list = await models;
    assert.equal(list[0]?.name, "small");
    assert.ok(Date.now() - started >= 200, "it waited for the server");
    assert.equal(client.state, "open");
    const attempts = changes.filter((c) => c.state === "reconnecting");
    assert.ok(attempts.length >= 2, "backed off across several attempts");
    const delays = attempts.map((c) => c.delayMs ?? -1);
    assert.ok(delays.every((d) => d >= 0 && d <= 800), `delays within the cap: ${delays.join(", ")}`);
    assert.ok(delays.some((d) => d > 100), `delays grow: ${delays.join(", ")}`);

    // Generation works on the new connection.
    const after = await client.generate("small", "The capital of France is", { maxTokens: 4, sampling: { temperature: 0 } }).result();
    assert.match(after.text, /Paris/);

    // A client that gave up starts over when asked again.
    assert.ok((await quitter.ping()) >= 0);
    assert.equal(quitter.state, "open");
  });

  it("while the server drains: running requests finish, new ones are sent again after reconnecting", async () => {
    const patient = await connect({ reconnect: { baseMs: 50, capMs: 300, maxAttempts: 1000 } });
    const plain = await connect({ reconnect: false });
    const options = { maxTokens: 16, sampling: { temperature: 0.8, seed: 1 } };
    const gens = [patient, plain].map((c) => c.generate("small", "Once upon a time", options));
    const iterators = gens.map((g) => g[Symbol.asyncIterator]());
    for (const iterator of iterators) {
      assert.equal((await iterator.next()).done, false, "the generation is streaming");
    }
    const exited = server.terminate();
    await server.logged("shutting down");
    await sleep(50);
    // Without reconnection, a new request is refused (with its id); pings still work.
    await assert.rejects(plain.models(), (e: unknown) => e instanceof ShuttingDown && e.requestId !== undefined);
    assert.ok((await plain.ping()) >= 0);
    // A reconnecting client holds the refused request for its next connection.
    let settled = false;
    const waiting = patient.models().finally(() => (settled = true));
    // What was running finishes.
    for (const [i, iterator] of iterators.entries()) {
      while (!(await iterator.next()).done) {
        // the rest of the pieces
      }
      const completion = await gens[i]!.result();
      assert.ok(completion.finish === "stop" || completion.finish === "length", completion.finish);
      assert.ok(completion.usage.completionTokens >= 1);
    }
    await exited;
    assert.equal(settled, false, "the refused request waits for the server to come back");
    assert.notEqual(plain.state, "open");
    await assert.rejects(plain.ping(), ConnectionLost);
    await server.spawn();
    assert.equal((await waiting)[0]?.name, "small");
    assert.equal(patient.state, "open");
  });

  it("does not retry a refused key", async () => {
    const changes: StateChange[] = [];
    const client = await connect({
      reconnect: { baseMs: 50, capMs: 200, maxAttempts: 100 },
      onStateChange: (change) => changes.push(change),
    });
    await server.kill();
    await server.rotateKey("acme"); // the client's key is no longer valid
    const pending = client.ping();
    await server.spawn();
    await assert.rejects(pending, Unauthorized);
    assert.equal(client.state, "failed");
    const count = changes.filter((c) => c.state === "reconnecting").length;
    await sleep(500);
    assert.equal(changes.filter((c) => c.state === "reconnecting").length, count, "no attempts after the refusal");
    await assert.rejects(client.models(), Unauthorized, "later requests fail at once");

    // The new key works.
    const fresh = await Client.connect(server.url, server.keys.acme ?? "");
    clients.push(fresh);
    assert.equal(fresh.tenant, "acme");
  });
});
