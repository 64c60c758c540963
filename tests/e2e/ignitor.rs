//! The Ignitor controller against the real control plane: `NOW` fires once, an RFC 3339 time
//! fires when it comes (a past one at once), a 6-field cron fires at every matching time,
//! suspend and resume (catch-up), and an invalid time zone. Bounds only catch hangs.

use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use shoal::api::task::{Ignitor, IgnitorStatus};

use crate::common::{self, eventually};
use crate::operator::{self, Operator};

const T: Duration = Duration::from_secs(60);

fn ignitor(name: &str, spec: Value) -> Ignitor {
    serde_json::from_value(json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "Ignitor", "metadata": {"name": name}, "spec": spec})).unwrap()
}

/// A ready operator replica watching a fresh namespace (so that timing starts with it).
async fn setup(client: &Client, prefix: &str) -> (String, Operator, Api<Ignitor>) {
    let ops = common::namespace(client, &format!("{prefix}-ops")).await;
    let work = common::namespace(client, prefix).await;
    let mut op = Operator::new(&ops, &work);
    op.start("r1");
    let port = op.replicas[0].metrics_port;
    eventually(T, "the replica to be ready", || async { (operator::http_get(port, "/readyz").await?.0 == 200).then_some(()) }).await;
    let api = Api::namespaced(client.clone(), &work);
    (work, op, api)
}

fn status(i: &Ignitor) -> IgnitorStatus {
    i.status.clone().unwrap_or_default()
}

fn created(i: &Ignitor) -> Timestamp {
    i.metadata.creation_timestamp.as_ref().unwrap().0
}

fn ready(i: &Ignitor) -> Option<(String, String, String)> {
    let c = i.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Wait until `name` has fired at least `n` times.
async fn fired(api: &Api<Ignitor>, name: &str, n: i64) -> Ignitor {
    eventually(T, &format!("{name} to fire {n} times"), || async {
        let i = api.get(name).await.ok()?;
        (status(&i).ignitions_count >= n).then_some(i)
    })
    .await
}

async fn wait_reason(api: &Api<Ignitor>, name: &str, reason: &str) -> Ignitor {
    eventually(T, &format!("{name} Ready reason {reason}"), || async {
        let i = api.get(name).await.ok()?;
        (ready(&i)?.1 == reason).then_some(i)
    })
    .await
}

async fn events_of(client: &Client, ns: &str, name: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default().fields(&format!("involvedObject.name={name},involvedObject.kind=Ignitor"))).await.unwrap().items
}

async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str) -> Event {
    eventually(T, &format!("event {reason} on {name}"), || async { events_of(client, ns, name).await.into_iter().find(|e| e.reason.as_deref() == Some(reason)) }).await
}

fn secs(n: i64) -> SignedDuration {
    SignedDuration::from_secs(n)
}

