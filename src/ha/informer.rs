//! Sharded watches, a sharded work queue and the controller loop.
//!
//! A replica opens one label-selected watch (`shoal.dev/shard=<i>`) per kind for each shard
//! it holds, and closes it when the shard goes, so each replica caches about 1/N of the
//! objects. Work for a shard this replica does not hold is dropped at the queue and counted.
//!
//! The label only decides who *sees* an object. An object whose label is not the shard it
//! belongs in (of its own UID; for a child, of its controller owner's UID) is never cached or
//! queued here: the watch that sees it fixes the label instead (in range: the holder of that
//! shard; missing or out of range: the leader, [`run_labeler`] and [`run_child_labeler`]).
//! This module must never act on an object on the word of its label alone.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::{Debug, Display};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{FutureExt, Stream, StreamExt};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Fence, KindLabel, LabelState, Ownership, ReasonLabel, ShardEvent, Sharding, label_state, unsharded_selector};
use crate::api::SHARD_LABEL;
use crate::metrics::runtime::RunningWork;
use crate::metrics::{QueueMetrics, ReconcileResult};

/// (namespace, name) of an object.
pub type Key = (String, String);

pub fn key_of<K: Resource>(o: &K) -> Key {
    (o.meta().namespace.clone().unwrap_or_default(), o.name_any())
}

/// A deduplicating work queue: a key is queued at most once, and a key that changes while
/// it is being reconciled is reconciled again afterwards, never concurrently. With
/// [`Queue::new`], it reports client-go's work-queue metrics.
#[derive(Clone, Default)]
pub struct Queue {
    inner: Arc<QueueInner>,
}

#[derive(Default)]
struct QueueInner {
    state: Mutex<QState>,
    notify: Notify,
    metrics: Option<QueueMetrics>,
}

#[derive(Default)]
struct QState {
    /// Each with the instant it was added (for the queue duration).
    ready: VecDeque<(Key, Instant)>,
    queued: HashSet<Key>,
    /// Each with the instant its reconcile started (for the work duration).
    running: HashMap<Key, Instant>,
    /// Added again while running: each with the instant it was first added meanwhile.
    dirty: HashMap<Key, Instant>,
    /// The one pending delayed add of each key: when it is due.
    delayed: HashMap<Key, tokio::time::Instant>,
}

impl QState {
    /// client-go's depth: what waits, including keys to run again once their reconcile ends.
    fn depth(&self) -> i64 {
        (self.ready.len() + self.dirty.len()) as i64
    }
}

impl RunningWork for QueueInner {
    fn running_seconds(&self) -> (f64, f64) {
        let now = Instant::now();
        let Ok(s) = self.state.lock() else { return (0.0, 0.0) };
        s.running.values().map(|t| now.saturating_duration_since(*t).as_secs_f64()).fold((0.0, 0.0), |(sum, max), d| (sum + d, f64::max(max, d)))
    }
}

impl Queue {
    /// A queue that reports its depth, adds, retries and durations through `metrics`.
    pub fn new(metrics: QueueMetrics) -> Self {
        let inner = Arc::new(QueueInner { metrics: Some(metrics.clone()), ..Default::default() });
        let weak: Weak<QueueInner> = Arc::downgrade(&inner);
        metrics.watch(weak);
        Self { inner }
    }

    pub fn add(&self, key: Key) {
        self.add_since(key, Instant::now());
    }

    /// Add `key`, waiting since `since`.
    fn add_since(&self, key: Key, since: Instant) {
        let Ok(mut s) = self.inner.state.lock() else {
            return;
        };
        let added = if s.running.contains_key(&key) {
            let fresh = !s.dirty.contains_key(&key);
            s.dirty.entry(key).or_insert(since);
            fresh
        } else if s.queued.insert(key.clone()) {
            s.ready.push_back((key, since));
            self.inner.notify.notify_one();
            true
        } else {
            false
        };
        if let Some(m) = &self.inner.metrics
            && added
        {
            m.adds.inc();
            m.depth.set(s.depth());
        }
    }

    /// Add `key` after `delay`. A key has at most one pending delayed add: an earlier one
    /// replaces a later one, a later one is dropped. So however often a key is requeued, it
    /// comes back once.
    pub fn add_after(&self, key: Key, delay: Duration) {
        let due = tokio::time::Instant::now() + delay;
        {
            let Ok(mut s) = self.inner.state.lock() else { return };
            if s.delayed.get(&key).is_some_and(|d| *d <= due) {
                return;
            }
            s.delayed.insert(key.clone(), due);
        }
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(due).await;
            // Only the timer still on record fires; one replaced by an earlier add does not.
            let mine = q.inner.state.lock().map(|mut s| {
                let mine = s.delayed.get(&key) == Some(&due);
                if mine {
                    s.delayed.remove(&key);
                }
                mine
            });
            if mine.unwrap_or(false) {
                q.add(key);
            }
        });
    }

    /// [`Self::add_after`] for a key whose reconcile failed or could not run: counted as a
    /// retry (client-go's `AddRateLimited`).
    pub fn retry(&self, key: Key, delay: Duration) {
        if let Some(m) = &self.inner.metrics {
            m.retries.inc();
        }
        self.add_after(key, delay);
    }

    /// Keys with a pending delayed add.
    pub fn pending_timers(&self) -> usize {
        self.inner.state.lock().map(|s| s.delayed.len()).unwrap_or(0)
    }

    async fn pop(&self) -> Key {
        loop {
            if let Ok(mut s) = self.inner.state.lock()
                && let Some((k, since)) = s.ready.pop_front()
            {
                s.queued.remove(&k);
                let now = Instant::now();
                s.running.insert(k.clone(), now);
                if !s.ready.is_empty() {
                    self.inner.notify.notify_one();
                }
                if let Some(m) = &self.inner.metrics {
                    m.queue_duration.observe(now.saturating_duration_since(since).as_secs_f64());
                    m.depth.set(s.depth());
                }
                return k;
            }
            self.inner.notify.notified().await;
        }
    }

    fn done(&self, key: &Key) {
        let Ok(mut s) = self.inner.state.lock() else { return };
        let started = s.running.remove(key);
        // Added again while it ran: queued now, as waiting since that add (counted then).
        if let Some(since) = s.dirty.remove(key)
            && s.queued.insert(key.clone())
        {
            s.ready.push_back((key.clone(), since));
            self.inner.notify.notify_one();
        }
        if let Some(m) = &self.inner.metrics {
            if let Some(started) = started {
                m.work_duration.observe(started.elapsed().as_secs_f64());
            }
            m.depth.set(s.depth());
        }
    }
}

