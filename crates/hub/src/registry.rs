//! The hub's registry of endpoints: who is connected, since when, as which user, and what they
//! publish. Pure state: time is passed in (milliseconds since the epoch), no I/O, so every rule
//! (id binding, liveness, retention, per-user caps) is unit-tested.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use ztm_proto::wire::{
    EndpointInfo, Proto, ServiceDecl, ServiceEndpoint, ServiceInfo, HEARTBEAT_TIMEOUT,
    OFFLINE_RETENTION,
};

use crate::limits::Limits;

pub type SessionId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: SessionId,
    pub token: String,
    /// Serial of the client certificate the session was registered with.
    pub serial: String,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub name: String,
    pub user: String,
    pub ip: String,
    pub port: u16,
    /// What the endpoint publishes; emptied when it goes offline (only online endpoints'
    /// services are listed or reachable).
    pub services: Vec<ServiceDecl>,
    pub heartbeat: u64,
    /// Set while the endpoint has a control connection to this hub.
    pub session: Option<Session>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterError {
    /// The id is online under another user.
    Taken { owner: String },
    /// The user has as many endpoints online here as it may.
    UserFull { limit: usize },
    /// The user's endpoints publish as many services as it may.
    UserServices { limit: usize },
    /// The hub holds as many endpoints as it may.
    Full,
}

/// What a registration did: the new session, and the session it replaced (to be closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub session: SessionId,
    pub replaced: Option<SessionId>,
}

pub struct Register<'a> {
    pub id: &'a str,
    pub user: &'a str,
    pub serial: &'a str,
    pub name: &'a str,
    pub ip: String,
    pub port: u16,
    pub services: Vec<ServiceDecl>,
    pub token: String,
}

/// What one user holds in the registry, kept up to date with every change so that caps are
/// checked without scanning.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Usage {
    /// Entries with a session.
    online: usize,
    /// Entries without one (listed as offline for a while).
    offline: usize,
    /// Services published by the user's online entries.
    services: usize,
}

impl Usage {
    fn is_empty(&self) -> bool {
        self.online == 0 && self.offline == 0 && self.services == 0
    }
}

/// The registry's lists, built once per change and shared by every request that reads them.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The registry's version when it was built.
    pub version: u64,
    /// When it was built (heartbeat times in it are at most this old).
    pub built: u64,
    pub endpoints: Arc<Vec<EndpointInfo>>,
    /// Services of online endpoints, each provider with its own `users`.
    pub services: Arc<Vec<ServiceInfo>>,
    /// Whether any provider has a `users` list (if none has, every user sees every provider).
    pub restricted: bool,
}

pub struct Registry {
    endpoints: HashMap<String, Entry>,
    usage: HashMap<String, Usage>,
    /// The endpoints (ids) that publish each service, kept with every change: what opening
    /// a tunnel asks costs the providers of one service, not a walk over the mesh.
    providers: HashMap<(Proto, String), BTreeSet<String>>,
    next_session: SessionId,
    /// Bumped by every change that a list shows (heartbeat times aside).
    version: u64,
    limits: Limits,
}

fn is_fresh(heartbeat: u64, now: u64) -> bool {
    now.saturating_sub(heartbeat) <= HEARTBEAT_TIMEOUT.as_millis() as u64
}

