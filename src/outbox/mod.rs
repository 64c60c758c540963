//! The effects outbox: how shoal calls webhooks so that each call has its effect once.
//!
//! The calling controller records a [`Delivery`] (state Pending, deterministic id from
//! [`Outbox::delivery_id`]) in its object's status with a resourceVersion precondition, asks
//! [`Outbox::attempt`] for ONE attempt, and records the updated entry. A new owner retries a
//! Pending entry with the same id, so a receiver that dedupes on `webhook-id` sees the
//! effect once. This module owns the wire contract (docs/webhooks.md): the Standard Webhooks
//! headers and signature, the classification of answers, the retry schedule and the egress
//! policy ([`egress`]).
//!
//! It must never call a receiver outside [`Writer::guard`] (so no call outlives the shard
//! fence), never read or write the Kubernetes API, and never put a secret in a log line,
//! an error or a status field.

pub mod egress;

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use base64::Engine;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;
use reqwest::StatusCode;

use crate::api::delivery::{Delivery, DeliveryState};
use crate::ha::{WriteError, Writer};
use egress::{CheckedResolver, Egress, find_refused};

/// The first retry waits about this long (backon's `min_delay`).
pub const MIN_RETRY_DELAY: Duration = Duration::from_secs(1);
/// The un-jittered delay grows to at most this (backon's `max_delay`).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// What `last_error` says after a 410.
pub const GONE_MESSAGE: &str = "receiver answered 410 Gone: target disabled";
/// Longest `last_error` kept in status.
const MAX_ERROR_LEN: usize = 512;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct OutboxConfig {
    /// Hosts or CIDRs webhooks may call (comma-separated). Empty: any address except the refused ones.
    /// A CIDR inside a refused range (e.g. 169.254.169.254/32) re-allows that part of it.
    #[arg(long = "webhook-allow", env = "SHOAL_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub webhook_allow: Vec<String>,
}

/// The result of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The receiver answered 2xx.
    Delivered,
    /// Try again (same id) after this long; `next_attempt_at` says when.
    Retry(Duration),
    /// Given up: refused target, 410, or attempts exhausted.
    Failed,
}

/// How an attempt ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Retry,
    Failed,
    Gone,
    Refused,
}

impl Outcome {
    const ALL: [Outcome; 5] = [Outcome::Delivered, Outcome::Retry, Outcome::Failed, Outcome::Gone, Outcome::Refused];

    fn label(self) -> OutcomeLabel {
        let outcome = match self {
            Outcome::Delivered => "delivered",
            Outcome::Retry => "retry",
            Outcome::Failed => "failed",
            Outcome::Gone => "gone",
            Outcome::Refused => "refused",
        };
        OutcomeLabel { outcome }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone)]
struct OutboxMetrics {
    deliveries: Family<OutcomeLabel, Counter>,
    duration: crate::metrics::ExemplarHistogram,
}

impl OutboxMetrics {
    fn new(registry: &mut Registry) -> Self {
        let m = Self { deliveries: Family::default(), duration: crate::metrics::ExemplarHistogram::new(exponential_buckets(0.005, 2.0, 14)) };
        for o in Outcome::ALL {
            let _ = m.deliveries.get_or_create(&o.label());
        }
        registry.register("shoal_webhook_deliveries", "Webhook delivery attempts, by outcome (delivered, retry, failed, gone, refused)", m.deliveries.clone());
        registry.register("shoal_webhook_delivery_duration_seconds", "Duration of each webhook call that was sent", m.duration.clone());
        m
    }
}

/// Why an attempt was given up before anything was sent.
enum NotSent {
    Refused(String),
    Invalid(String),
}

/// One pooled HTTP client, the egress policy and the metrics of webhook deliveries.
pub struct Outbox {
    client: reqwest::Client,
    egress: Arc<Egress>,
    metrics: OutboxMetrics,
}

impl Outbox {
    pub fn new(cfg: &OutboxConfig, registry: &mut Registry) -> anyhow::Result<Self> {
        Self::build(cfg, registry, None)
    }

    /// An outbox whose IPv4 connections leave from 127.0.0.1, so the kernel refuses any that
    /// is not to loopback: the tests cannot reach beyond the machine even if a check breaks.
    #[cfg(test)]
    pub(crate) fn loopback_only(cfg: &OutboxConfig, registry: &mut Registry) -> anyhow::Result<Self> {
        Self::build(cfg, registry, Some(std::net::Ipv4Addr::LOCALHOST.into()))
    }

    fn build(cfg: &OutboxConfig, registry: &mut Registry, local_address: Option<std::net::IpAddr>) -> anyhow::Result<Self> {
        let egress = Arc::new(Egress::new(&cfg.webhook_allow).map_err(anyhow::Error::msg)?);
        let client = reqwest::Client::builder()
            .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")))
            // A proxy would resolve the host itself, past the egress checks.
            .no_proxy()
            .dns_resolver(Arc::new(CheckedResolver { egress: egress.clone() }))
            .redirect(egress::policy(egress.clone()))
            .local_address(local_address)
            .build()?;
        Ok(Self { client, egress, metrics: OutboxMetrics::new(registry) })
    }

