//! `/v1/ws`: one WebSocket per client, many requests multiplexed by `id`.
//!
//! A reader loop parses frames and starts one task per request; every reply
//! goes through one bounded queue to one writer. A slow reader fills its own
//! queue, which pauses its own generations and nobody else's. Closing the
//! socket stops everything the connection started. While the server drains,
//! the reader keeps answering (new requests with `shutting_down`) until the
//! connection's running requests have finished; then the server closes it
//! with code 1001 (going away), reason `shutting_down`. When a reload revokes
//! the connection's key (or removes its tenant), the connection gets an
//! `unauthorized` error, its requests stop, and it closes with code 1008
//! (policy violation), reason `unauthorized`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use realm_models::chat::tools::ToolPiece;
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, watch};

use super::auth::{Denied, authenticate, bearer_key};
use super::http::error_response;
use super::keys::Verified;
use super::listen::{Peer, SlotHandle};
use super::protocol::{
    ApiError, ChatMessage, ClientFrame, ErrorCode, ServerFrame, frame_id, parse_frame,
};
use super::service::{CheckedGeneration, Generation, Input};
use super::state::{AppState, Runtime, TenantRuntime};
use super::tools::{call_json, tool_set};
use crate::pipeline::Pipeline;
use crate::sandbox::LoadedComponent;

/// Replies queued for a connection's writer.
const OUTBOX: usize = 256;
/// How long a connection without a key in its upgrade may take to send `auth`.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// The close reason of a connection the server drained.
const SHUTTING_DOWN: &str = "shutting_down";

/// Asks one request to stop: a generation sees the flag and ends with its
/// `done` frame; other work is dropped at its next await point.
#[derive(Clone, Default)]
struct CancelSignal {
    flag: Arc<AtomicBool>,
    notify: Arc<Notify>,
}

impl CancelSignal {
    fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
        // Stores a permit if the request is not waiting yet.
        self.notify.notify_one();
    }

    async fn cancelled(&self) {
        self.notify.notified().await;
    }
}

/// One running request: how to ask it to stop, and how to abort its task.
struct Entry {
    cancel: CancelSignal,
    task: tokio::task::AbortHandle,
}

/// Requests running on one connection, by id. An id stays taken until its
/// request's final frame is queued; watchers learn when none is left.
#[derive(Clone)]
struct Running(Arc<watch::Sender<HashMap<String, Entry>>>);

impl Running {
    fn new() -> Self {
        Running(Arc::new(watch::Sender::new(HashMap::new())))
    }

    fn contains(&self, id: &str) -> bool {
        self.0.borrow().contains_key(id)
    }

    /// Spawns `task` as request `id`, registered before it can finish.
    fn start(
        &self,
        id: String,
        cancel: CancelSignal,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.0.send_modify(|map| {
            let task = tokio::spawn(task).abort_handle();
            map.insert(id, Entry { cancel, task });
        });
    }