/// The scheduled times recorded, oldest first.
fn scheduled(s: &IgnitorStatus) -> Vec<Timestamp> {
    s.ignitions.iter().map(|i| i.scheduled_time.0).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn now_fires_exactly_once() {
    let client = common::client().await;
    let (ns, op, api) = setup(&client, "ign-now").await;
    api.create(&PostParams::default(), &ignitor("once", json!({"scheduled": "NOW", "data": "hello"}))).await.unwrap();
    let i = fired(&api, "once", 1).await;
    let s = status(&i);
    assert_eq!(s.ignitions_count, 1);
    assert_eq!(s.ignitions.len(), 1);
    assert_eq!(s.ignitions[0].scheduled_time.0, created(&i), "NOW is scheduled at the creation time");
    assert!(s.ignitions[0].fired_at.0 >= created(&i));
    assert_eq!(s.last_scheduled_time.as_ref().map(|t| t.0), Some(created(&i)));
    assert!(s.next_ignition.is_none(), "{s:?}");
    assert!(s.last_ignition.is_some());
    assert_eq!(ready(&i).unwrap().0, "True");
    assert_eq!(ready(&i).unwrap().1, "Completed");
    assert_eq!(s.observed_generation, i.metadata.generation);
    let ev = wait_event(&client, &ns, "once", "Fired").await;
    assert!(ev.message.as_deref().unwrap_or_default().contains("fired scheduled time"), "{ev:?}");
    // Still once a while later (a spec edit does not fire it again either).
    api.patch("once", &PatchParams::default(), &Patch::Merge(json!({"spec": {"description": "edited"}}))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = status(&api.get("once").await.unwrap());
    assert_eq!((later.ignitions_count, later.ignitions.len()), (1, 1), "{later:?}");
    assert_eq!(later.ignitions, s.ignitions);
    assert_eq!(op.metric_sum("shoal_ignitor_firings_total{outcome=\"fired\"}").await, 1.0);
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_time_fires_when_it_comes_and_a_past_one_at_once() {
    let client = common::client().await;
    let (ns, _op, api) = setup(&client, "ign-at").await;
    // ~4 s ahead, with a fraction of a second (kept to the microsecond).
    let at = Timestamp::from_millisecond(Timestamp::now().checked_add(secs(4)).unwrap().as_millisecond()).unwrap();
    let past = Timestamp::from_second(Timestamp::now().as_second() - 3600).unwrap();
    let pp = PostParams::default();
    api.create(&pp, &ignitor("later", json!({"scheduled": at.to_string()}))).await.unwrap();
    api.create(&pp, &ignitor("past", json!({"scheduled": past.to_string()}))).await.unwrap();

    // Before the time: scheduled, not fired.
    let i = eventually(T, "later to be looked at", || async { api.get("later").await.ok().filter(|i| ready(i).is_some()) }).await;
    if Timestamp::now() < at {
        let s = status(&i);
        assert_eq!(s.ignitions_count, 0, "fired before its time {at}: {s:?}");
        assert_eq!(ready(&i).unwrap().1, "Scheduled");
        assert_eq!(s.next_ignition.as_ref().map(|t| t.0.as_second()), Some(at.as_second()));
    }
    let i = fired(&api, "later", 1).await;
    let s = status(&i);
    assert_eq!(s.ignitions_count, 1);
    assert_eq!(s.ignitions[0].scheduled_time.0, at);
    let fired_at = s.ignitions[0].fired_at.0;
    assert!(fired_at >= at, "fired at {fired_at}, before {at}");
    assert!(fired_at <= at.checked_add(secs(10)).unwrap(), "fired at {fired_at}, long after {at}");
    assert!(s.next_ignition.is_none());
    assert_eq!(ready(&i).unwrap().1, "Completed");

    // A time already past at creation fires at once (documented: due at once).
    let p = fired(&api, "past", 1).await;
    let s = status(&p);
    assert_eq!(s.ignitions_count, 1);
    assert_eq!(s.ignitions[0].scheduled_time.0, past);
    assert!(s.ignitions[0].fired_at.0 >= created(&p));
    assert!(s.ignitions[0].fired_at.0 <= created(&p).checked_add(secs(10)).unwrap(), "{s:?}");
    assert_eq!(s.missed_count, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status(&api.get("later").await.unwrap()).ignitions_count, 1);
    assert_eq!(status(&api.get("past").await.unwrap()).ignitions_count, 1);
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cron_every_two_seconds_fires_at_every_time() {
    let client = common::client().await;
    let (ns, _op, api) = setup(&client, "ign-cron").await;
    // maxCatchUp 10: a reconcile delayed by a loaded machine still fires every time, so that
    // this checks the controller's bookkeeping, not the machine's speed.
    api.create(&PostParams::default(), &ignitor("tick", json!({"scheduled": "*/2 * * * * *", "maxCatchUp": 10}))).await.unwrap();
    fired(&api, "tick", 1).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    let i = fired(&api, "tick", 4).await;
    let s = status(&i);
    let times = scheduled(&s);
    assert_eq!(s.ignitions_count as usize, times.len(), "{times:?}");
    assert!(times.len() >= 4, "{times:?}");
    let first = times[0].as_second() - created(&i).as_second();
    assert!(first > 0 && first <= 2, "the first time is the first even second after creation: {times:?}, created {}", created(&i));
    assert!(times.iter().all(|t| t.as_second() % 2 == 0 && t.subsec_nanosecond() == 0), "{times:?}");
    for w in times.windows(2) {
        assert_eq!(w[1].as_second() - w[0].as_second(), 2, "a gap or a duplicate: {times:?}");
    }
    for f in &s.ignitions {
        assert!(f.fired_at.0 >= f.scheduled_time.0, "{f:?}");
    }
    assert_eq!((s.missed_count, s.missed.len()), (0, 0));
    let last = *times.last().unwrap();
    assert_eq!(s.last_scheduled_time.as_ref().map(|t| t.0), Some(last));
    let next = s.next_ignition.as_ref().expect("a next time").0;
    assert!(next > last, "next {next} after the last {last}");
    assert_eq!(ready(&i).unwrap().1, "Scheduled");
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn suspended_fires_nothing_and_resuming_fires_the_latest() {
    let client = common::client().await;
    let (ns, _op, api) = setup(&client, "ign-susp").await;
    api.create(&PostParams::default(), &ignitor("paused", json!({"scheduled": "*/2 * * * * *", "suspend": true}))).await.unwrap();
    let i = wait_reason(&api, "paused", "Suspended").await;
    assert_eq!(ready(&i).unwrap().0, "False");
    let created = created(&i);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let i = api.get("paused").await.unwrap();
    let s = status(&i);
    assert_eq!((s.ignitions_count, s.missed_count), (0, 0), "{s:?}");
    assert!(s.next_ignition.is_none() && s.last_scheduled_time.is_none(), "{s:?}");
    assert_eq!(ready(&i).unwrap().1, "Suspended");

    let resumed = Timestamp::now();
    api.patch("paused", &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": false}}))).await.unwrap();
    let i = fired(&api, "paused", 1).await;
    let s = status(&i);
    // maxCatchUp 1: the latest time that passed while suspended fires; the ones before it
    // (every even second after creation) are missed.
    let first = s.ignitions[0].scheduled_time.0;
    assert!(first >= resumed.checked_sub(secs(2)).unwrap(), "fired {first}, resumed at {resumed}");
    assert!(s.ignitions[0].fired_at.0 >= resumed.checked_sub(secs(1)).unwrap());
    let first_even = created.as_second() + 2 - created.as_second() % 2;
    let expected: Vec<i64> = (first_even..first.as_second()).step_by(2).collect();
    assert!(expected.len() >= 2, "{expected:?}, created {created}, fired {first}");
    assert_eq!(s.missed_count, expected.len() as i64, "{s:?}");
    let missed: Vec<i64> = s.missed.iter().map(|t| t.0.as_second()).collect();
    assert_eq!(missed, expected[expected.len().saturating_sub(10)..], "the newest missed times");
    assert_eq!(ready(&i).unwrap().1, "Scheduled");
    assert!(s.next_ignition.is_some());
    let ev = wait_event(&client, &ns, "paused", "MissedSchedule").await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    // And it goes on firing.
    fired(&api, "paused", 2).await;
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_time_zone_is_an_invalid_schedule() {
    let client = common::client().await;
    let (ns, _op, api) = setup(&client, "ign-tz").await;
    api.create(&PostParams::default(), &ignitor("mars", json!({"scheduled": "*/2 * * * * *", "timeZone": "Mars/Olympus"}))).await.unwrap();
    let i = wait_reason(&api, "mars", "InvalidSchedule").await;
    let (ok, _, message) = ready(&i).unwrap();
    assert_eq!(ok, "False");
    assert!(message.contains("Mars/Olympus"), "{message}");
    let s = status(&i);
    let failed = s.conditions.iter().find(|c| c.type_ == "Failed").unwrap();
    assert_eq!(failed.status, "True");
    assert_eq!(s.observed_generation, i.metadata.generation);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = status(&api.get("mars").await.unwrap());
    assert_eq!(s.ignitions_count, 0);
    assert!(s.next_ignition.is_none());
    // Fixing the zone schedules it.
    api.patch("mars", &PatchParams::default(), &Patch::Merge(json!({"spec": {"timeZone": "Europe/Berlin"}}))).await.unwrap();
    fired(&api, "mars", 1).await;
    common::cleanup(&client, &ns).await;
}
