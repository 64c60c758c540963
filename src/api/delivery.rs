//! The wire format of the effects outbox: one [`Delivery`] per external call, kept in the
//! status of the object that owns the call (a NamespaceManager today; Task actions and
//! workflow notifications later). The entry is written, with a resourceVersion
//! precondition, before the call is made; its `id` is deterministic and is sent as
//! `webhook-id` on every attempt. See docs/webhooks.md.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A key of a Secret in the referring object's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key in the Secret's data (default `secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

impl SecretKeyRef {
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or("secret")
    }
}

/// Where a delivery stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DeliveryState {
    /// Recorded; not yet acknowledged by the receiver. A new owner retries it with the same id.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Given up: every attempt failed, the target was refused, or the receiver answered 410
    /// (which disables the target).
    Failed,
}

impl Delivery {
    /// A delivery recorded at `now`, not yet attempted.
    pub fn pending(id: String, target: String, payload: String, now: k8s_openapi::jiff::Timestamp) -> Self {
        Delivery {
            id,
            target,
            payload,
            state: DeliveryState::Pending,
            attempts: 0,
            last_error: None,
            last_status: None,
            created_at: Some(Time(now)),
            last_attempt_at: None,
            next_attempt_at: None,
            finished_at: None,
        }
    }
}

/// One external call of the effects outbox.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// Deterministic id, identical on every attempt: the `webhook-id` header.
    pub id: String,
    /// The URL called (never a secret: credentials in a URL are refused).
    pub target: String,
    /// The JSON body, as recorded with the intent: identical on every attempt.
    pub payload: String,
    pub state: DeliveryState,
    /// Attempts made so far.
    #[serde(default)]
    pub attempts: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The HTTP status of the last answer, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_at: Option<Time>,
    /// Not before this time (backoff after a failed attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}