type WatchItem<K> = Result<watcher::Event<K>, watcher::Error>;

/// How long a watch waits after its `n`th error in a row: 0.8 s doubling up to 15 s, plus a
/// random jitter of up to as much again, so the watches of many replicas do not retry in step.
fn watch_backoff() -> backon::ExponentialBackoff {
    ExponentialBuilder::default().with_min_delay(Duration::from_millis(800)).with_max_delay(Duration::from_secs(15)).with_factor(2.0).with_jitter().without_max_times().build()
}

/// Rung by the lease loop when the API server answers again after it did not: every watch
/// waiting out a back-off then tries again within a second (at a random moment, so that they
/// do not all list at once), instead of up to 30 s later.
pub(super) static API_BACK: Notify = Notify::const_new();

/// `stream` (a watcher) paused after each error for [`watch_backoff`], which starts over only
/// once the watch makes progress again (an object, a delete, a completed list), or cut short
/// by `api_back` ([`API_BACK`]). An expired resourceVersion (410 Gone) is not paused for: the API server
/// answered, and the watcher lists again at once.
///
/// kube's `default_backoff` starts over at every `Ok`, and a watcher whose list fails yields
/// `Init` before each new try: through an outage that ends in a relist (a restarted API
/// server, say), every watch of every replica retried about once a second for as long as it
/// lasted; and it pauses after the 410 that a restarted API server answers an old watch with,
/// for as long as the outage had grown the pause.
pub(super) fn with_backoff<K: Send + 'static>(stream: impl Stream<Item = WatchItem<K>> + Send + 'static, api_back: &'static Notify) -> impl Stream<Item = WatchItem<K>> + Send {
    futures::stream::unfold((stream.boxed(), watch_backoff(), None::<Duration>), move |(mut stream, mut backoff, pause)| async move {
        if let Some(pause) = pause {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = api_back.notified() => tokio::time::sleep(Duration::from_secs(1).mul_f64(super::leases::random_draw())).await,
            }
        }
        let item = stream.next().await?;
        let pause = match &item {
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                backoff = watch_backoff();
                None
            }
            Err(_) => backoff.next(),
            Ok(watcher::Event::Init) => None,
            Ok(_) => {
                backoff = watch_backoff();
                None
            }
        };
        Some((item, (stream, backoff, pause)))
    })
}

/// The cached objects, indexed by the queue key each one wakes (its owner), so that a
/// reconcile finds its children without scanning the whole cache.
struct Store<K> {
    objects: HashMap<Key, Arc<K>>,
    by_owner: HashMap<Key, HashSet<Key>>,
}

impl<K> Store<K> {
    fn insert(&mut self, key: Key, o: Arc<K>, map: impl Fn(&K) -> Option<Key>) {
        let owner = map(&o);
        if let Some(old) = self.objects.insert(key.clone(), o) {
            let old_owner = map(&old);
            if old_owner != owner {
                self.unindex(&key, old_owner);
            }
        }
        if let Some(owner) = owner {
            self.by_owner.entry(owner).or_default().insert(key);
        }
    }

    fn remove(&mut self, key: &Key, map: impl Fn(&K) -> Option<Key>) {
        if let Some(o) = self.objects.remove(key) {
            self.unindex(key, map(&o));
        }
    }

    fn children_of(&self, owner: &Key) -> Vec<Arc<K>> {
        self.by_owner.get(owner).map(|keys| keys.iter().filter_map(|k| self.objects.get(k).cloned()).collect()).unwrap_or_default()
    }

    fn unindex(&mut self, key: &Key, owner: Option<Key>) {
        if let Some(owner) = owner
            && let Some(set) = self.by_owner.get_mut(&owner)
        {
            set.remove(key);
            if set.is_empty() {
                self.by_owner.remove(&owner);
            }
        }
    }
}

type MapFn<K> = Box<dyn Fn(&K) -> Option<Key> + Send + Sync>;
type RelevantFn<K> = Box<dyn Fn(Option<&K>, &K) -> bool + Send + Sync>;

/// A cache of one kind, filled only from the shards this replica holds.
pub struct Informer<K: Resource> {
    api: Api<K>,
    kind: String,
    store: RwLock<Store<K>>,
    /// When each object last changed in this cache (for dispatch latency).
    seen: RwLock<HashMap<Key, std::time::Instant>>,
    /// Which queue key an event on an object wakes (the object itself, or its owner).
    map: MapFn<K>,
    /// Whether a change from the cached copy (if any) to the new one is worth a wake-up.
    relevant: RelevantFn<K>,
    tasks: Mutex<HashMap<u32, JoinHandle<()>>>,
    /// Shards whose watch has finished its initial list.
    synced: Mutex<HashSet<u32>>,
    queue: Queue,
    own: Ownership,
    /// What the objects' shard is computed from: their own UID (`new`) or their controller
    /// owner's (`new_mapped`, children).
    sharding: Sharding,
    /// A label selector every watched object must also match (a kind's own children, when
    /// several kinds own objects of one type).
    selector: Option<String>,
}

