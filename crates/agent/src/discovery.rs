//! What the hubs report, merged: the mesh's endpoints and services as this agent shows them,
//! the providers a port may use, and which endpoint a name or id means. Pure functions over the
//! hubs' answers, so every rule has a table test; the I/O that fetches the answers is in
//! [`crate::mesh`].

use std::collections::{BTreeMap, HashMap, HashSet};

use ztm_proto::acl;
use ztm_proto::model::{Endpoint, EndpointRef, Service};
use ztm_proto::wire::{is_endpoint_id, EndpointInfo, Proto, ServiceInfo};

use crate::store::ServiceRecord;

/// Which providers of a service a tunnel may go to.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub proto: Proto,
    pub name: &'a str,
    /// This agent's user.
    pub me: &'a str,
    /// Only this endpoint (an id; a name only for ports stored by an earlier version).
    pub endpoint: Option<&'a str>,
    /// Only endpoints of this user.
    pub user: Option<&'a str>,
    /// Without `endpoint`: the users the port trusts (`acl::trusts`).
    pub trust: Option<&'a [String]>,
}

/// A provider a tunnel may go to: an endpoint (its id and user) and the hubs (by index in the
/// answers) it was reported by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub endpoint: String,
    pub user: String,
    pub hubs: Vec<usize>,
}

/// The providers of `wanted` in the hubs' answers (`(hub index, the hub's services)`), in
/// the order first seen. An endpoint is its id and its user: should two users claim one id on
/// different hubs, they are two providers.
pub fn providers(wanted: &Wanted<'_>, answers: &[(usize, Vec<ServiceInfo>)]) -> Vec<Choice> {
    let mut out: Vec<Choice> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    for (hub, services) in answers {
        let matching = services
            .iter()
            .filter(|s| s.protocol == wanted.proto && s.name == wanted.name);
        for e in matching.flat_map(|s| s.endpoints.iter()) {
            if wanted
                .endpoint
                .is_some_and(|want| want != e.id && (is_endpoint_id(want) || want != e.name))
                || wanted.user.is_some_and(|u| u != e.username)
                || !acl::can_connect(wanted.me, &e.username, e.users.as_deref())
                || (wanted.endpoint.is_none() && !acl::trusts(wanted.me, wanted.trust, &e.username))
            {
                continue;
            }
            let key = (e.id.clone(), e.username.clone());
            match index.get(&key) {
                Some(&i) => {
                    if !out[i].hubs.contains(hub) {
                        out[i].hubs.push(*hub);
                    }
                }
                None => {
                    index.insert(key, out.len());
                    out.push(Choice {
                        endpoint: e.id.clone(),
                        user: e.username.clone(),
                        hubs: vec![*hub],
                    });
                }
            }
        }
    }
    out
}

/// Every endpoint the hubs know, merged, with `local` (this endpoint) always included and
/// first: one entry per id and user, the freshest hub's view of each, online if any hub says so.
pub fn endpoints(answers: Vec<Vec<EndpointInfo>>, local: Endpoint) -> Vec<Endpoint> {
    let mut merged: BTreeMap<(String, String), Endpoint> = BTreeMap::new();
    for e in answers.into_iter().flatten() {
        let is_local = e.id == local.id && e.username == local.username;
        let entry = merged
            .entry((e.id.clone(), e.username.clone()))
            .or_insert_with(|| Endpoint {
                id: e.id.clone(),
                name: e.name.clone(),
                username: e.username.clone(),
                ip: e.ip.clone(),
                port: e.port,
                heartbeat: e.heartbeat,
                online: e.online,
                is_local,
            });
        if e.heartbeat > entry.heartbeat || (e.online && !entry.online) {
            entry.ip = e.ip;
            entry.port = e.port;
            entry.heartbeat = entry.heartbeat.max(e.heartbeat);
            entry.name = e.name;
        }
        entry.online |= e.online;
    }
    merged
        .entry((local.id.clone(), local.username.clone()))
        .and_modify(|e| {
            e.online = local.online;
            e.is_local = true;
        })
        .or_insert(local);
    let mut list: Vec<Endpoint> = merged.into_values().collect();
    list.sort_by(|a, b| b.is_local.cmp(&a.is_local).then(a.name.cmp(&b.name)));
    list
}

