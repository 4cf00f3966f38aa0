/**
 * Typed errors. Every error the client raises is a {@link RealmError}; errors
 * the server reports have a subclass per wire `code` (see docs/protocol.md),
 * and failures on the client's side of the wire (a dropped connection, a
 * closed client) have their own.
 *
 * @module
 */

/** The error codes the server sends in `error` frames. */
export type ServerErrorCode =
  | "bad_request"
  | "unknown_type"
  | "frame_too_large"
  | "unauthorized"
  | "model_not_found"
  | "not_permitted"
  | "rate_limited"
  | "quota_exceeded"
  | "too_many_streams"
  | "invalid_input"
  | "duplicate_id"
  | "guest_error"
  | "pipeline_error"
  | "cancelled"
  | "shutting_down"
  | "overloaded"
  | "internal";

/** Codes of errors that arise in the client rather than on the server. */
export type ClientErrorCode =
  | "connection_lost"
  | "connection_failed"
  | "client_closed"
  | "protocol_error";

/** Extra details of a {@link RealmError}. */
export interface RealmErrorOptions {
  /** For rate limits and quotas: milliseconds after which a retry can succeed. */
  retryAfterMs?: number | undefined;
  /** The id of the request the error answers, when there is one. */
  requestId?: string | undefined;
  /** The underlying error, if any. */
  cause?: unknown;
}

/**
 * The base of every error this package throws. `code` is the server's error
 * code (`rate_limited`, …) or a client-side one (`connection_lost`, …); codes
 * the client does not know yet arrive as a plain `RealmError`.
 */
export class RealmError extends Error {
  /** The machine-readable error code. */
  readonly code: string;
  /** For rate limits and quotas: milliseconds after which a retry can succeed. */
  readonly retryAfterMs: number | undefined;
  /** The id of the request this error answers, when there is one. */
  readonly requestId: string | undefined;

  /** Makes an error with `code` and `message`. */
  constructor(code: string, message: string, options: RealmErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "RealmError";
    this.code = code;
    this.retryAfterMs = options.retryAfterMs;
    this.requestId = options.requestId;
  }
}

/** `bad_request`: the server could not read a frame (bad JSON, missing or unknown field). */
export class BadRequest extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("bad_request", message, options);
    this.name = "BadRequest";
  }
}

/** `unknown_type`: the server does not know the frame's `type`. */
export class UnknownType extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("unknown_type", message, options);
    this.name = "UnknownType";
  }
}

/**
 * `frame_too_large`: a request frame is over the server's `max-frame`; only
 * that request fails. The client also raises it itself, before sending, for
 * frames over {@link ConnectOptions.maxFrameBytes} (the server closes the
 * connection on frames over 4x its limit, failing every request on it).
 */
export class FrameTooLarge extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("frame_too_large", message, options);
    this.name = "FrameTooLarge";
  }
}

/**
 * `unauthorized`: a missing or wrong API key (HTTP 401 at connect), or a key
 * a configuration reload revoked on an open connection (the server closes it).
 */
export class Unauthorized extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("unauthorized", message, options);
    this.name = "Unauthorized";
  }
}

/** `model_not_found`: no such model for this tenant. */
export class ModelNotFound extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("model_not_found", message, options);
    this.name = "ModelNotFound";
  }
}

/** `not_permitted`: a pipeline the tenant is not granted, or `invoke` without a component. */
export class NotPermitted extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("not_permitted", message, options);
    this.name = "NotPermitted";
  }
}

/** `rate_limited`: over the tenant's requests or tokens per minute; see `retryAfterMs`. */
export class RateLimited extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("rate_limited", message, options);
    this.name = "RateLimited";
  }
}

/** `quota_exceeded`: the tenant's daily tokens are spent; `retryAfterMs` runs to 00:00 UTC. */
export class QuotaExceeded extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("quota_exceeded", message, options);
    this.name = "QuotaExceeded";
  }
}

/** `too_many_streams`: the tenant's `concurrent-streams` generations are already running. */
export class TooManyStreams extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("too_many_streams", message, options);
    this.name = "TooManyStreams";
  }
}

