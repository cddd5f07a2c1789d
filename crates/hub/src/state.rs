//! The hub's shared state and the operations that change its parts together: the [`Registry`]
//! (who is registered), the sessions' I/O handles, every authenticated connection (registered
//! or not, so revocation reaches them all), the revoked serials and the lists built from the
//! registry. Lock order, where two are held: registry, then sessions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::Reason;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::watch;
use ztm_net::now_ms;
use ztm_pki::Revoked;
use ztm_proto::acl;
use ztm_proto::wire::{EndpointInfo, Proto, HANDSHAKE_TIMEOUT, TUNNEL_STREAMS};

use crate::admission;
use crate::closer::{self, Closer, Goodbye};
use crate::limits::{Counter, Limits, Refused, Slot};
use crate::registry::{self, RegisterError, Registration, Registry, SessionId, Snapshot};
use ztm_proto::listing::{self, ListQuery};

/// A connection whose TLS handshake is done, as the hub holds it: on the heap, so that the
/// futures it passes through on its way to HTTP/2 (each keeps room for its arguments) hold a
/// pointer to it rather than copies of it.
pub type Tls = Box<ztm_tls::TlsStream>;

/// Who is on the other end of a TLS connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub user: String,
    pub serial: String,
    pub addr: SocketAddr,
}

/// Where a session's reverse connection is.
#[derive(Clone)]
pub enum Reverse {
    /// Not bound yet: the agent dials it right after registering.
    Pending,
    Bound(h2::client::SendRequest<Bytes>),
    /// Bound, with its HTTP/2 not started yet: notifying it starts it (PROTOCOL.md, "Reverse
    /// connection"), after which it is `Bound`.
    Dormant(Arc<tokio::sync::Notify>),
    /// The agent's reverse connection was refused, for this reason (it may dial again).
    Refused(String),
}

/// The I/O handles of a registered session.
pub struct SessionIo {
    /// Closes the control connection that registered the session.
    pub control: Closer,
    /// Closes the session's reverse connection: this session's own, so that a registration
    /// replacing it on the same control connection closes the old reverse connection only.
    pub reverse_closer: Closer,
    /// Which control connection registered it.
    pub conn: u64,
    /// The reverse connection.
    pub reverse: watch::Sender<Reverse>,
    /// The streams tunnels may take on the reverse connection; the others stay free for
    /// management requests.
    pub tunnels: Arc<tokio::sync::Semaphore>,
    /// When a request last asked for the reverse connection (ms since the epoch).
    pub last_used: AtomicU64,
}

impl SessionIo {
    fn new(control: Closer, conn: u64) -> SessionIo {
        SessionIo {
            control,
            reverse_closer: Closer::new(),
            conn,
            reverse: watch::Sender::new(Reverse::Pending),
            tunnels: Arc::new(tokio::sync::Semaphore::new(TUNNEL_STREAMS as usize)),
            last_used: AtomicU64::new(now_ms()),
        }
    }

    /// Closes both connections.
    fn close(&self, why: Goodbye) {
        self.control.close(why.clone());
        self.reverse_closer.close(why);
    }
}

/// Why a request cannot use an endpoint's reverse connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoReverse {
    /// Not bound within the handshake timeout, or the session ended meanwhile.
    NotConnected,
    /// The agent's reverse connection was refused (the reason).
    Refused(String),
}

/// An authenticated connection, as the revocation sweep sees it.
struct ConnEntry {
    serial: String,
    kill: Closer,
}

/// How fresh the hub's copy of the CA's revocations is.
pub struct RevocationStatus {
    /// When the CA last answered a poll (ms since the epoch).
    last_ok: AtomicU64,
    /// Past this age, new sessions are refused.
    pub max_age: Duration,
}

impl RevocationStatus {
    pub fn new(max_age: Duration) -> Self {
        Self {
            last_ok: AtomicU64::new(now_ms()),
            max_age,
        }
    }
    pub fn polled(&self, now: u64) {
        self.last_ok.store(now, Ordering::Relaxed);
    }
    pub fn last_ok(&self) -> u64 {
        self.last_ok.load(Ordering::Relaxed)
    }
    pub fn fresh(&self, now: u64) -> bool {
        admission::revocations_fresh(self.last_ok(), now, self.max_age.as_millis() as u64)
    }
}

