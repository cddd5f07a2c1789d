//! Network namespaces for the root-only tests: creating them (and removing them, with their
//! `/etc/netns/NAME` files, when dropped), links between them, and running code or processes
//! inside one.
//!
//! Two ways into a namespace:
//! - [`in_ns`] runs a closure on a thread that has entered it: sockets the closure creates,
//!   and processes it spawns, live there (the REST calls of a test, in-process servers);
//! - [`Ztm::in_netns`](crate::Ztm::in_netns) starts processes under `ip netns exec NAME`,
//!   which also mounts `/etc/netns/NAME/*` over `/etc` for them (a namespace's own
//!   `/etc/hosts`, say).

use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use crate::dir::rand_u64;
use crate::http::sh;
use crate::procfs::status_field;

/// Where `ip netns` keeps a namespace's files for `/etc` (`hosts`, `resolv.conf`).
pub const ETC_NETNS: &str = "/etc/netns";

/// Runs `f` on a thread that has entered network namespace `ns`: sockets it creates, and
/// processes it spawns, live in that namespace.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = ["/run/netns", "/var/run/netns"]
        .iter()
        .map(|d| Path::new(d).join(ns))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("network namespace {ns} not found"));
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let file = std::fs::File::open(&path).unwrap();
            // Only this thread moves; the namespace file stays open for the call.
            if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
                panic!("setns {ns}: {e}");
            }
            f()
        });
        h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Runs a shell line and asserts that it succeeds.
pub fn run(line: &str) {
    let (code, out, err) = sh(Path::new("/"), line);
    assert_eq!(code, 0, "{line}: {out} {err}");
}

/// Network namespaces a test created; each is removed when this is dropped (also on panic),
/// and so is its `/etc/netns/NAME` directory. Drop it after every process in them is gone.
#[derive(Debug, Default)]
pub struct Namespaces(Vec<String>);

impl Namespaces {
    /// Creates namespaces `names` with their loopback up.
    pub fn create(names: &[&str]) -> Namespaces {
        let mut all = Namespaces::default();
        for ns in names {
            all.add(ns);
        }
        all
    }

    /// Creates namespace `ns` with its loopback up.
    pub fn add(&mut self, ns: &str) {
        // Listed first, so that it goes even if a later step fails.
        self.0.push(ns.to_string());
        run(&format!("ip netns add {ns}"));
        run(&format!("ip -n {ns} link set lo up"));
    }

    pub fn names(&self) -> &[String] {
        &self.0
    }

    /// Writes `text` as `/etc/{file}` of the processes that [`Ztm::in_netns`](crate::Ztm)
    /// (or `ip netns exec`) starts in `ns`: `/etc/netns/{ns}/{file}`. `/etc/{file}` must
    /// exist (`ip netns exec` mounts the file over it).
    pub fn etc_file(&self, ns: &str, file: &str, text: &str) -> PathBuf {
        assert!(
            self.0.iter().any(|n| n == ns),
            "{ns} is not a namespace of this test"
        );
        let dir = Path::new(ETC_NETNS).join(ns);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
            let _ = std::fs::remove_dir_all(Path::new(ETC_NETNS).join(ns));
        }
    }
}

/// One end of a veth link: a namespace, the device's name there and its address (CIDR).
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    pub ns: &'a str,
    pub dev: &'a str,
    pub addr: &'a str,
}

/// A veth pair between `a` and `b`, addressed and up.
pub fn veth(a: End, b: End) {
    run(&format!(
        "ip -n {} link add {} type veth peer name {} netns {}",
        a.ns, a.dev, b.dev, b.ns
    ));
    for end in [a, b] {
        run(&format!(
            "ip -n {} addr add {} dev {}",
            end.ns, end.addr, end.dev
        ));
        run(&format!("ip -n {} link set {} up", end.ns, end.dev));
    }
}

/// Why a namespace test cannot run here, if it cannot: not root, a tool of `tools` missing
/// (`ip` is always needed), `ip netns add` refused, or (when `nft` is among `tools`) nftables
/// not working in a namespace.
pub fn unavailable(tools: &[&str]) -> Option<String> {
    let dir = Path::new("/");
    if status_field(std::process::id(), "Uid") != Some(0) {
        return Some("not root".into());
    }
    for tool in std::iter::once(&"ip").chain(tools) {
        if sh(dir, &format!("command -v {tool}")).0 != 0 {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    let probe = format!("ztm-probe-{}-{:x}", std::process::id(), rand_u64() & 0xffff);
    let (code, _, err) = sh(dir, &format!("ip netns add {probe}"));
    if code != 0 {
        return Some(format!("`ip netns add` failed: {err}"));
    }
    let mut why = None;
    if tools.contains(&"nft") {
        let (code, _, err) = sh(
            dir,
            &format!(
                "ip netns exec {probe} nft add table inet probe && \
                 ip netns exec {probe} nft add chain inet probe p \
                 '{{ type nat hook postrouting priority 100; }}'"
            ),
        );
        if code != 0 {
            why = Some(format!("nftables does not work in a namespace: {err}"));
        }
    }
    let _ = sh(dir, &format!("ip netns del {probe}"));
    why
}
