//! Admission: the API server itself rejects bad objects, from the generated OpenAPI schema
//! and CEL rules, with a message that says what is wrong.

use kube::Client;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::common;

async fn create(client: &Client, ns: &str, obj: Value) -> Result<(), String> {
    let api = common::shoal_api(client, ns, obj["kind"].as_str().unwrap());
    let obj: DynamicObject = serde_json::from_value(obj).unwrap();
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) => Err(format!("{} ({})", e.message, e.code)),
        Err(e) => panic!("unexpected client error: {e}"),
    }
}

fn wf(name: &str, containers: Value) -> Value {
    json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": name}, "spec": {"containers": containers}})
}

#[track_caller]
fn rejected(r: Result<(), String>, needle: &str) {
    match r {
        Ok(()) => panic!("expected rejection mentioning {needle:?}, but the object was accepted"),
        Err(msg) => {
            assert!(msg.contains("(422)"), "expected 422 Invalid, got: {msg}");
            assert!(msg.contains(needle), "rejection should mention {needle:?}: {msg}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn workflow_rules() {
    let client = common::client().await;
    let ns = common::namespace(&client, "adm-wf").await;
    let ok = wf(
        "ok",
        json!([
            {"stepName": "a", "image": "busybox"},
            {"stepName": "b", "image": "busybox", "dependsOn": ["a"]},
            {"stepName": "c", "image": "busybox", "dependsOn": ["a", "b"]},
        ]),
    );
    create(&client, &ns, ok).await.expect("a valid DAG is accepted");

    rejected(
        create(
            &client,
            &ns,
            wf(
                "unknown-dep",
                json!([
                    {"stepName": "a", "image": "busybox", "dependsOn": ["nope"]},
                ]),
            ),
        )
        .await,
        "every dependsOn entry must name a step of this workflow",
    );
    rejected(
        create(
            &client,
            &ns,
            wf(
                "dup",
                json!([
                    {"stepName": "a", "image": "busybox"},
                    {"stepName": "a", "image": "alpine"},
                ]),
            ),
        )
        .await,
        "Duplicate value",
    );
    rejected(
        create(
            &client,
            &ns,
            wf(
                "self-dep",
                json!([
                    {"stepName": "a", "image": "busybox", "dependsOn": ["a"]},
                ]),
            ),
        )
        .await,
        "a step must not depend on itself",
    );
    rejected(create(&client, &ns, wf("no-steps", json!([]))).await, "spec.containers");
    rejected(
        create(
            &client,
            &ns,
            wf(
                "bad-name",
                json!([
                    {"stepName": "has space", "image": "busybox"},
                ]),
            ),
        )
        .await,
        "stepName",
    );
    let mut zero = wf("zero-timeout", json!([{"stepName": "a", "image": "busybox"}]));
    zero["spec"]["maxStepTimeout"] = json!(0);
    rejected(create(&client, &ns, zero).await, "maxStepTimeout must be -1");
    let mut unlimited = wf("unlimited", json!([{"stepName": "a", "image": "busybox", "timeoutSeconds": -1}]));
    unlimited["spec"]["maxStepTimeout"] = json!(-1);
    create(&client, &ns, unlimited).await.expect("-1 means unlimited");
    // Garbage collection: Argo's names and shapes; the delay is a Go duration of at most a year.
    let with_gc = |name: &str, gc: Value, ttl: Value| {
        let mut w = wf(name, json!([{"stepName": "a", "image": "busybox"}]));
        w["spec"]["podGC"] = gc;
        w["spec"]["ttlStrategy"] = ttl;
        w
    };
    create(&client, &ns, with_gc("gc-ok", json!({"strategy": "OnPodSuccess", "deleteDelayDuration": "1h30m", "keepLast": 3}), json!({"secondsAfterSuccess": 0, "secondsAfterFailure": 86400})))
        .await
        .expect("a valid podGC and ttlStrategy are accepted");
    create(&client, &ns, with_gc("gc-zero", json!({"deleteDelayDuration": "0"}), json!({}))).await.expect("0 is a Go duration");
    rejected(create(&client, &ns, with_gc("gc-strategy", json!({"strategy": "Always"}), json!({}))).await, "Unsupported value: \"Always\"");
    rejected(create(&client, &ns, with_gc("gc-delay", json!({"deleteDelayDuration": "10 minutes"}), json!({}))).await, "spec.podGC.deleteDelayDuration");
    rejected(create(&client, &ns, with_gc("gc-delay-sign", json!({"deleteDelayDuration": "-1s"}), json!({}))).await, "spec.podGC.deleteDelayDuration");
    rejected(create(&client, &ns, with_gc("gc-delay-long", json!({"deleteDelayDuration": "8761h"}), json!({}))).await, "deleteDelayDuration must be at most 8760h");
    rejected(create(&client, &ns, with_gc("gc-keep", json!({"keepLast": -1}), json!({}))).await, "spec.podGC.keepLast");
    rejected(create(&client, &ns, with_gc("gc-ttl", json!({}), json!({"secondsAfterFailure": -1}))).await, "spec.ttlStrategy.secondsAfterFailure");
    let too_many: Vec<Value> = (0..201).map(|i| json!({"stepName": format!("s{i}"), "image": "busybox"})).collect();
    rejected(create(&client, &ns, wf("too-many", Value::Array(too_many))).await, "200");
    // A large DAG within the bounds is accepted: 200 steps, 3790 edges (each step depends on
    // up to 20 earlier ones). The unknown-dependency rule's cost was sized for this.
    let dag = |fan_in: usize, extra: Option<&str>| {
        let mut steps: Vec<Value> =
            (0usize..200).map(|i| json!({"stepName": format!("s{i}"), "image": "busybox", "dependsOn": (i.saturating_sub(fan_in)..i).map(|j| format!("s{j}")).collect::<Vec<_>>()})).collect();
        if let Some(bad) = extra {
            steps[5]["dependsOn"].as_array_mut().unwrap().push(json!(bad));
        }
        Value::Array(steps)
    };
    create(&client, &ns, wf("big", dag(20, None))).await.expect("200 steps x 3790 edges accepted");
    rejected(create(&client, &ns, wf("big-unknown", dag(20, Some("nope")))).await, "every dependsOn entry must name a step of this workflow");
    rejected(create(&client, &ns, wf("too-many-edges", dag(25, None))).await, "at most 4000 dependsOn entries");
    // Past every per-field bound, the total can still exceed what the API server stores; it
    // refuses with a clear error and stores nothing.
    let huge: Vec<Value> = (0..200).map(|i| json!({"stepName": format!("s{i}"), "image": "busybox", "args": ["x".repeat(4000), "y".repeat(4000), "z".repeat(4000)]})).collect();
    match create(&client, &ns, wf("huge", Value::Array(huge))).await {
        Ok(()) => panic!("a 2.4 MB workflow must not be stored"),
        Err(msg) => assert!(msg.contains("larger than max") || msg.contains("too large"), "unclear error: {msg}"),
    }
    let api: Api<shoal::api::Workflow> = Api::namespaced(client.clone(), &ns);
    assert!(api.get_opt("huge").await.unwrap().is_none());
    common::cleanup(&client, &ns).await;
}

fn nsman(name: &str, policies: Value) -> Value {
    json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "NamespaceManager", "metadata": {"name": name}, "spec": {"policies": policies}})
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_manager_rules() {
    let client = common::client().await;
    let ns = common::namespace(&client, "adm-nsman").await;
    rejected(
        create(
            &client,
            &ns,
            nsman(
                "bad-enum",
                json!([
                    {"name": "p", "condition": {"type": "TTLX", "params": {"ttlSeconds": 5}}, "action": {"type": "DELETE"}},
                ]),
            ),
        )
        .await,
        "Unsupported value: \"TTLX\"",
    );
    rejected(
        create(
            &client,
            &ns,
            nsman(
                "bad-action",
                json!([
                    {"name": "p", "condition": {"type": "TTL", "params": {"ttlSeconds": 5}}, "action": {"type": "EXPLODE"}},
                ]),
            ),
        )
        .await,
        "Unsupported value: \"EXPLODE\"",
    );
    rejected(
        create(
            &client,
            &ns,
            nsman(
                "dup",
                json!([
                    {"name": "p", "condition": {"type": "TTL", "params": {"ttlSeconds": 5}}, "action": {"type": "DELETE"}},
                    {"name": "p", "condition": {"type": "TTL", "params": {"ttlSeconds": 9}}, "action": {"type": "DELETE"}},
                ]),
            ),
        )
        .await,
        "Duplicate value",
    );
    rejected(
        create(
            &client,
            &ns,
            nsman(
                "ttl-missing",
                json!([
                    {"name": "p", "condition": {"type": "TTL"}, "action": {"type": "DELETE"}},
                ]),
            ),
        )
        .await,
        "a TTL condition needs params.ttlSeconds",
    );
    rejected(
        create(
            &client,
            &ns,
            nsman(
                "no-url",
                json!([
                    {"name": "p", "condition": {"type": "TTL", "params": {"ttlSeconds": 5}}, "action": {"type": "WEBHOOK"}},
                ]),
            ),
        )
        .await,
        "a WEBHOOK action needs params.url",
    );
    rejected(
        create(
            &client,
            &ns,
            nsman(
                "bad-url",
                json!([
                    {"name": "p", "condition": {"type": "TTL", "params": {"ttlSeconds": 5}}, "action": {"type": "WEBHOOK", "params": {"url": "not a url"}}},
                ]),
            ),
        )
        .await,
        "url must be an absolute http or https URL",
    );
    rejected(
        create(
            &client,
            &ns,
            nsman(
                "ftp-url",
                json!([
                    {"name": "p", "condition": {"type": "TTL", "params": {"ttlSeconds": 5}}, "action": {"type": "WEBHOOK", "params": {"url": "ftp://example.invalid/x"}}},
                ]),
            ),
        )
        .await,
        "url must be an absolute http or https URL",
    );
    rejected(
        create(
            &client,
            &ns,
            nsman(
                "bad-kind",
                json!([
                    {"name": "p", "condition": {"type": "TTL", "params": {"ttlSeconds": 5}},
                     "action": {"type": "SCALE_DOWN", "params": {"selectors": [{"kind": "DaemonSet", "labels": {"a": "b"}}]}}},
                ]),
            ),
        )
        .await,
        "Unsupported value: \"DaemonSet\"",
    );
    rejected(
        create(
            &client,
            &ns,
            nsman(
                "bad-timeout",
                json!([
                    {"name": "p", "condition": {"type": "TTL", "params": {"ttlSeconds": 5}}, "action": {"type": "WEBHOOK", "params": {"url": "http://127.0.0.1:9/h", "timeoutSeconds": 0}}},
                ]),
            ),
        )
        .await,
        "timeoutSeconds",
    );
    // SCALE_DOWN without selectors means every Deployment and StatefulSet of the namespace.
    create(
        &client,
        &ns,
        nsman(
            "no-selectors",
            json!([
                {"name": "p", "condition": {"type": "TTL", "params": {"ttlSeconds": 5}}, "action": {"type": "SCALE_DOWN"}},
            ]),
        ),
    )
    .await
    .expect("SCALE_DOWN without selectors accepted");
    create(
        &client,
        &ns,
        nsman(
            "good",
            json!([
                {"name": "p", "condition": {"type": "PODS_SUCCEED", "params": {"podLabels": {"a": "b"}, "periodSeconds": 10}},
                 "action": {"type": "WEBHOOK", "params": {"url": "http://127.0.0.1:9/hook"}}},
            ]),
        ),
    )
    .await
    .expect("valid manager accepted");
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn activity_task_and_ignitor_rules() {
    let client = common::client().await;
    let ns = common::namespace(&client, "adm-misc").await;
    rejected(
        create(
            &client,
            &ns,
            json!({
                "apiVersion": "shoal.dev/v1alpha1", "kind": "ActivityWorker", "metadata": {"name": "w"},
                "spec": {"job": {"name": "j", "image": "bash:5.0", "imagePullPolicy": "Sometimes"}}
            }),
        )
        .await,
        "Unsupported value: \"Sometimes\"",
    );
    rejected(
        create(
            &client,
            &ns,
            json!({
                "apiVersion": "shoal.dev/v1alpha1", "kind": "Activity", "metadata": {"name": "a"},
                "spec": {"name": "x", "job": {"name": "j", "image": "bash:5.0", "imagePullPolicy": "Sometimes"}}
            }),
        )
        .await,
        "Unsupported value: \"Sometimes\"",
    );
    rejected(
        create(
            &client,
            &ns,
            json!({
                "apiVersion": "shoal.dev/v1alpha1", "kind": "Activity", "metadata": {"name": "a"},
                "spec": {"name": "x", "workers": 0}
            }),
        )
        .await,
        "spec.workers",
    );
    rejected(
        create(
            &client,
            &ns,
            json!({
                "apiVersion": "shoal.dev/v1alpha1", "kind": "Ignitor", "metadata": {"name": "i"},
                "spec": {"scheduled": "every tuesday"}
            }),
        )
        .await,
        "scheduled must be NOW, an RFC 3339 time, or a cron expression",
    );
    rejected(
        create(
            &client,
            &ns,
            json!({
                "apiVersion": "shoal.dev/v1alpha1", "kind": "Task", "metadata": {"name": "t"},
                "spec": {"startOnIgnition": ["Not_A_Name"], "template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
            }),
        )
        .await,
        "startOnIgnition",
    );
    rejected(
        create(
            &client,
            &ns,
            json!({
                "apiVersion": "shoal.dev/v1alpha1", "kind": "Task", "metadata": {"name": "t"},
                "spec": {"description": "no template"}
            }),
        )
        .await,
        "spec.template",
    );
    // A cron expression with the right shape but impossible values passes admission; the
    // Ignitor controller reports it as a condition (see core::schedule).
    create(
        &client,
        &ns,
        json!({
            "apiVersion": "shoal.dev/v1alpha1", "kind": "Ignitor", "metadata": {"name": "late"},
            "spec": {"scheduled": "61 * * * *"}
        }),
    )
    .await
    .expect("shape-valid cron passes admission");
    common::cleanup(&client, &ns).await;
}

/// Map values are bounded too (schemars' `inner` does not reach a map's values, so these
/// bounds are written into `additionalProperties`).
#[tokio::test(flavor = "multi_thread")]
async fn map_values_are_bounded() {
    let client = common::client().await;
    let ns = common::namespace(&client, "adm-maps").await;
    let long = "x".repeat(4097);
    rejected(create(&client, &ns, json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "Activity", "metadata": {"name": "a"}, "spec": {"name": "a", "inputs": {"k": long}}})).await, "Too long");
    let label = "x".repeat(64);
    rejected(create(&client, &ns, nsman("n", json!([{"name": "p", "condition": {"type": "PODS_SUCCEED", "params": {"podLabels": {"a": label}}}, "action": {"type": "DELETE"}}]))).await, "Too long");
    create(&client, &ns, json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "Activity", "metadata": {"name": "ok"}, "spec": {"name": "a", "inputs": {"k": "x".repeat(4096)}}}))
        .await
        .expect("4096 characters accepted");
    common::cleanup(&client, &ns).await;
}

