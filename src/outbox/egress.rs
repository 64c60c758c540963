//! The egress policy of the outbox: which addresses a webhook may reach.
//!
//! Link-local and cloud metadata addresses are refused, checked on the addresses a name
//! resolves to, not on the name. The HTTP client resolves every host name through
//! [`CheckedResolver`], which drops refused addresses, so the connection is made only to
//! addresses that passed the check (a second DNS answer cannot swap in a refused one).
//! An IP-literal host never reaches a resolver, so [`Egress::check_url`] checks it; the
//! outbox calls that before a request and the redirect [`policy`] before following one.
//!
//! This module must never make a request itself; it only decides where one may go.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Redirects followed at most per attempt.
pub const MAX_REDIRECTS: usize = 3;

/// A target the egress policy does not allow. Its message names the host and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused target {host}: {reason}")]
pub struct Refused {
    pub host: String,
    pub reason: String,
}

impl Refused {
    fn new(host: &str, reason: impl Into<String>) -> Self {
        Self { host: host.to_string(), reason: reason.into() }
    }
}

/// The ranges no webhook may reach, with the reason given when one is hit.
fn refused_ranges() -> [(IpNet, &'static str); 3] {
    [
        (net("169.254.0.0/16"), "link-local address (169.254.0.0/16, where cloud metadata services listen)"),
        (net("fe80::/10"), "IPv6 link-local address (fe80::/10)"),
        (net("fd00:ec2::254/128"), "cloud metadata address (fd00:ec2::254)"),
    ]
}

fn net(s: &str) -> IpNet {
    s.parse().expect("a valid built-in CIDR")
}

/// `ip` and the IPv4 address an IPv6 address carries, if any: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`) and the well-known NAT64 prefix (`64:ff9b::a.b.c.d`), each of
/// which reaches the IPv4 address on some networks.
fn forms(ip: IpAddr) -> Vec<IpAddr> {
    let mut out = vec![ip];
    if let IpAddr::V6(v6) = ip {
        if let Some(v4) = v6.to_ipv4() {
            out.push(IpAddr::V4(v4));
        }
        let s = v6.segments();
        if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
            out.push(IpAddr::V4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8)));
        }
    }
    out
}

/// Why `ip` is refused by the built-in rules, if it is.
pub fn refused_reason(ip: IpAddr) -> Option<&'static str> {
    let ranges = refused_ranges();
    forms(ip).into_iter().find_map(|f| ranges.iter().find(|(n, _)| n.contains(&f)).map(|(_, why)| *why))
}

/// The egress policy: the built-in refused ranges and the operator's allow-list.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    /// Host names allowed by name (lowercase, no trailing dot).
    hosts: Vec<String>,
    /// Networks allowed; a network inside a refused range re-allows that part of it.
    nets: Vec<IpNet>,
}

impl Egress {
    /// The policy for `--webhook-allow` entries: host names, IP addresses or CIDRs.
    pub fn new(allow: &[String]) -> Result<Self, String> {
        let mut egress = Self::default();
        for entry in allow.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if let Ok(n) = entry.parse::<IpNet>() {
                egress.nets.push(n.trunc());
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                egress.nets.push(IpNet::from(ip));
            } else {
                let host = entry.trim_end_matches('.').to_ascii_lowercase();
                match url::Host::parse(&host) {
                    _ if host.contains('*') => return Err(format!("--webhook-allow: {entry:?}: wildcards are not supported; list each host name")),
                    Ok(url::Host::Domain(_)) if !host.contains('/') => egress.hosts.push(host),
                    _ => return Err(format!("--webhook-allow: {entry:?} is neither a host name, an IP address nor a CIDR")),
                }
            }
        }
        Ok(egress)
    }

    fn restricted(&self) -> bool {
        !self.hosts.is_empty() || !self.nets.is_empty()
    }

    fn host_listed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// May `host` (the URL's host, a name or the literal) be reached at `ip`?
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), Refused> {
        let listed = self.nets.iter().find(|n| forms(ip).iter().any(|f| n.contains(f)));
        if let Some(why) = refused_reason(ip) {
            // Only a listed network that lies inside a refused range re-allows it: an allow-list
            // of 0.0.0.0/0 meant "anything" and must not open the metadata service.
            let reallowed = listed.is_some_and(|n| refused_ranges().iter().any(|(r, _)| r.contains(n)));
            return if reallowed { Ok(()) } else { Err(Refused::new(host, format!("{ip} is a {why}"))) };
        }
        if !self.restricted() || listed.is_some() || self.host_listed(host) {
            return Ok(());
        }
        Err(Refused::new(host, format!("neither the host nor its address {ip} is in --webhook-allow")))
    }

    /// The addresses `host` resolved to that may be reached, or why none may.
    pub fn filter(&self, host: &str, addrs: impl IntoIterator<Item = SocketAddr>) -> Result<Vec<SocketAddr>, Refused> {
        let mut kept = Vec::new();
        let mut first_refusal = None;
        for a in addrs {
            match self.check_ip(host, a.ip()) {
                Ok(()) => kept.push(a),
                Err(r) => {
                    tracing::debug!(host, address = %a.ip(), reason = %r.reason, "resolved address refused");
                    first_refusal.get_or_insert(r);
                }
            }
        }
        match (kept.is_empty(), first_refusal) {
            (true, Some(r)) => Err(Refused::new(host, format!("resolves only to refused addresses: {}", r.reason))),
            _ => Ok(kept),
        }
    }

    /// The checks that need no DNS: http or https, a host, no userinfo, and an IP-literal host
    /// that the policy allows.
    pub fn check_url(&self, url: &url::Url) -> Result<(), Refused> {
        let host = url.host_str().unwrap_or_default();
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refused::new(host, format!("scheme {:?} is not http or https", url.scheme())));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused::new(host, "the URL carries credentials (user:password@); put them in the receiver's configuration, not in the URL"));
        }
        match url.host() {
            None => Err(Refused::new(host, "the URL has no host")),
            Some(url::Host::Ipv4(ip)) => self.check_ip(host, IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(host, IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => Ok(()),
        }
    }
}

