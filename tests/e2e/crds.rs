//! The committed CRD YAML under crds/ must be exactly what the code generates.

use std::collections::BTreeSet;
use std::path::PathBuf;

#[test]
fn committed_crds_match_the_code() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut expected = BTreeSet::new();
    for crd in shoal::api::crds::all() {
        let file = shoal::api::crds::file_name(&crd);
        let generated = shoal::api::crds::to_yaml(&crd);
        let committed = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
        assert!(committed == generated, "crds/{file} is out of date; run `make crds` (cargo run -- crds --dir crds) and commit it");
        expected.insert(file);
    }
    let present: BTreeSet<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(present, expected, "crds/ holds files the code does not generate");
}

#[test]
fn every_kind_has_status_category_and_short_names() {
    for crd in shoal::api::crds::all() {
        let name = crd.metadata.name.clone().unwrap();
        assert_eq!(crd.spec.group, "shoal.dev");
        assert!(crd.spec.names.categories.as_ref().is_some_and(|c| c.contains(&"shoal".to_string())), "{name}: category");
        assert!(crd.spec.names.short_names.as_ref().is_some_and(|s| !s.is_empty()), "{name}: short names");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.additional_printer_columns.as_ref().is_some_and(|c| !c.is_empty()), "{name}: printer columns");
        if name == "actionplugins.shoal.dev" {
            // Configuration that Tasks read; nothing reconciles it, so it has no status.
            assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_none(), "{name}: no status");
            continue;
        }
        assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "{name}: status subresource");
        let yaml = shoal::api::crds::to_yaml(&crd);
        assert!(yaml.contains("observedGeneration"), "{name}: conditions carry observedGeneration");
    }
}