impl<K> Informer<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    /// An informer of objects sharded by their own UID, each waking itself in the queue. An
    /// object whose label is not the shard of its UID is relabelled, never cached.
    pub fn new(api: Api<K>, own: Ownership, queue: Queue) -> Arc<Self> {
        Self::build(api, own, queue, |o| Some(key_of(o)), |_, _| true, Sharding::OwnUid, None)
    }

    /// An informer of children, whose events wake `map(object)` in the queue (their
    /// owner), and only when `relevant(cached, new)` says the change matters to it. A child
    /// belongs in the shard of its controller owner's UID, never of its own: one labelled
    /// otherwise (created before `--shards` changed, or edited) is relabelled to it.
    pub fn new_mapped(
        api: Api<K>,
        own: Ownership,
        queue: Queue,
        map: impl Fn(&K) -> Option<Key> + Send + Sync + 'static,
        relevant: impl Fn(Option<&K>, &K) -> bool + Send + Sync + 'static,
        selector: Option<&str>,
    ) -> Arc<Self> {
        Self::build(api, own, queue, map, relevant, Sharding::ControllerUid, selector.map(String::from))
    }

    fn build(
        api: Api<K>,
        own: Ownership,
        queue: Queue,
        map: impl Fn(&K) -> Option<Key> + Send + Sync + 'static,
        relevant: impl Fn(Option<&K>, &K) -> bool + Send + Sync + 'static,
        sharding: Sharding,
        selector: Option<String>,
    ) -> Arc<Self> {
        let kind = K::kind(&K::DynamicType::default()).to_string();
        Arc::new(Self {
            api,
            kind,
            store: RwLock::new(Store { objects: HashMap::new(), by_owner: HashMap::new() }),
            seen: RwLock::new(HashMap::new()),
            map: Box::new(map),
            relevant: Box::new(relevant),
            tasks: Mutex::new(HashMap::new()),
            synced: Mutex::new(HashSet::new()),
            queue,
            own,
            sharding,
            selector,
        })
    }

    /// When the object last changed in this cache.
    pub fn seen_at(&self, key: &Key) -> Option<std::time::Instant> {
        self.seen.read().ok()?.get(key).copied()
    }

    /// The cached objects whose events wake `owner` (for a child informer: its children).
    pub fn children_of(&self, owner: &Key) -> Vec<Arc<K>> {
        self.store.read().map(|s| s.children_of(owner)).unwrap_or_default()
    }

    pub fn get(&self, key: &Key) -> Option<Arc<K>> {
        self.store.read().ok()?.objects.get(key).cloned()
    }

    /// Look at every cached object (under the cache's read lock: `f` must be quick).
    pub fn for_each(&self, mut f: impl FnMut(&K)) {
        if let Ok(s) = self.store.read() {
            s.objects.values().for_each(|o| f(o));
        }
    }

    fn insert(&self, key: Key, o: Arc<K>) {
        if let Ok(mut s) = self.store.write() {
            s.insert(key, o, &self.map);
        }
    }

    /// Remove `key` if the cached copy came from the watch of `shard`: when an object moves
    /// between two shards this replica holds, the other watch may already have cached it.
    fn remove_from(&self, key: &Key, shard: u32) {
        if let Ok(mut s) = self.store.write() {
            if s.objects.get(key).is_none_or(|o| Ownership::shard_label(o.as_ref()) != Some(shard)) {
                return;
            }
            s.remove(key, &self.map);
        }
        if let Ok(mut seen) = self.seen.write() {
            seen.remove(key);
        }
    }

    /// Remove the cached objects `gone` picks, and return them.
    fn remove_where(&self, mut gone: impl FnMut(&Key, &K) -> bool) -> Vec<Arc<K>> {
        let Ok(mut s) = self.store.write() else { return Vec::new() };
        let removed: Vec<(Key, Arc<K>)> = s.objects.iter().filter(|(k, o)| gone(k, o)).map(|(k, o)| (k.clone(), o.clone())).collect();
        for (k, _) in &removed {
            s.remove(k, &self.map);
        }
        if let Ok(mut seen) = self.seen.write() {
            seen.retain(|k, _| s.objects.contains_key(k));
        }
        removed.into_iter().map(|(_, o)| o).collect()
    }

    fn publish_size(&self) {
        let size = self.store.read().map(|s| s.objects.len()).unwrap_or(0);
        // A kind cached for several owners (Jobs of workflows, workers and Tasks) is one
        // series per cache, told apart by its owner label: `Job/shoal.dev/task-uid`.
        let kind = match &self.selector {
            Some(owner_label) => format!("{}/{owner_label}", self.kind),
            None => self.kind.clone(),
        };
        self.own.metrics().cache_objects.get_or_create(&KindLabel { kind }).set(size as i64);
    }

    /// Follow shard acquisitions and releases until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut events = self.own.subscribe();
        for s in self.own.held_shards() {
            self.start(s);
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = events.recv() => match ev {
                    Ok(ShardEvent::Acquired(s)) => self.start(s),
                    Ok(ShardEvent::Released(s)) => self.stop(s),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.resync(),
                    Err(_) => break,
                },
            }
        }
        let shards: Vec<u32> = self.tasks.lock().map(|t| t.keys().copied().collect()).unwrap_or_default();
        for s in shards {
            self.stop(s);
        }
    }

    fn resync(self: &Arc<Self>) {
        let held: HashSet<u32> = self.own.held_shards().into_iter().collect();
        let running: HashSet<u32> = self.tasks.lock().map(|t| t.keys().copied().collect()).unwrap_or_default();
        for s in held.difference(&running) {
            self.start(*s);
        }
        for s in running.difference(&held) {
            self.stop(*s);
        }
    }

    fn start(self: &Arc<Self>, shard: u32) {
        let Ok(mut tasks) = self.tasks.lock() else {
            return;
        };
        if tasks.contains_key(&shard) {
            return;
        }
        let me = self.clone();
        tasks.insert(shard, tokio::spawn(async move { me.watch_shard(shard).await }));
    }

    fn stop(&self, shard: u32) {
        if let Some(t) = self.tasks.lock().ok().and_then(|mut t| t.remove(&shard)) {
            t.abort();
        }
        if let Ok(mut synced) = self.synced.lock() {
            synced.remove(&shard);
        }
        // Dropped, not deleted: whoever holds the shard next lists them again.
        self.remove_where(|_, o| Ownership::shard_label(o) == Some(shard));
        self.publish_size();
    }

    async fn watch_shard(self: Arc<Self>, shard: u32) {
        let selector = match &self.selector {
            Some(extra) => format!("{SHARD_LABEL}={shard},{extra}"),
            None => format!("{SHARD_LABEL}={shard}"),
        };
        let cfg = watcher::Config::default().labels(&selector);
        self.follow(shard, with_backoff(watcher(self.api.clone(), cfg), &API_BACK)).await
    }

    /// Keep the cache of `shard` in step with its watch `stream`, waking the queue key of
    /// every object that changed in a way that matters, until the stream ends.
    async fn follow(&self, shard: u32, stream: impl Stream<Item = WatchItem<K>> + Send) {
        let mut stream = std::pin::pin!(stream);
        // The objects listed so far by the relist under way.
        let mut seen: HashSet<Key> = HashSet::new();
        // Objects this watch delivered that belong in another shard, whose relabel has not
        // gone through yet (retried every retry period).
        let mut misplaced: HashMap<Key, K> = HashMap::new();
        let mut retry = tokio::time::interval(self.own.config().retry_period);
        loop {
            let ev = tokio::select! {
                ev = stream.next() => match ev {
                    Some(ev) => ev,
                    None => break,
                },
                _ = retry.tick(), if !misplaced.is_empty() => {
                    let mut still = HashMap::new();
                    for (key, o) in misplaced.drain() {
                        if !self.relabel(&o, shard).await {
                            still.insert(key, o);
                        }
                    }
                    misplaced = still;
                    continue;
                }
            };
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::debug!(kind = %self.kind, shard, error = %e, "watch failed; backing off");
                    continue;
                }
            };
            match ev {
                watcher::Event::Init => seen.clear(),
                watcher::Event::InitApply(o) | watcher::Event::Apply(o) => {
                    let mut o = o;
                    o.meta_mut().managed_fields = None;
                    let key = key_of(&o);
                    misplaced.remove(&key);
                    if self.misplaced(&o, shard) {
                        // Not cached, not queued: nobody acts on it until its label is right.
                        self.own.metrics().mislabelled.inc();
                        if !self.relabel(&o, shard).await {
                            misplaced.insert(key, o);
                        }
                        continue;
                    }
                    seen.insert(key.clone());
                    self.apply(key, o);
                }
                watcher::Event::InitDone => {
                    // A relist (after a watch expired, broke, or fell too far behind) stands
                    // for every event missed in the gap: what it no longer lists was deleted
                    // meanwhile, and no delete event will come for it. Its owner is woken as
                    // a delete would wake it.
                    let gone = self.remove_where(|k, o| Ownership::shard_label(o) == Some(shard) && !seen.contains(k));
                    self.publish_size();
                    if let Ok(mut synced) = self.synced.lock() {
                        synced.insert(shard);
                    }
                    for o in gone {
                        if let Some(w) = (self.map)(&o) {
                            self.queue.add(w);
                        }
                    }
                }
                watcher::Event::Delete(o) => {
                    let key = key_of(&o);
                    misplaced.remove(&key);
                    if self.misplaced(&o, shard) {
                        // Relabelled out of this watch (or deleted): it was never cached here.
                        continue;
                    }
                    self.remove_from(&key, shard);
                    self.publish_size();
                    if let Some(w) = (self.map)(&o) {
                        self.queue.add(w);
                    }
                }
            }
        }
    }

    /// Cache `o` (listed or changed) and wake whom the change concerns: its owner if
    /// `relevant` says so, and always when it is another object under the same name (deleted
    /// and created again, say in a gap a relist covers) or it moved to another owner (the
    /// previous owner lost a child).
    fn apply(&self, key: Key, o: K) {
        let old = self.get(&key);
        let owner = (self.map)(&o);
        let replaced = old.as_ref().is_some_and(|old| old.meta().uid != o.meta().uid);
        let previous_owner = old.as_deref().and_then(|old| (self.map)(old)).filter(|w| Some(w) != owner.as_ref());
        let wake = if replaced || previous_owner.is_some() || (self.relevant)(old.as_deref(), &o) { owner.clone() } else { None };
        self.insert(key.clone(), Arc::new(o));
        if (wake.is_some() || old.is_none())
            && let Ok(mut s) = self.seen.write()
        {
            s.insert(key, std::time::Instant::now());
        }
        self.publish_size();
        for w in wake.into_iter().chain(previous_owner) {
            self.queue.add(w);
        }
    }

    /// Whether `o`, delivered by the watch of `shard`, belongs in another shard.
    fn misplaced(&self, o: &K, shard: u32) -> bool {
        self.own.home_shard(o, self.sharding).is_some_and(|home| home != shard)
    }

    /// Give `o`, seen by the watch of `shard`, the label of the shard it belongs in. False
    /// if it should be tried again.
    ///
    /// Under the fence of `shard`, not the leader's: the leader watches only objects that no
    /// sharded watch selects, so the holder of `shard` is the one replica that sees this
    /// object. What it writes is the same whoever writes it (the shard of the UID), so the
    /// fence is not what keeps it right; it keeps a replica that has lost `shard` from
    /// writing on the strength of a stale watch. The resourceVersion precondition keeps it
    /// from overwriting a later edit, or a new object under the same name (their own
    /// watch events decide again).
    async fn relabel(&self, o: &K, shard: u32) -> bool {
        let Some(home) = self.own.home_shard(o, self.sharding) else { return true };
        if self.own.owns_shard(shard).is_none() {
            // A lapse of the fence: try again. Lost or handed over: the next holder sees it.
            return !self.own.is_held_not_draining(shard);
        }
        let patch = patch_shard_label(self.api.clone().into_client(), o, home);
        // Bounded: the shard's watch waits for it.
        let Ok(result) = tokio::time::timeout(self.own.config().renew_deadline, patch).await else { return false };
        match result {
            Ok(()) => {
                self.own.metrics().relabelled.get_or_create(&ReasonLabel { reason: LabelState::Wrong.reason().into() }).inc();
                tracing::info!(kind = %self.kind, object = ?key_of(o), from = shard, to = home, "relabelled to the shard it belongs in");
                true
            }
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => true,
            Err(e) => {
                tracing::warn!(kind = %self.kind, object = ?key_of(o), error = %e, "relabelling failed; will retry");
                false
            }
        }
    }
}