    /// Deterministic delivery id from its parts (e.g. [uid, policy name, generation]): "msg_"
    /// and 32 lowercase hex digits of the SHA-256 of the parts, each prefixed by its length
    /// (so `["a/b", "c"]` and `["a", "b/c"]` differ).
    pub fn delivery_id(parts: &[&str]) -> String {
        let mut h = hmac_sha256::Hash::new();
        for p in parts {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p.as_bytes());
        }
        let digest = h.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("msg_{hex}")
    }

    /// Syntactic check before intent is recorded: parses, http/https, has a host, no
    /// userinfo (credentials in URLs would leak into status), and an IP-literal host is not
    /// refused by the egress policy. A host name is checked when it is resolved.
    pub fn check_url(&self, url: &str) -> Result<url::Url, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
        self.egress.check_url(&parsed).map_err(|r| r.to_string())?;
        Ok(parsed)
    }

    /// Is `secret` usable to sign: `whsec_` (optional) and the base64 of 24 to 64 bytes, as
    /// Standard Webhooks prescribes? Surrounding whitespace is ignored. The message never
    /// quotes the secret.
    pub fn check_secret(secret: &str) -> Result<(), String> {
        const HINT: &str = "a webhook secret must be `whsec_` followed by the base64 of 24 to 64 random bytes (e.g. `echo whsec_$(head -c 32 /dev/urandom | base64)`)";
        let b64 = secret.trim();
        let b64 = b64.strip_prefix("whsec_").unwrap_or(b64);
        match base64::engine::general_purpose::STANDARD.decode(b64) {
            Ok(key) if (24..=64).contains(&key.len()) => Ok(()),
            Ok(key) => Err(format!("{HINT}; this one decodes to {} bytes", key.len())),
            Err(_) => Err(format!("{HINT}; this one is not valid base64")),
        }
    }

    /// ONE attempt of `d`, which must be Pending (a Delivered or Failed entry is left as it
    /// is and its state returned). Updates `d` in place: `attempts`, `last_attempt_at`,
    /// `last_status`, `last_error`, and `state`/`next_attempt_at`/`finished_at` per the
    /// outcome. `now` is the time of this attempt, sent as `webhook-timestamp`.
    ///
    /// Returns Err only when the guard does: Fenced (nothing sent, `d` unchanged) or Deadline
    /// (the call may have been sent: counted, still Pending, with a retry time).
    #[allow(clippy::too_many_arguments)]
    pub async fn attempt(&self, w: &Writer, d: &mut Delivery, body: &[u8], secret: Option<&str>, timeout: Duration, max_attempts: i32, now: Timestamp) -> Result<Attempt, WriteError> {
        match d.state {
            DeliveryState::Delivered => return Ok(Attempt::Delivered),
            DeliveryState::Failed => return Ok(Attempt::Failed),
            DeliveryState::Pending => {}
        }
        // The attempt's span (none when tracing is off) is in the delivery's own trace.
        let span = crate::telemetry::spans::delivery_attempt(d);
        let r = tracing::Instrument::instrument(self.attempt_pending(w, d, body, secret, timeout, max_attempts, now), span.clone()).await;
        crate::telemetry::spans::delivery_attempted(&span, d);
        r
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt_pending(&self, w: &Writer, d: &mut Delivery, body: &[u8], secret: Option<&str>, timeout: Duration, max_attempts: i32, now: Timestamp) -> Result<Attempt, WriteError> {
        let request = match self.request(d, body, secret, timeout, now) {
            Ok(r) => r,
            Err(NotSent::Refused(e)) => return Ok(self.finish(d, now, Outcome::Refused, None, Some(e))),
            Err(NotSent::Invalid(e)) => return Ok(self.finish(d, now, Outcome::Failed, None, Some(e))),
        };
        let started = Instant::now();
        let sent = w.guard(&format!("webhook {}", d.id), self.client.execute(request)).await;
        if !matches!(sent, Err(WriteError::Fenced)) {
            self.metrics.duration.observe(started.elapsed().as_secs_f64(), crate::metrics::current_exemplar(), None);
        }
        let answer = match sent {
            Ok(answer) => answer,
            Err(WriteError::Deadline) => {
                let why = "the call did not complete before the shard fence ended; the receiver may have got it".to_string();
                self.retry_later(d, now, None, why);
                return Err(WriteError::Deadline);
            }
            Err(e) => return Err(e),
        };
        Ok(match answer {
            Ok(resp) if resp.status().is_success() => self.finish(d, now, Outcome::Delivered, Some(resp.status()), None),
            Ok(resp) if resp.status() == StatusCode::GONE => self.finish(d, now, Outcome::Gone, Some(resp.status()), Some(GONE_MESSAGE.into())),
            Ok(resp) if resp.status().is_redirection() => {
                let why = format!("receiver answered {} (only 307 and 308 redirects are followed: they repeat the POST)", resp.status());
                self.failure(d, now, Some(resp.status()), why, max_attempts)
            }
            Ok(resp) => self.failure(d, now, Some(resp.status()), format!("receiver answered {}", resp.status()), max_attempts),
            Err(e) => match find_refused(&e) {
                Some(r) => self.finish(d, now, Outcome::Refused, None, Some(r.to_string())),
                None => self.failure(d, now, None, describe(&e, timeout), max_attempts),
            },
        })
    }

    /// The signed request for `d`, or why none may be sent.
    fn request(&self, d: &Delivery, body: &[u8], secret: Option<&str>, timeout: Duration, now: Timestamp) -> Result<reqwest::Request, NotSent> {
        let url = url::Url::parse(&d.target).map_err(|e| NotSent::Invalid(format!("not a valid URL: {e}")))?;
        self.egress.check_url(&url).map_err(|r| NotSent::Refused(r.to_string()))?;
        let ts = now.as_second();
        let mut req = self
            .client
            .post(url)
            .timeout(timeout)
            .header(standardwebhooks::HEADER_WEBHOOK_ID, &d.id)
            .header(standardwebhooks::HEADER_WEBHOOK_TIMESTAMP, ts.to_string())
            .header("idempotency-key", &d.id)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(secret) = secret {
            Self::check_secret(secret).map_err(NotSent::Invalid)?;
            let signer = standardwebhooks::Webhook::new(secret.trim()).map_err(|_| NotSent::Invalid("the webhook secret is not valid base64".into()))?;
            let signature = signer.sign(&d.id, ts, body).map_err(|_| NotSent::Invalid("the body is not UTF-8 JSON; nothing was sent".into()))?;
            req = req.header(standardwebhooks::HEADER_WEBHOOK_SIGNATURE, signature);
        }
        req.body(body.to_vec()).build().map_err(|e| NotSent::Invalid(format!("cannot build the request: {e}")))
    }

    /// Count the attempt and end it (delivered, gone, refused or failed at once).
    fn finish(&self, d: &mut Delivery, now: Timestamp, outcome: Outcome, status: Option<StatusCode>, error: Option<String>) -> Attempt {
        count(d, now, status, error);
        d.next_attempt_at = None;
        d.finished_at = Some(Time(now));
        self.metrics.deliveries.get_or_create(&outcome.label()).inc();
        let attempt = if outcome == Outcome::Delivered {
            d.state = DeliveryState::Delivered;
            Attempt::Delivered
        } else {
            d.state = DeliveryState::Failed;
            tracing::warn!(id = %d.id, target = %d.target, attempts = d.attempts, error = d.last_error.as_deref().unwrap_or(""), "webhook delivery failed");
            Attempt::Failed
        };
        tracing::debug!(id = %d.id, target = %d.target, ?outcome, "webhook attempt");
        crate::telemetry::spans::delivery_finished(d);
        attempt
    }

    /// A failed attempt that may be retried, unless it was the last one allowed.
    fn failure(&self, d: &mut Delivery, now: Timestamp, status: Option<StatusCode>, error: String, max_attempts: i32) -> Attempt {
        if d.attempts + 1 >= max_attempts.max(1) {
            let error = format!("{error}; gave up after {} attempts", d.attempts + 1);
            return self.finish(d, now, Outcome::Failed, status, Some(error));
        }
        Attempt::Retry(self.retry_later(d, now, status, error))
    }

    fn retry_later(&self, d: &mut Delivery, now: Timestamp, status: Option<StatusCode>, error: String) -> Duration {
        count(d, now, status, Some(error));
        let delay = retry_delay(d.attempts);
        d.next_attempt_at = Some(Time(now.checked_add(delay).unwrap_or(Timestamp::MAX)));
        self.metrics.deliveries.get_or_create(&Outcome::Retry.label()).inc();
        tracing::debug!(id = %d.id, target = %d.target, attempts = d.attempts, ?delay, error = d.last_error.as_deref().unwrap_or(""), "webhook attempt failed; will retry");
        delay
    }
}

