// Helpers shared by Realm's JavaScript guests. They work on both jco
// backends: StarlingMonkey (which has TextEncoder/TextDecoder) and QuickJS
// (which does not, and gives `null` where StarlingMonkey gives `undefined`).

/** A host `error` (thrown as a ComponentError) or any other exception as one line. */
export function describe(e) {
  const error = e?.payload ?? e;
  if (error && typeof error === 'object' && 'tag' in error) {
    return error.val == null ? error.tag : `${error.tag}: ${error.val}`;
  }
  return error instanceof Error ? error.message : String(error);
}

/** Calls a host function, turning its typed error into this guest's error string. */
export function host(call, ...args) {
  try {
    return call(...args);
  } catch (e) {
    throw describe(e);
  }
}

/** `text` as UTF-8 bytes (kv values are bytes). */
export function utf8(text) {
  const binary = unescape(encodeURIComponent(text));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

/** UTF-8 `bytes` as text. */
export function fromUtf8(bytes) {
  let binary = '';
  for (const b of bytes) binary += String.fromCharCode(b);
  return decodeURIComponent(escape(binary));
}

/** Sampling options: greedy up to `maxTokens`, ending at any of `stop`. */
export function greedy(maxTokens, stop = []) {
  return {
    maxTokens,
    temperature: 0,
    topK: 0,
    topP: 1,
    minP: 0,
    repeatPenalty: 1,
    presencePenalty: 0,
    frequencyPenalty: 0,
    seed: undefined,
    stop,
    constraint: undefined,
  };
}

/** Parses a JSON object request, or throws a message saying why it is not one. */
export function parseObject(input, what = 'input') {
  let value;
  try {
    value = JSON.parse(input);
  } catch (e) {
    throw `${what} is not JSON: ${e.message}`;
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw `${what} must be a JSON object`;
  }
  return value;
}

/** Checks an optional `max_tokens` field (default `fallback`). */
export function maxTokens(request, fallback) {
  const value = request.max_tokens ?? fallback;
  if (!Number.isInteger(value) || value < 1 || value > 512) {
    throw '`max_tokens` must be an integer from 1 to 512';
  }
  return value;
}
