//! The controller runtime: the one place that wires a kind's sharded informer, its work
//! queue, the child caches it needs, its reconcile workers (with per-controller metrics and
//! panic handling, in `ha::run_controller`), its Events recorder and its fenced writer.
//!
//! Adding a kind is: its types (`api`), its pure planner (`core`), a reconcile
//! `async fn(Arc<K>, Fence, Arc<Context<S>>) -> Result<Action, E>`, and a few lines in
//! `operator::run`:
//!
//! ```text
//! let kind = rt.kind::<MyKind>("mykind");                       // sharded cache + queue
//! let children = rt.children::<MyKind, Job>(&kind, "my.label/owner-uid", owner_key, changed); // wakes owners
//! rt.run(kind, MyState { children }, my_reconcile);            // workers, fence, writer
//! ```
//!
//! This module must never hold domain logic; it only connects the pieces.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube::Resource;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::context::Context;
use crate::ha::{Action, Clients, Fence, Informer, Key, Ownership, Queue, Synced, run_controller};

/// Settings every controller shares.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Only watch this namespace (default: all namespaces).
    pub watch_namespace: Option<String>,
    /// Concurrent reconciles per controller.
    pub workers: usize,
    /// How often an object is looked at again without any change.
    pub resync: Duration,
}

/// A kind this runtime reconciles: its sharded cache and its queue.
pub struct Kind<K: Resource> {
    pub name: &'static str,
    pub informer: Arc<Informer<K>>,
    pub queue: Queue,
}

/// The runtime of one replica.
pub struct Runtime {
    clients: Clients,
    own: Ownership,
    settings: Settings,
    recorder: Recorder,
    shutdown: CancellationToken,
    tasks: JoinSet<&'static str>,
    caches: Vec<Arc<dyn Synced>>,
}

/// A long-running task that reports its name when it ends (see `operator::supervise`).
pub async fn named(name: &'static str, task: impl Future<Output = ()>) -> &'static str {
    task.await;
    name
}

impl Runtime {
    pub fn new(clients: Clients, own: Ownership, settings: Settings, shutdown: CancellationToken) -> Self {
        let recorder = Recorder::new(clients.request.clone(), Reporter { controller: "shoal".into(), instance: Some(own.holder().to_string()) });
        Self { clients, own, settings, recorder, shutdown, tasks: JoinSet::new(), caches: Vec::new() }
    }

    /// The watch API of kind `K`, in the watched namespace or all of them.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match &self.settings.watch_namespace {
            Some(ns) => Api::namespaced(self.clients.watch.clone(), ns),
            None => Api::all(self.clients.watch.clone()),
        }
    }

    /// Supervise a long-running task: if it ends, the process stops with an error.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(named(name, task));
    }

    /// The leader's labeller for kind `K` (objects no sharded watch selects get their shard).
    pub fn label<K>(&mut self)
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Default,
    {
        let task = crate::ha::run_labeler(self.api::<K>(), self.own.clone(), self.shutdown.clone());
        self.spawn("labeller", task);
    }

    /// A kind to reconcile: its sharded cache (objects sharded by their own UID) and queue.
    pub fn kind<K>(&mut self, name: &'static str) -> Kind<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Default,
    {
        let queue = Queue::new(self.own.metrics().runtime.queue(&crate::ha::controller_name::<K>()));
        let informer = Informer::new(self.api::<K>(), self.own.clone(), queue.clone());
        self.caches.push(informer.clone());
        self.spawn("informer", informer.clone().run(self.shutdown.clone()));
        Kind { name, informer, queue }
    }

    /// A cache of `C`, children of `kind` (sharded by their controller owner's UID, and
    /// matching the label `selector`, so that kinds owning objects of one type each watch only
    /// their own), whose events wake `map(child)` in the kind's queue when
    /// `relevant(cached, new)` says so.
    pub fn children<K, C>(
        &mut self,
        kind: &Kind<K>,
        selector: &str,
        map: impl Fn(&C) -> Option<Key> + Send + Sync + 'static,
        relevant: impl Fn(Option<&C>, &C) -> bool + Send + Sync + 'static,
    ) -> Arc<Informer<C>>
    where
        K: Resource,
        C: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        C::DynamicType: Default,
    {
        let informer = Informer::new_mapped(self.api::<C>(), self.own.clone(), kind.queue.clone(), map, relevant, Some(selector));
        self.caches.push(informer.clone());
        self.spawn("child informer", informer.clone().run(self.shutdown.clone()));
        informer
    }

    /// The leader's labeller for children `C` whose shard label no watch selects (only those
    /// carrying `owner_label`).
    pub fn label_children<C>(&mut self, owner_label: &'static str)
    where
        C: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        C::DynamicType: Default,
    {
        let task = crate::ha::run_child_labeler(self.api::<C>(), self.own.clone(), owner_label, self.shutdown.clone());
        self.spawn("child labeller", task);
    }

    /// Reconcile `kind` with `reconcile`, sharing `state` (its child caches, its metrics)
    /// through a [`Context`] that hands out fenced writers.
    pub fn run<K, S, F, Fut, E>(&mut self, kind: Kind<K>, state: S, reconcile: F)
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Default,
        S: Send + Sync + 'static,
        F: Fn(Arc<K>, Fence, Arc<Context<S>>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Action, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let ctx = Arc::new(Context::new(self.clients.clone(), self.recorder.clone(), self.own.clone(), self.settings.resync, state));
        let worker = move |obj, fence| reconcile(obj, fence, ctx.clone());
        let task = run_controller(kind.informer, kind.queue, self.own.clone(), self.settings.workers, worker, self.shutdown.clone());
        self.spawn(kind.name, task);
    }

    /// A cache opened outside the runtime that readiness also waits for.
    pub fn cache(&mut self, cache: Arc<dyn Synced>) {
        self.caches.push(cache);
    }

    /// Every cache this runtime opened, for readiness.
    pub fn caches(&self) -> Vec<Arc<dyn Synced>> {
        self.caches.clone()
    }

    /// The supervised tasks, for `operator::supervise`.
    pub fn into_tasks(self) -> JoinSet<&'static str> {
        self.tasks
    }
}
