/**
 * The client: one WebSocket to `GET /v1/ws`, many concurrent requests
 * multiplexed by id, reconnection with backoff.
 *
 * @module
 */

import type { IncomingMessage } from "node:http";
import WebSocket from "ws";

import { type Backoff, type BackoffOptions, backoffDelay, resolveBackoff } from "./backoff.js";
import {
  Cancelled,
  ClientClosed,
  ConnectionFailed,
  ConnectionLost,
  FrameTooLarge,
  InvalidInput,
  ProtocolError,
  RealmError,
  type RealmErrorOptions,
  Unauthorized,
  errorForCode,
} from "./errors.js";
import { Generation, type GenerationHost, GenerationStream } from "./generation.js";
import {
  type ChatMessage,
  type FinalFrame,
  type GenerateOptions,
  type JsonObject,
  type JsonValue,
  type ModelInfo,
  type ServerFrame,
  completionOf,
  parseServerFrame,
  wireGenerateOptions,
} from "./types.js";

/**
 * Where the client stands: `connecting` (the first connection), `open`,
 * `reconnecting` (after a drop, between attempts), `failed` (gave up, or the
 * key was refused; new requests start a new round of attempts unless the
 * failure was `Unauthorized` or reconnection is off) or `closed` (by
 * {@link Client.close}).
 */
export type ConnectionState = "connecting" | "open" | "reconnecting" | "failed" | "closed";

/** Details passed to {@link ConnectOptions.onStateChange}. */
export interface StateChange {
  /** The new state. */
  state: ConnectionState;
  /** For `reconnecting`: the attempt about to be made (1 for the first of an outage). */
  attempt?: number;
  /** For `reconnecting`: the wait before that attempt, in ms. */
  delayMs?: number;
  /** What caused the change: the drop, the failed attempt, or the final error. */
  error?: RealmError;
}

/** Options of {@link Client.connect}. */
export interface ConnectOptions {
  /**
   * Reconnection after a dropped connection (defaults in {@link BackoffOptions});
   * `false` turns it off. The first connection is tried once: a failure there
   * throws from {@link Client.connect}.
   */
  reconnect?: BackoffOptions | false;
  /** How long one connection attempt may take, upgrade and `ready` frame included, in ms (default 10000). */
  connectTimeoutMs?: number;
  /**
   * Interval of WebSocket pings that detect a dead peer, in ms (default 30000;
   * 0 = off). A ping unanswered by the next interval drops the connection.
   * No pings are sent while reading is paused for flow control.
   */
  heartbeatMs?: number;
  /**
   * Text pieces held per generation before the client pauses reading the
   * socket (default 256); see {@link Generation}.
   */
  highWaterMark?: number;
  /**
   * The largest request frame the client sends, in bytes (default 1 MiB, the
   * server's default `max-frame`). A bigger request fails with
   * {@link FrameTooLarge} without being sent. (The server answers a frame
   * over its own `max-frame` with `frame_too_large` for that request, but
   * closes the connection on frames over 4x the limit, failing every request
   * on it.)
   */
  maxFrameBytes?: number;
  /** Extra HTTP headers for the upgrade request. */
  headers?: Record<string, string>;
  /** Called on every change of {@link Client.state}. */
  onStateChange?: (change: StateChange) => void;
  /**
   * Called with errors that belong to no request: an `error` frame without an
   * id (the answer to a frame whose id the server could not read; the client
   * always sends readable ids), a malformed frame, or a frame for an unknown
   * request. Default: `process.emitWarning`.
   */
  onError?: (error: RealmError) => void;
}

/** Options of {@link Client.pipeline} and {@link Client.invoke}. */
export interface RequestOptions {
  /**
   * Aborting it cancels the request: the server stops the pipeline or the
   * component, and the call rejects with {@link Cancelled} (unless its result
   * was already on the way). A request not sent yet is never sent.
   */
  signal?: AbortSignal;
}

interface Pending {
  /** A `token` frame for this request; absent for requests that do not stream. */
  token?: (text: string) => void;
  /** The request's final frame. */
  final: (frame: FinalFrame) => void;
  /** The request cannot finish (connection lost, client closed). */
  lost: (error: RealmError) => void;
}

interface Deferred<T> {
  promise: Promise<T>;
  resolve: (value: T) => void;
  reject: (error: unknown) => void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // Waiters attach their own handlers; nobody waiting is not an error.
  promise.catch(() => {});
  return { promise, resolve, reject };
}

