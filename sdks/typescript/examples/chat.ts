// An interactive chat with a Realm server that streams the answer as it is
// generated and keeps the conversation.
//
//   npm run build
//   REALM_KEY=rk_acme_… node build/examples/chat.js --url ws://127.0.0.1:8080 [--model small]
//
// Commands: /reset forgets the conversation, /exit (or Ctrl-D) quits. Ctrl-C
// stops the answer being generated (and quits when nothing is running).

import { createInterface } from "node:readline";
import { parseArgs } from "node:util";

import { type ChatMessage, Client, type Generation, RealmError } from "realm-client";

const USAGE = `usage: chat [--url ws://127.0.0.1:8080] [--key rk_…] [--model NAME] [--system TEXT]
            [--max-tokens N] [--temperature T]
The key defaults to $REALM_KEY; the model to the tenant's first.`;

async function main(): Promise<number> {
  let args;
  try {
    args = parseArgs({
      options: {
        url: { type: "string", default: "ws://127.0.0.1:8080" },
        key: { type: "string" },
        model: { type: "string" },
        system: { type: "string" },
        "max-tokens": { type: "string", default: "256" },
        temperature: { type: "string", default: "0.7" },
        help: { type: "boolean", short: "h" },
      },
    }).values;
  } catch (error) {
    console.error(`${(error as Error).message}\n${USAGE}`);
    return 2;
  }
  if (args.help === true) {
    console.log(USAGE);
    return 0;
  }
  const key = args.key ?? process.env.REALM_KEY;
  if (key === undefined || key === "") {
    console.error(`no API key: pass --key or set REALM_KEY\n${USAGE}`);
    return 2;
  }
  const maxTokens = Number(args["max-tokens"]);
  const temperature = Number(args.temperature);
  if (!Number.isInteger(maxTokens) || maxTokens < 1 || !Number.isFinite(temperature)) {
    console.error(`--max-tokens must be a positive integer and --temperature a number\n${USAGE}`);
    return 2;
  }

  const client = await Client.connect(args.url, key, {
    onStateChange: ({ state, attempt, error }) => {
      if (state === "reconnecting" && attempt === 1) console.error(`\n[${error?.message ?? "disconnected"}; reconnecting…]`);
      if (state === "failed") console.error(`\n[${error?.message ?? "connection failed"}]`);
    },
  });
  const model = args.model ?? (await client.models())[0]?.name;
  if (model === undefined) {
    console.error("this tenant has no models");
    await client.close();
    return 1;
  }
  console.error(`connected to ${client.url} as ${client.tenant ?? "?"}; chatting with ${model} (/reset, /exit)`);

  const system: ChatMessage[] = args.system === undefined ? [] : [{ role: "system", content: args.system }];
  let history: ChatMessage[] = [...system];
  let running: Generation | undefined;
  const rl = createInterface({ input: process.stdin, output: process.stdout, terminal: process.stdin.isTTY });
  rl.on("SIGINT", () => {
    if (running !== undefined) {
      void running.cancel().catch(() => {});
    } else {
      rl.close();
    }
  });

  try {
    rl.setPrompt("> ");
    rl.prompt();
    // Lines typed (or piped) while an answer streams wait their turn here.
    for await (const raw of rl) {
      const line = raw.trim();
      if (line === "/exit") break;
      if (line === "/reset") {
        history = [...system];
        console.error("[conversation cleared]");
        rl.prompt();
        continue;
      }
      if (line === "") {
        rl.prompt();
        continue;
      }

      const messages: ChatMessage[] = [...history, { role: "user", content: line }];
      running = client.chat(model, messages, { maxTokens, sampling: { temperature } });
      try {
        for await (const piece of running) process.stdout.write(piece);
        const { text, usage, finish } = await running.result();
        process.stdout.write("\n");
        if (finish !== "stop") console.error(`[${finish}]`);
        console.error(`[${usage.promptTokens} prompt + ${usage.completionTokens} completion tokens]`);
        // Keep the exchange (a cancelled answer too: it is what the user saw).
        history = [...messages, { role: "assistant", content: text }];
      } catch (error) {
        process.stdout.write("\n");
        if (!(error instanceof RealmError)) throw error;
        const retry = error.retryAfterMs === undefined ? "" : ` (retry in ${Math.ceil(error.retryAfterMs / 1000)} s)`;
        console.error(`[${error.name}: ${error.message}${retry}]`);
        if (error.code === "unauthorized") break;
      } finally {
        running = undefined;
      }
      rl.prompt();
    }
  } finally {
    rl.close();
    await client.close();
  }
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    console.error(error instanceof Error ? `${error.name}: ${error.message}` : String(error));
    process.exitCode = 1;
  },
);
