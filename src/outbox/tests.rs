//! The outbox against a real receiver on 127.0.0.1 (see `dev::receiver`).

use std::path::PathBuf;
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use prometheus_client::registry::Registry;

use super::*;
use crate::dev::receiver::Receiver;
use crate::ha::{Fence, HaConfig, HaMetrics, Ownership};

/// 32 random bytes, as Standard Webhooks secrets are written.
const SECRET: &str = "whsec_G9lBWIDcJYX72GKu4I5Y4J+POLb1FVx07Q+IfWx0GuQ=";
const BODY: &[u8] = br#"{"event":"namespace.expired","namespace":"team-a"}"#;
const FENCE: Fence = Fence { shard: 3, transitions: 7 };
const LONG: Duration = Duration::from_secs(10);

struct Fixture {
    outbox: Outbox,
    registry: Registry,
    own: Ownership,
    log: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Fixture {
    /// An outbox with `allow` as `--webhook-allow`, and an ownership that holds [`FENCE`] for
    /// `renew_deadline`, with an action log.
    fn new(allow: &[&str], renew_deadline: Duration) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = std::env::temp_dir().join(format!("shoal-outbox-test-{}-{n}.log", std::process::id()));
        let file = std::fs::File::create(&log).unwrap();
        let cfg = HaConfig { shards: 8, lease_duration: renew_deadline * 2, renew_deadline, retry_period: Duration::from_millis(50), ..Default::default() };
        let own = Ownership::new(cfg, "me".into(), "ns".into(), HaMetrics::new(&mut Registry::default()), Some(file));
        own.hold_for_test(FENCE.shard, FENCE.transitions, std::time::Instant::now());
        let mut registry = Registry::default();
        let outbox = Outbox::loopback_only(&OutboxConfig { webhook_allow: allow.iter().map(|s| s.to_string()).collect() }, &mut registry).unwrap();
        Self { outbox, registry, own, log }
    }

    fn held() -> Self {
        Self::new(&[], Duration::from_secs(60))
    }

    fn writer(&self, fence: Fence) -> Writer {
        // Nothing listens there; the outbox never talks to the Kubernetes API.
        let client = Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let recorder = Recorder::new(client.clone(), Reporter { controller: "t".into(), instance: None });
        let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": "o", "namespace": "ns", "uid": "u"}})).unwrap();
        Writer::new(self.own.clone(), fence, client, recorder, &cm)
    }