/** Normalizes `url` to the WebSocket endpoint: http(s) becomes ws(s), an empty path becomes `/v1/ws`. */
export function websocketUrl(url: string): string {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new TypeError(`not a URL: ${JSON.stringify(url)} (expected e.g. ws://127.0.0.1:8080)`);
  }
  const schemes: Record<string, string> = { "ws:": "ws:", "wss:": "wss:", "http:": "ws:", "https:": "wss:" };
  const scheme = schemes[parsed.protocol];
  if (scheme === undefined) {
    throw new TypeError(`unsupported URL scheme ${parsed.protocol} in ${url} (use ws, wss, http or https)`);
  }
  parsed.protocol = scheme;
  if (parsed.pathname === "" || parsed.pathname === "/") {
    parsed.pathname = "/v1/ws";
  }
  return parsed.toString();
}

/** How many times in a row one request refused with `shutting_down` is sent again. */
const MAX_RESENDS = 3;

const DEFAULTS = {
  connectTimeoutMs: 10_000,
  heartbeatMs: 30_000,
  highWaterMark: 256,
  maxFrameBytes: 1024 * 1024,
};

/**
 * A connection to a Realm server's WebSocket API.
 *
 * ```ts
 * const client = await Client.connect("ws://127.0.0.1:8080", process.env.REALM_KEY!);
 * const gen = client.generate("small", "The capital of France is", { maxTokens: 8, sampling: { temperature: 0 } });
 * for await (const piece of gen) process.stdout.write(piece);
 * console.log((await gen.result()).usage);
 * await client.close();
 * ```
 *
 * Requests run concurrently over the one connection. When it drops, requests
 * in flight fail with {@link ConnectionLost} (the server cancels what a
 * dropped connection started) and the client reconnects in the background
 * with exponential backoff and jitter; requests made meanwhile wait for the
 * new connection, or fail with {@link ConnectionFailed} once the attempts run
 * out. A refused key ({@link Unauthorized}) is never retried. While the server
 * drains (SIGTERM), requests it refuses with `shutting_down` (which did not
 * run) and new requests wait for the next connection and are sent there.
 */
export class Client {
  readonly #url: string;
  readonly #key: string;
  readonly #backoff: Backoff;
  readonly #connectTimeoutMs: number;
  readonly #heartbeatMs: number;
  readonly #highWaterMark: number;
  readonly #maxFrameBytes: number;
  readonly #headers: Record<string, string>;
  readonly #onStateChange: ((change: StateChange) => void) | undefined;
  readonly #onError: (error: RealmError) => void;

  #state: ConnectionState = "connecting";
  #ws: WebSocket | undefined;
  #tenant: string | undefined;
  #nextId = 0;
  readonly #pending = new Map<string, Pending>();
  /** Generations whose buffers are full: reading is paused while any is here. */
  readonly #holds = new Set<GenerationStream>();
  /** Resolves when a connection opens; rejects when reconnecting gives up. */
  #opened: Deferred<WebSocket> | undefined;
  /**
   * The live connection, once its server said `shutting_down`: it takes no new
   * requests and closes once what runs has finished. With reconnection on,
   * new requests wait for the next connection.
   */
  #draining: WebSocket | undefined;
  /** Why the client is `failed`. */
  #failure: RealmError | undefined;
  #heartbeat: NodeJS.Timeout | undefined;
  #awaitingPong = false;
  /** Wakes the reconnect loop's sleep early (on close). */
  #interruptSleep: (() => void) | undefined;
  #closed: Promise<void> | undefined;

  private constructor(url: string, key: string, options: ConnectOptions) {
    this.#url = websocketUrl(url);
    if (typeof key !== "string" || key.length === 0) {
      throw new TypeError("an API key is required (rk_<tenant>_…; make one with `realm-host keys new`)");
    }
    this.#key = key;
    this.#backoff = resolveBackoff(options.reconnect);
    this.#connectTimeoutMs = positive("connectTimeoutMs", options.connectTimeoutMs ?? DEFAULTS.connectTimeoutMs);
    this.#heartbeatMs = nonNegative("heartbeatMs", options.heartbeatMs ?? DEFAULTS.heartbeatMs);
    this.#highWaterMark = positiveInteger("highWaterMark", options.highWaterMark ?? DEFAULTS.highWaterMark);
    this.#maxFrameBytes = positiveInteger("maxFrameBytes", options.maxFrameBytes ?? DEFAULTS.maxFrameBytes);
    this.#headers = { ...options.headers };
    this.#onStateChange = options.onStateChange;
    this.#onError =
      options.onError ??
      ((error) => {
        process.emitWarning(error.message, { type: "RealmClientWarning", code: error.code });
      });
  }