/// The services the hubs report merged with this endpoint's own (`local`; `me` is its id,
/// name and user), each provider once, this endpoint's own list of users fresher than the hubs'.
pub fn services(
    answers: Vec<Vec<ServiceInfo>>,
    local: &[ServiceRecord],
    me: (&str, &str, &str),
) -> Vec<Service> {
    let mut merged: BTreeMap<(Proto, String), (Service, HashSet<String>)> = BTreeMap::new();
    for s in answers.into_iter().flatten() {
        let (entry, seen) = merged
            .entry((s.protocol, s.name.clone()))
            .or_insert_with(|| (service(s.protocol, &s.name, true), HashSet::new()));
        for e in s.endpoints {
            if seen.insert(e.id.clone()) {
                entry.endpoints.push(EndpointRef {
                    id: e.id,
                    name: e.name,
                    username: e.username,
                    users: e.users,
                });
            }
        }
    }
    for s in local {
        let (entry, _) = merged
            .entry((s.protocol, s.name.clone()))
            .or_insert_with(|| (service(s.protocol, &s.name, false), HashSet::new()));
        entry.is_local = true;
        entry.host = Some(s.host.clone());
        entry.port = Some(s.port);
        match entry.endpoints.iter_mut().find(|x| x.id == me.0) {
            Some(mine) => mine.users = s.users.clone(),
            None => entry.endpoints.push(EndpointRef {
                id: me.0.to_string(),
                name: me.1.to_string(),
                username: me.2.to_string(),
                users: s.users.clone(),
            }),
        }
    }
    merged
        .into_values()
        .map(|(mut s, _)| {
            s.users = EndpointRef::common_users(&s.endpoints);
            s
        })
        .collect()
}

fn service(protocol: Proto, name: &str, discovered: bool) -> Service {
    Service {
        name: name.to_string(),
        protocol,
        endpoints: Vec::new(),
        is_discovered: discovered,
        is_local: !discovered,
        host: None,
        port: None,
        users: None,
    }
}

/// Why a name or id names no single endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresolved {
    /// No endpoint is called that.
    None,
    /// Several are: each as (id, user). `same_id`: one id that two users claim.
    Several {
        which: Vec<(String, String)>,
        same_id: bool,
    },
}

