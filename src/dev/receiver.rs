//! A webhook receiver on 127.0.0.1 for tests and local trials of the effects outbox.
//!
//! It records every request, verifies its Standard Webhooks signature when it has a secret,
//! and answers 200 unless told otherwise: [`Receiver::respond_with`] scripts the status of
//! the next requests, [`Receiver::redirect_to`] their redirects and [`Receiver::delay_next`]
//! how long they wait. It never reaches beyond loopback.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// `webhook-id` (empty if missing).
    pub id: String,
    /// `webhook-timestamp` (0 if missing or not a number).
    pub timestamp: i64,
    pub method: String,
    pub path: String,
    /// The body as JSON (`Null` if it is not JSON).
    pub body: serde_json::Value,
    pub raw: Bytes,
    /// The signature verified against the receiver's secret (false when it has none).
    pub signature_ok: bool,
    pub headers: HeaderMap,
}

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub location: Option<String>,
    pub delay: Duration,
}

impl Default for Reply {
    fn default() -> Self {
        Self { status: 200, location: None, delay: Duration::ZERO }
    }
}

struct Shared {
    signer: Option<standardwebhooks::Webhook>,
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<Reply>>,
}

/// A running receiver; it stops when dropped.
pub struct Receiver {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Listen on 127.0.0.1 on a free port; with `secret` (`whsec_…`), verify every signature.
    pub async fn start(secret: Option<&str>) -> Receiver {
        let signer = secret.map(|s| standardwebhooks::Webhook::new(s.trim()).expect("a whsec_ secret"));
        let shared = Arc::new(Shared { signer, received: Mutex::default(), script: Mutex::default() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let app = Router::new().fallback(receive).with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, shared, server }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        self.shared.received.lock().expect("receiver lock").clone()
    }

    /// The distinct `webhook-id`s so far, in order of first arrival: the effects a receiver
    /// that dedupes on the id would have applied.
    pub fn distinct_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for r in self.requests() {
            if !ids.contains(&r.id) {
                ids.push(r.id);
            }
        }
        ids
    }

    /// Wait until at least `n` requests have arrived (panics after `timeout`).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            assert!(tokio::time::Instant::now() < end, "the receiver got {} requests in {timeout:?}, expected {n}", got.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Answer the next `times` requests (after those already scripted) with `reply`.
    pub fn script(&self, reply: Reply, times: usize) {
        let mut s = self.shared.script.lock().expect("receiver lock");
        s.extend(std::iter::repeat_n(reply, times));
    }

    /// Answer the next `times` requests with `status`.
    pub fn respond_with(&self, status: u16, times: usize) {
        self.script(Reply { status, ..Reply::default() }, times);
    }

    /// Answer the next `times` requests with a 307 (the POST is repeated) to `location`.
    pub fn redirect_to(&self, location: &str, times: usize) {
        self.script(Reply { status: 307, location: Some(location.to_string()), ..Reply::default() }, times);
    }

    /// Answer the next `times` requests with 200 only after `delay`.
    pub fn delay_next(&self, delay: Duration, times: usize) {
        self.script(Reply { delay, ..Reply::default() }, times);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(State(shared): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let received = Received {
        id: text(standardwebhooks::HEADER_WEBHOOK_ID),
        timestamp: text(standardwebhooks::HEADER_WEBHOOK_TIMESTAMP).parse().unwrap_or(0),
        method: method.to_string(),
        path: uri.path().to_string(),
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        signature_ok: shared.signer.as_ref().is_some_and(|s| s.verify(&body, &headers).is_ok()),
        raw: body,
        headers,
    };
    shared.received.lock().expect("receiver lock").push(received);
    let reply = shared.script.lock().expect("receiver lock").pop_front().unwrap_or_default();
    tokio::time::sleep(reply.delay).await;
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match reply.location {
        Some(location) => (status, [(header::LOCATION, location)]).into_response(),
        None => status.into_response(),
    }
}