/** `invalid_input`: empty prompt, prompt beyond the context, bad sampling values, bad pipeline inputs. */
export class InvalidInput extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("invalid_input", message, options);
    this.name = "InvalidInput";
  }
}

/** `duplicate_id`: a request with this id is still running on the connection. */
export class DuplicateId extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("duplicate_id", message, options);
    this.name = "DuplicateId";
  }
}

/** `guest_error`: a component trapped, hit a sandbox limit, or returned an error. */
export class GuestError extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("guest_error", message, options);
    this.name = "GuestError";
  }
}

/** `pipeline_error`: a pipeline failed for a reason other than a guest (model load, template). */
export class PipelineError extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("pipeline_error", message, options);
    this.name = "PipelineError";
  }
}

/**
 * `cancelled`: a pipeline or invoke stopped by a cancel (an aborted `signal`)
 * before it finished. A cancelled generation is no error: it ends with finish
 * `cancelled`.
 */
export class Cancelled extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("cancelled", message, options);
    this.name = "Cancelled";
  }
}

/**
 * `shutting_down`: the server is draining and refused the request, which did
 * not run. A client that reconnects sends such a request again on its next
 * connection, so this reaches the caller only with reconnection off (or after
 * several refusals in a row).
 */
export class ShuttingDown extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("shutting_down", message, options);
    this.name = "ShuttingDown";
  }
}

/**
 * `overloaded`: the model could not be loaded in time (the server's memory
 * budget is held by other models in use) or failed to load. The request did
 * not run; `retryAfterMs` says when to try again.
 */
export class Overloaded extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("overloaded", message, options);
    this.name = "Overloaded";
  }
}

/** `internal`: a bug in the server. */
export class InternalError extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("internal", message, options);
    this.name = "InternalError";
  }
}

/**
 * `connection_lost`: the connection dropped while the request was in flight
 * (or, with reconnection off, before it could be sent). The server cancels
 * whatever a dropped connection started, so the request did not finish.
 */
export class ConnectionLost extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("connection_lost", message, options);
    this.name = "ConnectionLost";
  }
}

/**
 * `connection_failed`: the client could not (re)connect: the server is
 * unreachable, refused the upgrade with a status other than 401, did not
 * answer in time, or every reconnection attempt failed.
 */
export class ConnectionFailed extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("connection_failed", message, options);
    this.name = "ConnectionFailed";
  }
}

/** `client_closed`: {@link Client.close} was called before the request finished. */
export class ClientClosed extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("client_closed", message, options);
    this.name = "ClientClosed";
  }
}

/** `protocol_error`: the server sent something this client cannot understand. */
export class ProtocolError extends RealmError {
  /** Makes the error. */
  constructor(message: string, options?: RealmErrorOptions) {
    super("protocol_error", message, options);
    this.name = "ProtocolError";
  }
}

type ErrorClass = new (message: string, options?: RealmErrorOptions) => RealmError;

const BY_CODE: Readonly<Record<ServerErrorCode, ErrorClass>> = {
  bad_request: BadRequest,
  unknown_type: UnknownType,
  frame_too_large: FrameTooLarge,
  unauthorized: Unauthorized,
  model_not_found: ModelNotFound,
  not_permitted: NotPermitted,
  rate_limited: RateLimited,
  quota_exceeded: QuotaExceeded,
  too_many_streams: TooManyStreams,
  invalid_input: InvalidInput,
  duplicate_id: DuplicateId,
  guest_error: GuestError,
  pipeline_error: PipelineError,
  cancelled: Cancelled,
  shutting_down: ShuttingDown,
  overloaded: Overloaded,
  internal: InternalError,
};

/**
 * The typed error for a server error `code`: the subclass for a known code,
 * a plain {@link RealmError} carrying `code` for an unknown one.
 */
export function errorForCode(code: string, message: string, options?: RealmErrorOptions): RealmError {
  const known = Object.prototype.hasOwnProperty.call(BY_CODE, code)
    ? BY_CODE[code as ServerErrorCode]
    : undefined;
  return known === undefined ? new RealmError(code, message, options) : new known(message, options);
}
