/**
 * Public value types, and the wire frames with their validation.
 *
 * @module
 */

import { ProtocolError } from "./errors.js";

/** Any JSON value. */
export type JsonValue = null | boolean | number | string | JsonValue[] | JsonObject;

/** A JSON object. */
export interface JsonObject {
  [key: string]: JsonValue;
}

/** Sampling settings; unset ones take the server's defaults (temperature 0.8). */
export interface SamplingOptions {
  /** 0 = greedy (deterministic); the server accepts 0..=10 (default 0.8). */
  temperature?: number;
  /** Keep only the `topK` most likely tokens (0 = off). */
  topK?: number;
  /** Nucleus sampling: keep the smallest set of tokens with this much probability, 0..=1. */
  topP?: number;
  /** Drop tokens less likely than `minP` times the most likely one, 0..=1. */
  minP?: number;
  /** Penalty (> 0) for repeating recent tokens; 1 = off. */
  repeatPenalty?: number;
  /** OpenAI's presence penalty (-2..=2): lowers every token already generated; 0 = off. */
  presencePenalty?: number;
  /** OpenAI's frequency penalty (-2..=2): lowers a token once per time it was generated; 0 = off. */
  frequencyPenalty?: number;
  /** Random seed, for reproducible sampling (a non-negative integer). */
  seed?: number;
}

/** Options of {@link Client.generate} and {@link Client.chat}. */
export interface GenerateOptions {
  /** Most new tokens (server default 256). */
  maxTokens?: number;
  /** Sampling settings. */
  sampling?: SamplingOptions;
  /** Up to 16 non-empty strings that end the generation (finish `stop`). */
  stop?: string[];
  /** A format the server holds the output to while decoding (docs/structured-output.md). */
  responseFormat?: ResponseFormat;
  /** Functions the model may call (chats only); its calls are the result's `toolCalls`. */
  tools?: Tool[];
  /** `auto` (the default with tools), `none`, `required`, or a named function. */
  toolChoice?: ToolChoice;
  /** Whether the model may make several calls at once (default true). */
  parallelToolCalls?: boolean;
  /** Aborting it cancels the generation, as {@link Generation.cancel} does. */
  signal?: AbortSignal;
  /**
   * Text pieces to hold for this generation before the client pauses reading
   * from the socket (default: the client's {@link ConnectOptions.highWaterMark}).
   */
  highWaterMark?: number;
}

/**
 * What a generation's output must match, as the server enforces it: OpenAI's
 * `response_format` (`text`, `json_object`, `json_schema`), a regular
 * expression, or a Lark grammar in llguidance's dialect.
 */
export type ResponseFormat =
  | { type: "text" }
  | { type: "json_object" }
  | {
      type: "json_schema";
      json_schema: { name: string; description?: string; schema?: Record<string, unknown>; strict?: boolean };
    }
  | { type: "regex"; pattern: string }
  | { type: "grammar"; grammar: string };

/** A function offered to the model, in OpenAI's shape. */
export interface Tool {
  type: "function";
  function: { name: string; description?: string; parameters?: Record<string, unknown>; strict?: boolean };
}

/** Whether and which function the model must call. */
export type ToolChoice = "auto" | "none" | "required" | { type: "function"; function: { name: string } };

/** A call the model made of one of the offered tools. */
export interface ToolCall {
  /** Its id: a `tool` message with this `tool_call_id` answers it. */
  id: string;
  /** The function's name. */
  name: string;
  /** The arguments, valid against the function's `parameters` schema. */
  arguments: JsonObject;
}

/** A tool call as a chat message's `tool_calls` entry (OpenAI's shape). */
export interface WireToolCall {
  id: string;
  type: "function";
  function: { name: string; arguments: string };
}

/** A chat message. */
export interface ChatMessage {
  /** Who speaks: `system`, `user`, `assistant` or `tool` (a call's result). */
  role: "system" | "user" | "assistant" | "tool" | (string & {});
  /** What they say (may be empty in an assistant message that made calls). */
  content: string;
  /** The calls an assistant message made (see {@link toolCallsMessage}). */
  tool_calls?: WireToolCall[];
  /** The call whose result a `tool` message holds. */
  tool_call_id?: string;
  /** The author's name. */
  name?: string;
}

