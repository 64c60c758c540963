//! What every reconciler gets: a [`Context`] over its kind's own state `S` (child caches,
//! metrics), reachable as `ctx.field` through `Deref`. The clients are private to this
//! module: a reconcile reads through [`Context::read`] and writes only through the fenced
//! [`Writer`] that [`Context::writer`] gives it, so no write can skip the fence check, the
//! action log or the deadline.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::api::Patch;
use kube::runtime::events::Recorder;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ha::{Clients, Fence, Key, Ownership, ReadApi, WriteError, Writer};

pub struct Context<S> {
    clients: Clients,
    recorder: Recorder,
    pub own: Ownership,
    /// How often an object is looked at again without any change.
    pub resync: Duration,
    /// The kind's own state: its child caches and metrics.
    state: S,
    /// For each object whose status this replica patched: the resourceVersions its patches
    /// replaced. A cached copy still at one of them predates our own write (the watch has
    /// not caught up); planning from it could repeat work, so it is skipped.
    superseded: Superseded,
}

impl<S> std::ops::Deref for Context<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.state
    }
}

impl<S> Context<S> {
    pub fn new(clients: Clients, recorder: Recorder, own: Ownership, resync: Duration, state: S) -> Self {
        Self { clients, recorder, own, resync, state, superseded: Superseded::default() }
    }

    /// The start of every reconcile of `obj` under `fence`: the fence still holds (the
    /// reconcile is recorded in the action log) and the cached copy is not older than this
    /// replica's own last status write (planning from it could repeat work; the watch brings
    /// the newer one). The writer for `obj`, or `None`: nothing to do now.
    pub fn begin<K: Resource<DynamicType = ()>>(&self, fence: Fence, obj: &K) -> Option<Writer> {
        if !self.own.record(fence, obj, "reconcile") {
            return None;
        }
        let key = (obj.meta().namespace.clone().unwrap_or_default(), obj.name_any());
        if self.superseded.check(&key, obj.meta().resource_version.as_deref()) {
            return None;
        }
        Some(self.writer(fence, obj))
    }

    /// Patch `obj`'s status to `status` through `w`, with a resourceVersion precondition (the
    /// version `obj` was read at), and remember that version as superseded. `None` when the
    /// object changed since it was read (409). A field of `old` (`obj`'s status as read) that `status` no
    /// longer has (an `Option` now `None`, skipped when serialised) is sent as null, so the
    /// merge patch removes it instead of leaving it as it was.
    pub async fn patch_status<K, T: Serialize>(&self, w: &Writer, obj: &K, old: Option<&T>, status: &T) -> Result<Option<K>, WriteError>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    {
        let ns = obj.meta().namespace.clone().unwrap_or_default();
        let mut body = serde_json::to_value(status).unwrap_or(serde_json::Value::Null);
        if let Some(Ok(was)) = old.map(serde_json::to_value) {
            null_removed(&was, &mut body);
        }
        let patch = serde_json::json!({"metadata": {"resourceVersion": obj.resource_version()}, "status": body});
        match w.api::<K>(&ns).patch_status(&obj.name_any(), &Patch::Merge(&patch)).await {
            Ok(updated) => {
                self.superseded.mark((ns, obj.name_any()), obj.meta().resource_version.clone());
                Ok(Some(updated))
            }
            Err(e) if e.code() == Some(409) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Merge-patch `obj` itself (its spec or metadata, not its status) through `w`, and
    /// remember the version `obj` was read at as superseded, as [`Self::patch_status`] does:
    /// a cached copy at that version predates this write, even though the write changed no
    /// status (a controller that writes its status on top of the returned object would
    /// otherwise plan again from the copy in between). Returns the updated object.
    pub async fn patch<K, P>(&self, w: &Writer, obj: &K, patch: &Patch<P>) -> Result<K, WriteError>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
        P: Serialize + std::fmt::Debug,
    {
        let ns = obj.meta().namespace.clone().unwrap_or_default();
        let updated = w.api::<K>(&ns).patch(&obj.name_any(), patch).await?;
        self.superseded.mark((ns, obj.name_any()), obj.meta().resource_version.clone());
        Ok(updated)
    }

    /// The fenced writer for `obj` under `fence`.
    pub fn writer<K: Resource<DynamicType = ()>>(&self, fence: Fence, obj: &K) -> Writer {
        Writer::new(self.own.clone(), fence, self.clients.request.clone(), self.recorder.clone(), obj)
    }

    /// Reads of kind `K` in `ns` that the cache cannot answer.
    pub fn read<K>(&self, ns: &str) -> ReadApi<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        ReadApi::new(self.clients.request.clone(), ns)
    }

    /// Reads of the cluster-scoped kind `K` (a Namespace).
    pub fn read_cluster<K>(&self) -> ReadApi<K>
    where
        K: Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        ReadApi::cluster(self.clients.request.clone())
    }
}

