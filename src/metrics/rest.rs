//! client-go's request metrics for the Kubernetes clients:
//! `rest_client_requests_total{code,method,host}` and
//! `rest_client_request_duration_seconds{verb,host}` (until the response headers; for a
//! watch, until the stream opens). A tower [`Layer`] around each kube client's service, so
//! that every request of every client is counted in one place.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

/// client-go's request latency buckets.
const BUCKETS: [f64; 12] = [0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0];

/// The HTTP status, or `<error>` when no response came (client-go's values).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Code {
    Status(u16),
    Error,
}

impl EncodeLabelValue for Code {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        match self {
            Code::Status(c) => write!(encoder, "{c}"),
            Code::Error => encoder.write_str("<error>"),
        }
    }
}

/// The API server's `host:port`, shared by every label set of one client.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Host(Arc<str>);

impl EncodeLabelValue for Host {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(&self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub code: Code,
    pub method: &'static str,
    pub host: Host,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub verb: &'static str,
    pub host: Host,
}

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS.iter().copied())
}

/// The request metrics of every Kubernetes client of this process.
#[derive(Clone)]
pub struct RestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<LatencyLabels, Histogram>,
}

impl RestMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self { requests: Family::default(), duration: Family::new_with_constructor(latency_histogram) };
        registry.register("rest_client_requests", "Number of HTTP requests, partitioned by status code, method, and host", m.requests.clone());
        registry.register("rest_client_request_duration_seconds", "Request latency in seconds. Broken down by verb and host", m.duration.clone());
        m
    }

    /// The layer that counts the requests of a client of the API server at `cluster_url`.
    pub fn layer(&self, cluster_url: &http::Uri) -> RestLayer {
        let host = match (cluster_url.host(), cluster_url.port_u16()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => String::new(),
        };
        RestLayer { shared: Arc::new(Shared { metrics: self.clone(), host: Host(host.into()) }) }
    }

    /// Requests counted under these labels so far.
    pub fn requests(&self, code: Code, method: &'static str, host: &str) -> u64 {
        self.requests.get_or_create(&RequestLabels { code, method, host: Host(host.into()) }).get()
    }
}

struct Shared {
    metrics: RestMetrics,
    host: Host,
}

impl Shared {
    fn record(&self, method: &'static str, code: Code, started: Instant) {
        let host = self.host.clone();
        self.metrics.requests.get_or_create(&RequestLabels { code, method, host: host.clone() }).inc();
        self.metrics.duration.get_or_create(&LatencyLabels { verb: method, host }).observe(started.elapsed().as_secs_f64());
    }
}

/// The method as a static label value (no string per request).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// See [`RestMetrics::layer`].
#[derive(Clone)]
pub struct RestLayer {
    shared: Arc<Shared>,
}

impl<S> Layer<S> for RestLayer {
    type Service = RestService<S>;
    fn layer(&self, inner: S) -> RestService<S> {
        RestService { inner, shared: self.shared.clone() }
    }
}

#[derive(Clone)]
pub struct RestService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, RB> Service<Request<B>> for RestService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Counted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let method = method_label(req.method());
        Counted { inner: self.inner.call(req), shared: self.shared.clone(), method, started: Instant::now() }
    }
}

/// A request in flight; counted when its response (or its failure) arrives.
pub struct Counted<F> {
    inner: F,
    shared: Arc<Shared>,
    method: &'static str,
    started: Instant,
}

impl<F, RB, E> Future for Counted<F>
where
    F: Future<Output = Result<Response<RB>, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let r = std::task::ready!(Pin::new(&mut self.inner).poll(cx));
        let code = match &r {
            Ok(resp) => Code::Status(resp.status().as_u16()),
            Err(_) => Code::Error,
        };
        self.shared.record(self.method, code, self.started);
        Poll::Ready(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn every_request_is_counted_by_code_method_and_host() {
        let mut registry = Registry::default();
        let m = RestMetrics::new(&mut registry);
        let layer = m.layer(&"https://127.0.0.1:6443".parse().unwrap());
        let svc = tower::service_fn(|req: Request<()>| async move {
            match req.uri().path() {
                "/fail" => Err("refused"),
                "/missing" => Ok(Response::builder().status(404).body(()).unwrap()),
                _ => Ok(Response::new(())),
            }
        });
        let svc = tower::util::BoxService::new(svc);
        let mut svc = layer.layer(svc);
        for (method, path) in [(Method::GET, "/"), (Method::GET, "/"), (Method::PATCH, "/missing"), (Method::POST, "/fail")] {
            let _ = svc.ready().await.unwrap().call(Request::builder().method(method).uri(path).body(()).unwrap()).await;
        }
        assert_eq!(m.requests(Code::Status(200), "GET", "127.0.0.1:6443"), 2);
        assert_eq!(m.requests(Code::Status(404), "PATCH", "127.0.0.1:6443"), 1);
        assert_eq!(m.requests(Code::Error, "POST", "127.0.0.1:6443"), 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("rest_client_requests_total{code=\"<error>\",method=\"POST\",host=\"127.0.0.1:6443\"} 1"), "{text}");
        assert!(text.contains("rest_client_request_duration_seconds_count{verb=\"GET\",host=\"127.0.0.1:6443\"} 2"), "{text}");
    }
}
