//! The hub's registry of endpoints: who is connected, since when, as which user, and what they
//! publish. Pure state: time is passed in (milliseconds since the epoch), no I/O, so every rule
//! (id binding, liveness, retention) is unit-tested.

use std::collections::{BTreeMap, HashMap};

use ztm_proto::wire::{
    EndpointInfo, ServiceDecl, ServiceEndpoint, ServiceInfo, HEARTBEAT_TIMEOUT, OFFLINE_RETENTION,
};

/// Most endpoints the registry keeps (online and recently offline together).
pub const MAX_ENDPOINTS: usize = 100_000;

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
    pub services: Vec<ServiceDecl>,
    pub heartbeat: u64,
    /// Set while the endpoint has a control connection to this hub.
    pub session: Option<Session>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterError {
    /// The id is online under another user.
    Taken {
        owner: String,
    },
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

#[derive(Default)]
pub struct Registry {
    endpoints: HashMap<String, Entry>,
    next_session: SessionId,
}

fn is_fresh(heartbeat: u64, now: u64) -> bool {
    now.saturating_sub(heartbeat) <= HEARTBEAT_TIMEOUT.as_millis() as u64
}

impl Entry {
    pub fn online(&self, now: u64) -> bool {
        self.session.is_some() && is_fresh(self.heartbeat, now)
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, r: Register<'_>, now: u64) -> Result<Registration, RegisterError> {
        if let Some(existing) = self.endpoints.get(r.id) {
            if existing.user != r.user && existing.online(now) {
                return Err(RegisterError::Taken {
                    owner: existing.user.clone(),
                });
            }
        } else if self.endpoints.len() >= MAX_ENDPOINTS {
            self.forget_oldest_offline(now);
            if self.endpoints.len() >= MAX_ENDPOINTS {
                return Err(RegisterError::Full);
            }
        }
        self.next_session += 1;
        let session = Session {
            id: self.next_session,
            token: r.token,
            serial: r.serial.to_string(),
        };
        let replaced = self
            .endpoints
            .get(r.id)
            .and_then(|e| e.session.as_ref())
            .map(|s| s.id);
        self.endpoints.insert(
            r.id.to_string(),
            Entry {
                id: r.id.to_string(),
                name: r.name.to_string(),
                user: r.user.to_string(),
                ip: r.ip,
                port: r.port,
                services: r.services,
                heartbeat: now,
                session: Some(session),
            },
        );
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

    pub fn publish(&mut self, id: &str, session: SessionId, services: Vec<ServiceDecl>) -> bool {
        match self.current(id, session) {
            Some(e) => {
                e.services = services;
                true
            }
            None => false,
        }
    }

    /// Ends a session (its connection closed); the endpoint stays listed as offline.
    pub fn end_session(&mut self, id: &str, session: SessionId) {
        if let Some(e) = self.current(id, session) {
            e.session = None;
        }
    }

    /// Sessions whose heartbeat went stale (to close), and entries offline for longer than the
    /// retention (forgotten).
    pub fn sweep(&mut self, now: u64) -> Vec<SessionId> {
        let mut stale = Vec::new();
        for e in self.endpoints.values_mut() {
            if let Some(s) = &e.session {
                if !is_fresh(e.heartbeat, now) {
                    stale.push(s.id);
                    e.session = None;
                }
            }
        }
        let keep = OFFLINE_RETENTION.as_millis() as u64;
        self.endpoints
            .retain(|_, e| e.session.is_some() || now.saturating_sub(e.heartbeat) <= keep);
        stale
    }

    fn forget_oldest_offline(&mut self, _now: u64) {
        let oldest = self
            .endpoints
            .values()
            .filter(|e| e.session.is_none())
            .min_by_key(|e| e.heartbeat)
            .map(|e| e.id.clone());
        if let Some(id) = oldest {
            self.endpoints.remove(&id);
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
        (s.token == token && e.user == user).then_some(s.id)
    }

    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.endpoints.get(id)
    }

    /// The endpoint an online session belongs to.
    pub fn online_entry(&self, id: &str, now: u64) -> Option<&Entry> {
        self.endpoints.get(id).filter(|e| e.online(now))
    }

    pub fn endpoints(&self, now: u64) -> Vec<EndpointInfo> {
        let mut list: Vec<EndpointInfo> = self
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
        list.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        list
    }

    /// Services of online endpoints, grouped by protocol and name.
    pub fn services(&self, now: u64) -> Vec<ServiceInfo> {
        let mut by_key: BTreeMap<(String, String), ServiceInfo> = BTreeMap::new();
        for e in self.endpoints.values().filter(|e| e.online(now)) {
            for s in &e.services {
                let info = by_key
                    .entry((s.protocol.to_string(), s.name.clone()))
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
        let mut list: Vec<ServiceInfo> = by_key.into_values().collect();
        for s in &mut list {
            s.users = ServiceInfo::common_users(&s.endpoints);
        }
        list
    }

    pub fn online_count(&self, now: u64) -> usize {
        self.endpoints.values().filter(|e| e.online(now)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztm_proto::wire::Proto;

    fn reg<'a>(id: &'a str, user: &'a str, token: &str) -> Register<'a> {
        Register {
            id,
            user,
            serial: "01",
            name: "ep",
            ip: "127.0.0.1".into(),
            port: 1,
            services: vec![ServiceDecl {
                protocol: Proto::Tcp,
                name: "ssh".into(),
                users: None,
            }],
            token: token.into(),
        }
    }

    #[test]
    fn id_is_bound_to_its_user_while_online() {
        let mut r = Registry::new();
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
    }

    #[test]
    fn liveness_and_sweeping() {
        let mut r = Registry::new();
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
        // Forgotten after the retention period.
        r.sweep(OFFLINE_RETENTION.as_millis() as u64 + 1);
        assert!(r.endpoints(0).is_empty());
    }

    #[test]
    fn hello_and_revocation() {
        let mut r = Registry::new();
        let s = r.register(reg("e1", "alice", "tok"), 0).unwrap().session;
        assert_eq!(r.check_hello("e1", "tok", "alice"), Some(s));
        assert_eq!(r.check_hello("e1", "bad", "alice"), None);
        assert_eq!(r.check_hello("e1", "tok", "bob"), None);
        assert_eq!(r.sessions_revoked(|serial| serial == "01"), vec![s]);
        assert!(r.sessions_revoked(|serial| serial == "02").is_empty());
    }

    #[test]
    fn services_group_providers() {
        let mut r = Registry::new();
        r.register(reg("e1", "alice", "a"), 0).unwrap();
        r.register(reg("e2", "bob", "b"), 0).unwrap();
        let s = r.services(0);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].endpoints.len(), 2);
    }
}
