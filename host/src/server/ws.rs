//! `/v1/ws`: one WebSocket per client, many requests multiplexed by `id`.
//!
//! A reader loop parses frames and starts one task per request; every reply
//! goes through one bounded queue to one writer. A slow reader fills its own
//! queue, which pauses its own generations and nobody else's. Closing the
//! socket cancels everything the connection started.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::auth::{authenticate, bearer_key, unauthorized};
use super::protocol::{ApiError, ClientFrame, ErrorCode, ServerFrame, parse_frame};
use super::service::{Generation, Input};
use super::state::{AppState, TenantRuntime};

/// Replies queued for a connection's writer.
const OUTBOX: usize = 256;
/// How long a connection without a key in its upgrade may take to send `auth`.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests running on one connection, by id.
type Running = Arc<Mutex<HashMap<String, Request>>>;

struct Request {
    cancel: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

/// Upgrades to a WebSocket; a key in `Authorization` is checked first.
pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let tenant = match bearer_key(&headers) {
        Some(key) => match authenticate(&state, key).await {
            Some(tenant) => Some(tenant),
            None => return unauthorized().into_response(),
        },
        None => None,
    };
    let max_frame = state.runtime().config.max_frame.0 as usize;
    // Frames up to 4x the limit are read and answered with `frame_too_large`;
    // beyond that the connection closes.
    ws.max_message_size(max_frame.saturating_mul(4))
        .on_upgrade(move |socket| connection(state, socket, tenant, max_frame))
}

async fn connection(
    state: Arc<AppState>,
    socket: WebSocket,
    tenant: Option<String>,
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
        let _ = sink.close().await;
    });
    let running: Running = Arc::default();

    let tenant = match tenant {
        Some(tenant) => Some(tenant),
        None => first_frame_auth(&state, &mut stream, &out).await,
    };
    if let Some(tenant) = tenant {
        let _ = out
            .send(ServerFrame::Ready {
                tenant: tenant.clone(),
            })
            .await;
        loop {
            let message = tokio::select! {
                message = stream.next() => message,
                () = state.drained() => break,
            };
            let Some(Ok(message)) = message else { break };
            let text = match message {
                Message::Text(text) => text,
                Message::Binary(_) => {
                    let _ = out
                        .send(ServerFrame::error(
                            None,
                            ApiError::new(
                                ErrorCode::BadRequest,
                                "frames are JSON text, not binary",
                            ),
                        ))
                        .await;
                    continue;
                }
                Message::Close(_) => break,
                _ => continue,
            };
            if text.len() > max_frame {
                let error = ApiError::new(
                    ErrorCode::FrameTooLarge,
                    format!(
                        "the frame has {} bytes; the limit is {max_frame}",
                        text.len()
                    ),
                );
                state.count_error(&tenant, &error);
                let _ = out.send(ServerFrame::error(None, error)).await;
                continue;
            }
            match parse_frame(&text) {
                Ok(frame) => dispatch(&state, &tenant, frame, &out, &running).await,
                Err((id, error)) => {
                    state.count_error(&tenant, &error);
                    let _ = out.send(ServerFrame::error(id, error)).await;
                }
            }
        }
    }
    if state.is_draining() {
        // Shutting down: let what is running finish (the server bounds the wait).
        while !running.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The client is gone (or everything finished): stop what is left.
    for (_, request) in running.lock().unwrap_or_else(|e| e.into_inner()).drain() {
        request.cancel.store(true, Ordering::Relaxed);
        request.task.abort();
    }
    drop(out);
    let _ = writer.await;
}