/// The versions of each object that this replica's own status writes replaced, kept until
/// the cache shows a copy at none of them (a newer one: a reconcile writes from the cached
/// copy, so every later version is past the ones it replaced).
///
/// Every replaced version, not only the last: a reconcile may write twice (the Task
/// controller records its triggers, creates Jobs, then records them Running), and a cached
/// copy at the first write's result is as stale as one at the version it replaced. With
/// only the last remembered, a copy at the first version (not the last one) cleared the
/// memory, and the next copy, at the first write's result, was planned from: its Pending
/// runs had their Jobs created a second time.
#[derive(Default)]
struct Superseded(Mutex<HashMap<Key, Vec<String>>>);

impl Superseded {
    /// Versions kept per object, at most (a reconcile writes once or twice).
    const KEPT: usize = 8;

    /// True if `rv` is a version this replica has already replaced with its own write.
    /// Once the cache has a newer copy the entry is dropped, so the map stays small.
    fn check(&self, key: &Key, rv: Option<&str>) -> bool {
        let Ok(mut m) = self.0.lock() else {
            return false;
        };
        let stale = matches!((m.get(key), rv), (Some(old), Some(rv)) if old.iter().any(|o| o == rv));
        if !stale {
            m.remove(key);
        }
        stale
    }

    /// Remember that a write replaced version `rv` of `key`.
    fn mark(&self, key: Key, rv: Option<String>) {
        if let (Ok(mut m), Some(rv)) = (self.0.lock(), rv) {
            let v = m.entry(key).or_default();
            v.push(rv);
            let extra = v.len().saturating_sub(Self::KEPT);
            v.drain(..extra);
        }
    }
}

