/**
 * A running generation: an async iterable of text pieces with a final
 * {@link Completion}, and the per-generation buffering behind it.
 *
 * @module
 */

import { RealmError } from "./errors.js";
import type { Completion } from "./types.js";

/**
 * What a generation needs from its client (internal).
 *
 * @internal
 */
export interface GenerationHost {
  /** Sends a `cancel` frame for request `id`; resolves to its `found`. */
  cancel(id: string): Promise<boolean>;
  /** `hold` true: this generation's buffer is full, pause reading; false: it may resume. */
  hold(stream: GenerationStream, hold: boolean): void;
}

/**
 * The state of one generation, fed by the client's message handler and
 * drained by its consumer (internal; users see {@link Generation}).
 *
 * Flow control: pieces wait in `pieces` until the consumer takes them. When
 * `highWaterMark` are waiting, the stream asks its host to pause reading the
 * socket (which, through the server's bounded queue, pauses the generation on
 * the server) until the consumer has taken them down to half of that.
 *
 * @internal
 */
export class GenerationStream {
  /** The request id, once the request is sent. */
  id: string | undefined;
  /** Pieces received and not yet consumed. */
  private pieces: string[] = [];
  private readonly lowWaterMark: number;
  /** Whether this stream currently asks the host to pause reading. */
  private holding = false;
  private outcome: { completion: Completion } | { error: RealmError } | undefined;
  private wake: (() => void) | undefined;
  /** An iterator was created. */
  private iterating = false;
  /** The consumer stopped iterating early (`break`): pieces are dropped. */
  private abandoned = false;
  /** `result()` was called before any iteration. */
  private resultOnly = false;
  /** Pieces were dropped because only `result()` was wanted: iteration would have a gap. */
  private discarded = false;
  /** A cancel was asked for. */
  cancelRequested = false;
  private cancelling: Promise<boolean> | undefined;
  readonly result: Promise<Completion>;
  private settle!: { resolve: (c: Completion) => void; reject: (e: RealmError) => void };

  constructor(
    private readonly host: GenerationHost,
    private readonly highWaterMark: number,
  ) {
    this.lowWaterMark = Math.floor(highWaterMark / 2);
    this.result = new Promise<Completion>((resolve, reject) => {
      this.settle = { resolve, reject };
    });
    // A consumer that only iterates never awaits `result`: its rejection
    // (also raised by the iterator) must not count as unhandled.
    this.result.catch(() => {});
  }

  /** Whether the generation has ended (done or failed). */
  get ended(): boolean {
    return this.outcome !== undefined;
  }

  /** Pieces received and not yet consumed. */
  get buffered(): number {
    return this.pieces.length;
  }

  /** A `token` frame arrived. */
  push(text: string): void {
    if (this.ended || this.abandoned || this.discarded) {
      return;
    }
    this.pieces.push(text);
    if (this.pieces.length >= this.highWaterMark && !this.holding && !this.cancelRequested) {
      if (this.resultOnly && !this.iterating) {
        // Nobody is reading the pieces: drop them rather than stall the connection.
        this.discard();
        return;
      }
      this.setHolding(true);
    }
    this.notify();
  }

  /** The generation ended with its `done` frame. */
  finish(completion: Completion): void {
    if (this.ended) return;
    this.outcome = { completion };
    // No more pieces will come for this generation: pausing gains nothing.
    this.setHolding(false);
    this.settle.resolve(completion);
    this.notify();
  }

  /** The generation failed (error frame, lost connection, closed client). */
  fail(error: RealmError): void {
    if (this.ended) return;
    this.outcome = { error };
    this.setHolding(false);
    this.settle.reject(error);
    this.notify();
  }

  /** `result()` was called. */
  wantResult(): void {
    if (!this.iterating) {
      this.resultOnly = true;
      if (this.holding) {
        this.discard();
      }
    }
  }

  /** Asks the server to stop; see {@link Generation.cancel}. */
  cancel(): Promise<boolean> {
    if (this.cancelling !== undefined) {
      return this.cancelling;
    }
    if (this.ended) {
      return Promise.resolve(false);
    }
    this.cancelRequested = true;
    // The server stops within a step of the cancel, so the pieces still to
    // come are few: do not hold the connection for them.
    this.setHolding(false);
    const id = this.id;
    if (id === undefined) {
      // Not sent yet: the client sees `cancelRequested` and never sends it.
      this.finish({ text: "", usage: { promptTokens: 0, completionTokens: 0 }, finish: "cancelled", toolCalls: [] });
      this.cancelling = Promise.resolve(true);
    } else {
      this.cancelling = this.host.cancel(id);
    }
    return this.cancelling;
  }