    /// One attempt under the held fence, with the secret, a 10 s timeout and `max` attempts.
    async fn attempt(&self, d: &mut Delivery, max: i32, now: Timestamp) -> Result<Attempt, WriteError> {
        self.outbox.attempt(&self.writer(FENCE), d, BODY, Some(SECRET), LONG, max, now).await
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    fn count(&self, outcome: &str) -> u64 {
        let prefix = format!("shoal_webhook_deliveries_total{{outcome=\"{outcome}\"}} ");
        let text = self.metrics();
        let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
        line[prefix.len()..].trim().parse().unwrap()
    }

    /// Calls that were sent (each is observed by the duration histogram).
    fn calls_sent(&self) -> u64 {
        let text = self.metrics();
        let line = text.lines().find(|l| l.starts_with("shoal_webhook_delivery_duration_seconds_count ")).expect("the duration histogram");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    fn action_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

fn pending(target: &str) -> Delivery {
    Delivery { created_at: None, ..Delivery::pending(Outbox::delivery_id(&["uid-1", "expire", "3"]), target.to_string(), String::new(), Timestamp::UNIX_EPOCH) }
}

fn secs(n: i64) -> Timestamp {
    Timestamp::now().checked_add(k8s_openapi::jiff::SignedDuration::from_secs(n)).unwrap()
}

#[test]
fn delivery_ids_are_deterministic_and_unambiguous() {
    let id = Outbox::delivery_id(&["uid-1", "expire", "3"]);
    assert_eq!(id, Outbox::delivery_id(&["uid-1", "expire", "3"]));
    assert!(id.starts_with("msg_") && id.len() == 4 + 32, "{id}");
    assert!(id[4..].chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)), "{id}");
    assert_ne!(Outbox::delivery_id(&["a/b", "c"]), Outbox::delivery_id(&["a", "b/c"]));
    assert_ne!(Outbox::delivery_id(&["ab", "c"]), Outbox::delivery_id(&["a", "bc"]));
    assert_ne!(Outbox::delivery_id(&["a"]), Outbox::delivery_id(&["a", ""]));
    assert_ne!(Outbox::delivery_id(&["a", "b"]), Outbox::delivery_id(&["b", "a"]));
    // A fixed value: the id must not change between releases, or a retry after an upgrade
    // would look like a new effect to the receiver.
    assert_eq!(Outbox::delivery_id(&["a", "b"]), "msg_3c9d591045bc8876f9d0399bbfb05c6a");
}

#[test]
fn check_url_refuses_credentials_other_schemes_and_refused_literals() {
    let f = Fixture::held();
    assert_eq!(f.outbox.check_url("https://hooks.example.com/a?b=c").unwrap().host_str(), Some("hooks.example.com"));
    assert!(f.outbox.check_url("http://127.0.0.1:8080/").is_ok(), "loopback is allowed by default");
    for (url, why) in [
        ("not a url", "not a valid URL"),
        ("/relative/path", "not a valid URL"),
        ("ftp://hooks.example.com/x", "not http or https"),
        ("file:///etc/passwd", "not http or https"),
        ("http://user:hunter2@hooks.example.com/", "credentials"),
        ("https://token@hooks.example.com/", "credentials"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://[fd00:ec2::254]/", "metadata"),
    ] {
        let e = f.outbox.check_url(url).expect_err(url);
        assert!(e.contains(why), "{url}: {e}");
        assert!(!e.contains("hunter2") && !e.contains("token"), "the message must not repeat credentials: {e}");
    }
    let restricted = Fixture::new(&["hooks.example.com", "10.0.0.0/8"], LONG);
    assert!(restricted.outbox.check_url("http://10.1.1.1/").is_ok());
    assert!(restricted.outbox.check_url("http://192.168.1.1/").unwrap_err().contains("--webhook-allow"));
    assert!(restricted.outbox.check_url("http://unlisted.example.com/").is_ok(), "a name is checked when it is resolved");
    assert!(Outbox::new(&OutboxConfig { webhook_allow: vec!["http://x/".into()] }, &mut Registry::default()).is_err(), "a bad allow-list entry stops the start");
}

#[test]
fn check_secret_wants_whsec_base64_of_24_to_64_bytes_and_never_quotes_it() {
    assert!(Outbox::check_secret(SECRET).is_ok());
    assert!(Outbox::check_secret(&format!("  {SECRET}\n")).is_ok(), "whitespace from a Secret file is ignored");
    assert!(Outbox::check_secret(SECRET.strip_prefix("whsec_").unwrap()).is_ok(), "the prefix is optional");
    for bad in ["whsec_c2hvcnQ=", "hunter2-is-my-password!", "whsec_", &format!("whsec_{}", "QUFB".repeat(22))] {
        let e = Outbox::check_secret(bad).expect_err(bad);
        assert!(e.contains("whsec_"), "{e}");
        assert!(bad == "whsec_" || !e.contains(bad), "the message must not quote the secret: {e}");
    }
}

#[tokio::test]
async fn a_delivery_carries_the_standard_webhooks_headers_and_a_valid_signature() {
    let f = Fixture::held();
    let rx = Receiver::start(Some(SECRET)).await;
    let mut d = pending(&rx.url("/hooks/ns"));
    let now = Timestamp::now();
    assert_eq!(f.attempt(&mut d, 5, now).await.unwrap(), Attempt::Delivered);

    let got = rx.requests();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert!(r.signature_ok, "standardwebhooks::Webhook::verify accepts the signature");
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    verifier.verify(&r.raw, &r.headers).expect("verifies here too");
    assert!(verifier.verify(b"{\"tampered\":true}", &r.headers).is_err(), "a different body does not verify");
    let h = |n: &str| r.headers.get(n).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(r.id, d.id);
    assert_eq!(h("idempotency-key").as_deref(), Some(d.id.as_str()));
    assert_eq!(r.timestamp, now.as_second(), "webhook-timestamp is the attempt's time in unix seconds");
    assert!(h("webhook-signature").unwrap().starts_with("v1,"));
    assert_eq!(h("content-type").as_deref(), Some("application/json"));
    assert_eq!(h("user-agent"), Some(format!("shoal/{}", env!("CARGO_PKG_VERSION"))));
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/hooks/ns"));
    assert_eq!(r.raw.as_ref(), BODY);

    assert_eq!(d.state, DeliveryState::Delivered);
    assert_eq!((d.attempts, d.last_status, d.last_error.as_deref()), (1, Some(200), None));
    assert_eq!(d.last_attempt_at, Some(Time(now)));
    assert_eq!(d.finished_at, Some(Time(now)));
    assert_eq!(d.next_attempt_at, None);
    assert_eq!(f.count("delivered"), 1);
    assert_eq!(f.calls_sent(), 1);
    assert!(f.action_log().contains(&format!("webhook {}", d.id)), "the call is in the action log: {}", f.action_log());

    // A delivered entry is not sent again.
    assert_eq!(f.attempt(&mut d, 5, Timestamp::now()).await.unwrap(), Attempt::Delivered);
    assert_eq!((rx.requests().len(), d.attempts), (1, 1));
}

#[tokio::test]
async fn without_a_secret_there_is_no_signature_header() {
    let f = Fixture::held();
    let rx = Receiver::start(None).await;
    let mut d = pending(&rx.url("/"));
    let r = f.outbox.attempt(&f.writer(FENCE), &mut d, BODY, None, LONG, 3, Timestamp::now()).await.unwrap();
    assert_eq!(r, Attempt::Delivered);
    let got = rx.requests();
    assert!(got[0].headers.get("webhook-signature").is_none());
    assert_eq!(got[0].id, d.id);
}

#[tokio::test]
async fn any_2xx_is_delivered() {
    let f = Fixture::held();
    let rx = Receiver::start(Some(SECRET)).await;
    for status in [201u16, 202, 204, 299] {
        rx.respond_with(status, 1);
        let mut d = pending(&rx.url("/"));
        assert_eq!(f.attempt(&mut d, 3, Timestamp::now()).await.unwrap(), Attempt::Delivered, "{status}");
        assert_eq!(d.last_status, Some(i32::from(status)));
    }
}

#[tokio::test]
async fn failures_are_retried_with_the_same_id_growing_backoff_and_a_cap() {
    let f = Fixture::held();
    let rx = Receiver::start(Some(SECRET)).await;
    rx.respond_with(500, 2);
    rx.respond_with(503, 10);
    let mut d = pending(&rx.url("/"));
    let t0 = Timestamp::now();
    let at = |i: i64| t0.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(i)).unwrap();
    let mut delays = Vec::new();
    for i in 0..2 {
        let now = at(i);
        let Attempt::Retry(delay) = f.attempt(&mut d, 3, now).await.unwrap() else { panic!("attempt {i} must be retried: {d:?}") };
        assert_eq!(d.state, DeliveryState::Pending);
        assert_eq!((d.attempts, d.last_status), (i as i32 + 1, Some(500)));
        assert_eq!(d.last_error.as_deref(), Some("receiver answered 500 Internal Server Error"));
        assert_eq!(d.next_attempt_at, Some(Time(now.checked_add(delay).unwrap())));
        assert_eq!(d.finished_at, None);
        delays.push(delay);
    }
    assert!(delays[0] >= MIN_RETRY_DELAY && delays[0] < 2 * MIN_RETRY_DELAY, "{delays:?}");
    assert!(delays[1] >= 2 * MIN_RETRY_DELAY && delays[1] < 4 * MIN_RETRY_DELAY, "{delays:?}");

    // The third of three attempts is the last.
    assert_eq!(f.attempt(&mut d, 3, at(2)).await.unwrap(), Attempt::Failed);
    assert_eq!((d.state, d.attempts, d.last_status), (DeliveryState::Failed, 3, Some(503)));
    assert_eq!(d.last_error.as_deref(), Some("receiver answered 503 Service Unavailable; gave up after 3 attempts"));
    assert_eq!((d.next_attempt_at.is_none(), d.finished_at.is_some()), (true, true));
    // And nothing more is sent for it.
    assert_eq!(f.attempt(&mut d, 3, at(3)).await.unwrap(), Attempt::Failed);

    let got = rx.requests();
    assert_eq!(got.len(), 3, "three attempts, three requests");
    assert!(got.iter().all(|r| r.id == d.id && r.signature_ok), "the same webhook-id on every retry");
    assert!(got.iter().all(|r| r.headers["idempotency-key"] == d.id.as_str()));
    assert_eq!(got.iter().map(|r| r.timestamp).collect::<Vec<_>>(), (0..3).map(|i| at(i).as_second()).collect::<Vec<_>>(), "each attempt has its own timestamp");
    assert_eq!(rx.distinct_ids(), vec![d.id.clone()]);
    assert_eq!((f.count("retry"), f.count("failed")), (2, 1));
}

#[tokio::test]
async fn a_new_owner_retries_a_pending_entry_with_the_same_id() {
    // Replica A's attempt failed and it recorded the entry; replica B (another outbox, another
    // fence) picks the recorded entry up.
    let rx = Receiver::start(Some(SECRET)).await;
    rx.respond_with(502, 1);
    let a = Fixture::held();
    let mut d = pending(&rx.url("/"));
    assert!(matches!(a.attempt(&mut d, 5, Timestamp::now()).await.unwrap(), Attempt::Retry(_)));
    let recorded: Delivery = serde_json::from_value(serde_json::to_value(&d).unwrap()).unwrap();
    let b = Fixture::held();
    let mut d = recorded;
    assert_eq!(b.attempt(&mut d, 5, Timestamp::now()).await.unwrap(), Attempt::Delivered);
    assert_eq!(d.attempts, 2);
    assert_eq!(rx.requests().len(), 2);
    assert_eq!(rx.distinct_ids().len(), 1, "one effect for a receiver that dedupes on webhook-id");
}

#[test]
fn retry_delays_double_from_one_second_to_five_minutes_with_jitter() {
    for n in 1..=20 {
        let base = Duration::from_secs(1u64 << (n - 1).min(12)).min(MAX_RETRY_DELAY);
        let samples: Vec<Duration> = (0..50).map(|_| retry_delay(n)).collect();
        assert!(samples.iter().all(|d| *d >= base && *d < 2 * base), "attempt {n}: {samples:?} outside [{base:?}, {:?})", 2 * base);
        assert!(samples.iter().any(|d| *d != samples[0]), "attempt {n}: jitter varies the delay");
    }
    // The retry windows docs/webhooks.md quotes: N attempts wait less than `bound` in all.
    for (attempts, bound) in [(8, 254), (10, 1022), (20, 7022)] {
        for _ in 0..20 {
            let waited: Duration = (1..attempts).map(retry_delay).sum();
            assert!(waited >= Duration::from_secs(bound / 2) && waited < Duration::from_secs(bound), "{attempts} attempts: {waited:?}");
        }
    }
    assert!(retry_delay(i32::MAX) < 2 * MAX_RETRY_DELAY);
    assert!(retry_delay(0) < 2 * MIN_RETRY_DELAY, "nonsense counts are clamped");
}

#[tokio::test]
async fn gone_disables_the_target_at_once() {
    let f = Fixture::held();
    let rx = Receiver::start(Some(SECRET)).await;
    rx.respond_with(410, 1);
    let mut d = pending(&rx.url("/"));
    assert_eq!(f.attempt(&mut d, 10, Timestamp::now()).await.unwrap(), Attempt::Failed);
    assert_eq!((d.state, d.attempts, d.last_status), (DeliveryState::Failed, 1, Some(410)));
    assert_eq!(d.last_error.as_deref(), Some("receiver answered 410 Gone: target disabled"));
    assert_eq!(d.next_attempt_at, None);
    assert_eq!((f.count("gone"), f.count("failed"), f.count("retry")), (1, 0, 0));
}

#[tokio::test]
async fn a_timeout_is_retried() {
    let f = Fixture::held();
    let rx = Receiver::start(Some(SECRET)).await;
    rx.delay_next(Duration::from_secs(5), 1);
    let mut d = pending(&rx.url("/"));
    let t0 = std::time::Instant::now();
    let r = f.outbox.attempt(&f.writer(FENCE), &mut d, BODY, Some(SECRET), Duration::from_millis(300), 3, Timestamp::now()).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "the timeout ended the call: {:?}", t0.elapsed());
    assert!(matches!(r, Attempt::Retry(_)), "{r:?}");
    assert_eq!((d.state, d.attempts, d.last_status), (DeliveryState::Pending, 1, None));
    assert_eq!(d.last_error.as_deref(), Some("no answer within 300ms"));
    assert_eq!(rx.requests().len(), 1, "it was sent");
}

