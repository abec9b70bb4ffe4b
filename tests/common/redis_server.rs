//! Real Redis servers for the tests that need one. Never skips: without `redis-server` these tests fail and
//! say how to get it.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The conventional local Redis, reused when it answers.
const SHARED_ADDR: &str = "127.0.0.1:6379";

/// A Redis to run tests against.
pub struct RedisServer {
    pub addr: SocketAddr,
    /// Our own redis-server process; `None` for the shared one, which tests never stop.
    child: Option<Child>,
    /// Holds cluster-mode state (nodes.conf) while the server runs.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// The Redis on 127.0.0.1:6379 when one answers PING, else one of our own. Tests sharing it keep apart
    /// with a key prefix of their own ([`unique_prefix`]).
    pub fn shared() -> RedisServer {
        let addr: SocketAddr = SHARED_ADDR.parse().unwrap();
        if ping(addr) {
            return RedisServer {
                addr,
                child: None,
                dir: tempfile::tempdir().unwrap(),
            };
        }
        Self::private()
    }

    /// A redis-server of our own on a free port, for tests that stop and restart it.
    pub fn private() -> RedisServer {
        Self::own(&[])
    }

    /// A redis-server of our own on a free port, started with `args`.
    fn own(args: &[&str]) -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        server.start(args);
        server
    }

    /// A read-only replica of our own, of a primary that does not exist: it answers, but refuses every
    /// write with READONLY, as a URL pointing at a replica would.
    pub fn replica() -> RedisServer {
        let primary = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string();
        Self::own(&["--replicaof", "127.0.0.1", &primary])
    }

    /// A one-node Redis Cluster of our own owning every slot: enough for cross-slot rules to apply.
    pub fn cluster() -> RedisServer {
        let server = Self::own(&["--cluster-enabled", "yes"]);
        server.own_every_slot();
        server
    }

    /// Gives this one-node cluster every slot and waits until the cluster is ok.
    fn own_every_slot(&self) {
        let reply = self.command(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        assert!(reply.starts_with("+OK"), "CLUSTER ADDSLOTSRANGE: {reply}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .command(&["CLUSTER", "INFO"])
            .contains("cluster_state:ok")
        {
            assert!(Instant::now() < deadline, "the cluster never became ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A redis-server of our own serving TLS on a second port (returned) with `files`' server certificate,
    /// trusting client certificates of `files`' CA, and requiring one when `auth_clients`; as a one-node
    /// cluster owning every slot when `cluster`. Its plain port ([`RedisServer::addr`]) stays open for
    /// the test's own commands.
    pub fn tls(files: &TlsFiles, auth_clients: bool, cluster: bool) -> (RedisServer, u16) {
        let tls_port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string();
        let path = |p: &std::path::Path| p.display().to_string();
        let (cert, key, ca) = (path(&files.cert), path(&files.key), path(&files.ca));
        let mut args = vec![
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            if auth_clients { "yes" } else { "no" },
        ];
        if cluster {
            args.extend(["--cluster-enabled", "yes", "--tls-cluster", "yes"]);
        }
        let server = Self::own(&args);
        if cluster {
            server.own_every_slot();
        }
        (server, tls_port.parse().unwrap())
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Stops our own server (never the shared one) and waits until it no longer answers.
    pub fn stop(&mut self) {
        let mut child = self
            .child
            .take()
            .expect("only a private redis-server can be stopped");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts our own server again on the same port, empty.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.start(&[]);
    }

    /// Sends one command and returns the raw RESP reply.
    pub fn command(&self, args: &[&str]) -> String {
        command(self.addr, args).expect("redis answers")
    }

    /// Keys starting with `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let reply = self.command(&["KEYS", &format!("{prefix}*")]);
        reply
            .lines()
            .filter(|line| !line.starts_with('*') && !line.starts_with('$'))
            .map(str::to_owned)
            .collect()
    }

    fn start(&mut self, extra: &[&str]) {
        let port = self.addr.port().to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}). These tests need a real Redis: run one on \
                     127.0.0.1:6379, or install redis-server (Debian: apt-get install redis-server)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(self.addr) {
            assert!(
                Instant::now() < deadline,
                "redis-server on {} never answered",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TLS server's files: its certificate and key, and the CA that signed it (and trusted client
/// certificates).
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A key prefix no other test uses, so tests can share one Redis.
pub fn unique_prefix() -> String {
    format!("cts-test-{}", uuid::Uuid::new_v4().simple())
}

fn ping(addr: SocketAddr) -> bool {
    command(addr, &["PING"]).is_some_and(|reply| reply.starts_with("+PONG"))
}

/// One RESP command over a fresh connection; `None` when nothing answers.
fn command(addr: SocketAddr, args: &[&str]) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = Vec::new();
    let mut buf = [0; 4096];
    // Replies used here are small: read until a short read says the reply is complete.
    loop {
        let n = stream.read(&mut buf).ok()?;
        reply.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            break;
        }
    }
    (!reply.is_empty()).then(|| String::from_utf8_lossy(&reply).into_owned())
}

/// libfaketime, to run a process with a skewed wall clock (Debian keeps it under /usr/lib/<arch>/).
pub fn libfaketime() -> PathBuf {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
        .find(|path| path.exists())
        .expect("the clock-skew test needs libfaketime (Debian: apt-get install libfaketime)")
}
