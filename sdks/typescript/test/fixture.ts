/**
 * Test fixture: a real `realm-host serve` process on a temporary config.
 *
 * Environment:
 * - `REALM_HOST_BIN`: the binary (default `${CARGO_TARGET_DIR:-<repo>/target}/debug/realm-host`).
 * - `REALM_TEST_MODEL`: the `.gguf` served as model `small`
 *   (default `~/.realm/models/smollm2-135m-instruct.gguf`).
 */

import { type ChildProcess, execFile, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { homedir, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const run = promisify(execFile);

/** The repository root (this file runs from sdks/typescript/build/test/). */
export const REPO = resolve(fileURLToPath(new URL("../../../../", import.meta.url)));

/** The `realm-host` binary the tests run. */
export function realmHostBin(): string {
  const fromEnv = process.env.REALM_HOST_BIN;
  if (fromEnv !== undefined && fromEnv !== "") {
    return resolve(fromEnv);
  }
  const target = process.env.CARGO_TARGET_DIR;
  return join(target !== undefined && target !== "" ? resolve(REPO, target) : join(REPO, "target"), "debug", "realm-host");
}

/** The model file served as `small`. */
export function testModel(): string {
  const fromEnv = process.env.REALM_TEST_MODEL;
  return fromEnv !== undefined && fromEnv !== ""
    ? resolve(fromEnv)
    : join(homedir(), ".realm", "models", "smollm2-135m-instruct.gguf");
}

/** A guest component built by the Rust workspace (guests/rust). */
export function guest(name: string): string {
  return join(REPO, "guests", "rust", "target", "wasm32-wasip2", "release", `${name}.wasm`);
}

/** What a test server needs. */
export interface ServerSpec {
  /** Tenant id → the TOML lines of its table (keys are added by `realm-host keys new`). */
  tenants: Record<string, string>;
  /** Whether to load the test model as `small` (default true). */
  model?: boolean;
}

const running = new Set<ChildProcess>();
process.on("exit", () => {
  for (const child of running) {
    child.kill("SIGKILL");
  }
});

/** A `realm-host serve` process. */
export class RealmServer {
  /** `host:port` it listens on. */
  addr = "";
  /** Tenant id → its API key. */
  readonly keys: Record<string, string> = {};
  #child: ChildProcess | undefined;
  #exited: Promise<void> = Promise.resolve();
  #log = "";

  private constructor(
    readonly dir: string,
    readonly config: string,
    readonly home: string,
  ) {}

  /** Writes a config for `spec`, makes a key per tenant, and starts the server. */
  static async start(spec: ServerSpec): Promise<RealmServer> {
    const bin = realmHostBin();
    if (!existsSync(bin)) {
      throw new Error(
        `realm-host not found at ${bin}: build it (cargo build -p realm-host) or set REALM_HOST_BIN`,
      );
    }
    // A drain-timeout long enough for a test's generations to finish while draining.
    const lines = ['listen = "127.0.0.1:0"', 'drain-timeout = "10s"'];
    if (spec.model ?? true) {
      const model = testModel();
      if (!existsSync(model)) {
        throw new Error(
          `test model not found at ${model}: run \`realm-host models pull smollm2-135m-instruct\` or set REALM_TEST_MODEL`,
        );
      }
      lines.push("[models]", `small = ${JSON.stringify(model)}`);
    }
    for (const [tenant, table] of Object.entries(spec.tenants)) {
      lines.push(`[tenants.${tenant}]`, table);
    }
    const dir = await mkdtemp(join(tmpdir(), "realm-sdk-ts-"));
    const home = join(dir, "home");
    await mkdir(home);
    const config = join(dir, "realm.toml");
    await writeFile(config, `${lines.join("\n")}\n`);
    const server = new RealmServer(dir, config, home);
    for (const tenant of Object.keys(spec.tenants)) {
      server.keys[tenant] = await server.newKey(tenant);
    }
    await server.spawn();
    return server;
  }

  /** `realm-host keys new` for `tenant` (adds its hash to the config); returns the key. */
  async newKey(tenant: string): Promise<string> {
    try {
      const { stdout } = await run(realmHostBin(), ["keys", "new", "--tenant", tenant, "--config", this.config], {
        env: this.#env(),
      });
      const key = stdout.trim();
      if (!key.startsWith(`rk_${tenant}_`)) {
        throw new Error(`unexpected key output: ${stdout}`);
      }
      return key;
    } catch (error) {
      throw new Error(`realm-host keys new --tenant ${tenant} failed: ${String(error)}`);
    }
  }

  /** Replaces every key of `tenant` with a new one (takes effect at the next start). */
  async rotateKey(tenant: string): Promise<string> {
    const lines = (await readFile(this.config, "utf8")).split("\n");
    let inTable = false;
    let removed = 0;
    const kept = lines.filter((line) => {
      if (/^\s*\[/.test(line)) {
        inTable = line.trim() === `[tenants.${tenant}]`;
      } else if (inTable && /^\s*api-keys\s*=/.test(line)) {
        removed += 1;
        return false;
      }
      return true;
    });
    if (removed === 0) {
      throw new Error(`no api-keys line for tenant ${tenant} in ${this.config}:\n${lines.join("\n")}`);
    }
    await writeFile(this.config, kept.join("\n"));
    const key = await this.newKey(tenant);
    this.keys[tenant] = key;
    return key;
  }

  /** `ws://host:port`. */
  get url(): string {
    return `ws://${this.addr}`;
  }

  /** Everything the server wrote to stderr so far. */
  get log(): string {
    return this.#log;
  }

  /** Starts (or restarts) the process; a restart listens on the same port. */
  async spawn(): Promise<void> {
    if (this.#child !== undefined) {
      throw new Error("the server is already running");
    }
    if (this.addr !== "") {
      // Restart on the port clients know.
      const text = await readFile(this.config, "utf8");
      await writeFile(this.config, text.replace(/^listen = .*$/m, `listen = ${JSON.stringify(this.addr)}`));
    }
    const child = spawn(realmHostBin(), ["serve", "--config", this.config], {
      env: this.#env(),
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.#child = child;
    running.add(child);
    this.#exited = new Promise((resolveExit) => {
      child.once("exit", () => {
        running.delete(child);
        if (this.#child === child) this.#child = undefined;
        resolveExit();
      });
    });
    const addr = await new Promise<string>((resolveAddr, reject) => {
      const timer = setTimeout(() => reject(new Error(`realm-host did not listen within 120 s:\n${this.#log}`)), 120_000);
      let buffered = "";
      child.stderr?.setEncoding("utf8");
      child.stderr?.on("data", (chunk: string) => {
        this.#log += chunk;
        buffered += chunk;
        // Only whole lines: a chunk may end in the middle of the address.
        const lines = buffered.split("\n");
        buffered = lines.pop() ?? "";
        for (const line of lines) {
          const match = /listening on http:\/\/(\S+)/.exec(line);
          if (match?.[1] !== undefined) {
            clearTimeout(timer);
            resolveAddr(match[1]);
          }
        }
      });
      child.once("error", (error) => {
        clearTimeout(timer);
        reject(new Error(`cannot start ${realmHostBin()}: ${error.message}`));
      });
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`realm-host serve exited (${code ?? signal}) before listening:\n${this.#log}`));
      });
    });
    this.addr = addr;
  }

  /**
   * SIGTERM, then waits until the process has drained and exited (the
   * directory is kept, so {@link spawn} can restart it).
   */
  async terminate(): Promise<void> {
    this.#child?.kill("SIGTERM");
    await this.#exited;
  }

  /** Resolves once the server's log contains `text` (polling; fails after `ms`). */
  async logged(text: string, times = 1, ms = 30_000): Promise<void> {
    const deadline = Date.now() + ms;
    while (this.#log.split(text).length - 1 < times) {
      if (Date.now() > deadline) {
        throw new Error(`the server did not log ${JSON.stringify(text)} ${times}x within ${ms} ms:\n${this.#log}`);
      }
      await sleep(20);
    }
  }

  /** Rewrites the config with `edit` and reloads it (SIGHUP); resolves once reloaded. */
  async reload(edit: (config: string) => string): Promise<void> {
    const times = this.#log.split("configuration reloaded").length;
    await writeFile(this.config, edit(await readFile(this.config, "utf8")));
    this.#child?.kill("SIGHUP");
    await this.logged("configuration reloaded", times);
  }

  /** SIGKILL: the process dies without closing its connections cleanly. */
  async kill(): Promise<void> {
    this.#child?.kill("SIGKILL");
    await this.#exited;
  }

  /** SIGTERM, SIGKILL after 5 s; then removes the temporary directory. */
  async stop(): Promise<void> {
    const child = this.#child;
    if (child !== undefined) {
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
      await this.#exited;
      clearTimeout(timer);
    }
    await rm(this.dir, { recursive: true, force: true });
  }

  #env(): NodeJS.ProcessEnv {
    const env: NodeJS.ProcessEnv = { ...process.env, REALM_HOME: this.home };
    delete env.RUST_LOG;
    return env;
  }
}

/** Resolves after `ms`. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Collects a generation's pieces and its result. */
export async function drain(gen: AsyncIterable<string> & { result(): Promise<import("realm-client").Completion> }) {
  const pieces: string[] = [];
  for await (const piece of gen) {
    pieces.push(piece);
  }
  return { pieces, completion: await gen.result() };
}