  /**
   * Connects to a Realm server and authenticates with `key` (sent as
   * `Authorization: Bearer <key>` on the upgrade).
   *
   * @param url `ws://host:port` (or `http://`, `wss://`, `https://`); the path defaults to `/v1/ws`.
   * @param key A tenant's API key, `rk_<tenant>_…`.
   * @throws Unauthorized when the server refuses the key (HTTP 401).
   * @throws ConnectionFailed when the server cannot be reached or does not answer in time.
   */
  static async connect(url: string, key: string, options: ConnectOptions = {}): Promise<Client> {
    const client = new Client(url, key, options);
    try {
      client.#attach(await client.#open());
    } catch (error) {
      client.#state = "closed";
      throw error;
    }
    return client;
  }

  /** The connection's state. */
  get state(): ConnectionState {
    return this.#state;
  }

  /** The tenant the key belongs to (from the server's `ready` frame). */
  get tenant(): string | undefined {
    return this.#tenant;
  }

  /** The WebSocket endpoint in use. */
  get url(): string {
    return this.#url;
  }

  /**
   * Completes `prompt` with `model`, streaming pieces as they are produced.
   * Errors (unknown model, limits, a lost connection) surface when iterating
   * the returned {@link Generation} or awaiting its `result()`.
   */
  generate(model: string, prompt: string, options: GenerateOptions = {}): Generation {
    return this.#generation({ type: "generate", model, prompt }, options);
  }

  /** Chats with `model` (the model's chat template formats `messages`); see {@link Client.generate}. */
  chat(model: string, messages: readonly ChatMessage[], options: GenerateOptions = {}): Generation {
    const wire = messages.map((m) => ({ role: m.role, content: m.content }));
    return this.#generation({ type: "chat", model, messages: wire }, options);
  }

  /**
   * Runs pipeline `name` (one the tenant's config grants) on `inputs`.
   *
   * @returns the pipeline's outputs object.
   * @throws NotPermitted for a pipeline the tenant is not granted; InvalidInput for bad inputs;
   *   GuestError or PipelineError when it fails; Cancelled when `options.signal` aborts it.
   */
  async pipeline<T extends JsonObject = JsonObject>(
    name: string,
    inputs: JsonObject = {},
    options: RequestOptions = {},
  ): Promise<T> {
    const frame = await this.#request({ type: "pipeline", pipeline: name, inputs }, options.signal);
    return expect(frame, "result").output as T;
  }

  /**
   * Calls the `handle` export of the tenant's own component with `request`.
   *
   * @returns the JSON the component answered.
   * @throws NotPermitted when the tenant has no component; GuestError when it fails;
   *   Cancelled when `options.signal` aborts it.
   */
  async invoke<T extends JsonValue = JsonValue>(request: JsonValue, options: RequestOptions = {}): Promise<T> {
    const frame = await this.#request({ type: "invoke", request }, options.signal);
    return expect(frame, "result").output as T;
  }

  /** The models this tenant may use. */
  async models(): Promise<ModelInfo[]> {
    const frame = expect(await this.#request({ type: "models" }), "models");
    return frame.models.map((m) => ({ name: m.name, architecture: m.architecture, contextLength: m.context_length }));
  }

  /**
   * Checks the connection (pings are not rate-limited).
   *
   * @returns the round trip, in milliseconds.
   */
  async ping(): Promise<number> {
    const started = performance.now();
    // A draining server still answers pings on its open connections.
    expect(await this.#request({ type: "ping" }, undefined, true), "pong");
    return performance.now() - started;
  }

  /**
   * Closes the connection and stops reconnecting. Requests still running fail
   * with {@link ClientClosed} (and the server cancels them); later ones too.
   */
  close(): Promise<void> {
    if (this.#closed !== undefined) {
      return this.#closed;
    }
    const closed = new ClientClosed("the client was closed");
    this.#setState({ state: "closed" });
    this.#interruptSleep?.();
    this.#opened?.reject(closed);
    this.#opened = undefined;
    this.#failAll(closed);
    const ws = this.#ws;
    this.#detach();
    this.#closed = new Promise<void>((resolve) => {
      if (ws === undefined || ws.readyState === WebSocket.CLOSED) {
        resolve();
        return;
      }
      const force = setTimeout(() => ws.terminate(), 2000);
      ws.once("close", () => {
        clearTimeout(force);
        resolve();
      });
      ws.close(1000, "client closed");
    });
    return this.#closed;
  }

  // --- requests -----------------------------------------------------------