async fn first_frame_auth(
    state: &AppState,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    out: &mpsc::Sender<ServerFrame>,
) -> Option<String> {
    let refuse =
        |message: &str| ServerFrame::error(None, ApiError::new(ErrorCode::Unauthorized, message));
    let first = tokio::time::timeout(AUTH_TIMEOUT, stream.next()).await;
    let Ok(Some(Ok(Message::Text(text)))) = first else {
        let _ = out
            .send(refuse(
                "send an `auth` frame (or an Authorization header) first",
            ))
            .await;
        return None;
    };
    match parse_frame(&text) {
        Ok(ClientFrame::Auth { key }) => match authenticate(state, &key).await {
            Some(tenant) => Some(tenant),
            None => {
                let _ = out.send(refuse("invalid API key")).await;
                None
            }
        },
        _ => {
            let _ = out.send(refuse("the first frame must be `auth`")).await;
            None
        }
    }
}

/// Starts or answers one request.
async fn dispatch(
    state: &Arc<AppState>,
    tenant_id: &str,
    frame: ClientFrame,
    out: &mpsc::Sender<ServerFrame>,
    running: &Running,
) {
    let runtime = state.runtime();
    let Some(tenant) = runtime.tenants.get(tenant_id).cloned() else {
        let _ = out
            .send(ServerFrame::error(
                None,
                ApiError::new(ErrorCode::Unauthorized, "this tenant no longer exists"),
            ))
            .await;
        return;
    };
    let (id, kind) = match &frame {
        ClientFrame::Auth { .. } => {
            let error = ApiError::new(
                ErrorCode::BadRequest,
                "the connection is already authenticated",
            );
            let _ = out.send(ServerFrame::error(None, error)).await;
            return;
        }
        ClientFrame::Ping { id } => {
            let _ = out.send(ServerFrame::Pong { id: id.clone() }).await;
            return;
        }
        ClientFrame::Cancel { id, target } => {
            let found = match running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(target)
            {
                Some(request) => {
                    request.cancel.store(true, Ordering::Relaxed);
                    true
                }
                None => false,
            };
            let _ = out
                .send(ServerFrame::Cancelled {
                    id: id.clone(),
                    target: target.clone(),
                    found,
                })
                .await;
            return;
        }
        ClientFrame::Generate { id, .. } => (id.clone(), "generate"),
        ClientFrame::Chat { id, .. } => (id.clone(), "chat"),
        ClientFrame::Pipeline { id, .. } => (id.clone(), "pipeline"),
        ClientFrame::Invoke { id, .. } => (id.clone(), "invoke"),
        ClientFrame::Models { id } => (id.clone(), "models"),
    };
    if let Err(error) = state.admit(&tenant, kind) {
        state.count_error(tenant_id, &error);
        let _ = out.send(ServerFrame::error(Some(id), error)).await;
        return;
    }
    let duplicate = running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(&id);
    if duplicate {
        let error = ApiError::new(
            ErrorCode::DuplicateId,
            format!("request `{id}` is still running on this connection"),
        );
        state.count_error(tenant_id, &error);
        let _ = out.send(ServerFrame::error(Some(id), error)).await;
        return;
    }
    let cancel = Arc::new(AtomicBool::new(false));
    // Registered before the task can finish (it unregisters itself under this lock).
    let mut map = running.lock().unwrap_or_else(|e| e.into_inner());
    let task = tokio::spawn(run_request(
        state.clone(),
        runtime.clone(),
        tenant,
        frame,
        out.clone(),
        cancel.clone(),
        running.clone(),
    ));
    map.insert(
        id,
        Request {
            cancel,
            task: task.abort_handle(),
        },
    );
}

