//! What every reconciler gets: a [`Context`] over its kind's own state `S` (child caches,
//! metrics), reachable as `ctx.field` through `Deref`. The clients are private to this
//! module: a reconcile reads through [`Context::read`] and writes only through the fenced
//! [`Writer`] that [`Context::writer`] gives it, so no write can skip the fence check, the
//! action log or the deadline.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::Resource;
use kube::runtime::events::Recorder;

use crate::ha::{Clients, Fence, Key, Ownership, ReadApi, Writer};

pub struct Context<S> {
    clients: Clients,
    recorder: Recorder,
    pub own: Ownership,
    /// How often an object is looked at again without any change.
    pub resync: Duration,
    /// The kind's own state: its child caches and metrics.
    state: S,
    /// For each object whose status this replica patched: the resourceVersion the patch
    /// replaced. A cached copy still at that version predates our own write (the watch has
    /// not caught up); planning from it could repeat work, so it is skipped.
    superseded: Mutex<HashMap<Key, String>>,
}

impl<S> std::ops::Deref for Context<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.state
    }
}

impl<S> Context<S> {
    pub fn new(clients: Clients, recorder: Recorder, own: Ownership, resync: Duration, state: S) -> Self {
        Self { clients, recorder, own, resync, state, superseded: Mutex::default() }
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

    /// True if `rv` is a version this replica has already replaced with its own write.
    /// Once the cache has a newer copy the entry is dropped, so the map stays small.
    pub fn is_superseded(&self, key: &Key, rv: Option<&str>) -> bool {
        let Ok(mut m) = self.superseded.lock() else {
            return false;
        };
        let stale = matches!((m.get(key), rv), (Some(old), Some(rv)) if old == rv);
        if !stale {
            m.remove(key);
        }
        stale
    }

    pub fn mark_superseded(&self, key: Key, rv: Option<String>) {
        if let (Ok(mut m), Some(rv)) = (self.superseded.lock(), rv) {
            m.insert(key, rv);
        }
    }
}