#[tokio::test]
async fn a_connection_error_is_retried() {
    let f = Fixture::held();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut d = pending(&format!("http://127.0.0.1:{port}/"));
    let r = f.attempt(&mut d, 3, Timestamp::now()).await.unwrap();
    assert!(matches!(r, Attempt::Retry(_)), "{r:?}");
    let e = d.last_error.clone().unwrap();
    assert!(e.contains(&format!("127.0.0.1:{port}")) && e.to_lowercase().contains("connect"), "{e}");
    assert_eq!(f.count("retry"), 1);
}

#[tokio::test]
async fn a_metadata_literal_is_refused_without_any_connection() {
    let f = Fixture::held();
    // IPv4 forms only: the loopback-only client of the tests stops IPv4 connections elsewhere
    // in the kernel should the check break (the IPv6 forms are checked in `egress`).
    for target in ["http://169.254.169.254/latest/meta-data/", "http://2852039166/", "http://0xa9fea9fe/"] {
        let mut d = pending(target);
        assert_eq!(f.attempt(&mut d, 10, Timestamp::now()).await.unwrap(), Attempt::Failed, "{target}");
        assert_eq!((d.state, d.attempts, d.last_status), (DeliveryState::Failed, 1, None));
        let e = d.last_error.unwrap();
        assert!(e.starts_with("refused target") && e.contains("link-local"), "{e}");
    }
    assert_eq!(f.count("refused"), 3);
    assert_eq!(f.calls_sent(), 0, "no call went out");
    assert_eq!(f.action_log(), "", "nothing passed the guard");
}