/// Lists older than this are rebuilt even if nothing was registered (heartbeat times and
/// liveness change with time alone).
const LIST_MAX_AGE_MS: u64 = 1_000;

/// The lists of one registry version, with the answers shared by every caller that sees the
/// same thing.
struct Lists {
    snapshot: Snapshot,
    /// `GET /api/endpoints` for callers who see every address (root).
    endpoints_all: Option<Bytes>,
    /// `GET /api/services` for callers who see every provider (when none is restricted).
    services_all: Option<Bytes>,
}

/// What a connection holds while it lives: its place in the connection table and its user's
/// connection slot. Dropping it gives both back.
pub struct ConnHandle {
    hub: Arc<Hub>,
    id: u64,
    _slot: Slot<String>,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.hub.conns().remove(&self.id);
    }
}

pub struct Hub {
    pub name: String,
    pub limits: Limits,
    registry: Mutex<Registry>,
    sessions: Mutex<HashMap<SessionId, SessionIo>>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    user_conns: Counter<String>,
    /// Requests with a body in progress, by user and in all.
    pub bodies: Counter<String>,
    /// Tunnels open, by user and in all.
    pub tunnels: Counter<String>,
    lists: Mutex<Option<Lists>>,
    pub revoked: Revoked,
    pub revocations: RevocationStatus,
    /// What the hub's tunnel relays hold for stalled next hops.
    pub stalls: ztm_relay::StallGuard,
    /// What Prometheus is shown (`ztm hub --metrics`); counted whether or not anyone looks.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Why a registration was refused.
#[derive(Debug)]
pub enum RegisterRefusal {
    Registry(RegisterError),
    /// The hub cannot tell whether the certificate was revoked.
    Stale,
}

impl Hub {
    pub fn new(
        name: String,
        limits: Limits,
        revoked: Revoked,
        max_staleness: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Hub {
        Hub {
            name,
            registry: Mutex::new(Registry::new(limits.clone())),
            sessions: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            user_conns: Counter::new(limits.connections_per_user, usize::MAX),
            bodies: Counter::new(limits.bodies_per_user, limits.bodies),
            tunnels: Counter::new(limits.tunnels_per_user, limits.tunnels),
            lists: Mutex::new(None),
            revoked,
            revocations: RevocationStatus::new(max_staleness),
            stalls: Default::default(),
            metrics,
            limits,
        }
    }

    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock()
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<SessionId, SessionIo>> {
        self.sessions.lock()
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, ConnEntry>> {
        self.conns.lock()
    }

    /// Admits an authenticated connection: within its user's bound, and not with a revoked
    /// certificate. It is in the connection table (and so reached by revocation sweeps) until
    /// the handle is dropped.
    pub fn admit(
        self: &Arc<Self>,
        id: u64,
        peer: &Peer,
        kill: Closer,
    ) -> Result<ConnHandle, admission::Refusal> {
        if self.revoked.contains(&peer.serial) {
            return Err(admission::Refusal::new(
                http::StatusCode::FORBIDDEN,
                format!("the certificate of user {} has been revoked", peer.user),
            ));
        }
        let slot = self.user_conns.try_take(peer.user.clone()).map_err(|r| {
            let limit = match r {
                Refused::Key(n) | Refused::Total(n) => n,
            };
            admission::Refusal::new(
                http::StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "user {} holds {limit} connections to this hub, as many as it may",
                    peer.user
                ),
            )
        })?;
        self.conns().insert(
            id,
            ConnEntry {
                serial: peer.serial.clone(),
                kill,
            },
        );
        Ok(ConnHandle {
            hub: self.clone(),
            id,
            _slot: slot,
        })
    }

    /// Registers an endpoint for the control connection `conn` (closed with `control`),
    /// closing the session it replaces: its reverse connection, and its control connection if
    /// that is another one.
    pub fn register(
        &self,
        r: registry::Register<'_>,
        conn: u64,
        control: &Closer,
    ) -> Result<Registration, RegisterRefusal> {
        let now = now_ms();
        if !self.revocations.fresh(now) {
            return Err(RegisterRefusal::Stale);
        }
        let mut registry = self.registry();
        let registration = registry
            .register(r, now)
            .map_err(RegisterRefusal::Registry)?;
        let mut sessions = self.sessions();
        if let Some(old) = registration.replaced {
            if let Some(io) = sessions.remove(&old) {
                if io.conn != conn {
                    io.control.close(closer::session_replaced());
                }
                io.reverse_closer.close(closer::session_replaced());
            }
        }
        sessions.insert(registration.session, SessionIo::new(control.clone(), conn));
        Ok(registration)
    }

    /// Ends the session of endpoint `id` that control connection `conn` registered. True if it
    /// was still that connection's (and so the endpoint went offline).
    pub fn end_session(&self, id: &str, session: SessionId, conn: u64) -> bool {
        let mut registry = self.registry();
        let mut sessions = self.sessions();
        let holder = sessions.get(&session).map(|s| s.conn);
        let mine = holder == Some(conn);
        // A session that moved to another control connection goes on without this one.
        if mine || holder.is_none() {
            registry.end_session(id, session);
        }
        if mine {
            if let Some(io) = sessions.remove(&session) {
                io.close(closer::session_ended());
            }
        }
        mine
    }

    /// Moves the session of endpoint `id` whose token is `token` to control connection `conn`
    /// (closed with `control`), if `user` holds it (PROTOCOL.md, "Control connection on
    /// demand"): the session. The connection it leaves is closed ("session moved").
    pub fn resume(
        &self,
        id: &str,
        token: &str,
        user: &str,
        conn: u64,
        control: &Closer,
    ) -> Option<SessionId> {
        let registry = self.registry();
        let session = registry.check_hello(id, token, user)?;
        let mut sessions = self.sessions();
        let io = sessions.get_mut(&session)?;
        let old = std::mem::replace(&mut io.control, control.clone());
        io.conn = conn;
        old.close(closer::session_moved());
        Some(session)
    }

    /// Closes a session's connections, saying `why`, and takes it offline (if it still
    /// exists).
    pub fn kill_session(&self, session: SessionId, why: Goodbye) {
        let mut registry = self.registry();
        if let Some(id) = registry.id_of_session(session) {
            registry.end_session(&id, session);
        }
        if let Some(io) = self.sessions().remove(&session) {
            io.close(why);
        }
    }

    /// The session a reverse connection's hello names, if the token and the user match.
    pub fn session_of_hello(&self, endpoint: &str, token: &str, user: &str) -> Option<SessionId> {
        self.registry().check_hello(endpoint, token, user)
    }

    /// Binds a reverse connection to `session`: the closer of that reverse connection, if the
    /// session still exists.
    pub fn bind_reverse(
        &self,
        session: SessionId,
        sender: h2::client::SendRequest<Bytes>,
    ) -> Option<Closer> {
        let mut sessions = self.sessions();
        let io = sessions.get_mut(&session)?;
        io.last_used.store(now_ms(), Ordering::SeqCst);
        io.reverse.send_replace(Reverse::Bound(sender));
        Some(io.reverse_closer.clone())
    }

    /// How `session`'s reverse connection is used: when a request last asked for it (ms since
    /// the epoch), and how many tunnels are open on it.
    pub fn reverse_use(&self, session: SessionId) -> Option<(u64, usize)> {
        let sessions = self.sessions();
        let io = sessions.get(&session)?;
        let open = (TUNNEL_STREAMS as usize).saturating_sub(io.tunnels.available_permits());
        Some((io.last_used.load(Ordering::SeqCst), open))
    }

    /// Binds a reverse connection whose HTTP/2 starts on demand to `session`: requests for the
    /// endpoint notify `wake`. The closer of that reverse connection, if the session still
    /// exists.
    pub fn bind_dormant(
        &self,
        session: SessionId,
        wake: Arc<tokio::sync::Notify>,
    ) -> Option<Closer> {
        let mut sessions = self.sessions();
        let io = sessions.get_mut(&session)?;
        io.reverse.send_replace(Reverse::Dormant(wake));
        Some(io.reverse_closer.clone())
    }

    /// Records that `session`'s reverse connection was refused: requests for the endpoint
    /// fail at once with `why` instead of waiting for it.
    pub fn refuse_reverse(&self, session: SessionId, why: String) {
        if let Some(io) = self.sessions().get(&session) {
            io.reverse.send_replace(Reverse::Refused(why));
        }
    }

    pub fn unbind_reverse(&self, session: SessionId) {
        if let Some(io) = self.sessions().get(&session) {
            io.reverse.send_if_modified(|r| {
                let bound = matches!(r, Reverse::Bound(_) | Reverse::Dormant(_));
                if bound {
                    *r = Reverse::Pending;
                }
                bound
            });
        }
    }

    /// The streams tunnels may take on a session's reverse connection.
    pub fn tunnel_slots(&self, session: SessionId) -> Option<Arc<tokio::sync::Semaphore>> {
        self.sessions().get(&session).map(|io| io.tunnels.clone())
    }

    /// The reverse-connection sender of an online endpoint. An agent dials its reverse
    /// connection right after registering, so a request that arrives in between waits for it
    /// (up to the handshake timeout) instead of failing; one whose reverse connection was
    /// refused fails at once.
    pub async fn reverse_of(
        &self,
        session: SessionId,
    ) -> Result<h2::client::SendRequest<Bytes>, NoReverse> {
        let mut bound = {
            let sessions = self.sessions();
            let io = sessions.get(&session).ok_or(NoReverse::NotConnected)?;
            // Said before the connection is looked at: a connection sent back to dormant is
            // looked at again after it was unbound, and sees this (`reverse::watch`).
            io.last_used.store(now_ms(), Ordering::SeqCst);
            io.reverse.subscribe()
        };
        // A dormant connection is woken, and then waited for as one being bound.
        let settled = bound.wait_for(|r| match r {
            Reverse::Pending => false,
            Reverse::Dormant(wake) => {
                wake.notify_one();
                false
            }
            Reverse::Bound(_) | Reverse::Refused(_) => true,
        });
        let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, settled).await {
            Ok(Ok(r)) => match &*r {
                Reverse::Bound(sender) => Ok(sender.clone()),
                Reverse::Refused(why) => Err(NoReverse::Refused(why.clone())),
                Reverse::Pending | Reverse::Dormant(_) => Err(NoReverse::NotConnected),
            },
            // Timed out, or the session ended (its sender was dropped).
            _ => Err(NoReverse::NotConnected),
        };
        result
    }