/// Set `o`'s shard label to `shard`, only if `o` is still at the resourceVersion it was read
/// at (409 otherwise; a new object under the same name has another resourceVersion too).
async fn patch_shard_label<K>(client: kube::Client, o: &K, shard: u32) -> Result<(), kube::Error>
where
    K: Resource,
    K::DynamicType: Default,
{
    let url = K::url_path(&K::DynamicType::default(), o.meta().namespace.as_deref());
    let body = serde_json::json!({"metadata": {"resourceVersion": o.meta().resource_version, "labels": {SHARD_LABEL: shard.to_string()}}});
    let req = kube::core::Request::new(url).patch_metadata(&o.name_any(), &PatchParams::default(), &Patch::Merge(&body)).map_err(kube::Error::BuildRequest)?;
    client.request::<kube::core::PartialObjectMeta<K>>(req).await.map(|_| ())
}

/// A cache that can say whether it has synced the given shards (for readiness).
pub trait Synced: Send + Sync {
    /// Has the watch of every one of `shards` finished its initial list?
    fn synced(&self, shards: &[u32]) -> bool;
}

impl<K: Resource + Send + Sync> Synced for Informer<K> {
    fn synced(&self, shards: &[u32]) -> bool {
        self.synced.lock().map(|s| shards.iter().all(|x| s.contains(x))).unwrap_or(false)
    }
}

