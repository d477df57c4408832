//! Helpers for the ephemera tests: a store shared by the jobs of a test (a
//! local folder or a bucket on a real S3 server, moto), fresh jobs of
//! Buildkite builds, raw access to the store's objects (what someone who
//! can write a scope's prefix could do), and hand-made archives.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tar::EntryType;

use super::{drvkite, ok};

static BUILD: AtomicUsize = AtomicUsize::new(1);

/// Where a world's objects are, for raw access.
pub enum Raw {
    Local(PathBuf),
    /// A bucket on moto (which does not check signatures), objects below
    /// `prefix/`.
    S3 {
        port: u16,
        bucket: String,
        prefix: String,
    },
}

/// One store shared by the jobs of a test.
pub struct World {
    pub root: tempfile::TempDir,
    pub store: String,
    pub extra: Vec<(String, String)>,
    pub raw: Raw,
}

#[derive(Clone, Copy)]
pub enum Build<'a> {
    Main,
    Pr(u64),
    Fork(u64, &'a str),
}

pub struct Job {
    pub ws: PathBuf,
    pub home: PathBuf,
    pub vars: Vec<(String, String)>,
}

impl World {
    pub fn local() -> World {
        let root = tempfile::tempdir().unwrap();
        let store = root.path().join("store");
        World {
            store: store.display().to_string(),
            root,
            extra: vec![],
            raw: Raw::Local(store),
        }
    }