    /// Closes sessions whose heartbeats stopped.
    pub fn sweep(&self) {
        let stale = self.registry().sweep(now_ms());
        for s in stale {
            tracing::info!("session {s} missed its heartbeats; closing it");
            if let Some(io) = self.sessions().remove(&s) {
                io.close(Goodbye::new(
                    Reason::NO_ERROR,
                    closer::text::HEARTBEATS_MISSED,
                ));
            }
        }
    }

    /// Closes every connection — registered or not, control or reverse — and every session
    /// that uses a revoked certificate. Returns how many connections it closed.
    pub fn drop_revoked(&self) -> usize {
        let sessions = self
            .registry()
            .sessions_revoked(|serial| self.revoked.contains(serial));
        for s in sessions {
            tracing::info!("session {s} uses a revoked certificate; closing it");
            self.kill_session(s, closer::revoked());
        }
        let mut closed = 0;
        for c in self.conns().values() {
            if !c.kill.is_closed() && self.revoked.contains(&c.serial) {
                c.kill.close(closer::revoked());
                closed += 1;
            }
        }
        closed
    }

    /// The metrics in Prometheus' text format, with what the hub holds read now.
    pub fn metrics_text(&self) -> String {
        let now = now_ms();
        let online = self.registry().online_count(now);
        let age = now.saturating_sub(self.revocations.last_ok()) as f64 / 1000.0;
        self.metrics.render(online, age, self.stalls.resets())
    }

