//! One binary cache: where its narinfo files are and how to read them.
//! `http(s)://` caches through keep-alive connections, `file://` caches
//! from the file system; any other store URL cannot be asked.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use ureq::http::Uri;

use super::netrc::Netrc;
use crate::types::STORE_DIR;

/// Narinfo files are a few kB; a larger answer is not one.
const MAX_NARINFO: u64 = 4 << 20;

/// Why a lookup gave no usable narinfo (besides "the cache lacks it").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    /// Connection refused, DNS, TLS, a broken connection, a read error.
    Unreachable(String),
    /// An HTTP status other than 200 and the "missing" ones.
    Http(u16),
    /// Not signed by a trusted key, or a signature that does not verify.
    Signature,
    /// Not a narinfo, or one for another store path.
    Narinfo(String),
    /// The cache was disabled after an earlier error and not asked.
    Disabled,
}

impl Failure {
    /// The failure's kind, as the summary counts it.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Timeout => "timed out",
            Failure::Unreachable(_) => "could not connect or read",
            Failure::Http(_) => "HTTP errors",
            Failure::Signature => "bad or missing signatures",
            Failure::Narinfo(_) => "unusable narinfos",
            Failure::Disabled => "not asked (cache disabled after an error)",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => f.write_str("timed out"),
            Failure::Unreachable(e) => write!(f, "unreachable: {e}"),
            Failure::Http(s) => write!(f, "HTTP {s}"),
            Failure::Signature => f.write_str("not signed by a trusted key"),
            Failure::Narinfo(e) => write!(f, "unusable narinfo: {e}"),
            Failure::Disabled => f.write_str("not asked: the cache failed earlier"),
        }
    }
}

/// A narinfo lookup's answer.
#[derive(Debug)]
pub enum Lookup {
    Found(String),
    Missing,
    Failed(Failure),
}

#[derive(Debug)]
enum Kind {
    Http {
        /// Without a trailing `/`, user information or query.
        base: String,
        /// `Authorization` header from the URL's user information or
        /// from the netrc file.
        auth: Option<String>,
    },
    File {
        dir: PathBuf,
    },
    /// A store drvkite cannot ask, and why.
    Unsupported(String),
}

/// A substituter as drvkite asks it.
#[derive(Debug)]
pub struct Cache {
    /// How reports name it: no credentials, no query.
    pub name: String,
    kind: Kind,
    /// Set on the first error that makes Nix disable a substituter: no
    /// request is made to it afterwards.
    disabled: OnceLock<String>,
}

