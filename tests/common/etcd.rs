//! A real 3-member etcd cluster (Debian's `etcd-server`) on loopback
//! ports, each member with its own data directory, for the etcd witness
//! tests: members can be killed (SIGKILL), restarted, and the leader found.
//! Election timeout 500 ms (heartbeat 50 ms), so etcd grants 1 s leases.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Member {
    pub name: String,
    pub client: u16,
    pub peer: u16,
    child: Option<Child>,
}

pub struct Etcd {
    pub members: Vec<Member>,
    dir: PathBuf,
    initial: String,
    extra: Vec<String>,
    /// Clients speak TLS and must present a certificate signed by the CA
    /// in this directory (`make_certs`).
    tls: Option<PathBuf>,
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// etcd and etcdctl are installed (scripts/setup.sh installs them).
pub fn available() -> bool {
    Command::new("etcd").arg("--version").output().is_ok_and(|o| o.status.success())
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_with(&[])
    }

    /// With more etcd options for every member.
    pub fn start_with(extra: &[&str]) -> Etcd {
        Etcd::start_full(extra, None)
    }

    /// Clients over TLS with client certificates (`make_certs(dir)`).
    pub fn start_tls(certs: &std::path::Path) -> Etcd {
        Etcd::start_full(&[], Some(certs.to_path_buf()))
    }

    fn start_full(extra: &[&str], tls: Option<PathBuf>) -> Etcd {
        assert!(available(), "etcd is not installed: run scripts/setup.sh (Debian package etcd-server)");
        let dir = std::env::temp_dir().join(format!("ftvm-etcd-{}-{}", std::process::id(), port()));
        std::fs::create_dir_all(&dir).unwrap();
        let members: Vec<Member> =
            (1..=3).map(|i| Member { name: format!("m{i}"), client: port(), peer: port(), child: None }).collect();
        let initial = members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer)).collect::<Vec<_>>().join(",");
        let mut e = Etcd { members, dir, initial, extra: extra.iter().map(|s| s.to_string()).collect(), tls };
        for i in 0..3 {
            e.restart(i);
        }
        e.wait_healthy(3);
        e
    }

    /// `etcd://E1,E2,E3/PREFIX`.
    pub fn witness(&self, prefix: &str) -> String {
        format!("etcd://{}{prefix}", self.endpoints())
    }

    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| format!("127.0.0.1:{}", m.client)).collect::<Vec<_>>().join(",")
    }

    pub fn restart(&mut self, i: usize) {
        let m = &mut self.members[i];
        let data = self.dir.join(&m.name);
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name))).unwrap();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut cmd = Command::new("etcd");
        if let Some(d) = &self.tls {
            cmd.arg("--cert-file").arg(d.join("server.crt")).arg("--key-file").arg(d.join("server.key"));
            cmd.arg("--trusted-ca-file").arg(d.join("ca.crt")).arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &format!("{scheme}://127.0.0.1:{}", m.client)])
            .args(["--advertise-client-urls", &format!("{scheme}://127.0.0.1:{}", m.client)])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", m.peer)])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", m.peer)])
            .args(["--initial-cluster", &self.initial, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &format!("ftvm-test-{}", self.dir.display())])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd");
        m.child = Some(child);
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP member `i` for `ms`, then SIGCONT: a member that stalls
    /// without refusing connections.
    pub fn pause(&self, i: usize, ms: u64) {
        let Some(c) = &self.members[i].child else { return };
        let sig = |s: &str| {
            let _ = Command::new("kill").arg(format!("-{s}")).arg(c.id().to_string()).status();
        };
        sig("STOP");
        std::thread::sleep(Duration::from_millis(ms));
        sig("CONT");
    }

    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3");
        match &self.tls {
            Some(d) => {
                let eps = self.members.iter().map(|m| format!("https://127.0.0.1:{}", m.client)).collect::<Vec<_>>().join(",");
                c.args(["--endpoints", &eps]);
                c.arg("--cacert").arg(d.join("ca.crt")).arg("--cert").arg(d.join("client.crt")).arg("--key").arg(d.join("client.key"));
            }
            None => {
                c.args(["--endpoints", &self.endpoints()]);
            }
        }
        c.args(["--command-timeout", "2s", "--dial-timeout", "1s"]).args(args).output().expect("etcdctl")
    }

    /// Waits until `n` members answer and one of them leads.
    pub fn wait_healthy(&self, n: usize) {
        let t0 = Instant::now();
        loop {
            let st = self.status();
            if st.len() >= n && st.iter().any(|(_, leader)| *leader) {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "etcd did not come up ({n} members): {st:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// (member index, is leader) of each member that answers.
    pub fn status(&self) -> Vec<(usize, bool)> {
        let o = self.etcdctl(&["endpoint", "status", "-w", "simple"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(", ").collect();
                let port: u16 = f.first()?.rsplit(':').next()?.parse().ok()?;
                let i = self.members.iter().position(|m| m.client == port)?;
                Some((i, f.get(4)? == &"true"))
            })
            .collect()
    }

    pub fn leader(&self) -> Option<usize> {
        self.status().into_iter().find(|(_, l)| *l).map(|(i, _)| i)
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate
/// (CN `cn`) signed by it, made with openssl in `dir`: ca.crt,
/// server.{crt,key}, client.{crt,key}.
pub fn make_certs(dir: &std::path::Path, cn: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let sh = |script: &str| {
        let o = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().expect("sh");
        assert!(o.status.success(), "{script}: {}", String::from_utf8_lossy(&o.stderr));
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=ftvm-test-ca -keyout ca.key -out ca.crt 2>/dev/null");
    sh("printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n' > server.ext");
    sh("openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr 2>/dev/null && openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext -out server.crt 2>/dev/null");
    sh("printf 'extendedKeyUsage=clientAuth\\n' > client.ext");
    sh(&format!("openssl req -newkey rsa:2048 -nodes -subj /CN={cn} -keyout client.key -out client.csr 2>/dev/null && openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile client.ext -out client.crt 2>/dev/null"));
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
