//! The fenced writer: the one way a reconcile changes the cluster.
//!
//! A reconcile gets a [`Writer`] for the object it reconciles, under the [`Fence`] it began
//! with. Every mutating request (create, patch, status patch, delete, delete-collection,
//! Event) goes through [`Writer::send`], which
//! 1. checks the fence right before the request and refuses to send when it no longer holds,
//! 2. appends the action to the action log,
//! 3. gives the request a deadline that ends when the fence ends, so a request that passed
//!    the check cannot land after another replica may have taken the shard.
//!
//! The client behind it has kube's retry layer turned off (see `ha::clients`): a retry of a
//! 429/503/504 inside the client would resend the request without a new fence check. Failed
//! requests are retried by the controller runtime, as a new reconcile under a fresh check.
//!
//! This module must never decide *what* to write; it only decides *whether* a write may go
//! out now.

use std::fmt::Debug;
use std::future::Future;

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Fence, Ownership};
use crate::metrics::rest::RestMetrics;

/// Why a write did not happen (or did not complete).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The fence lapsed (lost, handed over, or not renewed in time). Nothing was sent; the
    /// reconcile must stop acting.
    #[error("the shard fence no longer holds; nothing was sent")]
    Fenced,
    /// The request was sent but had not completed when the fence ended. Whether it took
    /// effect is unknown; the next owner observes and decides.
    #[error("the request did not complete before the shard fence ended")]
    Deadline,
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl WriteError {
    /// The HTTP status of an API error, if that is what this is.
    pub fn code(&self) -> Option<u16> {
        match self {
            WriteError::Kube(kube::Error::Api(e)) => Some(e.code),
            _ => None,
        }
    }

    /// The API server's message, for an API error.
    pub fn api_message(&self) -> Option<&str> {
        match self {
            WriteError::Kube(kube::Error::Api(e)) => Some(e.message.as_str()),
            _ => None,
        }
    }
}

/// Writes on behalf of one object under one fence.
#[derive(Clone)]
pub struct Writer {
    own: Ownership,
    fence: Fence,
    client: Client,
    recorder: Recorder,
    object: String,
    uid: String,
    reference: k8s_openapi::api::core::v1::ObjectReference,
}

impl Writer {
    /// A writer for `obj` under `fence`. `client` must be the request client (no retry layer).
    pub fn new<K>(own: Ownership, fence: Fence, client: Client, recorder: Recorder, obj: &K) -> Self
    where
        K: Resource<DynamicType = ()>,
    {
        Self {
            own,
            fence,
            client,
            recorder,
            object: format!("{}/{}", obj.meta().namespace.as_deref().unwrap_or(""), obj.name_any()),
            uid: obj.meta().uid.clone().unwrap_or_default(),
            reference: obj.object_ref(&()),
        }
    }

    /// Check the fence, record `action`, and run `request` with a deadline at the fence's end.
    pub async fn send<T, F>(&self, action: &str, request: F) -> Result<T, WriteError>
    where
        F: Future<Output = Result<T, kube::Error>>,
    {
        self.guard(action, request).await?.map_err(WriteError::from)
    }

    /// The fence check, action log and deadline of [`send`](Self::send), for a side effect
    /// that is not a Kubernetes request (a webhook call of the effects outbox). The effect's
    /// own result is returned inside.
    pub async fn guard<T, F>(&self, action: &str, effect: F) -> Result<T, WriteError>
    where
        F: Future<Output = T>,
    {
        let Some(deadline) = self.own.fence_deadline(self.fence) else {
            self.own.metrics().ownership_denied.inc();
            return Err(WriteError::Fenced);
        };
        if !self.own.record_action(self.fence, &self.object, &self.uid, action) {
            return Err(WriteError::Fenced);
        }
        // The deadline is polled first: a process that froze after the check above and wakes
        // past the fence's end gives up before the request is even started.
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(deadline.into()) => {
                tracing::warn!(object = %self.object, action, "request outlived its fence; abandoned");
                Err(WriteError::Deadline)
            }
            r = effect => Ok(r),
        }
    }

    /// A fenced view of the API of kind `K` in namespace `ns`.
    pub fn api<K>(&self, ns: &str) -> FencedApi<'_, K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        FencedApi { writer: self, api: Api::namespaced(self.client.clone(), ns) }
    }

    /// A fenced view of the API of the cluster-scoped kind `K` (a Namespace).
    pub fn cluster_api<K>(&self) -> FencedApi<'_, K>
    where
        K: Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>,
    {
        FencedApi { writer: self, api: Api::all(self.client.clone()) }
    }

    /// Publish an Event about the object, fenced like any other write. A failure to publish
    /// is logged, not returned: an Event is a report, not part of the object's state.
    /// `related` names a second object the Event is about (for a step, its Job).
    pub async fn event(&self, type_: EventType, reason: &str, note: String, related: Option<k8s_openapi::api::core::v1::ObjectReference>) {
        let ev = Event { type_, reason: reason.to_string(), note: Some(note), action: "Reconcile".into(), secondary: related };
        let action = format!("event:{reason}");
        if let Err(e) = self.send(&action, self.recorder.publish(&ev, &self.reference)).await {
            tracing::debug!(object = %self.object, error = %e, "publishing an event failed");
        }
    }
}