    pub fn connections(&self) -> usize {
        self.conns().len()
    }

    /// The current lists, rebuilt if the registry changed or they are over a second old.
    fn with_lists<T>(&self, f: impl FnOnce(&mut Lists) -> T) -> T {
        let now = now_ms();
        let mut lists = self.lists.lock();
        let version = self.registry().version();
        let current = lists.as_ref().is_some_and(|l| {
            l.snapshot.version == version && now.saturating_sub(l.snapshot.built) < LIST_MAX_AGE_MS
        });
        if !current {
            *lists = None;
        }
        let lists = lists.get_or_insert_with(|| Lists {
            snapshot: self.registry().snapshot(now),
            endpoints_all: None,
            services_all: None,
        });
        f(lists)
    }

    /// `GET /api/endpoints` as `caller` sees it (JSON).
    pub fn endpoints_json(&self, caller: &str) -> Bytes {
        let (all, cached) = self.with_lists(|l| {
            let cached = (caller == acl::ROOT)
                .then(|| l.endpoints_all.clone())
                .flatten();
            (l.snapshot.endpoints.clone(), cached)
        });
        if let Some(body) = cached {
            return body;
        }
        let body = endpoints_body(caller, &all);
        if caller == acl::ROOT {
            self.with_lists(|l| {
                if Arc::ptr_eq(&l.snapshot.endpoints, &all) {
                    l.endpoints_all = Some(body.clone());
                }
            });
        }
        body
    }