  #generation(frame: Record<string, unknown>, options: GenerateOptions): Generation {
    const highWaterMark = positiveInteger("highWaterMark", options.highWaterMark ?? this.#highWaterMark);
    const stream = new GenerationStream(this.#generationHost, highWaterMark);
    const signal = options.signal;
    if (signal !== undefined) {
      const abort = (): void => {
        stream.cancel().catch(() => {
          // A failed cancel means a lost connection: the generation fails too.
        });
      };
      if (signal.aborted) {
        abort();
      } else {
        signal.addEventListener("abort", abort, { once: true });
        stream.result.finally(() => signal.removeEventListener("abort", abort)).catch(() => {});
      }
    }
    this.#startGeneration(stream, frame, options).catch((error: unknown) => stream.fail(asRealmError(error)));
    return new Generation(stream);
  }

  async #startGeneration(
    stream: GenerationStream,
    frame: Record<string, unknown>,
    options: GenerateOptions,
    resends = 0,
  ): Promise<void> {
    const wire = { ...frame, ...checkedGenerateOptions(options) };
    const ws = await this.#ready();
    if (stream.cancelRequested) {
      return; // cancelled while waiting for the connection; the stream has its result
    }
    const id = this.#allocateId();
    stream.id = id;
    let streamed = false;
    this.#send(ws, id, wire, {
      token: (text) => {
        streamed = true;
        stream.push(text);
      },
      final: (reply) => {
        if (reply.type === "done") {
          stream.finish(completionOf(reply));
        } else if (isShuttingDown(reply) && !streamed && !stream.cancelRequested && this.#mayResend(resends)) {
          // Refused before it started: send it again on the next connection.
          stream.id = undefined;
          this.#startGeneration(stream, frame, options, resends + 1).catch((error: unknown) =>
            stream.fail(asRealmError(error)),
          );
        } else {
          stream.fail(replyError(reply, "done"));
        }
      },
      lost: (error) => stream.fail(error),
    });
  }

  readonly #generationHost: GenerationHost = {
    cancel: async (target) => {
      const ws = this.#ws;
      if (ws === undefined || !this.#pending.has(target)) {
        return false; // finished, or lost with its connection
      }
      return expect(await this.#requestOn(ws, { type: "cancel", target }), "cancelled").found;
    },
    hold: (stream, hold) => {
      if (hold) {
        this.#holds.add(stream);
      } else {
        this.#holds.delete(stream);
      }
      this.#updatePause();
    },
  };

  /**
   * Sends a request on the current (or next) connection and resolves to its
   * final frame. A request refused with `shutting_down` did not run: it is
   * sent again once the client has reconnected. Aborting `signal` cancels it.
   * `drainingOk`: it may go on a connection the server drains (`ping`).
   */
  async #request(frame: Record<string, unknown>, signal?: AbortSignal, drainingOk = false): Promise<FinalFrame> {
    for (let resends = 0; ; resends++) {
      if (signal?.aborted) {
        throw new Cancelled("the request was cancelled before it was sent");
      }
      const ws = await abortable(this.#ready(drainingOk), signal);
      if (signal?.aborted) {
        throw new Cancelled("the request was cancelled before it was sent");
      }
      const reply = await this.#requestOn(ws, frame, signal);
      if (isShuttingDown(reply) && !signal?.aborted && this.#mayResend(resends)) {
        continue;
      }
      return reply;
    }
  }

  /** Sends a request on `ws`; aborting `signal` while it runs sends a `cancel` for it. */
  #requestOn(ws: WebSocket, frame: Record<string, unknown>, signal?: AbortSignal): Promise<FinalFrame> {
    return new Promise<FinalFrame>((resolve, reject) => {
      const id = this.#allocateId();
      const onAbort = (): void => {
        if (this.#pending.has(id) && ws === this.#ws) {
          this.#requestOn(ws, { type: "cancel", target: id }).catch(() => {
            // The connection is gone: the request fails with it.
          });
        }
      };
      const settled = (): void => signal?.removeEventListener("abort", onAbort);
      this.#send(ws, id, frame, {
        final: (reply) => {
          settled();
          resolve(reply);
        },
        lost: (error) => {
          settled();
          reject(error);
        },
      });
      if (signal !== undefined && this.#pending.has(id)) {
        signal.addEventListener("abort", onAbort, { once: true });
      }
    });
  }

  /** Whether a request refused with `shutting_down` is sent again on the next connection. */
  #mayResend(resends: number): boolean {
    return this.#backoff.maxAttempts > 0 && !this.#isClosed() && resends < MAX_RESENDS;
  }

  #allocateId(): string {
    this.#nextId += 1;
    return String(this.#nextId);
  }

  /** Registers request `id` and sends it; failures reach `pending.lost`. */
  #send(ws: WebSocket, id: string, frame: Record<string, unknown>, pending: Pending): void {
    if (this.#state === "closed") {
      pending.lost(new ClientClosed("the client was closed"));
      return;
    }
    if (ws !== this.#ws || ws.readyState !== WebSocket.OPEN) {
      pending.lost(new ConnectionLost(`the connection to ${this.#url} was lost before request ${id} was sent`, { requestId: id }));
      return;
    }
    let text: string;
    try {
      text = JSON.stringify({ id, ...frame });
    } catch (error) {
      pending.lost(new InvalidInput(`the request cannot be serialized as JSON: ${String(error)}`, { requestId: id, cause: error }));
      return;
    }
    const bytes = Buffer.byteLength(text);
    if (bytes > this.#maxFrameBytes) {
      pending.lost(
        new FrameTooLarge(`the ${String(frame.type)} request has ${bytes} bytes; the limit is ${this.#maxFrameBytes} (maxFrameBytes)`, {
          requestId: id,
        }),
      );
      return;
    }
    this.#pending.set(id, pending);
    ws.send(text, (error) => {
      if (error !== undefined && error !== null && this.#pending.get(id) === pending) {
        this.#pending.delete(id);
        pending.lost(new ConnectionLost(`sending request ${id} failed: ${error.message}`, { requestId: id, cause: error }));
      }
    });
  }

  // --- connection ---------------------------------------------------------

  /**
   * The open socket, waiting for (or starting) a reconnection when there is
   * none, and (unless `drainingOk`) for the next connection while the server
   * drains this one.
   */
  #ready(drainingOk = false): Promise<WebSocket> {
    switch (this.#state) {
      case "open":
        if (this.#ws !== undefined) {
          if (this.#ws !== this.#draining || drainingOk || this.#backoff.maxAttempts === 0) {
            return Promise.resolve(this.#ws);
          }
          // Resolved by the connection that follows once the server closes this one.
          this.#opened ??= deferred<WebSocket>();
          return this.#opened.promise;
        }
        break;
      case "closed":
        return Promise.reject(new ClientClosed("the client was closed"));
      case "failed": {
        const failure = this.#failure ?? new ConnectionFailed(`not connected to ${this.#url}`);
        if (failure instanceof Unauthorized || this.#backoff.maxAttempts === 0) {
          return Promise.reject(copyError(failure));
        }
        // The last round of attempts gave up; a new request tries again.
        this.#reconnect(failure);
        break;
      }
      case "connecting":
      case "reconnecting":
        break;
    }
    if (this.#opened === undefined) {
      return Promise.reject(new ConnectionFailed(`not connected to ${this.#url}`));
    }
    return this.#opened.promise;
  }

  /** One connection attempt: upgrade (with the key) and the server's `ready` frame. */
  #open(): Promise<WebSocket> {
    return new Promise<WebSocket>((resolve, reject) => {
      const ws = new WebSocket(this.#url, {
        headers: { ...this.#headers, authorization: `Bearer ${this.#key}` },
        handshakeTimeout: this.#connectTimeoutMs,
        perMessageDeflate: false,
      });
      let settled = false;
      const settle = (error: RealmError | undefined): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        ws.removeAllListeners();
        // An `error` event without a listener would throw; the live
        // connection's handlers (see #attach) do the real work.
        ws.on("error", () => {});
        if (error === undefined) {
          resolve(ws);
          return;
        }
        ws.terminate();
        reject(error);
      };
      const timer = setTimeout(
        () => settle(new ConnectionFailed(`connecting to ${this.#url} took longer than ${this.#connectTimeoutMs} ms`)),
        this.#connectTimeoutMs,
      );
      ws.on("unexpected-response", (_request, response: IncomingMessage) => {
        readBody(response).then(
          (body) => settle(upgradeRefused(this.#url, response.statusCode ?? 0, body)),
          () => settle(upgradeRefused(this.#url, response.statusCode ?? 0, "")),
        );
      });
      ws.on("error", (error) => settle(new ConnectionFailed(`cannot connect to ${this.#url}: ${error.message}`, { cause: error })));
      ws.on("close", (code, reason) =>
        settle(new ConnectionFailed(`the server closed the connection before it was ready (${describeClose(code, reason)})`)),
      );
      ws.on("message", (data, isBinary) => {
        let frame: ServerFrame | undefined;
        try {
          frame = isBinary ? undefined : parseServerFrame(data.toString());
        } catch (error) {
          settle(asRealmError(error));
          return;
        }
        if (frame?.type === "ready") {
          this.#tenant = frame.tenant;
          settle(undefined);
        } else if (frame?.type === "error") {
          settle(errorForCode(frame.code, frame.message, { retryAfterMs: frame.retry_after_ms }));
        } else {
          settle(new ProtocolError(`expected a \`ready\` frame from ${this.#url}, got ${truncate(data.toString())}`));
        }
      });
    });
  }

  /** Makes `ws` the live connection. */
  #attach(ws: WebSocket): void {
    this.#ws = ws;
    this.#failure = undefined;
    this.#awaitingPong = false;
    ws.on("message", (data, isBinary) => this.#onMessage(ws, data, isBinary));
    ws.on("close", (code, reason) => this.#onClose(ws, code, reason));
    ws.on("pong", () => {
      this.#awaitingPong = false;
    });
    if (this.#heartbeatMs > 0) {
      this.#heartbeat = setInterval(() => this.#beat(ws), this.#heartbeatMs);
      this.#heartbeat.unref();
    }
    this.#setState({ state: "open" });
    const opened = this.#opened;
    this.#opened = undefined;
    opened?.resolve(ws);
  }

  /** Forgets the live connection (its listeners stay, but ignore a socket that is not live). */
  #detach(): void {
    this.#draining = undefined;
    clearInterval(this.#heartbeat);
    this.#heartbeat = undefined;
    this.#ws = undefined;
    this.#holds.clear();
  }

  #beat(ws: WebSocket): void {
    if (ws !== this.#ws || ws.isPaused) {
      return; // paused reading cannot see the pong
    }
    if (this.#awaitingPong) {
      this.#drop(ws, `no answer to a ping within ${this.#heartbeatMs} ms`);
      return;
    }
    this.#awaitingPong = true;
    ws.ping();
  }

  /** Drops a connection that misbehaves; `close` then fails its requests and reconnects. */
  #drop(ws: WebSocket, why: string): void {
    this.#dropReason = why;
    ws.terminate();
  }

  #dropReason: string | undefined;

  #onMessage(ws: WebSocket, data: WebSocket.RawData, isBinary: boolean): void {
    if (ws !== this.#ws) {
      return;
    }
    this.#awaitingPong = false;
    if (isBinary) {
      this.#onError(new ProtocolError("the server sent a binary frame; frames are JSON text"));
      return;
    }
    let frame: ServerFrame | undefined;
    try {
      frame = parseServerFrame(data.toString());
    } catch (error) {
      const problem = asRealmError(error);
      const pending = problem.requestId === undefined ? undefined : this.#pending.get(problem.requestId);
      if (pending !== undefined && problem.requestId !== undefined) {
        this.#pending.delete(problem.requestId);
        pending.lost(problem);
      } else {
        this.#onError(problem);
      }
      return;
    }
    if (frame === undefined || frame.type === "ready") {
      return; // a frame type from a newer server, or a repeated `ready`
    }
    if (frame.type === "error" && frame.code === "shutting_down") {
      this.#draining = ws;
    }
    if (frame.type === "error" && frame.id === undefined) {
      this.#onUnaddressedError(ws, frame);
      return;
    }
    const id = frame.id as string;
    const pending = this.#pending.get(id);
    if (pending === undefined) {
      this.#onError(new ProtocolError(`the server sent a \`${frame.type}\` frame for unknown request ${id}`, { requestId: id }));
      return;
    }
    if (frame.type === "tool_call") {
      // Listed again in the `done` frame's `tool_calls`.
      return;
    }
    if (frame.type === "token") {
      if (pending.token === undefined) {
        this.#pending.delete(id);
        pending.lost(new ProtocolError(`the server sent a \`token\` frame for request ${id}, which does not stream`, { requestId: id }));
      } else {
        pending.token(frame.text);
      }
      return;
    }
    this.#pending.delete(id);
    pending.final(frame);
  }

  /**
   * An `error` frame without an id. The server puts the id on every error that
   * answers a frame whose id it could read, and this client always sends
   * readable ids: such an error answers none of its requests, and is reported
   * through `onError`.
   */
  #onUnaddressedError(ws: WebSocket, frame: Extract<ServerFrame, { type: "error" }>): void {
    const error = errorForCode(frame.code, `the server reported an error for no request: ${frame.message}`, {
      retryAfterMs: frame.retry_after_ms,
    });
    if (error instanceof Unauthorized) {
      // The server revoked this connection's key (a reload removed it or its
      // tenant) and closes the connection: nothing on it (or on a new one,
      // with the same key) can succeed.
      this.#failure = error;
      this.#failAll(error);
      this.#detach();
      this.#setState({ state: "failed", error });
      ws.close(1000, "unauthorized");
      return;
    }
    this.#onError(error);
  }

  #onClose(ws: WebSocket, code: number, reason: Buffer): void {
    if (ws !== this.#ws) {
      return;
    }
    const why = this.#dropReason ?? describeClose(code, reason);
    this.#dropReason = undefined;
    this.#detach();
    const lost = new ConnectionLost(`the connection to ${this.#url} was lost (${why})`);
    this.#failAll(lost);
    if (this.#backoff.maxAttempts === 0) {
      this.#failure = lost;
      this.#setState({ state: "failed", error: lost });
      return;
    }
    this.#reconnect(lost);
  }

  /** Starts a round of reconnection attempts in the background. */
  #reconnect(cause: RealmError): void {
    this.#opened ??= deferred<WebSocket>();
    const opened = this.#opened;
    this.#reconnectLoop(cause).then(
      (ws) => {
        if (ws === undefined) {
          return; // closed meanwhile; close() rejected the waiters
        }
        if (this.#state === "closed") {
          ws.close(1000, "client closed");
          return;
        }
        this.#attach(ws);
      },
      (error: unknown) => {
        if (this.#state === "closed") {
          return;
        }
        const failure = asRealmError(error);
        this.#failure = failure;
        this.#opened = undefined;
        this.#setState({ state: "failed", error: failure });
        opened.reject(failure);
      },
    );
  }

  /** Attempts until one connects (resolves), attempts run out or the key is refused (rejects), or the client closes (undefined). */
  async #reconnectLoop(cause: RealmError): Promise<WebSocket | undefined> {
    let last: RealmError = cause;
    for (let attempt = 1; attempt <= this.#backoff.maxAttempts; attempt++) {
      const delayMs = backoffDelay(attempt, this.#backoff);
      this.#setState({ state: "reconnecting", attempt, delayMs, error: last });
      await this.#sleep(delayMs);
      if (this.#isClosed()) {
        return undefined;
      }
      try {
        const ws = await this.#open();
        if (this.#isClosed()) {
          ws.close(1000, "client closed");
          return undefined;
        }
        return ws;
      } catch (error) {
        last = asRealmError(error);
        if (last instanceof Unauthorized) {
          throw last; // a refused key stays refused
        }
      }
    }
    throw new ConnectionFailed(
      `gave up reconnecting to ${this.#url} after ${this.#backoff.maxAttempts} attempt(s): ${last.message}`,
      { cause: last },
    );
  }

  /** Whether close() was called (a method, so that checks after an await are not narrowed away). */
  #isClosed(): boolean {
    return this.#state === "closed";
  }

  #sleep(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const timer = setTimeout(done, ms);
      const interrupt = (): void => done();
      this.#interruptSleep = interrupt;
      const self = this;
      function done(): void {
        clearTimeout(timer);
        if (self.#interruptSleep === interrupt) {
          self.#interruptSleep = undefined;
        }
        resolve();
      }
    });
  }

  /** Fails every request in flight with (a copy per request of) `error`. */
  #failAll(error: RealmError): void {
    const pending = [...this.#pending.entries()];
    this.#pending.clear();
    for (const [id, request] of pending) {
      request.lost(copyError(error, id));
    }
  }

  #updatePause(): void {
    const ws = this.#ws;
    if (ws === undefined) return;
    if (this.#holds.size > 0 && !ws.isPaused) {
      ws.pause();
    } else if (this.#holds.size === 0 && ws.isPaused) {
      this.#awaitingPong = false;
      ws.resume();
    }
  }

  #setState(change: StateChange): void {
    this.#state = change.state;
    if (this.#onStateChange !== undefined) {
      try {
        this.#onStateChange(change);
      } catch (error) {
        this.#onError(new RealmError("callback_error", `onStateChange threw: ${String(error)}`, { cause: error }));
      }
    }
  }
}