/// Resolves with the system resolver (through tokio) and keeps only allowed addresses.
pub struct CheckedResolver {
    pub egress: Arc<Egress>,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let egress = self.egress.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let kept = egress.filter(&host, addrs)?;
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("more than {MAX_REDIRECTS} redirects")]
struct TooManyRedirects;

/// Follow at most [`MAX_REDIRECTS`] redirects, each to a target [`Egress::check_url`] allows
/// (a named target is then resolved through [`CheckedResolver`] like any other). Only 307 and
/// 308 are followed: 301, 302 and 303 would turn the POST into a GET without its body, and a
/// 2xx to that must not count as a delivery.
pub fn policy(egress: Arc<Egress>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if !matches!(attempt.status(), reqwest::StatusCode::TEMPORARY_REDIRECT | reqwest::StatusCode::PERMANENT_REDIRECT) {
            return attempt.stop();
        }
        // `previous` starts with the original URL, so it holds one more than the redirects so far.
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(TooManyRedirects);
        }
        match egress.check_url(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(r) => attempt.error(r),
        }
    })
}

/// The refusal somewhere in an error's chain of sources, if the error is one.
pub fn find_refused<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        SocketAddr::new(ip(s), 0)
    }

    fn allow(entries: &[&str]) -> Egress {
        Egress::new(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn refused_ranges_and_their_ipv6_forms() {
        for a in [
            "169.254.169.254",
            "169.254.0.1",
            "169.254.255.255",
            "fe80::1",
            "febf:ffff::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::169.254.169.254",
            "::ffff:a9fe:1",
        ] {
            assert!(refused_reason(ip(a)).is_some(), "{a} must be refused");
        }
        for a in ["127.0.0.1", "::1", "10.0.0.1", "192.168.1.1", "169.253.255.255", "169.255.0.0", "fec0::1", "fd00:ec2::253", "::ffff:127.0.0.1", "8.8.8.8", "2001:db8::1"] {
            assert!(refused_reason(ip(a)).is_none(), "{a} must be allowed");
        }
    }

    #[test]
    fn without_an_allow_list_everything_but_the_refused_ranges_is_allowed() {
        let e = Egress::default();
        assert!(e.check_ip("localhost", ip("127.0.0.1")).is_ok(), "loopback stays allowed: the tests use it");
        assert!(e.check_ip("h", ip("10.1.2.3")).is_ok());
        assert!(e.check_ip("h", ip("2001:db8::1")).is_ok());
        let r = e.check_ip("metadata.google.internal", ip("169.254.169.254")).unwrap_err();
        assert!(r.to_string().contains("metadata.google.internal") && r.to_string().contains("169.254.169.254"), "{r}");
    }

    #[test]
    fn a_name_that_resolves_to_a_refused_address_is_refused() {
        let e = Egress::default();
        let r = e.filter("evil.example", [sa("169.254.169.254"), sa("::ffff:169.254.169.254")]).unwrap_err();
        assert!(r.to_string().contains("resolves only to refused addresses"), "{r}");
        // Mixed answers: only the allowed addresses are kept, so the connection goes there.
        assert_eq!(e.filter("mixed.example", [sa("169.254.169.254"), sa("10.0.0.7"), sa("fe80::1")]).unwrap(), vec![sa("10.0.0.7")]);
        // Nothing resolved is not a refusal.
        assert_eq!(e.filter("none.example", []).unwrap(), vec![]);
    }

    #[tokio::test]
    async fn the_resolver_resolves_and_filters() {
        let r = CheckedResolver { egress: Arc::new(Egress::default()) };
        let addrs: Vec<SocketAddr> = r.resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        // An allow-list that names neither localhost nor loopback refuses it, and says why.
        let r = CheckedResolver { egress: Arc::new(allow(&["10.0.0.0/8"])) };
        let Err(e) = r.resolve("localhost".parse().unwrap()).await else { panic!("localhost is not allowed") };
        assert!(find_refused(e.as_ref()).is_some(), "{e}");
    }

    #[test]
    fn the_allow_list_admits_listed_names_and_networks_only() {
        let e = allow(&["hooks.example.com.", "10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]);
        assert!(e.check_ip("HOOKS.example.com", ip("203.0.113.9")).is_ok(), "a listed name, at any (not refused) address");
        assert!(e.check_ip("other.example.com", ip("10.9.9.9")).is_ok(), "an address in a listed network");
        assert!(e.check_ip("other.example.com", ip("::ffff:10.9.9.9")).is_ok(), "its IPv4-mapped form too");
        assert!(e.check_ip("other.example.com", ip("2001:db8::1")).is_ok());
        assert!(e.check_ip("192.0.2.7", ip("192.0.2.7")).is_ok(), "a single listed address");
        let r = e.check_ip("other.example.com", ip("203.0.113.9")).unwrap_err();
        assert!(r.reason.contains("--webhook-allow"), "{r}");
        assert!(e.check_ip("localhost", ip("127.0.0.1")).is_err(), "loopback too, once there is an allow-list");
        // A listed name does not open a refused address.
        assert!(e.check_ip("hooks.example.com", ip("169.254.169.254")).is_err());
    }

    #[test]
    fn only_a_cidr_inside_a_refused_range_reallows_it() {
        let e = allow(&["169.254.169.254/32"]);
        assert!(e.check_ip("169.254.169.254", ip("169.254.169.254")).is_ok());
        assert!(e.check_ip("h", ip("::ffff:169.254.169.254")).is_ok());
        assert!(e.check_ip("h", ip("169.254.169.253")).is_err());
        let e = allow(&["169.254.0.0/16", "fe80::/10"]);
        assert!(e.check_ip("h", ip("169.254.1.1")).is_ok() && e.check_ip("h", ip("fe80::9")).is_ok());
        let e = allow(&["0.0.0.0/0", "::/0"]);
        assert!(e.check_ip("h", ip("8.8.8.8")).is_ok());
        assert!(e.check_ip("h", ip("169.254.169.254")).is_err(), "allowing everything does not open the metadata service");
        assert!(e.check_ip("h", ip("fd00:ec2::254")).is_err());
    }

    #[test]
    fn allow_list_entries_must_parse() {
        for bad in ["http://x", "a b", "10.0.0.0/33", "host/path", "*.example.com"] {
            assert!(Egress::new(&[bad.to_string()]).is_err(), "{bad}");
        }
        assert!(Egress::new(&[" ".into(), "".into()]).unwrap().nets.is_empty(), "blank entries are ignored");
    }

    #[test]
    fn url_checks() {
        let e = Egress::default();
        let ok = |u: &str| e.check_url(&u.parse().unwrap());
        assert!(ok("http://127.0.0.1:8080/x").is_ok());
        assert!(ok("https://hooks.example.com/x").is_ok());
        for (u, why) in [
            ("ftp://hooks.example.com/", "scheme"),
            ("file:///etc/passwd", "scheme"),
            ("http://user:pw@hooks.example.com/", "credentials"),
            ("http://user@hooks.example.com/", "credentials"),
            ("http://169.254.169.254/latest/meta-data", "link-local"),
            ("http://2852039166/", "link-local"),
            ("http://169.254.169.254./", "link-local"),
            ("http://[::169.254.169.254]/", "link-local"),
            ("http://0xa9.0xfe.0xa9.0xfe/", "link-local"),
            ("http://[::ffff:169.254.169.254]/", "link-local"),
            ("http://[fe80::1]/", "IPv6 link-local"),
            ("http://[fd00:ec2::254]/", "metadata"),
        ] {
            let r = ok(u).expect_err(u);
            assert!(r.reason.contains(why), "{u}: {r}");
        }
    }
}