    /// `GET /api/services` as `caller` sees it (JSON): only the providers that admit it.
    pub fn services_json(&self, caller: &str) -> Bytes {
        let (services, restricted, cached) = self.with_lists(|l| {
            (
                l.snapshot.services.clone(),
                l.snapshot.restricted,
                l.services_all.clone(),
            )
        });
        let everyone = !restricted || caller == acl::ROOT;
        if everyone {
            if let Some(body) = cached {
                return body;
            }
        }
        let body = if everyone {
            to_json(services.as_ref())
        } else {
            let visible: Vec<_> = services
                .iter()
                .filter_map(|s| admission::service_for(caller, s))
                .collect();
            to_json(&visible)
        };
        if !restricted {
            self.with_lists(|l| {
                if Arc::ptr_eq(&l.snapshot.services, &services) {
                    l.services_all = Some(body.clone());
                }
            });
        }
        body
    }
}

impl Hub {
    /// A part of `GET /api/endpoints` as `caller` sees it: the page and how many match.
    pub fn endpoints_page(&self, caller: &str, query: &ListQuery) -> (Bytes, usize) {
        let all = self.with_lists(|l| l.snapshot.endpoints.clone());
        let (page, total) = query.page(all.iter(), |e| listing::endpoint_fields(e));
        let page: Vec<EndpointInfo> = page.into_iter().cloned().collect();
        (endpoints_body(caller, &page), total)
    }

    /// A part of `GET /api/services` as `caller` sees it: the page and how many match.
    pub fn services_page(&self, caller: &str, query: &ListQuery) -> (Bytes, usize) {
        let services = self.with_lists(|l| l.snapshot.services.clone());
        let visible = services
            .iter()
            .filter_map(|s| admission::service_for(caller, s));
        let (page, total) = query.page(visible, listing::service_fields);
        (to_json(&page), total)
    }

    /// `GET /api/services/{proto}/{name}` as `caller` sees it (`None`: no provider of it admits
    /// the caller). What an agent asks when it opens a tunnel: the cost of one service, not of
    /// the mesh.
    pub fn service_json(&self, caller: &str, proto: Proto, name: &str) -> Option<Bytes> {
        let service = self.registry().service(proto, name, now_ms())?;
        let visible = admission::service_for(caller, &service)?;
        Some(to_json(&visible))
    }
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Bytes {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .unwrap_or_default()
}

fn endpoints_body(caller: &str, all: &[EndpointInfo]) -> Bytes {
    if caller == acl::ROOT {
        return to_json(all);
    }
    let visible: Vec<std::borrow::Cow<'_, EndpointInfo>> = all
        .iter()
        .map(|e| match admission::redacted_for(caller, e) {
            Some(r) => std::borrow::Cow::Owned(r),
            None => std::borrow::Cow::Borrowed(e),
        })
        .collect();
    to_json(&visible)
}