/// The mutating calls of `Api<K>`, each through [`Writer::send`].
pub struct FencedApi<'w, K> {
    writer: &'w Writer,
    api: Api<K>,
}

impl<K> FencedApi<'_, K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
{
    fn action(verb: &str, name: &str) -> String {
        format!("{verb} {}/{name}", K::kind(&()))
    }

    pub async fn create(&self, obj: &K) -> Result<K, WriteError> {
        let name = obj.meta().name.clone().unwrap_or_default();
        self.writer.send(&Self::action("create", &name), self.api.create(&PostParams::default(), obj)).await
    }

    /// Create `obj` and read the API server's answer as `R`, a slim view of `K`. A created
    /// Job comes back with its pod template and managedFields, most of its bytes, while its
    /// creator reads only the UID; decoding into a view that names only what is read skips
    /// building the rest (the same reason the caches hold `StepJob`s).
    pub async fn create_as<R: DeserializeOwned>(&self, obj: &K) -> Result<R, WriteError> {
        let name = obj.meta().name.clone().unwrap_or_default();
        let client = self.api.clone().into_client();
        let url = self.api.resource_url().to_string();
        let request = async move {
            let body = serde_json::to_vec(obj).map_err(kube::Error::SerdeError)?;
            let req = kube::core::Request::new(url).create(&PostParams::default(), body).map_err(kube::Error::BuildRequest)?;
            client.request::<R>(req).await
        };
        self.writer.send(&Self::action("create", &name), request).await
    }

    pub async fn patch<P: Serialize + Debug>(&self, name: &str, patch: &Patch<P>) -> Result<K, WriteError> {
        self.writer.send(&Self::action("patch", name), self.api.patch(name, &PatchParams::default(), patch)).await
    }

    pub async fn patch_status<P: Serialize + Debug>(&self, name: &str, patch: &Patch<P>) -> Result<K, WriteError> {
        self.writer.send(&Self::action("patch-status", name), self.api.patch_status(name, &PatchParams::default(), patch)).await
    }

    /// Delete `name`; a 404 (already gone) is success.
    pub async fn delete(&self, name: &str, dp: &DeleteParams) -> Result<(), WriteError> {
        self.remove(name, dp).await.map(|_| ())
    }

    /// Delete `name`: true if this request deleted it (or started its deletion), false if it
    /// was already gone (404).
    pub async fn remove(&self, name: &str, dp: &DeleteParams) -> Result<bool, WriteError> {
        match self.writer.send(&Self::action("delete", name), self.api.delete(name, dp)).await {
            Err(e) if e.code() == Some(404) => Ok(false),
            r => r.map(|_| true),
        }
    }

    /// Delete every object `lp` selects, server-side (so objects not yet in any cache go too).
    pub async fn delete_collection(&self, dp: &DeleteParams, lp: &ListParams) -> Result<(), WriteError> {
        let selector = lp.label_selector.clone().unwrap_or_default();
        self.writer.send(&Self::action("delete-collection", &selector), self.api.delete_collection(dp, lp)).await.map(|_| ())
    }
}

/// The read-only calls a reconcile may make outside its cache. Reads need no fence; they get
/// the request client's read timeout like everything else.
pub struct ReadApi<K> {
    api: Api<K>,
}

impl<K> ReadApi<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    pub fn new(client: Client, ns: &str) -> Self {
        Self { api: Api::namespaced(client, ns) }
    }
}

impl<K> ReadApi<K>
where
    K: Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    pub fn cluster(client: Client) -> Self {
        Self { api: Api::all(client) }
    }
}

impl<K> ReadApi<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    pub async fn get_opt(&self, name: &str) -> Result<Option<K>, kube::Error> {
        self.api.get_opt(name).await
    }

    pub async fn list(&self, lp: &ListParams) -> Result<kube::core::ObjectList<K>, kube::Error> {
        self.api.list(lp).await
    }
}