/// The one endpoint `ep` (an id, in any case, or else a name) of `user` (any user if `None`)
/// names among `all`.
pub fn resolve<'a>(
    all: &'a [Endpoint],
    ep: &str,
    user: Option<&str>,
) -> Result<&'a Endpoint, Unresolved> {
    let of_user = |e: &&Endpoint| user.is_none_or(|u| e.username == u);
    let by_id: Vec<&Endpoint> = all
        .iter()
        .filter(|e| e.id.eq_ignore_ascii_case(ep))
        .filter(of_user)
        .collect();
    let candidates = if by_id.is_empty() {
        all.iter()
            .filter(|e| e.name == ep)
            .filter(of_user)
            .collect()
    } else {
        by_id
    };
    match candidates.as_slice() {
        [one] => Ok(one),
        [] => Err(Unresolved::None),
        several => Err(Unresolved::Several {
            which: several
                .iter()
                .map(|e| (e.id.clone(), e.username.clone()))
                .collect(),
            same_id: several.iter().all(|e| e.id == several[0].id),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztm_proto::wire::ServiceEndpoint;

    fn provider(id: &str, user: &str, users: Option<&[&str]>) -> ServiceEndpoint {
        ServiceEndpoint {
            id: id.into(),
            name: format!("n-{id}"),
            username: user.into(),
            users: users.map(|l| l.iter().map(|u| u.to_string()).collect()),
        }
    }

    fn db(endpoints: Vec<ServiceEndpoint>) -> ServiceInfo {
        ServiceInfo {
            protocol: Proto::Tcp,
            name: "db".into(),
            users: None,
            endpoints,
        }
    }

    fn wanted<'a>(me: &'a str) -> Wanted<'a> {
        Wanted {
            proto: Proto::Tcp,
            name: "db",
            me,
            endpoint: None,
            user: None,
            trust: None,
        }
    }

    fn ids(choices: &[Choice]) -> Vec<(&str, &str, Vec<usize>)> {
        choices
            .iter()
            .map(|c| (c.endpoint.as_str(), c.user.as_str(), c.hubs.clone()))
            .collect()
    }

    #[test]
    fn providers_a_port_may_use() {
        let hub0 = vec![db(vec![
            provider("e1", "alice", None),
            provider("e2", "root", None),
            provider("e3", "mallory", None),
            provider("e4", "alice", Some(&["bob"])),
        ])];
        let hub1 = vec![db(vec![provider("e1", "alice", None)])];
        let answers = vec![(0, hub0), (1, hub1)];
        let any = vec!["*".to_string()];
        let bob = vec!["bob".to_string()];
        type Case<'a> = (Wanted<'a>, Vec<(&'a str, &'a str, Vec<usize>)>);
        let cases: Vec<Case> = vec![
            // Alice's port trusts alice and root; e4 admits bob only... but alice owns it.
            (
                wanted("alice"),
                vec![
                    ("e1", "alice", vec![0, 1]),
                    ("e2", "root", vec![0]),
                    ("e4", "alice", vec![0]),
                ],
            ),
            // Bob trusts bob and root: root's e2 only (e4 admits him, but he does not trust alice).
            (wanted("bob"), vec![("e2", "root", vec![0])]),
            (
                Wanted {
                    trust: Some(&any),
                    ..wanted("bob")
                },
                vec![
                    ("e1", "alice", vec![0, 1]),
                    ("e2", "root", vec![0]),
                    ("e3", "mallory", vec![0]),
                    ("e4", "alice", vec![0]),
                ],
            ),
            (
                Wanted {
                    trust: Some(&bob),
                    ..wanted("carol")
                },
                vec![],
            ),
            // A named endpoint is trusted by naming it; who may connect still decides.
            (
                Wanted {
                    endpoint: Some("e3"),
                    ..wanted("bob")
                },
                vec![("e3", "mallory", vec![0])],
            ),
            (
                Wanted {
                    endpoint: Some("e4"),
                    ..wanted("carol")
                },
                vec![],
            ),
            (
                Wanted {
                    endpoint: Some("n-e3"),
                    ..wanted("bob")
                },
                vec![("e3", "mallory", vec![0])],
            ),
            (
                Wanted {
                    endpoint: Some("e1"),
                    user: Some("bob"),
                    ..wanted("root")
                },
                vec![],
            ),
            (
                Wanted {
                    name: "other",
                    ..wanted("root")
                },
                vec![],
            ),
            (
                Wanted {
                    proto: Proto::Udp,
                    ..wanted("root")
                },
                vec![],
            ),
        ];
        for (w, want) in cases {
            assert_eq!(ids(&providers(&w, &answers)), want, "{w:?}");
        }
    }

    #[test]
    fn two_users_claiming_one_id_are_two_providers() {
        let answers = vec![
            (0, vec![db(vec![provider("e1", "bob", None)])]),
            (1, vec![db(vec![provider("e1", "mallory", None)])]),
        ];
        let any = vec!["*".to_string()];
        let w = Wanted {
            trust: Some(&any),
            ..wanted("root")
        };
        assert_eq!(
            ids(&providers(&w, &answers)),
            vec![("e1", "bob", vec![0]), ("e1", "mallory", vec![1])]
        );
    }

    #[test]
    fn many_providers_merge_in_linear_time() {
        let many: Vec<ServiceEndpoint> = (0..20_000)
            .map(|i| provider(&format!("e{i}"), "root", None))
            .collect();
        let answers = vec![(0, vec![db(many.clone())]), (1, vec![db(many)])];
        let started = std::time::Instant::now();
        let got = providers(&wanted("root"), &answers);
        assert_eq!(got.len(), 20_000);
        assert!(got.iter().all(|c| c.hubs == [0, 1]));
        let merged = services(
            vec![vec![db((0..20_000)
                .map(|i| provider(&format!("e{i}"), "root", None))
                .collect())]],
            &[],
            ("me", "me", "root"),
        );
        assert_eq!(merged[0].endpoints.len(), 20_000);
        // Quadratic merging took seconds here; linear takes milliseconds.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    fn info(id: &str, user: &str, hb: u64, online: bool, ip: &str) -> EndpointInfo {
        EndpointInfo {
            id: id.into(),
            name: format!("n-{id}"),
            username: user.into(),
            ip: ip.into(),
            port: 1,
            heartbeat: hb,
            online,
        }
    }

    fn local() -> Endpoint {
        Endpoint {
            id: "me".into(),
            name: "mine".into(),
            username: "alice".into(),
            ip: String::new(),
            port: 0,
            heartbeat: 0,
            online: true,
            is_local: true,
        }
    }

    #[test]
    fn endpoint_lists_merge() {
        let merged = endpoints(
            vec![
                vec![
                    info("e1", "bob", 10, false, "a"),
                    info("me", "alice", 5, false, "x"),
                ],
                vec![
                    info("e1", "bob", 20, true, "b"),
                    info("e1", "mallory", 1, true, "c"),
                ],
            ],
            local(),
        );
        let view: Vec<_> = merged
            .iter()
            .map(|e| {
                (
                    e.id.as_str(),
                    e.username.as_str(),
                    e.online,
                    e.ip.as_str(),
                    e.is_local,
                )
            })
            .collect();
        assert_eq!(
            view,
            vec![
                ("me", "alice", true, "x", true),
                ("e1", "bob", true, "b", false),
                ("e1", "mallory", true, "c", false),
            ]
        );
        // This endpoint is listed even when no hub knows it yet.
        assert_eq!(endpoints(vec![], local()).len(), 1);
    }

    #[test]
    fn service_lists_merge_with_the_local_ones() {
        let local = [ServiceRecord {
            protocol: Proto::Tcp,
            name: "db".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            users: Some(vec!["bob".into()]),
        }];
        let merged = services(
            vec![
                vec![db(vec![
                    provider("e1", "bob", None),
                    provider("me", "alice", None),
                ])],
                vec![db(vec![provider("e1", "bob", None)])],
            ],
            &local,
            ("me", "mine", "alice"),
        );
        assert_eq!(merged.len(), 1);
        let s = &merged[0];
        assert!(s.is_local && s.is_discovered);
        assert_eq!(s.port, Some(5432));
        assert_eq!(s.endpoints.len(), 2, "each provider once");
        let mine = s.endpoints.iter().find(|e| e.id == "me").unwrap();
        assert_eq!(
            mine.users,
            Some(vec!["bob".to_string()]),
            "the local list is fresher"
        );
        // Only local: listed, not discovered.
        let only = services(vec![], &local, ("me", "mine", "alice"));
        assert!(only[0].is_local && !only[0].is_discovered);
        assert_eq!(only[0].users, Some(vec!["bob".to_string()]));
    }

    #[test]
    fn names_and_ids_resolve_to_one_endpoint() {
        let mut all = endpoints(
            vec![vec![
                info("e1", "bob", 1, true, ""),
                info("e2", "carol", 1, true, ""),
                info("e1", "mallory", 1, true, ""),
            ]],
            local(),
        );
        all.push(Endpoint {
            name: "n-e2".into(),
            id: "e9".into(),
            ..all[0].clone()
        });
        assert_eq!(
            resolve(&all, "me", None).map(|e| e.username.as_str()),
            Ok("alice")
        );
        assert_eq!(resolve(&all, "E2", None).map(|e| e.id.as_str()), Ok("e2"));
        assert_eq!(
            resolve(&all, "e1", Some("bob")).map(|e| e.username.as_str()),
            Ok("bob")
        );
        assert_eq!(resolve(&all, "nobody", None), Err(Unresolved::None));
        assert_eq!(resolve(&all, "e1", Some("dave")), Err(Unresolved::None));
        assert!(matches!(
            resolve(&all, "e1", None),
            Err(Unresolved::Several { same_id: true, .. })
        ));
        assert!(matches!(
            resolve(&all, "n-e2", None),
            Err(Unresolved::Several { same_id: false, .. })
        ));
    }
}