#[tokio::test]
async fn a_name_that_resolves_to_a_refused_address_is_refused() {
    // `localhost` resolves to loopback; an allow-list without it makes loopback a refused
    // address, so this goes through the resolver's refusal as a metadata name would.
    let f = Fixture::new(&["10.0.0.0/8"], Duration::from_secs(60));
    let rx = Receiver::start(Some(SECRET)).await;
    let mut d = pending(&format!("http://localhost:{}/", rx.addr().port()));
    assert_eq!(f.attempt(&mut d, 10, Timestamp::now()).await.unwrap(), Attempt::Failed);
    let e = d.last_error.clone().unwrap();
    assert!(e.starts_with("refused target localhost") && e.contains("resolves only to refused addresses"), "{e}");
    assert_eq!((d.attempts, f.count("refused"), f.count("retry")), (1, 1, 0));
    assert!(rx.requests().is_empty());
    // Listed by name, it is allowed.
    let f = Fixture::new(&["localhost"], Duration::from_secs(60));
    let mut d = pending(&format!("http://localhost:{}/", rx.addr().port()));
    assert_eq!(f.attempt(&mut d, 10, Timestamp::now()).await.unwrap(), Attempt::Delivered);
}

#[tokio::test]
async fn redirects_are_followed_three_times_and_never_to_a_refused_address() {
    let f = Fixture::held();
    let rx = Receiver::start(Some(SECRET)).await;
    rx.redirect_to("http://169.254.169.254/latest/meta-data/", 1);
    let mut d = pending(&rx.url("/"));
    let r = f.outbox.attempt(&f.writer(FENCE), &mut d, BODY, Some(SECRET), Duration::from_secs(2), 10, Timestamp::now()).await.unwrap();
    assert_eq!(r, Attempt::Failed, "{d:?}");
    let e = d.last_error.clone().unwrap();
    assert!(e.starts_with("refused target 169.254.169.254") && e.contains("link-local"), "{e}");
    assert_eq!((d.attempts, f.count("refused")), (1, 1));

    // Three redirects (307 and 308, one to a name resolved through the checked resolver) are
    // followed ...
    let port = rx.addr().port();
    rx.redirect_to(&format!("http://localhost:{port}/1"), 1);
    rx.redirect_to(&format!("http://127.0.0.1:{port}/2"), 1);
    rx.script(crate::dev::receiver::Reply { status: 308, location: Some("/3".into()), ..Default::default() }, 1);
    let mut d = pending(&rx.url("/0"));
    assert_eq!(f.attempt(&mut d, 10, Timestamp::now()).await.unwrap(), Attempt::Delivered);
    let paths: Vec<String> = rx.requests().iter().skip(1).map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/0", "/1", "/2", "/3"]);
    assert!(rx.requests().iter().skip(1).all(|r| r.id == d.id && r.signature_ok && r.method == "POST"), "307 and 308 repeat the signed POST");

    // 301, 302 and 303 would turn the POST into a bodiless GET: not followed, retried.
    for status in [301u16, 302, 303] {
        let before = rx.requests().len();
        rx.script(crate::dev::receiver::Reply { status, location: Some("/get".into()), ..Default::default() }, 1);
        let mut d = pending(&rx.url("/moved"));
        assert!(matches!(f.attempt(&mut d, 10, Timestamp::now()).await.unwrap(), Attempt::Retry(_)), "{status}");
        assert_eq!(d.last_status, Some(i32::from(status)));
        assert!(d.last_error.clone().unwrap().contains("only 307 and 308 redirects are followed"), "{d:?}");
        assert_eq!(rx.requests().len(), before + 1, "{status} was not followed");
    }

    // ... a fourth is not.
    rx.redirect_to("/again", 4);
    let mut d = pending(&rx.url("/loop"));
    assert!(matches!(f.attempt(&mut d, 10, Timestamp::now()).await.unwrap(), Attempt::Retry(_)));
    assert!(d.last_error.clone().unwrap().contains("more than 3 redirects"), "{d:?}");
    assert_eq!(rx.requests().len(), 5 + 3 + 4);
}