/// Text of a store URL safe to show: the user information (credentials)
/// and the query (store parameters) left out, and `$` written `%24` (the
/// same URL) so that Buildkite's upload cannot interpolate it.
fn display_name(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or(url);
    let name = match no_query.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit('@').next().unwrap_or(authority);
            format!("{scheme}://{host}{}", path.trim_end_matches('/'))
        }
        None => no_query.to_owned(),
    };
    name.replace('$', "%24")
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Undo `%XX` escapes (in URL user information).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Cache {
    /// The cache a store URL names, with credentials for http(s) from the
    /// URL or, as curl reads it for Nix, the netrc file.
    pub fn new(url: &str, netrc: &Netrc) -> Self {
        let name = display_name(url);
        let no_query = url.split(['?', '#']).next().unwrap_or(url);
        let kind = match no_query.split_once("://") {
            Some(("http" | "https", _)) => Self::http(no_query, netrc),
            Some(("file", path)) if path.starts_with('/') => Kind::File {
                dir: PathBuf::from(path),
            },
            Some(("file", _)) => Kind::Unsupported("a file:// URL needs an absolute path".into()),
            Some((scheme, _)) => Kind::Unsupported(format!(
                "drvkite cannot ask {scheme}:// stores, only http(s):// and file:// binary caches"
            )),
            None => Kind::Unsupported(
                "not a binary cache URL (local and daemon stores do not count: build agents do not share them)".into(),
            ),
        };
        Cache {
            name,
            kind,
            disabled: OnceLock::new(),
        }
    }

    fn http(url: &str, netrc: &Netrc) -> Kind {
        let Ok(uri) = url.parse::<Uri>() else {
            return Kind::Unsupported("not a valid URL".into());
        };
        let Some(host) = uri.host() else {
            return Kind::Unsupported("the URL has no host".into());
        };
        let authority = uri.authority().map_or("", |a| a.as_str());
        let (userinfo, host_port) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let auth = match userinfo {
            Some(u) => {
                let (user, password) = u.split_once(':').unwrap_or((u, ""));
                Some(basic(&percent_decode(user), &percent_decode(password)))
            }
            None => netrc.credentials(host).map(|(u, p)| basic(u, p)),
        };
        let base = format!(
            "{}://{host_port}{}",
            uri.scheme_str().unwrap_or("http"),
            uri.path().trim_end_matches('/')
        );
        Kind::Http { base, auth }
    }

    /// Why the cache cannot be asked, if it cannot.
    pub fn unusable(&self) -> Option<&str> {
        match &self.kind {
            Kind::Unsupported(why) => Some(why),
            _ => self.disabled.get().map(String::as_str),
        }
    }

    fn disable(&self, why: String) {
        let _ = self.disabled.set(why);
    }

    /// Read `nix-cache-info` as Nix does when it opens a substituter: an
    /// http(s) cache without one is not a binary cache; one for another
    /// store directory cannot be used. Either disables the cache.
    pub fn open(&self, agent: &ureq::Agent) {
        let found = match &self.kind {
            Kind::Unsupported(_) => return,
            // Nix creates a missing nix-cache-info in a file:// cache.
            Kind::File { .. } => match self.get(agent, "nix-cache-info") {
                Lookup::Missing => return,
                other => other,
            },
            Kind::Http { .. } => self.get(agent, "nix-cache-info"),
        };
        let why = match found {
            Lookup::Found(text) => {
                let store_dir = text
                    .lines()
                    .find_map(|l| l.strip_prefix("StoreDir: "))
                    .map(str::trim);
                match store_dir {
                    Some(dir) if dir != STORE_DIR => {
                        format!("it is a cache for the store {dir}, not {STORE_DIR}")
                    }
                    _ => return,
                }
            }
            Lookup::Missing => "it has no nix-cache-info: not a binary cache".to_owned(),
            Lookup::Failed(f) => format!("nix-cache-info: {f}"),
        };
        self.disable(why);
    }

    /// The narinfo of the store path with this hash.
    pub fn narinfo(&self, agent: &ureq::Agent, hash: &str) -> Lookup {
        if self.unusable().is_some() {
            return Lookup::Failed(Failure::Disabled);
        }
        let found = self.get(agent, &format!("{hash}.narinfo"));
        // Like Nix, a substituter that fails (rather than lacks a path) is
        // not asked again in this run: a dead server costs one timeout per
        // connection, not one per target.
        if let Lookup::Failed(f @ (Failure::Timeout | Failure::Unreachable(_) | Failure::Http(_))) =
            &found
        {
            self.disable(f.to_string());
        }
        found
    }

    fn get(&self, agent: &ureq::Agent, file: &str) -> Lookup {
        match &self.kind {
            Kind::Unsupported(_) => Lookup::Failed(Failure::Disabled),
            Kind::File { dir } => match std::fs::read_to_string(dir.join(file)) {
                Ok(text) => Lookup::Found(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Lookup::Missing,
                Err(e) => Lookup::Failed(Failure::Unreachable(e.to_string())),
            },
            Kind::Http { base, auth } => {
                http_get(agent, &format!("{base}/{file}"), auth.as_deref())
            }
        }
    }
}

fn http_get(agent: &ureq::Agent, url: &str, auth: Option<&str>) -> Lookup {
    let mut req = agent.get(url);
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let failed = |e: ureq::Error| match e {
        ureq::Error::Timeout(_) => Failure::Timeout,
        other => Failure::Unreachable(other.to_string()),
    };
    let mut resp = match req.call() {
        Ok(r) => r,
        Err(e) => return Lookup::Failed(failed(e)),
    };
    match resp.status().as_u16() {
        200 => match resp
            .body_mut()
            .with_config()
            .limit(MAX_NARINFO)
            .read_to_string()
        {
            Ok(text) => Lookup::Found(text),
            Err(e) => Lookup::Failed(failed(e)),
        },
        // Nix takes these as "not in this cache" (S3 answers 403).
        404 | 403 | 410 => {
            // Read to the end, so the connection can be used again.
            let _ = resp
                .body_mut()
                .with_config()
                .limit(MAX_NARINFO)
                .read_to_vec();
            Lookup::Missing
        }
        status => Lookup::Failed(Failure::Http(status)),
    }
}

/// Host names resolved once per run. ureq resolves the host of every
/// request, before it looks for a pooled connection, and with a timeout set
/// on a new thread each time: 4,000 lookups were 4,000 threads (and, for a
/// cache known by name, as many DNS queries).
#[derive(Debug, Default)]
struct OnceResolver {
    inner: ureq::unversioned::resolver::DefaultResolver,
    known: std::sync::Mutex<
        std::collections::HashMap<String, ureq::unversioned::resolver::ResolvedSocketAddrs>,
    >,
}

impl ureq::unversioned::resolver::Resolver for OnceResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let key = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or(""),
            uri.authority().map_or("", |a| a.as_str())
        );
        if let Some(addrs) = self.known.lock().expect("resolver").get(&key) {
            return Ok(addrs.clone());
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        self.known
            .lock()
            .expect("resolver")
            .insert(key, addrs.clone());
        Ok(addrs)
    }
}