async fn run_request(
    state: Arc<AppState>,
    runtime: Arc<super::state::Runtime>,
    tenant: Arc<TenantRuntime>,
    frame: ClientFrame,
    out: mpsc::Sender<ServerFrame>,
    cancel: Arc<AtomicBool>,
    running: Running,
) {
    let frame = match generation_of(frame) {
        Ok((id, request, stream)) => {
            let result = generation(
                &state, &runtime, &tenant, &id, request, stream, &out, cancel,
            )
            .await;
            finish(&state, &tenant, &running, &out, id, result).await;
            return;
        }
        Err(frame) => frame,
    };
    let (id, result) = match *frame {
        ClientFrame::Pipeline {
            id,
            pipeline,
            inputs,
        } => {
            let result = state
                .run_pipeline(&tenant, &pipeline, inputs)
                .await
                .map(|output| ServerFrame::Result {
                    id: id.clone(),
                    output,
                });
            (id, result)
        }
        ClientFrame::Invoke { id, request } => {
            let result = state
                .invoke(&runtime, &tenant, &request)
                .await
                .map(|output| ServerFrame::Result {
                    id: id.clone(),
                    output,
                });
            (id, result)
        }
        ClientFrame::Models { id } => {
            let models = state.models_of(&runtime, &tenant);
            (id.clone(), Ok(ServerFrame::Models { id, models }))
        }
        ClientFrame::Generate { .. }
        | ClientFrame::Chat { .. }
        | ClientFrame::Auth { .. }
        | ClientFrame::Ping { .. }
        | ClientFrame::Cancel { .. } => {
            unreachable!("answered by dispatch or generation_of")
        }
    };
    finish(&state, &tenant, &running, &out, id, result).await;
}

/// The generation a `generate` or `chat` frame asks for, with the request id
/// and whether to stream; any other frame comes back unchanged.
fn generation_of(frame: ClientFrame) -> Result<(String, Generation, bool), Box<ClientFrame>> {
    let (id, model, input, max_tokens, sampling, stop, stream) = match frame {
        ClientFrame::Generate {
            id,
            model,
            prompt,
            max_tokens,
            sampling,
            stop,
            stream,
        } => (
            id,
            model,
            Input::Prompt(prompt),
            max_tokens,
            sampling,
            stop,
            stream,
        ),
        ClientFrame::Chat {
            id,
            model,
            messages,
            max_tokens,
            sampling,
            stop,
            stream,
        } => (
            id,
            model,
            Input::Chat(messages),
            max_tokens,
            sampling,
            stop,
            stream,
        ),
        other => return Err(Box::new(other)),
    };
    let request = Generation {
        model,
        input,
        max_tokens,
        sampling,
        stop,
    };
    Ok((id, request, stream))
}

/// Unregisters request `id` and sends its final frame (or its error).
async fn finish(
    state: &AppState,
    tenant: &TenantRuntime,
    running: &Running,
    out: &mpsc::Sender<ServerFrame>,
    id: String,
    result: Result<ServerFrame, ApiError>,
) {
    running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    let frame = result.unwrap_or_else(|error| {
        state.count_error(&tenant.id, &error);
        ServerFrame::error(Some(id), error)
    });
    let _ = out.send(frame).await;
}

/// Runs a generation, forwarding its pieces as `token` frames when streaming.
#[allow(clippy::too_many_arguments)]
async fn generation(
    state: &AppState,
    runtime: &super::state::Runtime,
    tenant: &TenantRuntime,
    id: &str,
    request: Generation,
    stream: bool,
    out: &mpsc::Sender<ServerFrame>,
    cancel: Arc<AtomicBool>,
) -> Result<ServerFrame, ApiError> {
    let (pieces, forward) = if stream {
        let (tx, mut rx) = mpsc::channel::<String>(1);
        let out = out.clone();
        let id = id.to_string();
        let forward = tokio::spawn(async move {
            while let Some(text) = rx.recv().await {
                if out
                    .send(ServerFrame::Token {
                        id: id.clone(),
                        text,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        (Some(tx), Some(forward))
    } else {
        (None, None)
    };
    let finished = state
        .generate(runtime, tenant, request, pieces, cancel)
        .await;
    if let Some(forward) = forward {
        // Every token frame is queued before the `done` frame.
        let _ = forward.await;
    }
    let finished = finished?;
    Ok(ServerFrame::Done {
        id: id.to_string(),
        text: finished.text,
        usage: finished.usage,
        finish: finished.finish,
    })
}
