// `glossary`: a `tenant`-world component in JavaScript (jco componentize).
//
// A glossary the model fills in: a term is defined by the model once, then
// served from the tenant's kv store. Requests (JSON):
//   {"op": "define", "term": "GGUF", "max_tokens": 40}
//       → {"term", "definition", "cached": bool, "model"}
//   {"op": "set", "term": "GGUF", "definition": "..."} → {"term", "stored": true}
//   {"op": "forget", "term": "GGUF"}                 → {"term", "forgotten": bool}
//   {"op": "terms"}                                  → {"terms": [...]}
// It uses the first model the tenant may call.

import { chat, listModels } from 'realm:inference/llm@0.2.0';
import { delete as remove, get, listKeys, set } from 'realm:inference/kv@0.2.0';
import { fromUtf8, greedy, host, maxTokens, parseObject, utf8 } from '../common/host.js';

const PREFIX = 'term/';

function field(request, name) {
  const value = request[name];
  if (typeof value !== 'string' || value.trim() === '') {
    throw `request needs a non-empty string field \`${name}\``;
  }
  return value.trim();
}

function define(request) {
  const term = field(request, 'term');
  const stored = host(get, PREFIX + term);
  if (stored != null) {
    return { term, definition: fromUtf8(stored), cached: true, model: null };
  }
  const models = host(listModels);
  if (models.length === 0) throw 'this tenant may not use any model';
  const model = models[0].name;
  const messages = [
    { role: 'system', content: 'You define terms in one short sentence.', toolCalls: [] },
    { role: 'user', content: `What is ${term}?`, toolCalls: [] },
  ];
  const completion = host(chat, model, messages, undefined, greedy(maxTokens(request, 40), ['\n']));
  const definition = completion.text.trim();
  if (definition === '') throw `the model gave no definition for \`${term}\``;
  host(set, PREFIX + term, utf8(definition));
  return { term, definition, cached: false, model };
}

export function handle(input) {
  const request = parseObject(input, 'request');
  switch (request.op) {
    case 'define':
      return JSON.stringify(define(request));
    case 'set': {
      const term = field(request, 'term');
      host(set, PREFIX + term, utf8(field(request, 'definition')));
      return JSON.stringify({ term, stored: true });
    }
    case 'forget': {
      const term = field(request, 'term');
      return JSON.stringify({ term, forgotten: host(remove, PREFIX + term) });
    }
    case 'terms': {
      const terms = host(listKeys, PREFIX).map((key) => key.slice(PREFIX.length));
      return JSON.stringify({ terms });
    }
    default:
      throw '`op` must be one of define, set, forget, terms';
  }
}
