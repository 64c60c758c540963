//! Throwaway PKI for the local control plane: a CA, the API server's serving certificate,
//! an admin client certificate (group system:masters) and the service-account signing key.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType};

/// Paths of the generated files, relative to the cluster directory's `pki/`.
pub struct Pki;

impl Pki {
    pub const CA_CRT: &'static str = "pki/ca.crt";
    pub const SERVING_CRT: &'static str = "pki/apiserver.crt";
    pub const SERVING_KEY: &'static str = "pki/apiserver.key";
    pub const ADMIN_CRT: &'static str = "pki/admin.crt";
    pub const ADMIN_KEY: &'static str = "pki/admin.key";
    pub const SA_KEY: &'static str = "pki/sa.key";
    pub const SA_PUB: &'static str = "pki/sa.pub";
}

/// Write a fresh PKI under `dir/pki`. Existing files are kept, so a restarted cluster keeps
/// its identity and old kubeconfigs stay valid.
pub fn ensure(dir: &Path) -> Result<()> {
    let pki = dir.join("pki");
    if pki.join("sa.pub").exists() && pki.join("admin.key").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&pki)?;

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "shoal-dev-ca");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca, ca_key)?;
    write(&dir.join(Pki::CA_CRT), &ca.pem())?;

    let key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
    ])?;
    serving.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    serving.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
    serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    serving.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let cert = serving.signed_by(&key, &ca)?;
    write(&dir.join(Pki::SERVING_CRT), &cert.pem())?;
    write(&dir.join(Pki::SERVING_KEY), &key.serialize_pem())?;

    let key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name.push(DnType::CommonName, "shoal-admin");
    admin.distinguished_name.push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    admin.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let cert = admin.signed_by(&key, &ca)?;
    write(&dir.join(Pki::ADMIN_CRT), &cert.pem())?;
    write(&dir.join(Pki::ADMIN_KEY), &key.serialize_pem())?;

    let sa = KeyPair::generate()?;
    write(&dir.join(Pki::SA_KEY), &sa.serialize_pem())?;
    write(&dir.join(Pki::SA_PUB), &sa.public_key_pem())?;
    Ok(())
}

fn write(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}
