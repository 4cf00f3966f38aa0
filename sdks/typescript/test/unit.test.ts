// Pure functions: error mapping, backoff, URL handling. No server needed.

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  BadRequest,
  Cancelled,
  ConnectionLost,
  DEFAULT_BACKOFF,
  DuplicateId,
  FrameTooLarge,
  GuestError,
  InternalError,
  InvalidInput,
  ModelNotFound,
  NotPermitted,
  PipelineError,
  QuotaExceeded,
  RateLimited,
  Overloaded,
  RealmError,
  ShuttingDown,
  TooManyStreams,
  Unauthorized,
  UnknownType,
  backoffDelay,
  errorForCode,
  resolveBackoff,
  websocketUrl,
} from "realm-client";

describe("errorForCode", () => {
  it("maps every server code to its class", () => {
    // Every code of the server's ErrorCode enum (host/src/server/protocol.rs).
    const cases: [string, new (m: string) => RealmError][] = [
      ["bad_request", BadRequest],
      ["unknown_type", UnknownType],
      ["frame_too_large", FrameTooLarge],
      ["unauthorized", Unauthorized],
      ["model_not_found", ModelNotFound],
      ["not_permitted", NotPermitted],
      ["rate_limited", RateLimited],
      ["quota_exceeded", QuotaExceeded],
      ["too_many_streams", TooManyStreams],
      ["invalid_input", InvalidInput],
      ["duplicate_id", DuplicateId],
      ["guest_error", GuestError],
      ["pipeline_error", PipelineError],
      ["cancelled", Cancelled],
      ["shutting_down", ShuttingDown],
      ["overloaded", Overloaded],
      ["internal", InternalError],
    ];
    for (const [code, Class] of cases) {
      const error = errorForCode(code, `message for ${code}`);
      assert.ok(error instanceof Class, code);
      assert.ok(error instanceof RealmError);
      assert.ok(error instanceof Error);
      assert.equal(error.code, code);
      assert.equal(error.message, `message for ${code}`);
      assert.equal(error.name, Class.name);
    }
  });

  it("keeps the retry hint and request id", () => {
    const error = errorForCode("rate_limited", "slow down", { retryAfterMs: 1200, requestId: "9" });
    assert.ok(error instanceof RateLimited);
    assert.equal(error.retryAfterMs, 1200);
    assert.equal(error.requestId, "9");
  });

  it("turns unknown codes into a plain RealmError with the code", () => {
    const error = errorForCode("brand_new_code", "from a newer server");
    assert.equal(error.constructor, RealmError);
    assert.equal(error.code, "brand_new_code");
    // Object.prototype names are not codes.
    assert.equal(errorForCode("constructor", "x").constructor, RealmError);
  });

  it("gives client-side errors their own codes", () => {
    const lost = new ConnectionLost("gone");
    assert.equal(lost.code, "connection_lost");
    assert.ok(lost instanceof RealmError);
  });
});

describe("backoff", () => {
  it("doubles from baseMs up to capMs without jitter", () => {
    const b = resolveBackoff({ baseMs: 100, capMs: 1000, jitter: 0 });
    assert.deepEqual(
      [1, 2, 3, 4, 5, 6].map((n) => backoffDelay(n, b)),
      [100, 200, 400, 800, 1000, 1000],
    );
    assert.equal(backoffDelay(5000, b), 1000, "huge attempt numbers stay at the cap");
  });

  it("draws jittered delays from [d * (1 - jitter), d]", () => {
    const b = resolveBackoff({ baseMs: 1000, capMs: 1000, jitter: 0.5 });
    assert.equal(backoffDelay(1, b, () => 0), 1000);
    assert.equal(backoffDelay(1, b, () => 0.999999), 500);
    for (let i = 0; i < 100; i++) {
      const d = backoffDelay(1, b);
      assert.ok(d >= 500 && d <= 1000, String(d));
    }
  });

  it("fills defaults, turns off with false, and rejects bad values", () => {
    assert.deepEqual(resolveBackoff(undefined), DEFAULT_BACKOFF);
    assert.deepEqual(resolveBackoff({ capMs: 9000 }), { ...DEFAULT_BACKOFF, capMs: 9000 });
    assert.equal(resolveBackoff(false).maxAttempts, 0);
    assert.equal(resolveBackoff({ maxAttempts: Infinity }).maxAttempts, Infinity);
    assert.throws(() => resolveBackoff({ baseMs: -1 }), /baseMs/);
    assert.throws(() => resolveBackoff({ baseMs: 500, capMs: 100 }), /capMs/);
    assert.throws(() => resolveBackoff({ maxAttempts: 1.5 }), /maxAttempts/);
    assert.throws(() => resolveBackoff({ jitter: 2 }), /jitter/);
  });
});

describe("websocketUrl", () => {
  it("adds /v1/ws and maps http(s) to ws(s)", () => {
    assert.equal(websocketUrl("ws://127.0.0.1:8080"), "ws://127.0.0.1:8080/v1/ws");
    assert.equal(websocketUrl("http://127.0.0.1:8080/"), "ws://127.0.0.1:8080/v1/ws");
    assert.equal(websocketUrl("https://realm.example"), "wss://realm.example/v1/ws");
    assert.equal(websocketUrl("wss://realm.example/custom/ws"), "wss://realm.example/custom/ws");
  });

  it("rejects what is not a WebSocket URL", () => {
    assert.throws(() => websocketUrl("127.0.0.1:8080"), TypeError);
    assert.throws(() => websocketUrl("ftp://realm.example"), /unsupported URL scheme/);
  });
});