#[tokio::test]
async fn a_lapsed_fence_sends_nothing() {
    let f = Fixture::held();
    let rx = Receiver::start(Some(SECRET)).await;
    let before = pending(&rx.url("/"));
    let mut d = before.clone();
    for fence in [Fence { shard: FENCE.shard, transitions: FENCE.transitions + 1 }, Fence { shard: 5, transitions: 1 }] {
        let r = f.outbox.attempt(&f.writer(fence), &mut d, BODY, Some(SECRET), LONG, 3, Timestamp::now()).await;
        assert!(matches!(r, Err(WriteError::Fenced)), "{r:?}");
        assert_eq!(d, before, "nothing is changed: nothing was attempted");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.requests().is_empty(), "the receiver saw no request");
    assert_eq!((f.calls_sent(), f.action_log().as_str()), (0, ""));
}

#[tokio::test]
async fn a_call_cannot_outlive_the_fence() {
    let rx = Receiver::start(Some(SECRET)).await;
    rx.delay_next(Duration::from_secs(5), 1);
    let f = Fixture::new(&[], Duration::from_millis(500));
    let mut d = pending(&rx.url("/"));
    let now = Timestamp::now();
    let t0 = std::time::Instant::now();
    let r = f.attempt(&mut d, 1, now).await;
    assert!(matches!(r, Err(WriteError::Deadline)), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "abandoned when the fence ended: {:?}", t0.elapsed());
    // It may have been received: counted, still Pending (even with max_attempts 1), retried later.
    assert_eq!((d.state, d.attempts, d.last_status), (DeliveryState::Pending, 1, None));
    assert!(d.last_error.clone().unwrap().contains("shard fence"), "{d:?}");
    assert!(d.next_attempt_at.is_some() && d.finished_at.is_none());
    assert_eq!(rx.requests().len(), 1);
}