/** The assistant message that made `calls`, to put back in a chat's history. */
export function toolCallsMessage(calls: readonly ToolCall[], content = ""): ChatMessage {
  return {
    role: "assistant",
    content,
    tool_calls: calls.map((c) => ({
      id: c.id,
      type: "function",
      function: { name: c.name, arguments: JSON.stringify(c.arguments) },
    })),
  };
}

/**
 * Why a generation ended: end-of-generation token or stop string,
 * `maxTokens`, a cancel, or (with tools) the model made calls.
 */
export type FinishReason = "stop" | "length" | "cancelled" | "tool_calls";

/** Token counts of a generation. */
export interface Usage {
  /** Tokens in the prompt (after the chat template, for chats). */
  promptTokens: number;
  /** Tokens generated. */
  completionTokens: number;
}

/** A finished generation. */
export interface Completion {
  /** The generated text (the concatenation of the streamed pieces), without tool calls. */
  text: string;
  /** The calls the model made (with tools). */
  toolCalls: ToolCall[];
  /** Token counts. */
  usage: Usage;
  /** Why it ended. */
  finish: FinishReason;
}

/** A model the tenant may use. */
export interface ModelInfo {
  /** The name to pass as `model`. */
  name: string;
  /** The model's architecture (`llama`, `gemma3`, …). */
  architecture: string;
  /** Its context window, in tokens. */
  contextLength: number;
}

/** Wire shapes of the frames the server sends (docs/protocol.md). */
export type ServerFrame =
  | { type: "ready"; tenant: string }
  | { type: "token"; id: string; text: string }
  | { type: "tool_call"; id: string; call: ToolCall }
  | {
      type: "done";
      id: string;
      text: string;
      tool_calls: ToolCall[];
      usage: { prompt_tokens: number; completion_tokens: number };
      finish: FinishReason;
    }
  | { type: "result"; id: string; output: JsonValue }
  | {
      type: "models";
      id: string;
      models: { name: string; architecture: string; context_length: number }[];
    }
  | { type: "pong"; id: string }
  | { type: "cancelled"; id: string; target: string; found: boolean }
  | { type: "error"; id?: string; code: string; message: string; retry_after_ms?: number };

/** A frame that ends a request (every server frame but `ready`, `token` and `tool_call`). */
export type FinalFrame = Exclude<ServerFrame, { type: "ready" } | { type: "token" } | { type: "tool_call" }>;

type Fields = Record<string, unknown>;

const isString = (v: unknown): v is string => typeof v === "string";
const isCount = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v) && v >= 0;

/**
 * Parses and checks one text frame from the server.
 *
 * @throws ProtocolError when it is not JSON or lacks what its `type` needs.
 * Frames of a `type` this client does not know are returned as `undefined`
 * (a newer server may send more).
 */
