//! The image: `image/build.sh` (what `make image` runs) builds an OCI image archive with
//! buildah from the test build of `shoal`; its config runs `/shoal run` as a numeric non-root
//! user with the OCI labels, the same as the Dockerfile says and the user the chart runs the
//! pod as; and its filesystem is enough to run the binary as that user.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// A blob of the OCI layout in `dir`, by digest (`sha256:…`).
fn blob(dir: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap();
    dir.join("blobs").join(alg).join(hex)
}

fn json_file(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// What the Dockerfile's final stage declares: USER, ENTRYPOINT, CMD (as JSON) and the
/// names of its LABELs.
fn dockerfile() -> (String, Value, Value, Vec<String>) {
    let text = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let last_stage = joined.rsplit_once("\nFROM ").unwrap().1;
    let mut user = String::new();
    let (mut entrypoint, mut cmd) = (Value::Null, Value::Null);
    let mut labels = vec![];
    for line in last_stage.lines().map(str::trim) {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "USER" => user = rest.trim().to_string(),
            "ENTRYPOINT" => entrypoint = serde_json::from_str(rest).unwrap(),
            "CMD" => cmd = serde_json::from_str(rest).unwrap(),
            "LABEL" => labels.extend(rest.match_indices("org.opencontainers.").filter_map(|(i, _)| rest[i..].split_once('=')).map(|(k, _)| k.to_string())),
            _ => {}
        }
    }
    labels.sort();
    (user, entrypoint, cmd, labels)
}

#[test]
fn the_image_runs_shoal_as_a_numeric_non_root_user_as_the_dockerfile_says() {
    assert!(Command::new("buildah").arg("--version").output().is_ok_and(|o| o.status.success()), "buildah is missing (apt-get install -y buildah; .ci/run installs it)");
    let dir = std::env::temp_dir().join(format!("shoal-test-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let archive = dir.join("shoal-image.tar");
    // The debug build the tests already have: what `make image PROFILE=debug` packs.
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("image/build.sh");
    let out = Command::new("bash").arg(&script).arg(env!("CARGO_BIN_EXE_shoal")).arg(&archive).arg("shoal:test").output().unwrap();
    assert!(out.status.success(), "image/build.sh failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    // The OCI layout inside the archive: index.json → manifest → config and layers.
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    let tar = |file: &Path, into: &Path| {
        let out = Command::new("tar").arg("-xf").arg(file).arg("-C").arg(into).output().unwrap();
        assert!(out.status.success(), "tar -xf {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    };
    tar(&archive, &layout);
    assert_eq!(json_file(&layout.join("oci-layout"))["imageLayoutVersion"], "1.0.0");
    let index = json_file(&layout.join("index.json"));
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    assert_eq!(manifests[0]["annotations"]["org.opencontainers.image.ref.name"], "shoal:test");
    let manifest = json_file(&blob(&layout, manifests[0]["digest"].as_str().unwrap()));
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let config = json_file(&blob(&layout, manifest["config"]["digest"].as_str().unwrap()));
    assert_eq!((&config["os"], &config["architecture"]), (&Value::from("linux"), &Value::from("amd64")));
    let c = &config["config"];

    // A numeric user (Kubernetes can check runAsNonRoot only for a numeric one), not root,
    // the one the chart runs the pod as.
    let user = c["User"].as_str().unwrap().to_string();
    let (uid, gid) = user.split_once(':').unwrap_or((&user, ""));
    let uid: u32 = uid.parse().unwrap_or_else(|_| panic!("the image's user {user:?} is not numeric"));
    assert_ne!(uid, 0, "the image runs as root");
    let docs = crate::helm::render("shoal", "shoal-system", &[]);
    let pod = &docs.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"]["securityContext"];
    assert_eq!((pod["runAsUser"].as_u64(), pod["runAsGroup"].to_string()), (Some(uid as u64), gid.to_string()), "the chart's pod user and the image's differ");
    assert_eq!(c["Entrypoint"], serde_json::json!(["/shoal"]));
    assert_eq!(c["Cmd"], serde_json::json!(["run"]));
    assert!(c["ExposedPorts"]["8080/tcp"].is_object(), "{c}");
    let labels: BTreeMap<String, String> = serde_json::from_value(c["Labels"].clone()).unwrap();
    assert_eq!(labels.get("org.opencontainers.image.title").map(String::as_str), Some("shoal"));
    assert_eq!(labels.get("org.opencontainers.image.version").map(String::as_str), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(labels.get("org.opencontainers.image.licenses").map(String::as_str), Some(env!("CARGO_PKG_LICENSE")));
    assert!(labels.get("org.opencontainers.image.revision").is_some_and(|r| r.len() == 40 || r == "unknown"), "{labels:?}");

    // The Dockerfile, the users' path, declares the same.
    let (d_user, d_entrypoint, d_cmd, d_labels) = dockerfile();
    assert_eq!(d_user, user, "USER in the Dockerfile");
    assert_eq!((d_entrypoint, d_cmd), (c["Entrypoint"].clone(), c["Cmd"].clone()), "ENTRYPOINT and CMD in the Dockerfile");
    let oci: Vec<String> = labels.keys().filter(|k| k.starts_with("org.opencontainers.")).cloned().collect();
    assert_eq!(d_labels, oci, "the Dockerfile's OCI labels");

    // The layers hold what the binary needs: it runs in them, as the image's user.
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        tar(&blob(&layout, layer["digest"].as_str().unwrap()), &rootfs);
    }
    let out = Command::new("chroot").arg(format!("--userspec={user}")).arg(&rootfs).arg("/shoal").arg("--version").output().unwrap();
    assert!(out.status.success(), "/shoal does not run in the image's filesystem as {user}: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("shoal {}", env!("CARGO_PKG_VERSION")));
    let _ = std::fs::remove_dir_all(&dir);
}