#[tokio::test]
async fn an_invalid_secret_fails_without_a_call_and_without_quoting_it() {
    let f = Fixture::held();
    let rx = Receiver::start(None).await;
    let mut d = pending(&rx.url("/"));
    let r = f.outbox.attempt(&f.writer(FENCE), &mut d, BODY, Some("hunter2-not-base64!"), LONG, 3, Timestamp::now()).await.unwrap();
    assert_eq!(r, Attempt::Failed);
    let e = d.last_error.unwrap();
    assert!(e.contains("whsec_") && !e.contains("hunter2"), "{e}");
    assert!(rx.requests().is_empty());
    assert_eq!((f.count("failed"), f.calls_sent()), (1, 0));
}

#[test]
fn metrics_are_registered_with_every_outcome() {
    let f = Fixture::held();
    let text = f.metrics();
    for o in ["delivered", "retry", "failed", "gone", "refused"] {
        assert_eq!(f.count(o), 0, "{o}");
    }
    assert!(text.contains("# TYPE shoal_webhook_deliveries counter"), "{text}");
    assert!(text.contains("# TYPE shoal_webhook_delivery_duration_seconds histogram"), "{text}");
}

/// The receiver example of docs/webhooks.md (examples/webhook-receiver.py), run with python3
/// against this signer: it accepts a signed delivery, applies a repeated id once, and refuses
/// a wrong signature, a missing one and a stale timestamp.
#[tokio::test]
async fn the_python_receiver_example_verifies_our_signatures_and_dedupes() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/webhook-receiver.py");
    let offline = tokio::process::Command::new("python3").arg(&script).arg("--self-test").output().await.expect("python3 must be installed to check the example");
    assert!(offline.status.success(), "{}", String::from_utf8_lossy(&offline.stderr));

    let mut child = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--host", "127.0.0.1", "--port", "0"])
        .env("WEBHOOK_SECRET", SECRET)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 must be installed to check the example");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_line = async || tokio::time::timeout(LONG, lines.next_line()).await.expect("a line from the example in time").unwrap().expect("the example is running");
    let url = next_line().await.strip_prefix("listening on ").expect("the example's first line").to_string();

    let f = Fixture::held();
    let recorded = pending(&format!("{url}/hooks"));
    let mut d = recorded.clone();
    assert_eq!(f.attempt(&mut d, 3, Timestamp::now()).await.unwrap(), Attempt::Delivered, "{d:?}");
    assert_eq!(next_line().await, format!("effect {} {{\"event\": \"namespace.expired\", \"namespace\": \"team-a\"}}", d.id));
    // The same entry once more, as a new owner retries it after a failover.
    let mut again = recorded.clone();
    assert_eq!(f.attempt(&mut again, 3, Timestamp::now()).await.unwrap(), Attempt::Delivered);
    assert_eq!(next_line().await, format!("duplicate {}", d.id));

    let other_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut d = pending(&format!("{url}/hooks"));
    d.id = Outbox::delivery_id(&["forged"]);
    let r = f.outbox.attempt(&f.writer(FENCE), &mut d, BODY, Some(other_secret), LONG, 3, Timestamp::now()).await.unwrap();
    assert!(matches!(r, Attempt::Retry(_)) && d.last_status == Some(401), "{d:?}");
    assert_eq!(next_line().await, format!("rejected {}: no valid v1 signature", d.id));
    let mut d = pending(&format!("{url}/hooks"));
    let r = f.outbox.attempt(&f.writer(FENCE), &mut d, BODY, None, LONG, 3, Timestamp::now()).await.unwrap();
    assert!(matches!(r, Attempt::Retry(_)) && d.last_status == Some(401), "{d:?}");
    assert!(next_line().await.ends_with("missing webhook-id, webhook-timestamp or webhook-signature"));
    let mut d = pending(&format!("{url}/hooks"));
    assert!(matches!(f.attempt(&mut d, 3, secs(-301)).await.unwrap(), Attempt::Retry(_)), "{d:?}");
    assert!(next_line().await.ends_with("more than 5 minutes away (a replay?)"));

    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// https is checked against the public (Mozilla) roots shoal carries: a receiver with a