    /// Asks request `id` to stop; false if it is not running. The id stays
    /// taken until the request's final frame.
    fn cancel(&self, id: &str) -> bool {
        match self.0.borrow().get(id) {
            Some(entry) => {
                entry.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Queues request `id`'s final `frame` and frees the id in one step: the
    /// id is taken until the frame is queued, and free once a client can
    /// have read it.
    async fn finish(&self, id: &str, out: &mpsc::Sender<ServerFrame>, frame: ServerFrame) {
        let permit = out.reserve().await;
        self.0.send_modify(|map| {
            map.remove(id);
            if let Ok(permit) = permit {
                permit.send(frame);
            }
        });
    }

    /// Resolves once no request is running.
    async fn idle(&self) {
        let _ = self.0.subscribe().wait_for(HashMap::is_empty).await;
    }

    /// Stops every request (the client is gone): sets their flags and aborts
    /// their tasks, which drops pipelines and guest calls mid-way.
    fn abort_all(&self) {
        self.0.send_modify(|map| {
            for (_, entry) in map.drain() {
                entry.cancel.cancel();
                entry.task.abort();
            }
        });
    }
}

/// Upgrades to a WebSocket; a key in `Authorization` is checked first.
pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    Peer(peer): Peer,
    SlotHandle(slot): SlotHandle,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Err(error) = state.accepting() {
        return error_response(&error).into_response();
    }
    let verified = match bearer_key(&headers) {
        Some(key) => match authenticate(&state, key, peer.ip()).await {
            Ok(verified) => Some(verified),
            Err(denied) => return denied.response(),
        },
        None => None,
    };
    let max_frame = state.runtime().config.max_frame.0 as usize;
    // Frames up to 4x the limit are read and answered with `frame_too_large`;
    // beyond that the connection closes.
    ws.max_message_size(max_frame.saturating_mul(4))
        .on_upgrade(move |socket| async move {
            // The socket keeps its place in the connection caps while open.
            let _slot = slot;
            connection(state, socket, verified, peer.ip(), max_frame).await;
        })
}

async fn connection(
    state: Arc<AppState>,
    socket: WebSocket,
    verified: Option<Verified>,
    peer: std::net::IpAddr,
    max_frame: usize,
) {
    let _open = state.socket_opened();
    let (mut sink, mut stream) = socket.split();
    let (out, mut outbox) = mpsc::channel::<ServerFrame>(OUTBOX);
    let writer = tokio::spawn(async move {
        while let Some(frame) = outbox.recv().await {
            let text = serde_json::to_string(&frame).expect("frames serialize");
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
        }
        sink
    });
    let running = Running::new();
    let mut drained_here = false;
    let mut revoked_here = false;
    let mut reloads = state.reloads();

    let verified = match verified {
        Some(verified) => Some(verified),
        None => first_frame_auth(&state, &mut stream, &out, peer).await,
    };
    if let Some(verified) = verified {
        let tenant = verified.tenant.clone();
        let _ = out
            .send(ServerFrame::Ready {
                tenant: tenant.clone(),
            })
            .await;
        loop {
            let message = tokio::select! {
                message = stream.next() => message,
                () = drained(&state, &running) => {
                    drained_here = true;
                    break;
                }
                Ok(()) = reloads.changed() => {
                    // A reload may have revoked this connection's key.
                    if state.runtime().keys.holds(&verified) {
                        continue;
                    }
                    tracing::warn!(%peer, %tenant, "closing a connection whose key a reload revoked");
                    let error = ApiError::new(ErrorCode::Unauthorized, "this connection's API key was revoked");
                    state.count_error(&tenant, &error);
                    let _ = out.send(ServerFrame::error(None, error)).await;
                    revoked_here = true;
                    break;
                }
            };
            let Some(Ok(message)) = message else { break };
            match read(message, max_frame) {
                Read::Frame(frame) => dispatch(&state, &tenant, frame, &out, &running).await,
                Read::Refused(id, error) => {
                    state.count_error(&tenant, &error);
                    let _ = out.send(ServerFrame::error(id, error)).await;
                }
                Read::Skip => {}
                Read::Close => break,
            }
        }
    }
    // The client is gone, or the server drained this connection: stop what is left.
    running.abort_all();
    drop(out);
    if let Ok(mut sink) = writer.await {
        let close = if drained_here {
            Some((close_code::AWAY, SHUTTING_DOWN))
        } else if revoked_here {
            Some((close_code::POLICY, "unauthorized"))
        } else {
            None
        };
        if let Some((code, reason)) = close {
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            let _ = sink.send(Message::Close(Some(frame))).await;
        }
        let _ = sink.close().await;
    }
}

/// Resolves once the server drains and this connection has nothing running.
async fn drained(state: &AppState, running: &Running) {
    state.drained().await;
    running.idle().await;
}

/// What one incoming message is.
enum Read {
    /// A request frame, parsed.
    Frame(ClientFrame),
    /// A frame that could not be read; answered with this error (and the
    /// frame's id if it could be read).
    Refused(Option<String>, ApiError),
    /// A ping, pong or other control message.
    Skip,
    /// The client closes the connection.
    Close,
}

fn read(message: Message, max_frame: usize) -> Read {
    let text = match message {
        Message::Text(text) => text,
        Message::Binary(bytes) => {
            let id = std::str::from_utf8(&bytes).ok().and_then(frame_id);
            let error = ApiError::new(ErrorCode::BadRequest, "frames are JSON text, not binary");
            return Read::Refused(id, error);
        }
        Message::Close(_) => return Read::Close,
        _ => return Read::Skip,
    };
    if text.len() > max_frame {
        let error = ApiError::new(
            ErrorCode::FrameTooLarge,
            format!(
                "the frame has {} bytes; the limit is {max_frame}",
                text.len()
            ),
        );
        // At most 4x `max-frame` (the socket's message limit): bounded work.
        return Read::Refused(frame_id(&text), error);
    }
    match parse_frame(&text) {
        Ok(frame) => Read::Frame(frame),
        Err((id, error)) => Read::Refused(id, error),
    }
}

async fn first_frame_auth(
    state: &AppState,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    out: &mpsc::Sender<ServerFrame>,
    peer: std::net::IpAddr,
) -> Option<Verified> {
    let refuse = |id: Option<String>, message: &str| {
        ServerFrame::error(id, ApiError::new(ErrorCode::Unauthorized, message))
    };
    let first = tokio::time::timeout(AUTH_TIMEOUT, stream.next()).await;
    let Ok(Some(Ok(Message::Text(text)))) = first else {
        let _ = out
            .send(refuse(
                None,
                "send an `auth` frame (or an Authorization header) first",
            ))
            .await;
        return None;
    };
    match parse_frame(&text) {
        Ok(ClientFrame::Auth { key }) => match authenticate(state, &key, peer).await {
            Ok(verified) => Some(verified),
            Err(Denied::Invalid) => {
                let _ = out.send(refuse(None, "invalid API key")).await;
                None
            }
            Err(denied) => {
                let _ = out.send(ServerFrame::error(None, denied.error())).await;
                None
            }
        },
        other => {
            let id = match other {
                Ok(frame) => frame.id().map(str::to_string),
                Err((id, _)) => id,
            };
            let _ = out.send(refuse(id, "the first frame must be `auth`")).await;
            None
        }
    }
}

/// What a request frame asks for, not yet checked.
enum Ask {
    Generation {
        request: Box<Generation>,
        stream: bool,
    },
    Pipeline {
        name: String,
        inputs: Map<String, Value>,
    },
    Invoke {
        request: Value,
    },
    Models,
}

/// A request's work, checked against the tenant's permissions.
enum Work {
    Generation {
        request: CheckedGeneration,
        stream: bool,
    },
    Pipeline {
        pipeline: Arc<Pipeline>,
        inputs: Map<String, Value>,
    },
    Invoke {
        component: LoadedComponent,
        request: Value,
    },
    Models,
}

impl Ask {
    /// The request kind, as metrics label it.
    fn kind(&self) -> &'static str {
        match self {
            Ask::Generation { request, .. } => match request.input {
                Input::Prompt(_) => "generate",
                Input::Chat(_) => "chat",
            },
            Ask::Pipeline { .. } => "pipeline",
            Ask::Invoke { .. } => "invoke",
            Ask::Models => "models",
        }
    }

    /// Validates the request (model, sampling, pipeline, component); nothing
    /// is charged to the tenant yet.
    fn check(self, runtime: &Runtime, tenant: &TenantRuntime) -> Result<Work, ApiError> {
        Ok(match self {
            Ask::Generation { request, stream } => Work::Generation {
                request: request.check(runtime, tenant)?,
                stream,
            },
            Ask::Pipeline { name, inputs } => Work::Pipeline {
                pipeline: tenant.pipeline(&name)?,
                inputs,
            },
            Ask::Invoke { request } => Work::Invoke {
                component: tenant.own_component()?.clone(),
                request,
            },
            Ask::Models => Work::Models,
        })
    }
}

/// How one frame is handled.
enum Handling {
    /// Answered at once (`auth`, `ping`, `cancel`).
    Answer(ServerFrame),
    /// A request to check and start.
    Start { id: String, ask: Box<Ask> },
}

/// Answers a control frame, or splits a request frame into its id and ask.
fn handling(frame: ClientFrame, running: &Running) -> Handling {
    let generation =
        |(model, adapter), input, max_tokens, sampling, stop, format, tools| Generation {
            model,
            adapter,
            input,
            max_tokens,
            sampling,
            stop,
            format,
            tools,
        };
    let (id, ask) = match frame {
        ClientFrame::Auth { .. } => {
            let error = ApiError::new(
                ErrorCode::BadRequest,
                "the connection is already authenticated",
            );
            return Handling::Answer(ServerFrame::error(None, error));
        }
        // A ping must not answer under the id of a running request: a
        // client would take the pong for that request's end.
        ClientFrame::Ping { id } if running.contains(&id) => {
            let error = ApiError::new(
                ErrorCode::DuplicateId,
                format!("request `{id}` is still running on this connection"),
            );
            return Handling::Answer(ServerFrame::error(Some(id), error));
        }
        ClientFrame::Ping { id } => return Handling::Answer(ServerFrame::Pong { id }),
        ClientFrame::Cancel { id, target } => {
            let found = running.cancel(&target);
            return Handling::Answer(ServerFrame::Cancelled { id, target, found });
        }
        ClientFrame::Generate {
            id,
            model,
            adapter,
            prompt,
            max_tokens,
            sampling,
            stop,
            stream,
            response_format,
        } => {
            let (named, input) = ((model, adapter), Input::Prompt(prompt));
            let format = response_format.map(|f| *f);
            let request = generation(named, input, max_tokens, sampling, stop, format, None);
            let request = Box::new(request);
            (id, Ask::Generation { request, stream })
        }
        ClientFrame::Chat {
            id,
            model,
            adapter,
            messages,
            max_tokens,
            sampling,
            stop,
            stream,
            response_format,
            tools,
            tool_choice,
            parallel_tool_calls,
        } => {
            let read = messages
                .into_iter()
                .map(ChatMessage::into_engine)
                .collect::<Result<Vec<_>, _>>()
                .and_then(|messages| {
                    let choice = tool_choice.map(|c| *c);
                    Ok((messages, tool_set(tools, choice, parallel_tool_calls)?))
                });
            let (messages, tools) = match read {
                Ok(read) => read,
                Err(e) => return Handling::Answer(ServerFrame::error(Some(id), e)),
            };
            let (named, input) = ((model, adapter), Input::Chat(messages));
            let format = response_format.map(|f| *f);
            let request = generation(named, input, max_tokens, sampling, stop, format, tools);
            let request = Box::new(request);
            (id, Ask::Generation { request, stream })
        }
        ClientFrame::Pipeline {
            id,
            pipeline,
            inputs,
        } => (
            id,
            Ask::Pipeline {
                name: pipeline,
                inputs,
            },
        ),
        ClientFrame::Invoke { id, request } => (id, Ask::Invoke { request }),
        ClientFrame::Models { id } => (id, Ask::Models),
    };
    Handling::Start {
        id,
        ask: Box::new(ask),
    }
}

/// Answers one frame, or starts the request it asks for.
async fn dispatch(
    state: &Arc<AppState>,
    tenant_id: &str,
    frame: ClientFrame,
    out: &mpsc::Sender<ServerFrame>,
    running: &Running,
) {
    // Control frames need no tenant: a connection whose tenant a reload
    // removed can still ping and cancel what it started.
    let (id, ask) = match handling(frame, running) {
        Handling::Start { id, ask } => (id, *ask),
        Handling::Answer(reply) => {
            let _ = out.send(reply).await;
            return;
        }
    };
    let runtime = state.runtime();
    let Some(tenant) = runtime.tenants.get(tenant_id).cloned() else {
        let error = ApiError::new(ErrorCode::Unauthorized, "this tenant no longer exists");
        state.count_error(tenant_id, &error);
        let _ = out.send(ServerFrame::error(Some(id), error)).await;
        return;
    };
    if let Err(error) = start(state, &runtime, &tenant, id.clone(), ask, out, running).await {
        state.count_error(tenant_id, &error);
        let _ = out.send(ServerFrame::error(Some(id), error)).await;
    }
}

/// Validates request `id`, charges it to the tenant's request rate, and
/// starts it. Validation comes first, so a refused request costs nothing.
async fn start(
    state: &Arc<AppState>,
    runtime: &Arc<Runtime>,
    tenant: &Arc<TenantRuntime>,
    id: String,
    ask: Ask,
    out: &mpsc::Sender<ServerFrame>,
    running: &Running,
) -> Result<(), ApiError> {
    state.accepting()?;
    if running.contains(&id) {
        return Err(ApiError::new(
            ErrorCode::DuplicateId,
            format!("request `{id}` is still running on this connection"),
        ));
    }
    let kind = ask.kind();
    let work = ask.check(runtime, tenant)?;
    state.admit(tenant, kind).await?;
    let cancel = CancelSignal::default();
    let task = run_request(
        Context {
            state: state.clone(),
            runtime: runtime.clone(),
            tenant: tenant.clone(),
            out: out.clone(),
            running: running.clone(),
        },
        id.clone(),
        work,
        cancel.clone(),
    );
    running.start(id, cancel, task);
    Ok(())
}

/// What a request's task works with.
struct Context {
    state: Arc<AppState>,
    runtime: Arc<Runtime>,
    tenant: Arc<TenantRuntime>,
    out: mpsc::Sender<ServerFrame>,
    running: Running,
}

async fn run_request(cx: Context, id: String, work: Work, cancel: CancelSignal) {
    let result = match work {
        Work::Generation { request, stream } => {
            generation(&cx, &id, request, stream, cancel.flag).await
        }
        Work::Pipeline { pipeline, inputs } => {
            let run = cx.state.run_pipeline(&cx.tenant, &pipeline, inputs);
            unless_cancelled(&cancel, run)
                .await
                .map(|output| ServerFrame::Result {
                    id: id.clone(),
                    output,
                })
        }
        Work::Invoke { component, request } => {
            let run = cx
                .state
                .invoke(&cx.runtime, &cx.tenant, &component, &request);
            unless_cancelled(&cancel, run)
                .await
                .map(|output| ServerFrame::Result {
                    id: id.clone(),
                    output,
                })
        }
        Work::Models => Ok(ServerFrame::Models {
            id: id.clone(),
            models: cx.state.models_of(&cx.runtime, &cx.tenant),
        }),
    };
    let frame = result.unwrap_or_else(|error| {
        cx.state.count_error(&cx.tenant.id, &error);
        ServerFrame::error(Some(id.clone()), error)
    });
    cx.running.finish(&id, &cx.out, frame).await;
}

/// Runs `work` unless `cancel` fires first: then `work` is dropped, which
/// stops its guest calls (and the generations they started) at their next
/// await point, and the request ends with a `cancelled` error.
async fn unless_cancelled<T>(
    cancel: &CancelSignal,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::select! {
        result = work => result,
        () = cancel.cancelled() => Err(ApiError::new(
            ErrorCode::Cancelled,
            "the request was cancelled",
        )),
    }
}

/// Runs a generation, forwarding its pieces as `token` frames when streaming.
async fn generation(
    cx: &Context,
    id: &str,
    request: CheckedGeneration,
    stream: bool,
    cancel: Arc<AtomicBool>,
) -> Result<ServerFrame, ApiError> {
    let request = cx.state.admit_generation(&cx.tenant, request).await?;
    let (pieces, forward) = if stream {
        let (tx, mut rx) = mpsc::channel::<ToolPiece>(1);
        let out = cx.out.clone();
        let id = id.to_string();
        let forward = tokio::spawn(async move {
            while let Some(piece) = rx.recv().await {
                let frame = match piece {
                    ToolPiece::Text(text) => ServerFrame::Token {
                        id: id.clone(),
                        text,
                    },
                    ToolPiece::Call(call) => ServerFrame::ToolCall {
                        id: id.clone(),
                        call: call_json(&call),
                    },
                };
                if out.send(frame).await.is_err() {
                    break;
                }
            }
        });
        (Some(tx), Some(forward))
    } else {
        (None, None)
    };
    let finished = cx.state.generate(&cx.tenant, request, pieces, cancel).await;
    if let Some(forward) = forward {
        // Every token frame is queued before the `done` frame.
        let _ = forward.await;
    }
    let finished = finished?;
    Ok(ServerFrame::Done {
        id: id.to_string(),
        text: finished.text,
        tool_calls: finished.tool_calls.iter().map(call_json).collect(),
        usage: finished.usage,
        finish: finished.finish,
    })
}