/// Record that an attempt was made at `now` and how it ended.
fn count(d: &mut Delivery, now: Timestamp, status: Option<StatusCode>, error: Option<String>) {
    d.attempts += 1;
    d.last_attempt_at = Some(Time(now));
    d.last_status = status.map(|s| i32::from(s.as_u16()));
    d.last_error = error.map(|e| truncate(e, MAX_ERROR_LEN));
}

/// How long to wait after the `attempts`-th failed attempt: the `attempts`-th delay of
/// backon's exponential backoff from [`MIN_RETRY_DELAY`] doubling up to [`MAX_RETRY_DELAY`],
/// with jitter (a delay `b` becomes a random value in `[b, 2b)`).
pub fn retry_delay(attempts: i32) -> Duration {
    // The cap is reached by the 10th delay; later ones are all drawn the same way.
    let n = attempts.clamp(1, 32) as usize;
    ExponentialBuilder::new().with_min_delay(MIN_RETRY_DELAY).with_max_delay(MAX_RETRY_DELAY).with_jitter().without_max_times().build().nth(n - 1).unwrap_or(MAX_RETRY_DELAY)
}

/// A reqwest error with its causes, short enough for status. reqwest names the URL, which
/// never carries credentials (they are refused).
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {timeout:?}");
    }
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests;