/// self-signed or private-CA certificate is not trusted, and the attempt is retried.
#[tokio::test]
async fn https_wants_a_publicly_trusted_certificate() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.map(|_| ())
    });

    let f = Fixture::held();
    let mut d = pending(&format!("https://127.0.0.1:{port}/"));
    let r = f.attempt(&mut d, 3, Timestamp::now()).await.unwrap();
    assert!(matches!(r, Attempt::Retry(_)), "{r:?}");
    let e = d.last_error.clone().unwrap();
    assert!(e.contains("certificate") && e.contains("UnknownIssuer"), "{e}");
    assert!(server.await.unwrap().is_err(), "the handshake was not completed");
}

#[test]
fn the_python_example_in_the_docs_is_the_example_file() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/webhooks.md")).unwrap();
    let file = std::fs::read_to_string(root.join("examples/webhook-receiver.py")).unwrap();
    let start = doc.find("```python\n").expect("a python block in docs/webhooks.md") + "```python\n".len();
    let len = doc[start..].find("```\n").expect("the end of the python block");
    assert!(doc[start..start + len] == file, "docs/webhooks.md's example differs from examples/webhook-receiver.py: copy the file into the doc");
}

#[test]
fn the_allow_list_flag_takes_comma_separated_entries() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        outbox: OutboxConfig,
    }
    let cli = <Cli as clap::Parser>::try_parse_from(["shoal", "--webhook-allow", "hooks.example.com,10.0.0.0/8", "--webhook-allow", "169.254.10.20/32"]).unwrap();
    assert_eq!(cli.outbox.webhook_allow, ["hooks.example.com", "10.0.0.0/8", "169.254.10.20/32"]);
    assert!(Egress::new(&cli.outbox.webhook_allow).is_ok());
    let cli = <Cli as clap::Parser>::try_parse_from(["shoal"]).unwrap();
    assert!(cli.outbox.webhook_allow.is_empty(), "no allow-list by default");
}