  /** Starts the (only) iteration. */
  iterator(): AsyncIterator<string> {
    if (this.iterating) {
      throw new Error("a Generation can be iterated only once");
    }
    this.iterating = true;
    return {
      next: () => this.next(),
      return: async (): Promise<IteratorResult<string>> => {
        // `break` out of `for await`: the consumer is gone; stop the generation.
        this.abandoned = true;
        this.pieces = [];
        this.setHolding(false);
        if (!this.ended) {
          this.cancel().catch(() => {
            // The generation fails (and `result()` rejects) if the connection drops.
          });
        }
        return { done: true, value: undefined };
      },
    };
  }

  private async next(): Promise<IteratorResult<string>> {
    if (this.discarded) {
      throw new Error(
        "this generation's pieces were dropped because result() was awaited before iterating and the buffer filled; iterate before (or while) awaiting result()",
      );
    }
    for (;;) {
      if (this.abandoned) {
        return { done: true, value: undefined };
      }
      const piece = this.pieces.shift();
      if (piece !== undefined) {
        if (this.holding && this.pieces.length <= this.lowWaterMark) {
          this.setHolding(false);
        }
        return { done: false, value: piece };
      }
      if (this.outcome !== undefined) {
        if ("error" in this.outcome) {
          throw this.outcome.error;
        }
        return { done: true, value: undefined };
      }
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
    }
  }

  private discard(): void {
    this.discarded = true;
    this.pieces = [];
    this.setHolding(false);
  }

  private setHolding(hold: boolean): void {
    if (this.holding !== hold) {
      this.holding = hold;
      this.host.hold(this, hold);
    }
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }
}

/**
 * A generation started by {@link Client.generate} or {@link Client.chat}.
 *
 * ```ts
 * const gen = client.generate("small", "The capital of France is", { maxTokens: 8 });
 * for await (const piece of gen) process.stdout.write(piece);
 * const { text, usage, finish } = await gen.result();
 * ```
 *
 * Iterate it once, for the text pieces as they arrive; the iteration ends
 * with the generation, or throws its error (a {@link RealmError}). Leaving the
 * loop early (`break`) cancels the generation.
 *
 * Flow control: pieces not yet iterated are held, up to the high-water mark
 * (default 256 per generation); then the client pauses reading the socket
 * until the consumer catches up, which also pauses the generation on the
 * server. (Frames already read from the socket when it pauses are still
 * delivered: the bound is the high-water mark plus one socket read, at most
 * 64 KiB of frames.) The pause covers the whole connection (as the server's own queue
 * does), so iterate promptly, cancel what you no longer read, or only await
 * {@link Generation.result}: a generation whose `result()` is awaited before
 * any iteration drops its pieces instead of pausing.
 */
export class Generation implements AsyncIterable<string> {
  readonly #stream: GenerationStream;

  /**
   * Wraps a stream; generations are made by {@link Client.generate} and {@link Client.chat}.
   *
   * @internal
   */
  constructor(stream: GenerationStream) {
    this.#stream = stream;
  }

  /** The request id on the wire, once the request is sent. */
  get id(): string | undefined {
    return this.#stream.id;
  }

  /** Pieces received and not yet iterated. */
  get buffered(): number {
    return this.#stream.buffered;
  }

  /** The text pieces, as `token` frames arrive. */
  [Symbol.asyncIterator](): AsyncIterator<string> {
    return this.#stream.iterator();
  }

  /**
   * The finished generation: all its text, token usage and finish reason.
   *
   * @throws RealmError (a subclass per server error code, or
   * {@link ConnectionLost} / {@link ClientClosed}) when the generation fails.
   */
  result(): Promise<Completion> {
    this.#stream.wantResult();
    return this.#stream.result;
  }

  /**
   * Asks the server to stop the generation. It still ends normally, with the
   * text so far and finish `cancelled` (unless it finished first).
   *
   * @returns whether the generation was still running.
   */
  cancel(): Promise<boolean> {
    return this.#stream.cancel();
  }
}