/// How long a request may wait for its response before it is abandoned (reads; writes end
/// earlier, with their fence).
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The user agent of the operator's requests.
pub const USER_AGENT: &str = concat!("shoal/", env!("CARGO_PKG_VERSION"));

/// The clients of one replica.
#[derive(Clone)]
pub struct Clients {
    /// For watches: long-lived streams, so no read timeout (the watcher has its own idle
    /// timeout).
    pub watch: Client,
    /// For every request: a read timeout, and no retry layer, so a request is sent once and
    /// cannot be resent by the client after its fence has ended.
    pub request: Client,
}

impl Clients {
    /// Both clients from `KUBECONFIG` or the in-cluster configuration, their requests
    /// counted in `rest` (if given).
    pub async fn infer(rest: Option<&RestMetrics>) -> anyhow::Result<Self> {
        let config = kube::Config::infer().await?;
        Self::from_config(config, rest)
    }

    pub fn from_config(mut config: kube::Config, rest: Option<&RestMetrics>) -> anyhow::Result<Self> {
        config.default_retry = false;
        // Named in the API server's audit log, so writes can be told apart per client.
        config.headers.push((http::header::USER_AGENT, http::HeaderValue::from_static(USER_AGENT)));
        let watch = client(config.clone(), rest)?;
        config.read_timeout = Some(READ_TIMEOUT);
        config.reset_reader_on_write = true;
        let request = client(config, rest)?;
        Ok(Self { watch, request })
    }
}

/// kube's client for `config`, with its requests counted in `rest`.
fn client(config: kube::Config, rest: Option<&RestMetrics>) -> anyhow::Result<Client> {
    let Some(rest) = rest else { return Ok(Client::try_from(config)?) };
    let layer = rest.layer(&config.cluster_url);
    Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&layer).build())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::ha::{HaConfig, HaMetrics};

    fn ownership(renew_deadline: Duration) -> Ownership {
        let cfg = HaConfig { shards: 4, lease_duration: Duration::from_secs(2), renew_deadline, retry_period: Duration::from_millis(50), ..Default::default() };
        Ownership::new(cfg, "me".into(), "ns".into(), HaMetrics::new(&mut Registry::default()), None)
    }

    fn writer(own: &Ownership, fence: Fence) -> Writer {
        // Nothing listens there; these tests never let a request reach the network.
        let client = Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let recorder = Recorder::new(client.clone(), kube::runtime::events::Reporter { controller: "t".into(), instance: None });
        let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": "o", "namespace": "ns", "uid": "u"}})).unwrap();
        Writer::new(own.clone(), fence, client, recorder, &cm)
    }

    /// A request that notes in `flag` that it was started.
    fn noting(flag: &Arc<AtomicBool>) -> impl std::future::Future<Output = Result<(), kube::Error>> + use<> {
        let flag = flag.clone();
        async move {
            flag.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test]
    async fn nothing_is_sent_without_the_fence() {
        let own = ownership(Duration::from_secs(1));
        let fence = Fence { shard: 1, transitions: 3 };
        let w = writer(&own, fence);
        let polled = Arc::new(AtomicBool::new(false));
        let r = w.send("create x", noting(&polled)).await;
        assert!(matches!(r, Err(WriteError::Fenced)), "{r:?}");
        assert!(!polled.load(Ordering::SeqCst), "the request was never started");
        // Held, but under another epoch: still refused.
        own.hold_for_test(1, 4, std::time::Instant::now());
        let r = w.send("create x", noting(&polled)).await;
        assert!(matches!(r, Err(WriteError::Fenced)), "{r:?}");
        assert!(!polled.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_request_cannot_outlive_its_fence() {
        let own = ownership(Duration::from_millis(300));
        own.hold_for_test(2, 1, std::time::Instant::now());
        let w = writer(&own, Fence { shard: 2, transitions: 1 });
        let r: Result<(), WriteError> = w.send("ok", async { Ok(()) }).await;
        assert!(r.is_ok());
        let t0 = std::time::Instant::now();
        let r: Result<(), WriteError> = w.send("hangs", std::future::pending()).await;
        assert!(matches!(r, Err(WriteError::Deadline)), "{r:?}");
        assert!(t0.elapsed() < Duration::from_millis(400), "abandoned when the fence ended, after {:?}", t0.elapsed());
        // And once the fence has ended, nothing more goes out.
        let r: Result<(), WriteError> = w.send("late", async { Ok(()) }).await;
        assert!(matches!(r, Err(WriteError::Fenced)), "{r:?}");
    }
}