/// No log line, in either format, at any level, holds a delivery's signing secret: not while
/// signing and delivering, nor on a retry, a give-up, or an unusable secret.
#[tokio::test]
async fn the_signing_secret_never_appears_in_logs() {
    use tracing_subscriber::layer::SubscriberExt;
    let (json, text) = (crate::telemetry::tests::Captured::default(), crate::telemetry::tests::Captured::default());
    let plain = text.clone();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::TRACE)
        .with(json.json_layer())
        .with(tracing_subscriber::fmt::layer().with_ansi(false).with_writer(move || plain.clone()));
    let _logs = tracing::subscriber::set_default(subscriber);

    let f = Fixture::held();
    let rx = Receiver::start(Some(SECRET)).await;
    rx.respond_with(500, 1);
    let mut d = pending(&rx.url("/hook"));
    assert!(matches!(f.attempt(&mut d, 3, Timestamp::now()).await.unwrap(), Attempt::Retry(_)));
    assert_eq!(f.attempt(&mut d, 3, Timestamp::now()).await.unwrap(), Attempt::Delivered);
    rx.respond_with(500, 1);
    let mut last = pending(&rx.url("/last"));
    assert_eq!(f.attempt(&mut last, 1, Timestamp::now()).await.unwrap(), Attempt::Failed);
    // 16 bytes: too short to sign with; refused with a message that does not quote it.
    let short = "whsec_U2hvcnRTZWNyZXQxMjM0NQ==";
    let mut bad = pending(&rx.url("/bad"));
    assert_eq!(f.outbox.attempt(&f.writer(FENCE), &mut bad, BODY, Some(short), LONG, 3, Timestamp::now()).await.unwrap(), Attempt::Failed);

    let (json, text) = (json.text(), text.text());
    assert!(json.contains(&d.id) && json.contains("webhook delivery failed") && text.contains("webhook delivery failed"), "the capture sees the outbox's lines:\n{json}\n{text}");
    for secret in [SECRET, short] {
        let key = secret.trim_start_matches("whsec_");
        let key = key.trim_end_matches('=');
        for (what, logs) in [("JSON logs", &json), ("text logs", &text), ("status", &format!("{d:?} {last:?} {bad:?}"))] {
            assert!(!logs.contains(key), "{what} hold the secret {secret}:\n{logs}");
        }
    }
}