    /// A world on a fresh bucket of `moto`.
    pub fn s3(moto: &Moto, bucket: &str) -> World {
        let bucket: String = bucket
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(60)
            .collect();
        create_bucket(moto.port, &bucket);
        World {
            root: tempfile::tempdir().unwrap(),
            store: format!("s3://{bucket}/ci"),
            extra: [
                (
                    "DRVKITE_EPHEMERA_S3_ENDPOINT",
                    format!("http://127.0.0.1:{}", moto.port),
                ),
                ("DRVKITE_EPHEMERA_S3_ALLOW_HTTP", "true".into()),
                ("AWS_ACCESS_KEY_ID", "testing".into()),
                ("AWS_SECRET_ACCESS_KEY", "testing".into()),
                ("AWS_REGION", "us-east-1".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            raw: Raw::S3 {
                port: moto.port,
                bucket,
                prefix: "ci".into(),
            },
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self.raw, Raw::Local(_))
    }

    pub fn store_path(&self) -> PathBuf {
        PathBuf::from(&self.store)
    }

    /// A fresh job of `build`, with `extra` variables on top.
    pub fn job(&self, build: Build, extra: &[(&str, &str)]) -> Job {
        let n = BUILD.fetch_add(1, Ordering::SeqCst);
        let ws = self.root.path().join(format!("agent{n}/builds/depot"));
        let home = self.root.path().join(format!("agent{n}/home"));
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::create_dir_all(&home).unwrap();
        let mut vars: Vec<(String, String)> = [
            ("BUILDKITE_ORGANIZATION_SLUG", "acme"),
            ("BUILDKITE_PIPELINE_SLUG", "depot"),
            ("BUILDKITE_REPO", "git@github.com:acme/depot.git"),
            ("BUILDKITE_PIPELINE_DEFAULT_BRANCH", "main"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut set = |k: &str, v: String| vars.push((k.to_string(), v));
        set("BUILDKITE_BUILD_NUMBER", n.to_string());
        set("BUILDKITE_BUILD_ID", format!("build-{n}"));
        set(
            "BUILDKITE_BUILD_URL",
            format!("https://buildkite.com/acme/depot/builds/{n}"),
        );
        set("BUILDKITE_JOB_ID", format!("job-{n}"));
        set("DRVKITE_EPHEMERA_STORE", self.store.clone());
        match build {
            Build::Main => {
                set("BUILDKITE_BRANCH", "main".into());
                set("BUILDKITE_PULL_REQUEST", "false".into());
            }
            Build::Pr(pr) => {
                set("BUILDKITE_BRANCH", "feature".into());
                set("BUILDKITE_PULL_REQUEST", pr.to_string());
                set(
                    "BUILDKITE_PULL_REQUEST_REPO",
                    "https://github.com/acme/depot".into(),
                );
            }
            Build::Fork(pr, repo) => {
                // A fork may call its branch anything, "main" included.
                set("BUILDKITE_BRANCH", "main".into());
                set("BUILDKITE_PULL_REQUEST", pr.to_string());
                set("BUILDKITE_PULL_REQUEST_REPO", repo.into());
            }
        }
        for (k, v) in &self.extra {
            set(k, v.clone());
        }
        for (k, v) in extra {
            set(k, v.to_string());
        }
        Job { ws, home, vars }
    }

    /// The store's keys under `prefix`, sorted.
    pub fn keys_under(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .keys()
            .into_iter()
            .filter(|k| k.starts_with(prefix))
            .collect();
        keys.sort();
        keys
    }

    /// Every object's key, relative to the store's root.
    pub fn keys(&self) -> Vec<String> {
        match &self.raw {
            Raw::Local(dir) => files_under(dir),
            Raw::S3 {
                port,
                bucket,
                prefix,
            } => {
                let mut keys = Vec::new();
                let mut token: Option<String> = None;
                loop {
                    let mut query = format!(
                        "list-type=2&encoding-type=url&prefix={}",
                        url_encode(&format!("{prefix}/"))
                    );
                    if let Some(t) = &token {
                        query.push_str(&format!("&continuation-token={}", url_encode(t)));
                    }
                    let (status, body) = http(*port, "GET", &format!("/{bucket}?{query}"), b"");
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                    let body = String::from_utf8(body).unwrap();
                    for part in body.split("<Key>").skip(1) {
                        let key = url_decode(part.split("</Key>").next().unwrap());
                        keys.push(key[prefix.len() + 1..].to_string());
                    }
                    token = body
                        .split("<NextContinuationToken>")
                        .nth(1)
                        .map(|t| t.split('<').next().unwrap().to_string());
                    if !body.contains("<IsTruncated>true</IsTruncated>") {
                        return keys;
                    }
                }
            }
        }
    }

    /// One request for object `key` of an S3 world: (status, body).
    fn object(&self, method: &str, key: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let (port, path) = self.s3_object(key);
        http(port, method, &path, body)
    }

    /// The S3 server's port and the request path of object `key`.
    fn s3_object(&self, key: &str) -> (u16, String) {
        let Raw::S3 {
            port,
            bucket,
            prefix,
        } = &self.raw
        else {
            panic!("only an S3 world has objects to ask for");
        };
        let path = format!("/{bucket}/{}", url_encode(&format!("{prefix}/{key}")));
        (*port, path)
    }

    /// Store an object that listings show but reads refuse (S3 only: the
    /// GLACIER storage class, which a writer of the prefix may choose).
    pub fn put_unreadable(&self, key: &str, bytes: &[u8]) {
        let (port, path) = self.s3_object(key);
        let (status, body) = http_with(
            port,
            "PUT",
            &path,
            bytes,
            "x-amz-storage-class: GLACIER\r\n",
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_ne!(self.object("GET", key, b"").0, 200, "{key} is readable");
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        match &self.raw {
            Raw::Local(dir) => std::fs::read(dir.join(key)).ok(),
            Raw::S3 { .. } => {
                let (status, body) = self.object("GET", key, b"");
                (status == 200).then_some(body)
            }
        }
    }

    pub fn put(&self, key: &str, bytes: &[u8]) {
        match &self.raw {
            Raw::Local(dir) => {
                let p = dir.join(key);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, bytes).unwrap();
            }
            Raw::S3 { .. } => {
                let (status, body) = self.object("PUT", key, bytes);
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            }
        }
    }

    /// The newest manifest of set `name` in the store.
    pub fn manifest_of(&self, name: &str) -> String {
        let mut found: Vec<String> = self
            .manifests()
            .into_iter()
            .filter(|m| m.contains(&format!("/entries/{name}/")))
            .collect();
        found.sort_by_key(|m| m.rsplit('/').next().unwrap().to_string());
        found
            .pop()
            .unwrap_or_else(|| panic!("no manifest of {name}"))
    }

    /// Manifests in the store, as store-relative keys.
    pub fn manifests(&self) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|p| p.contains("/entries/") && p.ends_with(".json"))
            .collect()
    }

    /// The key of a manifest in `scope` (the first one listed).
    pub fn manifest_in(&self, scope: &str) -> String {
        self.manifests()
            .into_iter()
            .find(|m| m.starts_with(&format!("{scope}/")))
            .unwrap_or_else(|| panic!("no manifest in {scope}"))
    }

    pub fn manifest(&self, key: &str) -> serde_json::Value {
        serde_json::from_slice(&self.get(key).unwrap()).unwrap()
    }

    /// Put `archive` in `scope` as a live entry of the set of the manifest
    /// at `template`, with id `id` (newer ids win), and the manifest changed
    /// by `edit` last: what someone who can write that scope's prefix could
    /// do. Its place follows the edited fields unless `edit` says otherwise
    /// through `at`. Returns the new manifest's key.
    pub fn plant(
        &self,
        template: &str,
        scope: &str,
        archive: &[u8],
        id: &str,
        edit: impl Fn(&mut serde_json::Value),
    ) -> String {
        let mut m = self.manifest(template);
        let sha = hex(&Sha256::digest(archive));
        self.put(&format!("{scope}/blobs/{sha}.tar.zst"), archive);
        m["scope"] = scope.into();
        m["sha256"] = sha.into();
        m["size"] = (archive.len() as u64).into();
        m["id"] = id.into();
        m["created_at"] = humantime::format_rfc3339_nanos(SystemTime::now())
            .to_string()
            .into();
        let key = format!(
            "{scope}/entries/{}/{}/{id}.json",
            m["name"].as_str().unwrap(),
            m["key"].as_str().unwrap()
        );
        edit(&mut m);
        self.put(&key, &serde_json::to_vec(&m).unwrap());
        key
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else if b[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One HTTP/1.1 request to moto on loopback: (status, body).
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    http_with(port, method, path, body, "")
}

/// [`http`] with `headers` (`Name: value\r\n` lines) added.
fn http_with(port: u16, method: &str, path: &str, body: &[u8], headers: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // moto does not check signatures, but wants to know whose request it is.
    let auth = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, \
                SignedHeaders=host, Signature=0";
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {auth}\r\n\
         {headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, resp[split + 4..].to_vec())
}

pub fn files_under(dir: &Path) -> Vec<String> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            e.path()
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// The bin folder of drvkite first, then the system's.
pub fn path_var(first: Option<&Path>) -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_drvkite")).parent().unwrap();
    let mut parts = vec![];
    if let Some(f) = first {
        parts.push(f.display().to_string());
    }
    parts.push(bin.display().to_string());
    parts.push(std::env::var("PATH").unwrap_or_default());
    parts.join(":")
}

impl Job {
    pub fn base(&self, mut cmd: Command) -> Command {
        cmd.env_clear()
            .env("PATH", path_var(None))
            .env("HOME", &self.home)
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.ws);
        cmd
    }

    pub fn eph(&self, args: &[&str]) -> Command {
        let mut cmd = self.base(drvkite());
        cmd.arg("ephemera").args(args);
        cmd
    }

    pub fn ok(&self, args: &[&str]) -> String {
        ok(&mut self.eph(args))
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.eph(args).output().unwrap()
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.ws.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn write_home(&self, rel: &str, text: &str) {
        let p = self.home.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.ws.join(rel)).ok()
    }

    pub fn leftovers(&self) -> Vec<String> {
        let mut found = vec![];
        for dir in [&self.ws, &self.home] {
            for e in walkdir::WalkDir::new(dir)
                .into_iter()
                .filter_map(Result::ok)
            {
                let name = e.file_name().to_string_lossy();
                if name.starts_with(".drvkite-") {
                    found.push(e.path().display().to_string());
                }
            }
        }
        found
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Persist `target/` holding `content` with Cargo.lock as key file.
pub fn persist_target(job: &Job, content: &str) -> String {
    job.write("Cargo.lock", "lock v1\n");
    job.write("target/out.txt", content);
    job.ok(&["persist", "cargo", "target", "--key-file", "Cargo.lock"])
}

/// Restore `cargo` in a job; the restored `target/out.txt`, if any.
pub fn restore_target(job: &Job) -> Option<String> {
    if job.read("Cargo.lock").is_none() {
        job.write("Cargo.lock", "lock v1\n");
    }
    job.ok(&["restore", "cargo", "--key-file", "Cargo.lock"]);
    job.read("target/out.txt")
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `len` bytes that zstd cannot shrink.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Tar entries written raw, so names and types the tar crate's builder
/// would refuse can be made.
pub struct Evil {
    pub tar: tar::Builder<Vec<u8>>,
}

impl Evil {
    /// Starts with a harmless folder and file, as a real archive would.
    pub fn new() -> Evil {
        let mut e = Evil::empty();
        e.entry("0", EntryType::Directory, None, b"");
        e.entry("0/fine.txt", EntryType::Regular, None, b"fine");
        e
    }

    pub fn empty() -> Evil {
        Evil {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    pub fn entry(
        &mut self,
        name: &str,
        kind: EntryType,
        link: Option<&str>,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            assert!(name.len() < 100, "{name}");
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                assert!(l.len() < 100, "{l}");
                gnu.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        if matches!(kind, EntryType::Char) {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        self.tar.append(&h, data).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        zstd::encode_all(&self.tar.into_inner().unwrap()[..], 3).unwrap()
    }
}

/// A real S3 server (moto) on a free loopback port, stopped on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_command() -> Option<Command> {
    if let Ok(p) = std::env::var("DRVKITE_TEST_MOTO_SERVER")
        && !p.is_empty()
    {
        return Some(Command::new(p));
    }
    if let Ok(p) = which::which("moto_server") {
        return Some(Command::new(p));
    }
    let python_has_it = Command::new("python3")
        .args(["-c", "import moto.server"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    python_has_it.then(|| {
        let mut c = Command::new("python3");
        c.args(["-m", "moto.server"]);
        c
    })
}

/// Start moto, or `None` (with a loud note) when it is not installed
/// outside CI; in CI a missing moto fails the test.
pub fn start_moto() -> Option<Moto> {
    let Some(mut cmd) = moto_command() else {
        let msg = "moto_server (PyPI moto[server]) is not installed: the S3 store test needs a \
                   real S3 server; scripts/ensure-moto.sh installs it";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("\n!!!!!!!! SKIPPING the S3 store test: {msg} !!!!!!!!\n");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = cmd
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("start moto_server");
    let mut moto = Moto { child, port, log };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if let Some(status) = moto.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(moto.log.path()).unwrap_or_default();
            panic!("moto_server exited ({status}) before listening: {log}");
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not start listening"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(moto)
}

/// S3 `CreateBucket` as a bare HTTP request (moto does not check auth).
pub fn create_bucket(port: u16, bucket: &str) {
    let (status, body) = http(port, "PUT", &format!("/{bucket}"), b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

/// Run `cmd` to its end; its output and its peak resident memory in KiB:
/// the kernel's high-water mark of the process's memory (VmHWM), which only
/// grows, read every millisecond while it runs. (wait4's ru_maxrss would
/// also count the test process, whose memory the child starts from.)
pub fn run_measured(cmd: &mut Command) -> (Output, u64) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            pipe.read_to_end(&mut v).unwrap();
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let hwm = std::fs::read_to_string(&status_file)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0);
        peak = peak.max(hwm);
        std::thread::sleep(Duration::from_millis(1));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    assert!(peak > 0, "could not read {status_file}");
    (output, peak)
}

/// One `#[test]` per scenario on a local store (module `local`), and one
/// test running every scenario again side by side, each on its own bucket
/// of one moto (`on_s3`).
#[allow(unused_macros)]
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[test]
                fn $name() {
                    super::$name(&$crate::common::ephemera::World::local());
                }
            )*
        }

        /// Every scenario again, each on its own bucket of one moto, side
        /// by side.
        #[test]
        fn on_s3() {
            let Some(moto) = $crate::common::ephemera::start_moto() else {
                return;
            };
            let moto = &moto;
            std::thread::scope(|s| {
                $(
                    std::thread::Builder::new()
                        .name(stringify!($name).into())
                        .spawn_scoped(s, move || {
                            $name(&$crate::common::ephemera::World::s3(moto, stringify!($name)))
                        })
                        .unwrap();
                )*
            });
        }
    };
}

#[allow(unused_imports)]
pub(crate) use scenarios;