impl Entry {
    pub fn online(&self, now: u64) -> bool {
        self.session.is_some() && is_fresh(self.heartbeat, now)
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Registry {
    pub fn new(limits: Limits) -> Self {
        Self {
            endpoints: HashMap::new(),
            usage: HashMap::new(),
            providers: HashMap::new(),
            next_session: 0,
            version: 0,
            limits,
        }
    }

    fn usage_mut(&mut self, user: &str) -> &mut Usage {
        self.usage.entry(user.to_string()).or_default()
    }

    /// Removes `entry`'s share from its user's usage.
    fn unaccount(&mut self, entry: &Entry) {
        let services = entry.services.len();
        let online = entry.session.is_some();
        let u = self.usage_mut(&entry.user);
        if online {
            u.online -= 1;
        } else {
            u.offline -= 1;
        }
        u.services -= services;
        if u.is_empty() {
            self.usage.remove(&entry.user);
        }
        for s in &entry.services {
            let key = (s.protocol, s.name.clone());
            if let Some(ids) = self.providers.get_mut(&key) {
                ids.remove(&entry.id);
                if ids.is_empty() {
                    self.providers.remove(&key);
                }
            }
        }
    }

    fn account(&mut self, entry: &Entry) {
        let services = entry.services.len();
        let online = entry.session.is_some();
        let u = self.usage_mut(&entry.user);
        if online {
            u.online += 1;
        } else {
            u.offline += 1;
        }
        u.services += services;
        for s in &entry.services {
            self.providers
                .entry((s.protocol, s.name.clone()))
                .or_default()
                .insert(entry.id.clone());
        }
    }

    /// Takes an entry out (keeping the usage right).
    fn take(&mut self, id: &str) -> Option<Entry> {
        let e = self.endpoints.remove(id)?;
        self.unaccount(&e);
        self.version += 1;
        Some(e)
    }

    fn put(&mut self, e: Entry) {
        self.account(&e);
        self.version += 1;
        self.endpoints.insert(e.id.clone(), e);
    }

    pub fn register(&mut self, r: Register<'_>, now: u64) -> Result<Registration, RegisterError> {
        let existing = self.endpoints.get(r.id);
        if let Some(e) = existing {
            if e.user != r.user && e.online(now) {
                return Err(RegisterError::Taken {
                    owner: e.user.clone(),
                });
            }
        }
        // The user's usage without the entry this registration replaces.
        let mut usage = self.usage.get(r.user).copied().unwrap_or_default();
        if let Some(e) = existing.filter(|e| e.user == r.user) {
            if e.session.is_some() {
                usage.online -= 1;
            }
            usage.services -= e.services.len();
        }
        if usage.online >= self.limits.endpoints_per_user {
            return Err(RegisterError::UserFull {
                limit: self.limits.endpoints_per_user,
            });
        }
        if usage.services + r.services.len() > self.limits.services_per_user {
            return Err(RegisterError::UserServices {
                limit: self.limits.services_per_user,
            });
        }
        if existing.is_none() && self.endpoints.len() >= self.limits.endpoints {
            self.forget_oldest_offline(None);
            if self.endpoints.len() >= self.limits.endpoints {
                return Err(RegisterError::Full);
            }
        }
        let replaced = self.take(r.id).and_then(|e| e.session).map(|s| s.id);
        self.next_session += 1;
        let session = Session {
            id: self.next_session,
            token: r.token,
            serial: r.serial.to_string(),
        };
        self.put(Entry {
            id: r.id.to_string(),
            name: r.name.to_string(),
            user: r.user.to_string(),
            ip: r.ip,
            port: r.port,
            services: r.services,
            heartbeat: now,
            session: Some(session),
        });
        Ok(Registration {
            session: self.next_session,
            replaced,
        })
    }

    fn current(&mut self, id: &str, session: SessionId) -> Option<&mut Entry> {
        self.endpoints
            .get_mut(id)
            .filter(|e| e.session.as_ref().map(|s| s.id) == Some(session))
    }

    /// Records a heartbeat; false if `session` is not the endpoint's current session.
    pub fn heartbeat(&mut self, id: &str, session: SessionId, now: u64) -> bool {
        match self.current(id, session) {
            Some(e) => {
                e.heartbeat = now;
                true
            }
            None => false,
        }
    }

    /// Replaces what an online endpoint publishes. `Ok(false)`: `session` is not the
    /// endpoint's current session.
    pub fn publish(
        &mut self,
        id: &str,
        session: SessionId,
        services: Vec<ServiceDecl>,
    ) -> Result<bool, RegisterError> {
        let Some(e) = self.current(id, session) else {
            return Ok(false);
        };
        let (user, old) = (e.user.clone(), e.services.len());
        let usage = self.usage.get(&user).copied().unwrap_or_default();
        if usage.services - old + services.len() > self.limits.services_per_user {
            return Err(RegisterError::UserServices {
                limit: self.limits.services_per_user,
            });
        }
        let Some(mut e) = self.take(id) else {
            return Ok(false);
        };
        e.services = services;
        self.put(e);
        Ok(true)
    }

    /// Turns an entry offline: no session, no services; and keeps the user's offline entries
    /// within its cap.
    fn go_offline(&mut self, id: &str) {
        let Some(mut e) = self.take(id) else {
            return;
        };
        e.session = None;
        e.services = Vec::new();
        let user = e.user.clone();
        self.put(e);
        let offline = self.usage.get(&user).map_or(0, |u| u.offline);
        if offline > self.limits.endpoints_per_user {
            self.forget_oldest_offline(Some(&user));
        }
    }

    /// Ends a session (its connection closed); the endpoint stays listed as offline.
    pub fn end_session(&mut self, id: &str, session: SessionId) {
        if self.current(id, session).is_some() {
            self.go_offline(id);
        }
    }

    /// Sessions whose heartbeat went stale (to close), and entries offline for longer than the
    /// retention (forgotten).
    pub fn sweep(&mut self, now: u64) -> Vec<SessionId> {
        let mut stale = Vec::new();
        let mut expired = Vec::new();
        let keep = OFFLINE_RETENTION.as_millis() as u64;
        for e in self.endpoints.values() {
            match &e.session {
                Some(s) if !is_fresh(e.heartbeat, now) => stale.push((e.id.clone(), s.id)),
                None if now.saturating_sub(e.heartbeat) > keep => expired.push(e.id.clone()),
                _ => {}
            }
        }
        for (id, _) in &stale {
            self.go_offline(id);
        }
        for id in expired {
            self.take(&id);
        }
        stale.into_iter().map(|(_, s)| s).collect()
    }

    /// Forgets the offline entry (of `user`, or of anyone) seen longest ago.
    fn forget_oldest_offline(&mut self, user: Option<&str>) {
        let oldest = self
            .endpoints
            .values()
            .filter(|e| e.session.is_none() && user.is_none_or(|u| e.user == u))
            .min_by_key(|e| e.heartbeat)
            .map(|e| e.id.clone());
        if let Some(id) = oldest {
            self.take(&id);
        }
    }

    /// Sessions registered with a certificate serial that `revoked` says is revoked.
    pub fn sessions_revoked(&self, revoked: impl Fn(&str) -> bool) -> Vec<SessionId> {
        self.endpoints
            .values()
            .filter_map(|e| e.session.as_ref())
            .filter(|s| revoked(&s.serial))
            .map(|s| s.id)
            .collect()
    }

    /// The session a reverse connection belongs to, if `token` and `user` match.
    pub fn check_hello(&self, id: &str, token: &str, user: &str) -> Option<SessionId> {
        let e = self.endpoints.get(id)?;
        let s = e.session.as_ref()?;
        (constant_time_eq(s.token.as_bytes(), token.as_bytes()) && e.user == user).then_some(s.id)
    }

    /// The endpoint whose current session is `session`.
    pub fn id_of_session(&self, session: SessionId) -> Option<String> {
        self.endpoints
            .values()
            .find(|e| e.session.as_ref().is_some_and(|s| s.id == session))
            .map(|e| e.id.clone())
    }

    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.endpoints.get(id)
    }

    /// The endpoint an online session belongs to.
    pub fn online_entry(&self, id: &str, now: u64) -> Option<&Entry> {
        self.endpoints.get(id).filter(|e| e.online(now))
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Builds the lists (sorted) at `now`.
    pub fn snapshot(&self, now: u64) -> Snapshot {
        let mut endpoints: Vec<EndpointInfo> = self
            .endpoints
            .values()
            .map(|e| EndpointInfo {
                id: e.id.clone(),
                name: e.name.clone(),
                username: e.user.clone(),
                ip: e.ip.clone(),
                port: e.port,
                heartbeat: e.heartbeat,
                online: e.online(now),
            })
            .collect();
        endpoints.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        // Sorted by protocol (as text) and name (PROTOCOL.md, "Lists").
        let mut by_key: BTreeMap<(&'static str, String), ServiceInfo> = BTreeMap::new();
        let mut restricted = false;
        for e in self.endpoints.values().filter(|e| e.online(now)) {
            for s in &e.services {
                restricted |= s.users.is_some();
                let info = by_key
                    .entry((s.protocol.as_str(), s.name.clone()))
                    .or_insert_with(|| ServiceInfo {
                        protocol: s.protocol,
                        name: s.name.clone(),
                        users: None,
                        endpoints: Vec::new(),
                    });
                info.endpoints.push(ServiceEndpoint {
                    id: e.id.clone(),
                    name: e.name.clone(),
                    username: e.user.clone(),
                    users: s.users.clone(),
                });
            }
        }
        let mut services: Vec<ServiceInfo> = by_key.into_values().collect();
        for s in &mut services {
            s.endpoints.sort_by(|a, b| a.id.cmp(&b.id));
            s.users = ServiceInfo::common_users(&s.endpoints);
        }
        Snapshot {
            version: self.version,
            built: now,
            endpoints: Arc::new(endpoints),
            services: Arc::new(services),
            restricted,
        }
    }

    /// Service `proto/name` as a snapshot would list it at `now` (every online provider, by
    /// id), from the index of providers; `None` if no online endpoint publishes it.
    pub fn service(&self, proto: Proto, name: &str, now: u64) -> Option<ServiceInfo> {
        let ids = self.providers.get(&(proto, name.to_string()))?;
        let endpoints: Vec<ServiceEndpoint> = ids
            .iter()
            .filter_map(|id| self.endpoints.get(id))
            .filter(|e| e.online(now))
            .flat_map(|e| {
                e.services
                    .iter()
                    .filter(|s| s.protocol == proto && s.name == name)
                    .map(|s| ServiceEndpoint {
                        id: e.id.clone(),
                        name: e.name.clone(),
                        username: e.user.clone(),
                        users: s.users.clone(),
                    })
            })
            .collect();
        if endpoints.is_empty() {
            return None;
        }
        Some(ServiceInfo {
            protocol: proto,
            name: name.to_string(),
            users: ServiceInfo::common_users(&endpoints),
            endpoints,
        })
    }

    /// Every endpoint, sorted by name (a snapshot's list).
    pub fn endpoints(&self, now: u64) -> Vec<EndpointInfo> {
        self.snapshot(now).endpoints.as_ref().clone()
    }

    /// Services of online endpoints, grouped by protocol and name.
    pub fn services(&self, now: u64) -> Vec<ServiceInfo> {
        self.snapshot(now).services.as_ref().clone()
    }

    pub fn online_count(&self, now: u64) -> usize {
        self.endpoints.values().filter(|e| e.online(now)).count()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Online endpoints, offline entries and published services of `user`.
    pub fn usage_of(&self, user: &str) -> (usize, usize, usize) {
        let u = self.usage.get(user).copied().unwrap_or_default();
        (u.online, u.offline, u.services)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztm_proto::wire::Proto;

    fn svc(name: &str) -> ServiceDecl {
        ServiceDecl {
            protocol: Proto::Tcp,
            name: name.into(),
            users: None,
        }
    }

    fn reg<'a>(id: &'a str, user: &'a str, token: &str) -> Register<'a> {
        Register {
            id,
            user,
            serial: "01",
            name: "ep",
            ip: "127.0.0.1".into(),
            port: 1,
            services: vec![svc("ssh")],
            token: token.into(),
        }
    }

    /// The usage counters agree with a full count of the entries.
    fn check_usage(r: &Registry) {
        let mut counted: HashMap<String, Usage> = HashMap::new();
        for e in r.endpoints.values() {
            let u = counted.entry(e.user.clone()).or_default();
            if e.session.is_some() {
                u.online += 1;
            } else {
                u.offline += 1;
            }
            u.services += e.services.len();
        }
        assert_eq!(counted, r.usage);
    }

    #[test]
    fn id_is_bound_to_its_user_while_online() {
        let mut r = Registry::default();
        let a = r.register(reg("e1", "alice", "t1"), 1000).unwrap();
        assert_eq!(a.replaced, None);
        assert_eq!(
            r.register(reg("e1", "mallory", "t2"), 2000),
            Err(RegisterError::Taken {
                owner: "alice".into()
            })
        );
        // The same user replaces its old session.
        let b = r.register(reg("e1", "alice", "t3"), 3000).unwrap();
        assert_eq!(b.replaced, Some(a.session));
        assert!(!r.heartbeat("e1", a.session, 4000), "old session is gone");
        assert!(r.heartbeat("e1", b.session, 4000));
        // Once offline, another user may take the id.
        r.end_session("e1", b.session);
        assert!(r.register(reg("e1", "mallory", "t4"), 5000).is_ok());
        check_usage(&r);
    }

    #[test]
    fn liveness_and_sweeping() {
        let mut r = Registry::default();
        let s = r.register(reg("e1", "alice", "t"), 0).unwrap().session;
        assert_eq!(r.online_count(10_000), 1);
        assert_eq!(r.services(10_000).len(), 1);
        assert!(r.sweep(30_000).is_empty());
        assert_eq!(r.sweep(30_001), vec![s]);
        assert_eq!(r.online_count(30_001), 0);
        assert!(r.services(30_001).is_empty());
        let listed = r.endpoints(30_001);
        assert_eq!(listed.len(), 1);
        assert!(!listed[0].online);
        // An offline entry keeps no services.
        assert!(r.get("e1").unwrap().services.is_empty());
        check_usage(&r);
        // Forgotten after the retention period.
        r.sweep(OFFLINE_RETENTION.as_millis() as u64 + 1);
        assert!(r.endpoints(0).is_empty());
        assert!(r.usage.is_empty());
    }

    #[test]
    fn hello_and_revocation() {
        let mut r = Registry::default();
        let s = r.register(reg("e1", "alice", "tok"), 0).unwrap().session;
        assert_eq!(r.check_hello("e1", "tok", "alice"), Some(s));
        assert_eq!(r.check_hello("e1", "bad", "alice"), None);
        assert_eq!(r.check_hello("e1", "to", "alice"), None);
        assert_eq!(r.check_hello("e1", "tok", "bob"), None);
        assert_eq!(r.sessions_revoked(|serial| serial == "01"), vec![s]);
        assert!(r.sessions_revoked(|serial| serial == "02").is_empty());
    }

    #[test]
    fn services_group_providers() {
        let mut r = Registry::default();
        r.register(reg("e1", "alice", "a"), 0).unwrap();
        r.register(reg("e2", "bob", "b"), 0).unwrap();
        let s = r.services(0);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].endpoints.len(), 2);
        assert!(!r.snapshot(0).restricted);
    }

    /// The index of providers answers for one service exactly what the whole list says of
    /// it, through registrations, publishing, sessions ending and sweeping.
    #[test]
    fn one_service_from_the_index_is_the_listed_one() {
        let restricted = |name: &str, users: &[&str]| ServiceDecl {
            users: Some(users.iter().map(|u| u.to_string()).collect()),
            ..svc(name)
        };
        let check = |r: &Registry, now: u64| {
            let listed = r.services(now);
            for s in &listed {
                assert_eq!(
                    r.service(s.protocol, &s.name, now).as_ref(),
                    Some(s),
                    "{}",
                    s.name
                );
            }
            for name in ["ssh", "web", "db", "none"] {
                for proto in [Proto::Tcp, Proto::Udp] {
                    let in_list = listed
                        .iter()
                        .find(|s| s.protocol == proto && s.name == name);
                    assert_eq!(
                        r.service(proto, name, now).as_ref(),
                        in_list,
                        "{proto:?}/{name}"
                    );
                }
            }
            let indexed: usize = r.providers.values().map(BTreeSet::len).sum();
            let published: usize = r.endpoints.values().map(|e| e.services.len()).sum();
            assert_eq!(indexed, published, "one index entry per published service");
        };
        let mut r = Registry::default();
        let a = r.register(reg("e1", "alice", "a"), 0).unwrap();
        let b = r
            .register(
                Register {
                    services: vec![svc("ssh"), restricted("web", &["carol"])],
                    ..reg("e2", "bob", "b")
                },
                0,
            )
            .unwrap();
        r.register(
            Register {
                services: vec![restricted("web", &["carol"]), svc("db")],
                ..reg("e3", "carol", "c")
            },
            100,
        )
        .unwrap();
        check(&r, 1_000);
        assert_eq!(
            r.service(Proto::Tcp, "web", 1_000).unwrap().users,
            Some(vec!["carol".into()])
        );
        r.publish("e2", b.session, vec![svc("web")]).unwrap();
        check(&r, 1_000);
        assert_eq!(r.service(Proto::Tcp, "web", 1_000).unwrap().users, None);
        r.end_session("e1", a.session);
        check(&r, 1_000);
        assert_eq!(r.service(Proto::Tcp, "ssh", 1_000), None);
        // Stale heartbeats: not online, so not a provider, before and after the sweep.
        r.heartbeat("e3", 3, 20_000);
        check(&r, 30_050);
        r.sweep(30_050);
        check(&r, 30_050);
        assert_eq!(
            r.service(Proto::Tcp, "db", 30_050).unwrap().endpoints.len(),
            1
        );
    }

    fn limits() -> Limits {
        Limits {
            endpoints_per_user: 2,
            services_per_user: 3,
            endpoints: 5,
            ..Limits::default()
        }
    }

    #[test]
    fn a_user_holds_at_most_its_share() {
        let mut r = Registry::new(limits());
        r.register(reg("e1", "alice", "a"), 0).unwrap();
        r.register(reg("e2", "alice", "b"), 0).unwrap();
        assert_eq!(
            r.register(reg("e3", "alice", "c"), 0),
            Err(RegisterError::UserFull { limit: 2 })
        );
        // Re-registering one it holds is not a new one.
        let again = r.register(reg("e2", "alice", "d"), 0).unwrap();
        // Other users are not affected.
        r.register(reg("e4", "bob", "e"), 0).unwrap();
        // Services count across the user's endpoints: 2 published, at most 3.
        let many = Register {
            services: vec![svc("a"), svc("b"), svc("c")],
            ..reg("e2", "alice", "f")
        };
        assert_eq!(
            r.register(many, 0),
            Err(RegisterError::UserServices { limit: 3 })
        );
        assert_eq!(
            r.publish("e2", again.session, vec![svc("a"), svc("b"), svc("c")]),
            Err(RegisterError::UserServices { limit: 3 })
        );
        assert_eq!(
            r.publish("e2", again.session, vec![svc("a"), svc("b")]),
            Ok(true)
        );
        assert_eq!(r.usage_of("alice"), (2, 0, 3));
        check_usage(&r);
        // Offline entries of a user are capped too: the oldest is forgotten.
        r.end_session("e2", again.session);
        let e1 = r.register(reg("e1", "alice", "g"), 10).unwrap();
        r.end_session("e1", e1.session);
        let e5 = r.register(reg("e5", "alice", "h"), 20).unwrap();
        r.end_session("e5", e5.session);
        assert_eq!(r.usage_of("alice"), (0, 2, 0));
        assert!(
            r.get("e2").is_none(),
            "the oldest offline entry is forgotten"
        );
        check_usage(&r);
    }

    #[test]
    fn a_full_hub_forgets_offline_entries_first() {
        let mut r = Registry::new(Limits {
            endpoints: 2,
            ..Limits::default()
        });
        let a = r.register(reg("e1", "alice", "a"), 0).unwrap();
        r.register(reg("e2", "bob", "b"), 0).unwrap();
        assert_eq!(
            r.register(reg("e3", "carol", "c"), 0),
            Err(RegisterError::Full)
        );
        r.end_session("e1", a.session);
        r.register(reg("e3", "carol", "c"), 0).unwrap();
        assert!(r.get("e1").is_none());
        check_usage(&r);
    }

    #[test]
    fn the_version_changes_with_what_lists_show() {
        let mut r = Registry::default();
        let v0 = r.version();
        let s = r.register(reg("e1", "alice", "a"), 0).unwrap().session;
        let v1 = r.version();
        assert!(v1 > v0);
        r.heartbeat("e1", s, 5);
        assert_eq!(r.version(), v1, "heartbeats do not rebuild lists");
        r.publish("e1", s, vec![svc("x")]).unwrap();
        assert!(r.version() > v1);
        let restricted = ServiceDecl {
            users: Some(vec!["bob".into()]),
            ..svc("y")
        };
        r.publish("e1", s, vec![restricted]).unwrap();
        assert!(r.snapshot(10).restricted);
    }
}
