// `headline`: a `step`-world component in JavaScript (jco componentize).
//
// Input (JSON): {"text": "...", "model": "small", "max_tokens": 24}.
// Streams a headline for `text` from the model piece by piece (`llm.stream`)
// and counts the headlines this tenant has written in its kv store.
// Output: {"headline": "...", "pieces": N, "written": COUNT, "usage": {...}}.

import { stream } from 'realm:inference/llm@0.2.0';
import { get, set } from 'realm:inference/kv@0.2.0';
import { log } from 'realm:inference/log@0.2.0';
import { describe, fromUtf8, greedy, host, maxTokens, parseObject, utf8 } from '../common/host.js';

const COUNTER = 'headlines/written';

/** Streams a headline for `text`; returns its pieces and the token usage. */
function headline(model, text, limit) {
  const prompt = `${text}\n\nA short newspaper headline for the text above:`;
  const tokens = host(stream, model, prompt, greedy(limit, ['\n']));
  const pieces = [];
  for (let item = tokens.next(); item != null; item = tokens.next()) {
    if (item.tag === 'err') throw describe(item.val);
    pieces.push(item.val);
  }
  const usage = tokens.usage();
  tokens[Symbol.dispose]();
  return { pieces, usage };
}

/** Adds one to the tenant's headline counter; returns the new count. */
function countOne() {
  const stored = host(get, COUNTER);
  const count = (stored == null ? 0 : Number(fromUtf8(stored))) + 1;
  host(set, COUNTER, utf8(String(count)));
  return count;
}

export function run(input) {
  const request = parseObject(input);
  const { text, model = 'small' } = request;
  if (typeof text !== 'string' || text.trim() === '') {
    throw 'input needs a non-empty string field `text`';
  }
  const { pieces, usage } = headline(model, text.trim(), maxTokens(request, 24));
  const written = countOne();
  log('debug', `headline in ${pieces.length} pieces; ${written} written`);
  return JSON.stringify({
    headline: pieces.join('').trim().replace(/^["']+|["']+$/g, ''),
    pieces: pieces.length,
    written,
    usage: { prompt_tokens: usage.promptTokens, completion_tokens: usage.completionTokens },
  });
}