function isShuttingDown(frame: FinalFrame): boolean {
  return frame.type === "error" && frame.code === "shutting_down";
}

/** `promise`, or a rejection with {@link Cancelled} once `signal` aborts first. */
function abortable<T>(promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (signal === undefined) {
    return promise;
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(new Cancelled("the request was cancelled before it was sent"));
    if (signal.aborted) {
      onAbort();
      return;
    }
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener("abort", onAbort);
        resolve(value);
      },
      (error: unknown) => {
        signal.removeEventListener("abort", onAbort);
        reject(error);
      },
    );
  });
}

/** The typed error of a failed request's final frame. */
function replyError(frame: FinalFrame, wanted: FinalFrame["type"]): RealmError {
  if (frame.type === "error") {
    return errorForCode(frame.code, frame.message, { retryAfterMs: frame.retry_after_ms, requestId: frame.id });
  }
  return new ProtocolError(`expected a \`${wanted}\` frame for request ${frame.id}, got \`${frame.type}\``, {
    requestId: frame.id,
  });
}

/** The final frame if it is of type `wanted`; its typed error otherwise. */
function expect<K extends FinalFrame["type"]>(frame: FinalFrame, wanted: K): Extract<FinalFrame, { type: K }> {
  if (frame.type !== wanted) {
    throw replyError(frame, wanted);
  }
  return frame as Extract<FinalFrame, { type: K }>;
}

