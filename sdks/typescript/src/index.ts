/**
 * `realm-client`: a TypeScript client for Realm's WebSocket API
 * (`GET /v1/ws`, docs/protocol.md).
 *
 * @packageDocumentation
 */

export { Client, websocketUrl } from "./client.js";
export type { ConnectOptions, ConnectionState, RequestOptions, StateChange } from "./client.js";
export { Generation } from "./generation.js";
export { DEFAULT_BACKOFF, backoffDelay, resolveBackoff } from "./backoff.js";
export type { Backoff, BackoffOptions } from "./backoff.js";
export type {
  ChatMessage,
  Completion,
  FinishReason,
  GenerateOptions,
  JsonObject,
  JsonValue,
  ModelInfo,
  ResponseFormat,
  SamplingOptions,
  Tool,
  ToolCall,
  ToolChoice,
  Usage,
  WireToolCall,
} from "./types.js";
export { toolCallsMessage } from "./types.js";
export {
  BadRequest,
  Cancelled,
  ClientClosed,
  ConnectionFailed,
  ConnectionLost,
  DuplicateId,
  FrameTooLarge,
  GuestError,
  InternalError,
  InvalidInput,
  ModelNotFound,
  NotPermitted,
  PipelineError,
  ProtocolError,
  QuotaExceeded,
  RateLimited,
  RealmError,
  ShuttingDown,
  Overloaded,
  TooManyStreams,
  Unauthorized,
  UnknownType,
  errorForCode,
} from "./errors.js";
export type { ClientErrorCode, RealmErrorOptions, ServerErrorCode } from "./errors.js";