/// What to do after a successful reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Requeue(Duration),
    AwaitChange,
}

/// Run `workers` reconcilers over the queue until `shutdown`. Each reconcile runs only while
/// this replica owns the object's shard (counted in flight so a handover can drain it);
/// errors retry with per-object exponential backoff that resets on success.
pub async fn run_controller<K, F, Fut, E>(informer: Arc<Informer<K>>, queue: Queue, own: Ownership, workers: usize, reconcile: F, shutdown: CancellationToken)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
    F: Fn(Arc<K>, Fence) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Action, E>> + Send,
    E: Display + Send,
{
    let attempts: Arc<Mutex<HashMap<Key, usize>>> = Arc::default();
    let controller = controller_name::<K>();
    let metrics = own.metrics().runtime.controller(&controller, workers.max(1));
    let mut handles = Vec::new();
    for _ in 0..workers.max(1) {
        let (informer, queue, own, reconcile, shutdown, attempts) = (informer.clone(), queue.clone(), own.clone(), reconcile.clone(), shutdown.clone(), attempts.clone());
        let (controller, metrics) = (controller.clone(), metrics.clone());
        let reconcile = move |o, f| {
            let fut = reconcile(o, f);
            async move { fut.await.map_err(|e| e.to_string()) }
        };
        handles.push(tokio::spawn(async move {
            loop {
                let key = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    k = queue.pop() => k,
                };
                let Some(obj) = informer.get(&key) else {
                    queue.done(&key);
                    continue;
                };
                // The shard of its UID, and only if its label agrees (a cached copy with a wrong
                // label would be a bug upstream; it is refused and counted, not acted on).
                let Some(shard) = own.checked_shard(obj.as_ref()) else {
                    queue.done(&key);
                    continue;
                };
                let Some((fence, guard)) = own.begin(shard) else {
                    queue.done(&key);
                    // Held but the fence lapsed for a moment (a slow renew): try again once it
                    // is renewed. Not held, or being handed over: the next owner lists it.
                    if own.is_held_not_draining(shard) {
                        queue.retry(key, own.config().retry_period);
                    }
                    continue;
                };
                // A span per reconcile when tracing is on (none is built otherwise), with the
                // object's key: logs inside it carry its trace id, metrics its exemplar.
                let span =
                    if crate::telemetry::enabled() { tracing::info_span!("reconcile", controller = %controller, object = %format_args!("{}/{}", key.0, key.1), shard) } else { tracing::Span::none() };
                metrics.start();
                let started = Instant::now();
                let result = std::panic::AssertUnwindSafe(reconcile(obj, fence).instrument(span.clone())).catch_unwind().await;
                let elapsed = started.elapsed();
                drop(guard);
                // A reconcile whose fence ended while it ran (the API server hung, say) may have
                // stopped short, its writes refused or abandoned, whatever it returned; and the
                // event that woke it is spent. While this replica still holds the shard it runs
                // again once the fence is renewed (a shard that went is listed by its next owner).
                let cut_short = own.fence_deadline(fence).is_none() && own.is_held_not_draining(shard);
                // A panic is an error like any other: logged with the object, counted, and
                // retried with backoff, never left stuck.
                let result = result.unwrap_or_else(|panic| {
                    let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
                    metrics.panicked();
                    Err(format!("reconcile panicked: {what}"))
                });
                let outcome = match &result {
                    Ok(Action::Requeue(_)) => ReconcileResult::RequeueAfter,
                    Ok(Action::AwaitChange) => ReconcileResult::Success,
                    Err(_) => ReconcileResult::Error,
                };
                metrics.finish(outcome, elapsed, crate::metrics::exemplar(&span));
                queue.done(&key);
                if cut_short {
                    if let Err(e) = &result {
                        tracing::debug!(object = ?key, error = %e, "reconcile cut short by its fence; again once it is renewed");
                    }
                    queue.retry(key, own.config().retry_period);
                    continue;
                }
                match result {
                    Ok(action) => {
                        if let Ok(mut a) = attempts.lock() {
                            a.remove(&key);
                        }
                        if let Action::Requeue(d) = action {
                            queue.add_after(key, d);
                        }
                    }
                    Err(e) => {
                        let n = attempts
                            .lock()
                            .map(|mut a| {
                                let n = a.entry(key.clone()).or_default();
                                *n += 1;
                                *n
                            })
                            .unwrap_or(1);
                        let delay = ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(200))
                            .with_max_delay(Duration::from_secs(120))
                            .with_jitter()
                            .without_max_times()
                            .build()
                            .nth(n - 1)
                            .unwrap_or(Duration::from_secs(120));
                        crate::telemetry::reconcile_failed(&span, &e);
                        span.in_scope(|| tracing::warn!(object = ?key, error = %e, retry_in = ?delay, "reconcile failed"));
                        queue.retry(key, delay);
                    }
                }
            }
        }));
    }
    futures::future::join_all(handles).await;
}

/// The name a controller of kind `K` goes by in its metrics (`controller` and `name`
/// labels): its kind in lower case, as controller-runtime names a controller.
pub fn controller_name<K>() -> String
where
    K: Resource,
    K::DynamicType: Default,
{
    K::kind(&K::DynamicType::default()).to_lowercase()
}

/// Leader duty: give every object of kind `K` that no sharded watch selects (no shard label,
/// or one that is not a shard below `--shards`, e.g. after `--shards` shrank) the label of
/// the shard of its UID. For kinds sharded by their own UID.
pub async fn run_labeler<K>(api: Api<K>, own: Ownership, shutdown: CancellationToken)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let selector = unsharded_selector(own.config().shards);
    label_unsharded(api, own, Sharding::OwnUid, selector, shutdown).await
}

/// Leader duty for children: the same, for the objects of kind `K` that carry the label
/// `owned_by` (shoal's own children, e.g. `shoal.dev/workflow` on a step's Job), to the
/// shard of their controller owner's UID.
pub async fn run_child_labeler<K>(api: Api<K>, own: Ownership, owned_by: &str, shutdown: CancellationToken)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let selector = format!("{owned_by},{}", unsharded_selector(own.config().shards));
    label_unsharded(api, own, Sharding::ControllerUid, selector, shutdown).await
}