/** Generation options on the wire, checked for what JSON cannot carry. */
function checkedGenerateOptions(options: GenerateOptions): Record<string, unknown> {
  const numbers: [string, number | undefined][] = [
    ["maxTokens", options.maxTokens],
    ["sampling.temperature", options.sampling?.temperature],
    ["sampling.topK", options.sampling?.topK],
    ["sampling.topP", options.sampling?.topP],
    ["sampling.minP", options.sampling?.minP],
    ["sampling.repeatPenalty", options.sampling?.repeatPenalty],
    ["sampling.presencePenalty", options.sampling?.presencePenalty],
    ["sampling.frequencyPenalty", options.sampling?.frequencyPenalty],
    ["sampling.seed", options.sampling?.seed],
  ];
  for (const [name, value] of numbers) {
    if (value !== undefined && (typeof value !== "number" || !Number.isFinite(value))) {
      throw new InvalidInput(`${name} must be a finite number (got ${String(value)})`);
    }
  }
  const seed = options.sampling?.seed;
  if (seed !== undefined && !(Number.isSafeInteger(seed) && seed >= 0)) {
    throw new InvalidInput(`sampling.seed must be a non-negative safe integer (got ${seed})`);
  }
  return wireGenerateOptions(options);
}

/** A fresh error of the same class, code and message as `error` (one per request), for request `requestId`. */
function copyError(error: RealmError, requestId?: string): RealmError {
  const options = { retryAfterMs: error.retryAfterMs, requestId: requestId ?? error.requestId, cause: error.cause };
  if (error.constructor === RealmError) {
    return new RealmError(error.code, error.message, options);
  }
  const Class = error.constructor as new (message: string, options?: RealmErrorOptions) => RealmError;
  return new Class(error.message, options);
}