/// The CronJob-like Ignitor settings are bounded at admission.
#[tokio::test(flavor = "multi_thread")]
async fn ignitor_schedule_settings() {
    let client = common::client().await;
    let ns = common::namespace(&client, "adm-ign").await;
    let ign = |name: &str, extra: Value| {
        let mut spec = json!({"scheduled": "*/5 * * * *"});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "Ignitor", "metadata": {"name": name}, "spec": spec})
    };
    rejected(create(&client, &ns, ign("tz", json!({"timeZone": "Europe/Berlin; rm"}))).await, "timeZone must be an IANA time zone name");
    rejected(create(&client, &ns, ign("catch", json!({"maxCatchUp": 0}))).await, "maxCatchUp");
    rejected(create(&client, &ns, ign("policy", json!({"concurrencyPolicy": "Sometimes"}))).await, "Unsupported value: \"Sometimes\"");
    rejected(create(&client, &ns, ign("deadline", json!({"startingDeadlineSeconds": -1}))).await, "startingDeadlineSeconds");
    create(&client, &ns, ign("ok", json!({"timeZone": "America/Argentina/Buenos_Aires", "concurrencyPolicy": "Forbid", "maxCatchUp": 5, "startingDeadlineSeconds": 60, "suspend": true})))
        .await
        .expect("valid settings accepted");
    common::cleanup(&client, &ns).await;
}