async fn label_unsharded<K>(api: Api<K>, own: Ownership, sharding: Sharding, selector: String, shutdown: CancellationToken)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    loop {
        while own.leader_fence().is_none() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {},
            }
        }
        let cfg = watcher::Config::default().labels(&selector);
        let mut stream = with_backoff(watcher(api.clone(), cfg), &API_BACK).applied_objects().boxed();
        let mut tick = tokio::time::interval(own.config().retry_period);
        // Restart the watch now and then: its fresh list catches any object an event missed.
        let relist_at = tokio::time::Instant::now() + own.config().lease_duration * 2;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => if own.leader_fence().is_none() || tokio::time::Instant::now() > relist_at { break },
                o = stream.next() => match o {
                    Some(Ok(o)) => {
                        if own.leader_fence().is_none() { break }
                        label_one(api.clone().into_client(), &own, sharding, &o).await;
                    }
                    Some(Err(_)) => continue,
                    None => break,
                },
            }
        }
    }
}

/// Label one object the leader's watch delivered with the shard it belongs in.
async fn label_one<K>(client: kube::Client, own: &Ownership, sharding: Sharding, o: &K)
where
    K: Resource,
    K::DynamicType: Default,
{
    let Some(shard) = own.home_shard(o, sharding) else { return };
    let label = o.meta().labels.as_ref().and_then(|l| l.get(SHARD_LABEL)).map(String::as_str);
    let state = label_state(label, shard, own.config().shards);
    if state == LabelState::Right {
        return;
    }
    match patch_shard_label(client, o, shard).await {
        Ok(()) => {
            own.metrics().relabelled.get_or_create(&ReasonLabel { reason: state.reason().into() }).inc();
        }
        Err(e) => tracing::debug!(error = %e, "labelling failed; will retry on the next event or the next list"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, owner) pairs stand in for objects; the owner key is the "map".
    fn owner(o: &(String, Option<String>)) -> Option<Key> {
        o.1.clone().map(|w| ("ns".to_string(), w))
    }

    fn names(v: Vec<Arc<(String, Option<String>)>>) -> Vec<String> {
        let mut n: Vec<String> = v.iter().map(|o| o.0.clone()).collect();
        n.sort();
        n
    }

    fn k(n: &str) -> Key {
        ("ns".to_string(), n.to_string())
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_has_one_pending_timer_and_the_earliest_wins() {
        let q = Queue::default();
        for i in 0..100u64 {
            q.add_after(k("a"), Duration::from_secs(300 + i));
        }
        q.add_after(k("b"), Duration::from_secs(60));
        q.add_after(k("b"), Duration::from_secs(5));
        assert_eq!(q.pending_timers(), 2, "one timer per key");
        // b's earlier timer replaced its later one: it comes back at 5 s, once.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(q.pop().await, k("b"));
        q.done(&k("b"));
        // a's first timer (300 s) fires; the 99 later requeues were dropped, so nothing
        // brings it back after that reconcile.
        tokio::time::sleep(Duration::from_secs(295)).await;
        assert_eq!(q.pop().await, k("a"));
        q.done(&k("a"));
        assert_eq!(q.pending_timers(), 0);
        let nothing_more = tokio::time::timeout(Duration::from_secs(3600), q.pop()).await;
        assert!(nothing_more.is_err(), "a and b each came back exactly once");
    }

    /// One ConfigMap `ns/o` in a shard this replica holds, in the cache of an informer that
    /// never watches, with a queue reporting to the returned registry.
    fn one_object() -> (Ownership, prometheus_client::registry::Registry, Arc<Informer<k8s_openapi::api::core::v1::ConfigMap>>, Queue) {
        let mut registry = prometheus_client::registry::Registry::default();
        let cfg = crate::ha::HaConfig { shards: 4, ..Default::default() };
        let own = Ownership::new(cfg, "me".into(), "ns".into(), crate::ha::HaMetrics::new(&mut registry), None);
        let cm: k8s_openapi::api::core::v1::ConfigMap =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "o", "namespace": "ns", "uid": "u", "labels": {"shoal.dev/shard": crate::core::shard::shard_of("u", 4).to_string()}}}))
                .unwrap();
        own.hold_for_test(crate::core::shard::shard_of("u", 4), 1, std::time::Instant::now());
        // Nothing listens there; the informer's watch is never started in these tests.
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let queue = Queue::new(own.metrics().runtime.queue("configmap"));
        let informer = Informer::new(Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, "ns"), own.clone(), queue.clone());
        informer.insert(k("o"), Arc::new(cm));
        (own, registry, informer, queue)
    }

    fn page(registry: &prometheus_client::registry::Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, registry).unwrap();
        s
    }

    #[tokio::test]
    async fn a_panicking_reconcile_is_counted_and_retried() {
        let (own, registry, informer, queue) = one_object();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let done_tx = Arc::new(Mutex::new(Some(done_tx)));
        let shutdown = CancellationToken::new();
        let c = calls.clone();
        let reconcile = move |_o, _f| {
            let (c, done_tx) = (c.clone(), done_tx.clone());
            async move {
                if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    panic!("bad input");
                }
                if let Some(tx) = done_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
                Ok::<_, String>(Action::AwaitChange)
            }
        };
        let run = tokio::spawn(run_controller(informer, queue.clone(), own.clone(), 1, reconcile, shutdown.clone()));
        queue.add(k("o"));
        tokio::time::timeout(Duration::from_secs(30), done_rx).await.expect("retried after the panic").unwrap();
        shutdown.cancel();
        run.await.unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        let m = own.metrics().runtime.controller("configmap", 1);
        assert_eq!((m.panics(), m.errors(), m.count(ReconcileResult::Error), m.count(ReconcileResult::Success)), (1, 1, 1, 1));
        assert!(page(&registry).contains("workqueue_retries_total{controller=\"configmap\",name=\"configmap\"} 1"), "the panic was retried through the rate limiter");
    }

    #[tokio::test]
    async fn results_queue_metrics_and_the_reconcile_s_trace_id_are_recorded() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        // Tracing on (an in-process provider that exports nothing), on this test's thread,
        // where the current-thread runtime runs the workers too.
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let _tracing = tracing::subscriber::set_default(tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test"))));
        crate::telemetry::test::enable_on_this_thread();
        let (own, registry, informer, queue) = one_object();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // The first reconcile asks to come back in an hour; the second has nothing to do.
        let reconcile = move |_o, _f| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(());
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok::<_, String>(Action::Requeue(Duration::from_secs(3600)))
            }
        };
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(run_controller(informer, queue.clone(), own.clone(), 2, reconcile, shutdown.clone()));
        queue.add(k("o"));
        queue.add(k("o"));
        rx.recv().await.unwrap();
        // Added again while it runs: marked to run once more afterwards, not concurrently.
        queue.add(k("o"));
        assert!(page(&registry).contains("controller_runtime_active_workers{controller=\"configmap\"} 1"));
        assert!(page(&registry).contains("workqueue_depth{controller=\"configmap\",name=\"configmap\"} 1"));
        rx.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        run.await.unwrap();
        let text = page(&registry);
        for line in [
            "controller_runtime_reconcile_total{controller=\"configmap\",result=\"requeue_after\"} 2",
            "controller_runtime_reconcile_total{controller=\"configmap\",result=\"success\"} 0",
            "controller_runtime_reconcile_time_seconds_count{controller=\"configmap\"} 2",
            "controller_runtime_max_concurrent_reconciles{controller=\"configmap\"} 2",
            "controller_runtime_active_workers{controller=\"configmap\"} 0",
            "workqueue_adds_total{controller=\"configmap\",name=\"configmap\"} 2",
            "workqueue_depth{controller=\"configmap\",name=\"configmap\"} 0",
            "workqueue_queue_duration_seconds_count{controller=\"configmap\",name=\"configmap\"} 2",
            "workqueue_work_duration_seconds_count{controller=\"configmap\",name=\"configmap\"} 2",
            "workqueue_retries_total{controller=\"configmap\",name=\"configmap\"} 0",
            "workqueue_unfinished_work_seconds{controller=\"configmap\",name=\"configmap\"} 0.0",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        let exemplar = text.lines().find(|l| l.starts_with("controller_runtime_reconcile_time_seconds_bucket") && l.contains(" # {trace_id=\""));
        assert!(exemplar.is_some(), "the reconcile time carries the reconcile's trace id:\n{text}");
    }

    /// The keys waiting in the queue, in order, taken out of it.
    fn drain(q: &Queue) -> Vec<Key> {
        let mut s = q.inner.state.lock().unwrap();
        let keys: Vec<Key> = s.ready.drain(..).map(|(k, _)| k).collect();
        s.queued.clear();
        keys
    }

    fn ownership(shards: u32, renew_deadline: Duration, retry_period: Duration) -> Ownership {
        use prometheus_client::registry::Registry;
        let cfg = crate::ha::HaConfig { shards, lease_duration: Duration::from_secs(2), renew_deadline, retry_period, ..Default::default() };
        Ownership::new(cfg, "me".into(), "ns".into(), crate::ha::HaMetrics::new(&mut Registry::default()), None)
    }

    /// A child ConfigMap `name` (uid `uid`) of workflow `owner`, holding `data`, in shard 0 of 1.
    fn child(name: &str, uid: &str, owner: &str, data: &str) -> k8s_openapi::api::core::v1::ConfigMap {
        serde_json::from_value(serde_json::json!({"metadata": {
            "name": name, "namespace": "ns", "uid": uid, "labels": {SHARD_LABEL: "0"},
            "ownerReferences": [{"apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "name": owner, "uid": format!("uid-{owner}"), "controller": true}],
        }, "data": {"d": data}}))
        .unwrap()
    }

    /// An informer of children that wake their owner when their data changes, never watching
    /// anything itself (`follow` is fed by the test).
    fn child_informer(queue: &Queue) -> Arc<Informer<k8s_openapi::api::core::v1::ConfigMap>> {
        use k8s_openapi::api::core::v1::ConfigMap;
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let owner = |o: &ConfigMap| o.metadata.owner_references.as_ref()?.first().map(|r| ("ns".to_string(), r.name.clone()));
        let relevant = |old: Option<&ConfigMap>, new: &ConfigMap| old.is_none_or(|old| old.data != new.data);
        Informer::new_mapped(Api::<ConfigMap>::namespaced(client, "ns"), ownership(1, Duration::from_secs(1), Duration::from_millis(100)), queue.clone(), owner, relevant, None)
    }

    /// A relist of `objects`, as the watcher delivers it.
    fn relist(objects: Vec<k8s_openapi::api::core::v1::ConfigMap>) -> Vec<WatchItem<k8s_openapi::api::core::v1::ConfigMap>> {
        std::iter::once(watcher::Event::Init).chain(objects.into_iter().map(watcher::Event::InitApply)).chain([watcher::Event::InitDone]).map(Ok).collect()
    }

    #[tokio::test]
    async fn a_relist_wakes_the_owners_of_what_changed_or_vanished_in_the_gap() {
        let queue = Queue::default();
        let informer = child_informer(&queue);
        let feed = |items| informer.follow(0, futures::stream::iter(items));
        feed(relist(vec![child("a-1", "u1", "a", "x"), child("b-1", "u2", "b", "x"), child("c-1", "u3", "c", "x")])).await;
        assert_eq!(drain(&queue), [k("a"), k("b"), k("c")], "a first list wakes every owner");

        // The watch broke and came back with a relist: b-1 was deleted in the gap (no delete
        // event will ever come), c-1 changed, a-1 did not.
        feed(relist(vec![child("a-1", "u1", "a", "x"), child("c-1", "u3", "c", "y")])).await;
        let mut woken = drain(&queue);
        woken.sort();
        assert_eq!(woken, [k("b"), k("c")], "the owner of what vanished and of what changed, not of what stayed the same");
        assert!(informer.get(&k("b-1")).is_none() && informer.children_of(&k("b")).is_empty());

        // a-1 deleted and created again in a gap, same data: another object, so news to a.
        feed(relist(vec![child("a-1", "u9", "a", "x"), child("c-1", "u3", "c", "y")])).await;
        assert_eq!(drain(&queue), [k("a")]);
        // A child that moves to another owner wakes both (its new owner first).
        feed(vec![Ok(watcher::Event::Apply(child("c-1", "u3", "d", "y")))]).await;
        assert_eq!(drain(&queue), [k("d"), k("c")]);
    }

    #[tokio::test]
    async fn a_reconcile_cut_short_by_its_fence_runs_again_once_the_fence_is_renewed() {
        let (deadline, retry) = (Duration::from_millis(300), Duration::from_millis(50));
        let own = ownership(1, deadline, retry);
        own.hold_for_test(0, 1, std::time::Instant::now());
        let queue = Queue::default();
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let api = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, "ns");
        let informer = Informer::new(api, own.clone(), queue.clone());
        let mut cm = child("o", "u", "nobody", "x");
        cm.metadata.owner_references = None;
        informer.insert(k("o"), Arc::new(cm));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = calls.clone();
        // The first reconcile outlives its fence (the API server hung under it) and, as a
        // reconcile whose write was refused by the fence does, returns without a requeue.
        let reconcile = move |_o, _f| {
            let c = c.clone();
            async move {
                if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                Ok::<_, String>(Action::AwaitChange)
            }
        };
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(run_controller(informer, queue.clone(), own.clone(), 1, reconcile, shutdown.clone()));
        queue.add(k("o"));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "not while the fence is down");
        // The API server is back and the member Lease renewed: the cut-short reconcile runs again.
        own.hold_for_test(0, 1, std::time::Instant::now() + Duration::from_secs(3600));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2, "once more, and only once");
        shutdown.cancel();
        run.await.unwrap();
    }

    /// When each item of `items`, fed through `backoff`, came out (the stream yields every
    /// item at once, so any gap is the backoff's).
    async fn timeline<S: Stream<Item = WatchItem<()>>>(backoff: impl FnOnce(futures::stream::Iter<std::vec::IntoIter<WatchItem<()>>>) -> S, items: Vec<WatchItem<()>>) -> Vec<Duration> {
        let t0 = tokio::time::Instant::now();
        let mut out = std::pin::pin!(backoff(futures::stream::iter(items)));
        let mut at = Vec::new();
        while out.next().await.is_some() {
            at.push(t0.elapsed());
        }
        at
    }

    /// A watcher whose list keeps failing: `Init`, then the error, again and again.
    fn failing_lists(n: usize) -> Vec<WatchItem<()>> {
        (0..n).flat_map(|_| [Ok(watcher::Event::Init), Err(watcher::Error::NoResourceVersion)]).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_backs_off_until_it_makes_progress() {
        // Gaps between the failing tries: 0.8 s doubling to 15 s (each plus up to as much again).
        static BACK: Notify = Notify::const_new();
        let backoff = |s| with_backoff(s, &BACK);
        let at = timeline(backoff, failing_lists(8)).await;
        let tries: Vec<f64> = at.chunks(2).map(|c| c[0].as_secs_f64()).collect();
        let gaps: Vec<f64> = tries.windows(2).map(|w| w[1] - w[0]).collect();
        for (i, (gap, floor)) in gaps.iter().zip([0.8, 1.6, 3.2, 6.4, 12.8, 15.0, 15.0]).enumerate() {
            assert!(*gap >= floor && *gap < floor * 2.0 + 0.01, "gap {i}: {gap:.2}s, expected {floor}s to {}s ({gaps:?})", floor * 2.0);
        }
        // An expired resourceVersion (the API server answered: list again) is not paused for,
        // and starts it over.
        let mut items = failing_lists(4);
        items.extend([Err(watcher::Error::WatchError(kube::core::Status { code: 410, ..Default::default() }.boxed())), Ok(watcher::Event::Init)]);
        items.extend(failing_lists(2));
        let at = timeline(backoff, items).await;
        assert_eq!(at[9], at[8], "no pause after the 410");
        let gap = (at[12] - at[11]).as_secs_f64();
        assert!((0.8..1.61).contains(&gap), "the first pause after a 410 is short again: {gap:.2}s");

        // So does the lease loop's word that the API server answers again: a long pause ends
        // within a second of it.
        let ring = tokio::spawn(async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            BACK.notify_waiters();
        });
        let at = timeline(backoff, failing_lists(8)).await;
        ring.await.unwrap();
        let tries: Vec<f64> = at.chunks(2).map(|c| c[0].as_secs_f64()).collect();
        let after = tries.iter().find(|t| **t >= 20.0).copied().unwrap_or(f64::MAX);
        assert!(after <= 21.0, "the first try after the API server is back: {after:.2}s ({tries:?})");

        // Progress starts it over.
        let mut items = failing_lists(4);
        items.extend([Ok(watcher::Event::InitApply(())), Ok(watcher::Event::InitDone)]);
        items.extend(failing_lists(2));
        let at = timeline(backoff, items).await;
        let gap = (at[12] - at[11]).as_secs_f64();
        assert!((0.8..1.61).contains(&gap), "after a completed list the first pause is short again: {gap:.2}s");

        // What kube's default_backoff does with the same watcher: `Init` starts it over every
        // time, so it never waits more than its first pause.
        let at = timeline(|s| s.default_backoff(), failing_lists(8)).await;
        let longest = at.chunks(2).map(|c| c[0]).collect::<Vec<_>>().windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).fold(0.0, f64::max);
        assert!(longest < 1.61, "kube's default_backoff: {longest:.2}s at most");
    }

    #[test]
    fn the_owner_index_follows_inserts_relabels_and_removals() {
        let mut s = Store { objects: HashMap::new(), by_owner: HashMap::new() };
        let k = |n: &str| ("ns".to_string(), n.to_string());
        let obj = |n: &str, w: Option<&str>| Arc::new((n.to_string(), w.map(String::from)));
        s.insert(k("a-1"), obj("a-1", Some("a")), owner);
        s.insert(k("a-2"), obj("a-2", Some("a")), owner);
        s.insert(k("b-1"), obj("b-1", Some("b")), owner);
        s.insert(k("orphan"), obj("orphan", None), owner);
        assert_eq!(names(s.children_of(&k("a"))), ["a-1", "a-2"]);
        // An update that moves a child to another owner moves it in the index too.
        s.insert(k("a-2"), obj("a-2", Some("b")), owner);
        assert_eq!(names(s.children_of(&k("a"))), ["a-1"]);
        assert_eq!(names(s.children_of(&k("b"))), ["a-2", "b-1"]);
        s.remove(&k("a-1"), owner);
        assert!(s.children_of(&k("a")).is_empty());
        assert!(!s.by_owner.contains_key(&k("a")), "empty owner entries are dropped");
        s.remove(&k("orphan"), owner);
        assert_eq!(s.objects.len(), 2);
    }
}