/// An HTTP client for binary caches: `connections` keep-alive connections
/// per host, `timeout` per request (`connect_timeout` for connecting, if
/// Nix sets one), the CA certificates of Nix's `ssl-cert-file` if it names
/// a readable file.
pub fn agent(
    connections: usize,
    timeout: Duration,
    connect_timeout: Option<Duration>,
    ssl_cert_file: Option<&camino::Utf8Path>,
) -> ureq::Agent {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(pem) = ssl_cert_file.and_then(|f| std::fs::read(f).ok()) {
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if !certs.is_empty() {
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
    }
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .timeout_connect(connect_timeout)
        .max_idle_connections(connections * 4)
        .max_idle_connections_per_host(connections)
        .user_agent(concat!("drvkite/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls.build())
        .build();
    ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        OnceResolver::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_leave_out_credentials_and_parameters() {
        assert_eq!(
            display_name("https://ci:s3cret@cache.example.org/sub/?priority=10"),
            "https://cache.example.org/sub"
        );
        assert_eq!(
            display_name("file:///srv/cache?secret-key=/k"),
            "file:///srv/cache"
        );
        assert_eq!(display_name("daemon"), "daemon");
        assert_eq!(display_name("file:///c/$HOME/"), "file:///c/%24HOME");
    }

    #[test]
    fn credentials_from_the_url_win_over_netrc() {
        let netrc = Netrc::parse("machine cache.example.org login n password p");
        let from_netrc = Cache::new("https://cache.example.org/", &netrc);
        let from_url = Cache::new(
            "https://u%40x:p%3A@cache.example.org:8443/c?trusted=1",
            &netrc,
        );
        match (&from_netrc.kind, &from_url.kind) {
            (Kind::Http { base: b1, auth: a1 }, Kind::Http { base: b2, auth: a2 }) => {
                assert_eq!(b1, "https://cache.example.org");
                assert_eq!(a1.as_deref(), Some(basic("n", "p").as_str()));
                assert_eq!(b2, "https://cache.example.org:8443/c");
                assert_eq!(a2.as_deref(), Some(basic("u@x", "p:").as_str()));
            }
            other => panic!("{other:?}"),
        }
        for url in [
            "s3://bucket",
            "ssh://host",
            "daemon",
            "/nix/store",
            "file://relative",
        ] {
            assert!(Cache::new(url, &netrc).unusable().is_some(), "{url}");
        }
    }
}