/// Add to the merge patch `new` an explicit null for every field of `old` it no longer has,
/// in nested objects too (arrays are replaced whole by a merge patch, so they need nothing).
fn null_removed(old: &serde_json::Value, new: &mut serde_json::Value) {
    let (serde_json::Value::Object(was), serde_json::Value::Object(now)) = (old, new) else {
        return;
    };
    for (k, v) in was {
        match now.get_mut(k) {
            None => {
                now.insert(k.clone(), serde_json::Value::Null);
            }
            Some(n) => null_removed(v, n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// RFC 7386: apply `patch` to `target`.
    fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        let serde_json::Value::Object(p) = patch else {
            *target = patch.clone();
            return;
        };
        if !target.is_object() {
            *target = json!({});
        }
        let t = target.as_object_mut().unwrap();
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
    }

    #[test]
    fn a_field_that_goes_is_nulled_so_the_merge_patch_gives_the_new_status() {
        let old = json!({"next": "t1", "count": 1, "action": {"state": "Pending", "deliveryId": "d"}, "runs": [{"a": 1, "data": "x"}]});
        let new = json!({"count": 2, "action": {"state": "Done"}, "runs": [{"a": 1}]});
        let mut body = new.clone();
        null_removed(&old, &mut body);
        assert_eq!(body["next"], serde_json::Value::Null);
        assert_eq!(body["action"]["deliveryId"], serde_json::Value::Null);
        let mut applied = old.clone();
        merge(&mut applied, &body);
        assert_eq!(applied, new);
        // Without the nulls, the removed fields would stay.
        let mut plain = old.clone();
        merge(&mut plain, &new);
        assert_ne!(plain, new);
    }

    fn key() -> Key {
        ("ns".to_string(), "t".to_string())
    }

    #[test]
    fn every_version_replaced_in_a_row_is_stale_until_a_newer_copy_shows() {
        let s = Superseded::default();
        assert!(!s.check(&key(), Some("10")), "nothing written yet");
        // One reconcile from copy 10 writes twice: 10 -> 11, then 11 -> 12.
        s.mark(key(), Some("10".into()));
        s.mark(key(), Some("11".into()));
        // The watch lags: copies 10 and 11 arrive (in any order, any number of times).
        assert!(s.check(&key(), Some("10")));
        assert!(s.check(&key(), Some("11")), "the first write's result is stale too");
        assert!(s.check(&key(), Some("10")));
        // Copy 12 is ours and current: planned from, and the memory is dropped.
        assert!(!s.check(&key(), Some("12")));
        assert!(!s.check(&key(), Some("11")), "forgotten once a newer copy was seen");
        assert!(!s.check(&("ns".to_string(), "other".to_string()), Some("10")), "per object");
    }

    /// An API server stand-in that answers every request with `cm` at resourceVersion "12".
    async fn serving_version_12() -> String {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "t", "namespace": "ns", "uid": "u", "resourceVersion": "12"}, "data": {"k": "v"}}).to_string();
        let app = axum::Router::new().fallback(move || std::future::ready(([(axum::http::header::CONTENT_TYPE, "application/json")], cm.clone())));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_copy_at_the_version_a_spec_patch_replaced_is_stale() {
        use crate::ha::{HaConfig, HaMetrics};
        use prometheus_client::registry::Registry;
        let client = kube::Client::try_from(kube::Config::new(serving_version_12().await.parse().unwrap())).unwrap();
        let recorder = Recorder::new(client.clone(), kube::runtime::events::Reporter { controller: "t".into(), instance: None });
        let cfg = HaConfig { shards: 4, lease_duration: Duration::from_secs(10), renew_deadline: Duration::from_secs(5), ..Default::default() };
        let own = Ownership::new(cfg, "me".into(), "ops".into(), HaMetrics::new(&mut Registry::default()), None);
        own.hold_for_test(1, 1, std::time::Instant::now());
        let fence = Fence { shard: 1, transitions: 1 };
        let ctx = Context::new(Clients { watch: client.clone(), request: client }, recorder, own, Duration::from_secs(60), ());
        let at = |rv: &str| -> k8s_openapi::api::core::v1::ConfigMap { serde_json::from_value(json!({"metadata": {"name": "t", "namespace": "ns", "uid": "u", "resourceVersion": rv}})).unwrap() };
        let w = ctx.begin(fence, &at("11")).expect("nothing written yet");
        // A spec patch of copy 11 (a status written on top of its result comes next): copy 11,
        // which the watch may still deliver, predates it and is not planned from again.
        let updated = ctx.patch(&w, &at("11"), &Patch::Merge(json!({"data": {"k": "v"}}))).await.unwrap();
        assert_eq!(updated.metadata.resource_version.as_deref(), Some("12"));
        assert!(ctx.begin(fence, &at("11")).is_none(), "the copy the patch replaced is stale");
        assert!(ctx.begin(fence, &at("12")).is_some(), "the patched copy is current");
    }

    #[test]
    fn the_versions_kept_are_bounded() {
        let s = Superseded::default();
        for v in 0..20 {
            s.mark(key(), Some(v.to_string()));
        }
        assert!(!s.check(&key(), Some("0")), "the oldest are dropped");
        for v in 0..20 {
            s.mark(key(), Some(v.to_string()));
        }
        assert!(s.check(&key(), Some("19")) && s.check(&key(), Some("12")));
    }
}