function asRealmError(error: unknown): RealmError {
  if (error instanceof RealmError) {
    return error;
  }
  const message = error instanceof Error ? error.message : String(error);
  return new ProtocolError(`unexpected client failure: ${message}`, { cause: error });
}

function upgradeRefused(url: string, status: number, body: string): RealmError {
  let message = body.trim();
  try {
    const parsed = JSON.parse(body) as { error?: { message?: unknown } };
    if (typeof parsed.error?.message === "string") {
      message = parsed.error.message;
    }
  } catch {
    // not the OpenAI-shaped error: keep the raw body
  }
  if (status === 401) {
    return new Unauthorized(`the server refused the API key: ${message || "HTTP 401"}`);
  }
  return new ConnectionFailed(`the server refused the WebSocket upgrade at ${url} with HTTP ${status}${message ? `: ${truncate(message)}` : ""}`);
}

function readBody(response: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    response.on("data", (chunk: Buffer) => {
      size += chunk.length;
      if (size <= 64 * 1024) chunks.push(chunk);
    });
    response.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    response.on("error", reject);
  });
}

function describeClose(code: number, reason: Buffer): string {
  const text = reason.toString("utf8");
  return `close code ${code}${text ? `: ${text}` : ""}`;
}

function truncate(text: string): string {
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}

function positive(name: string, value: number): number {
  if (!(typeof value === "number" && Number.isFinite(value) && value > 0)) {
    throw new RangeError(`${name} must be a positive number (got ${String(value)})`);
  }
  return value;
}

function nonNegative(name: string, value: number): number {
  if (!(typeof value === "number" && Number.isFinite(value) && value >= 0)) {
    throw new RangeError(`${name} must be a number >= 0 (got ${String(value)})`);
  }
  return value;
}

function positiveInteger(name: string, value: number): number {
  if (!(Number.isInteger(value) && value > 0)) {
    throw new RangeError(`${name} must be a positive integer (got ${String(value)})`);
  }
  return value;
}
