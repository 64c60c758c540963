//! The quick load scenario (loadtest/scenarios/quick.yaml: 100 diamond workflows, a tenth
//! failing on purpose, 2 replicas) through `shoal loadtest`'s own code, on the shared
//! cluster. It asserts the harness's correctness checks only, never a timing: every workflow
//! ends in the phase it must, no step attempt has two Jobs, every recorded Job UID is the
//! step's Job.

use std::path::PathBuf;

use shoal::loadtest::{Args, load_scenario, run::run_scenario};

use crate::common;

#[tokio::test(flavor = "multi_thread")]
async fn quick_scenario_is_correct() {
    let _turn = common::HEAVY.acquire().await.unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut sc = load_scenario(&root.join("loadtest/scenarios/quick.yaml").display().to_string()).unwrap();
    // The cluster is shared with other tests and their operators: the replicas are confined
    // to one namespace (--watch-namespace), so the workflows go into that one.
    sc.namespaces = 1;
    let reports = std::env::temp_dir().join(format!("shoal-test-loadtest-{}", std::process::id()));
    let args = Args {
        scenarios: vec![],
        existing: true,
        kubeconfig: Some(common::kubeconfig()),
        start_replicas: true,
        shoal_bin: Some(std::env::var("SHOAL_BIN").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_shoal")))),
        reports: reports.clone(),
        count: None,
        namespaces: None,
        no_bare: true,
        bare: None,
        executor: None,
        quiet: true,
        keep: false,
        compare: false,
    };
    let r = run_scenario(&args, &sc).await.expect("the quick scenario runs");
    let c = &r.correctness;
    let failing = (0..sc.count).filter(|&i| sc.fails(i)).count();
    assert!(failing > 0 && failing < sc.count, "the scenario has failing and healthy workflows");
    assert!(!r.timed_out, "every workflow ended within the scenario's timeout: lost {:?}", c.lost);
    assert_eq!((c.created, c.ended), (sc.count, sc.count), "every workflow created and ended; lost: {:?}", c.lost);
    assert!(c.wrong_phase.is_empty(), "ended in the wrong phase: {:?}", c.wrong_phase);
    assert!(c.duplicate_jobs.is_empty(), "step attempts with two Jobs: {:?}", c.duplicate_jobs);
    assert!(c.uid_mismatch.is_empty(), "recorded Job UIDs that are not the step's Job: {:?}", c.uid_mismatch);
    assert_eq!(c.jobs_seen, c.jobs_expected, "one Job per step of every workflow");
    assert_eq!(c.jobs_expected, sc.count * sc.steps_per_workflow());
    assert_eq!(c.action_log_distinct_jobs, c.jobs_expected, "the replicas' action logs name every Job");
    assert!(c.ok);
    // The report is written from the same results.
    let dir = shoal::loadtest::report::write(&reports, &r, &[]).unwrap();
    assert!(std::fs::read_to_string(dir.join("report.md")).unwrap().contains("every check passed"));
    let _ = std::fs::remove_dir_all(reports);
}
