/**
 * Exponential backoff with jitter, for reconnecting.
 *
 * @module
 */

/** How the client waits between reconnection attempts after a dropped connection. */
export interface BackoffOptions {
  /** Delay before the first attempt, in ms; each later attempt doubles it (default 250). */
  baseMs?: number;
  /** The longest delay between attempts, in ms (default 5000). */
  capMs?: number;
  /**
   * Attempts per outage before giving up (default 10; `Infinity` never gives
   * up; 0 turns reconnection off).
   */
  maxAttempts?: number;
  /**
   * Fraction of each delay that is randomized, 0..1 (default 0.5): the delay
   * is drawn from `[d * (1 - jitter), d]`, so clients dropped together do not
   * reconnect in lockstep.
   */
  jitter?: number;
}

/** {@link BackoffOptions} with every field set. */
export type Backoff = Required<BackoffOptions>;

/** The defaults of {@link BackoffOptions}. */
export const DEFAULT_BACKOFF: Readonly<Backoff> = Object.freeze({
  baseMs: 250,
  capMs: 5000,
  maxAttempts: 10,
  jitter: 0.5,
});

/**
 * Fills in defaults and checks the values; `false` means no reconnection.
 *
 * @throws RangeError for a negative, non-finite (except `maxAttempts`) or out-of-range value.
 */
export function resolveBackoff(options: BackoffOptions | false | undefined): Backoff {
  if (options === false) {
    return { ...DEFAULT_BACKOFF, maxAttempts: 0 };
  }
  const backoff: Backoff = { ...DEFAULT_BACKOFF, ...definedOnly(options ?? {}) };
  const check = (name: keyof Backoff, ok: boolean, what: string): void => {
    if (!ok) {
      throw new RangeError(`reconnect.${name} must be ${what} (got ${String(backoff[name])})`);
    }
  };
  check("baseMs", Number.isFinite(backoff.baseMs) && backoff.baseMs >= 0, "a finite number >= 0");
  check("capMs", Number.isFinite(backoff.capMs) && backoff.capMs >= backoff.baseMs, "a finite number >= baseMs");
  check(
    "maxAttempts",
    backoff.maxAttempts === Infinity || (Number.isInteger(backoff.maxAttempts) && backoff.maxAttempts >= 0),
    "an integer >= 0 or Infinity",
  );
  check("jitter", backoff.jitter >= 0 && backoff.jitter <= 1, "within 0..1");
  return backoff;
}

/**
 * The delay before reconnection attempt `attempt` (1 for the first):
 * `min(capMs, baseMs * 2^(attempt-1))`, less up to `jitter` of it at random.
 */
export function backoffDelay(attempt: number, backoff: Backoff, random: () => number = Math.random): number {
  const exponent = Math.max(0, attempt - 1);
  // 2^exponent overflows to Infinity for huge attempts; min() keeps the cap.
  const full = Math.min(backoff.capMs, backoff.baseMs * 2 ** exponent);
  return Math.round(full * (1 - backoff.jitter * random()));
}

function definedOnly(options: BackoffOptions): BackoffOptions {
  const out: BackoffOptions = {};
  for (const [key, value] of Object.entries(options)) {
    if (value !== undefined) {
      (out as Record<string, unknown>)[key] = value;
    }
  }
  return out;
}