export function parseServerFrame(text: string): ServerFrame | undefined {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new ProtocolError(`the server sent a frame that is not JSON: ${truncate(text)}`, { cause: e });
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ProtocolError(`the server sent a frame that is not a JSON object: ${truncate(text)}`);
  }
  const f = value as Fields;
  const bad = (what: string): never => {
    throw new ProtocolError(`the server sent a malformed \`${String(f.type)}\` frame (${what}): ${truncate(text)}`, {
      requestId: isString(f.id) ? f.id : undefined,
    });
  };
  if (!isString(f.type)) {
    return bad("no string `type`");
  }
  const needId = (): string => (isString(f.id) ? f.id : bad("no string `id`"));
  switch (f.type) {
    case "ready":
      return { type: "ready", tenant: isString(f.tenant) ? f.tenant : bad("no `tenant`") };
    case "token":
      return { type: "token", id: needId(), text: isString(f.text) ? f.text : bad("no `text`") };
    case "tool_call":
      return { type: "tool_call", id: needId(), call: toolCallOf(f.call) ?? bad("bad `call`") };
    case "done": {
      const usage = f.usage as Fields | undefined;
      if (typeof usage !== "object" || usage === null || !isCount(usage.prompt_tokens) || !isCount(usage.completion_tokens)) {
        return bad("bad `usage`");
      }
      if (f.finish !== "stop" && f.finish !== "length" && f.finish !== "cancelled" && f.finish !== "tool_calls") {
        return bad("bad `finish`");
      }
      const calls = f.tool_calls ?? [];
      if (!Array.isArray(calls)) {
        return bad("bad `tool_calls`");
      }
      return {
        type: "done",
        id: needId(),
        text: isString(f.text) ? f.text : bad("no `text`"),
        tool_calls: calls.map((c: unknown) => toolCallOf(c) ?? bad("bad `tool_calls` entry")),
        usage: { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens },
        finish: f.finish,
      };
    }
    case "result":
      return { type: "result", id: needId(), output: "output" in f ? (f.output as JsonValue) : bad("no `output`") };
    case "models": {
      if (!Array.isArray(f.models)) {
        return bad("no `models` list");
      }
      const models = f.models.map((m: unknown) => {
        const e = (typeof m === "object" && m !== null ? m : {}) as Fields;
        if (!isString(e.name) || !isString(e.architecture) || !isCount(e.context_length)) {
          return bad("bad model entry");
        }
        return { name: e.name, architecture: e.architecture, context_length: e.context_length };
      });
      return { type: "models", id: needId(), models };
    }
    case "pong":
      return { type: "pong", id: needId() };
    case "cancelled":
      return {
        type: "cancelled",
        id: needId(),
        target: isString(f.target) ? f.target : bad("no `target`"),
        found: typeof f.found === "boolean" ? f.found : bad("no `found`"),
      };
    case "error": {
      if (!isString(f.code) || !isString(f.message)) {
        return bad("no `code` or `message`");
      }
      const frame: ServerFrame = { type: "error", code: f.code, message: f.message };
      if (f.id !== undefined && f.id !== null) {
        frame.id = needId();
      }
      if (f.retry_after_ms !== undefined && f.retry_after_ms !== null) {
        frame.retry_after_ms = isCount(f.retry_after_ms) ? f.retry_after_ms : bad("bad `retry_after_ms`");
      }
      return frame;
    }
    default:
      return undefined;
  }
}

/** A call in OpenAI's shape, read; `undefined` when malformed. */
function toolCallOf(value: unknown): ToolCall | undefined {
  const c = (typeof value === "object" && value !== null ? value : {}) as Fields;
  const fn = (typeof c.function === "object" && c.function !== null ? c.function : {}) as Fields;
  if (!isString(c.id) || !isString(fn.name) || !isString(fn.arguments)) {
    return undefined;
  }
  let args: unknown;
  try {
    args = JSON.parse(fn.arguments);
  } catch {
    return undefined;
  }
  if (typeof args !== "object" || args === null || Array.isArray(args)) {
    return undefined;
  }
  return { id: c.id, name: fn.name, arguments: args as JsonObject };
}

/** Converts a `done` frame to a {@link Completion}. */
export function completionOf(frame: Extract<ServerFrame, { type: "done" }>): Completion {
  return {
    text: frame.text,
    toolCalls: frame.tool_calls,
    usage: { promptTokens: frame.usage.prompt_tokens, completionTokens: frame.usage.completion_tokens },
    finish: frame.finish,
  };
}

/** The wire form (snake_case) of generation options; unset options are left out. */
export function wireGenerateOptions(options: GenerateOptions): Fields {
  const wire: Fields = {};
  if (options.maxTokens !== undefined) wire.max_tokens = options.maxTokens;
  if (options.stop !== undefined) wire.stop = options.stop;
  if (options.responseFormat !== undefined) wire.response_format = options.responseFormat;
  if (options.tools !== undefined) wire.tools = options.tools;
  if (options.toolChoice !== undefined) wire.tool_choice = options.toolChoice;
  if (options.parallelToolCalls !== undefined) wire.parallel_tool_calls = options.parallelToolCalls;
  const s = options.sampling;
  if (s !== undefined) {
    const sampling: Fields = {};
    if (s.temperature !== undefined) sampling.temperature = s.temperature;
    if (s.topK !== undefined) sampling.top_k = s.topK;
    if (s.topP !== undefined) sampling.top_p = s.topP;
    if (s.minP !== undefined) sampling.min_p = s.minP;
    if (s.repeatPenalty !== undefined) sampling.repeat_penalty = s.repeatPenalty;
    if (s.presencePenalty !== undefined) sampling.presence_penalty = s.presencePenalty;
    if (s.frequencyPenalty !== undefined) sampling.frequency_penalty = s.frequencyPenalty;
    if (s.seed !== undefined) sampling.seed = s.seed;
    wire.sampling = sampling;
  }
  return wire;
}

function truncate(text: string): string {
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}
