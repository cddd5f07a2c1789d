//! Who may do what at the hub: every decision as a pure function over plain values, each with
//! the status and words of its refusal. The connection handlers ask these and act on the answer.

use std::collections::HashSet;

use http::StatusCode;
use ztm_proto::acl;
use ztm_proto::exit::Destination;
use ztm_proto::names::check_name;
use ztm_proto::wire::{
    id_belongs_to, is_endpoint_id, is_id_nonce, EndpointInfo, Proto, ServiceDecl, ServiceInfo,
    DESTINATION_HEADER, EXIT_SERVICE, ID_NONCE_LEN, NOT_HERE,
};

use crate::limits::{MAX_SERVICES, MAX_SERVICE_USERS, MAX_USER_ENTRIES};

/// A refusal: the status and message the caller gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
    /// What a program matches on (the error body's `reason`), where it must tell this
    /// refusal apart from others.
    pub reason: Option<&'static str>,
}

impl Refusal {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            reason: None,
        }
    }

    /// 404: the endpoint is not online at this hub, or not as the user the caller means
    /// (reason [`NOT_HERE`]: the caller tries its other hubs).
    pub fn not_here(message: impl Into<String>) -> Self {
        Self {
            reason: Some(NOT_HERE),
            ..Self::new(StatusCode::NOT_FOUND, message)
        }
    }
}

pub type Decision = Result<(), Refusal>;

/// The endpoint a tunnel or management request names, as the registry has it now.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub id: &'a str,
    /// The user that registered it here.
    pub owner: &'a str,
}

/// Checks common to tunnels and management: the endpoint is online here, and it is the one
/// the caller means (when it names the endpoint's user with `ztm-endpoint-user`).
fn reach(ep: &str, target: Option<Target<'_>>, endpoint_user: Option<&str>) -> Decision {
    let Some(target) = target else {
        return Err(Refusal::not_here(format!(
            "endpoint {ep} is not online at this hub"
        )));
    };
    match endpoint_user {
        Some(u) if u != target.owner => Err(Refusal::not_here(format!(
            "endpoint {ep} of user {u} is not online at this hub"
        ))),
        _ => Ok(()),
    }
}

/// May `caller` manage endpoint `ep`?
pub fn manage(
    caller: &str,
    ep: &str,
    target: Option<Target<'_>>,
    endpoint_user: Option<&str>,
) -> Decision {
    reach(ep, target, endpoint_user)?;
    let owner = target.map_or("", |t| t.owner);
    if !acl::can_manage(caller, owner) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("user {caller} may not manage endpoints of user {owner}"),
        ));
    }
    Ok(())
}

/// May `caller` open a tunnel to service `proto/svc` of endpoint `ep`? `service` is the
/// endpoint's declaration of it (`None`: it does not publish it).
pub fn tunnel(
    caller: &str,
    ep: &str,
    target: Option<Target<'_>>,
    endpoint_user: Option<&str>,
    service: Option<&ServiceDecl>,
    svc_label: &str,
) -> Decision {
    reach(ep, target, endpoint_user)?;
    let owner = target.map_or("", |t| t.owner);
    let Some(service) = service else {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!("endpoint {ep} has no service {svc_label}"),
        ));
    };
    if !acl::can_connect(caller, owner, service.users.as_deref()) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("user {caller} may not connect to service {svc_label}"),
        ));
    }
    Ok(())
}

/// Is the `ztm-destination` of a tunnel request to service `svc` as it must be? Required
/// (and a valid `HOST:PORT`) for an exit, refused for any other service.
pub fn destination(svc: &str, destination: Option<&str>) -> Decision {
    let bad = |m: String| Err(Refusal::new(StatusCode::BAD_REQUEST, m));
    match (svc == EXIT_SERVICE, destination) {
        (true, None) => bad(format!(
            "a tunnel to an exit needs a {DESTINATION_HEADER} header"
        )),
        (true, Some(d)) => Destination::parse(d).map(|_| ()).or_else(bad),
        (false, Some(_)) => bad(format!(
            "{DESTINATION_HEADER} is only for a tunnel to an exit"
        )),
        (false, None) => Ok(()),
    }
}

/// May `user` register endpoint `id`, derived with `nonce`? An id is derived from its user
/// (`ztm_proto::wire::endpoint_id`), so no other user can ever hold it.
pub fn endpoint_id(id: &str, user: &str, nonce: Option<&str>) -> Decision {
    if !is_endpoint_id(id) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "endpoint id must be a UUID in lower case",
        ));
    }
    let Some(nonce) = nonce else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "the registration has no nonce: endpoint ids are derived from their user's name and \
             a nonce (PROTOCOL.md, Identity); this agent is too old for this hub",
        ));
    };
    if !is_id_nonce(nonce) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("nonce must be {ID_NONCE_LEN} lower-case hex digits"),
        ));
    }
    if !id_belongs_to(id, user, nonce) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("endpoint id {id} is not derived from user {user} and this nonce"),
        ));
    }
    Ok(())
}

/// Checks what an endpoint publishes: names by the CA's rules, at most [`MAX_SERVICES`]
/// services, no service twice, at most [`MAX_SERVICE_USERS`] users per service and
/// [`MAX_USER_ENTRIES`] in all, every user name valid.
pub fn services(list: &[ServiceDecl]) -> Decision {
    let bad = |m: String| Err(Refusal::new(StatusCode::BAD_REQUEST, m));
    if list.len() > MAX_SERVICES {
        return bad(format!(
            "{} services; an endpoint may publish at most {MAX_SERVICES}",
            list.len()
        ));
    }
    let mut seen = HashSet::new();
    let mut entries = 0usize;
    for s in list {
        // An exit is published as the one TCP service no user can name (PROTOCOL.md, "Exit
        // tunnels").
        let is_exit = s.protocol == Proto::Tcp && s.name == EXIT_SERVICE;
        if let (false, Err(e)) = (is_exit, check_name(&s.name)) {
            return bad(format!("service {:?}: {e}", s.name));
        }
        if !seen.insert((s.protocol, s.name.as_str())) {
            return bad(format!("service {}/{} is listed twice", s.protocol, s.name));
        }
        let Some(users) = &s.users else { continue };
        if users.len() > MAX_SERVICE_USERS {
            return bad(format!(
                "service {}/{}: {} users; at most {MAX_SERVICE_USERS}",
                s.protocol,
                s.name,
                users.len()
            ));
        }
        entries += users.len();
        if let Some(u) = users.iter().find(|u| check_name(u).is_err()) {
            return bad(format!(
                "service {}/{}: user {u:?} is not a valid user name",
                s.protocol, s.name
            ));
        }
    }
    if entries > MAX_USER_ENTRIES {
        return bad(format!(
            "{entries} user names in all services; at most {MAX_USER_ENTRIES}"
        ));
    }
    Ok(())
}

/// An endpoint as `caller` sees it in the list, if that differs from the entry: its public
/// address is shown only to root and its own user (it tells where a person's computer is;
/// nobody else needs it, traffic goes through hubs).
pub fn redacted_for(caller: &str, e: &EndpointInfo) -> Option<EndpointInfo> {
    if sees_address(caller, &e.username) {
        return None;
    }
    Some(EndpointInfo {
        ip: String::new(),
        port: 0,
        ..e.clone()
    })
}

/// Does `caller` see the public address of an endpoint of `owner`?
pub fn sees_address(caller: &str, owner: &str) -> bool {
    acl::can_manage(caller, owner)
}

/// A service as `caller` sees it: only the providers that admit it (each by its own list), or
/// `None` if none does.
pub fn service_for(caller: &str, s: &ServiceInfo) -> Option<ServiceInfo> {
    let endpoints: Vec<_> = s
        .endpoints
        .iter()
        .filter(|e| acl::can_connect(caller, &e.username, e.users.as_deref()))
        .cloned()
        .collect();
    if endpoints.is_empty() {
        return None;
    }
    Some(ServiceInfo {
        users: ServiceInfo::common_users(&endpoints),
        endpoints,
        ..s.clone()
    })
}

/// Are revocations fresh enough to admit new sessions? `last_ok` is when the CA last
/// answered (ms since the epoch), `max_age` the staleness the operator allows.
pub fn revocations_fresh(last_ok: u64, now: u64, max_age_ms: u64) -> bool {
    now.saturating_sub(last_ok) <= max_age_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztm_proto::wire::{Proto, ServiceEndpoint};

    fn decl(users: Option<&[&str]>) -> ServiceDecl {
        ServiceDecl {
            protocol: Proto::Tcp,
            name: "db".into(),
            users: users.map(|l| l.iter().map(|u| u.to_string()).collect()),
        }
    }

    #[test]
    fn exits_and_only_exits_take_a_destination() {
        for (svc, dest, ok) in [
            (EXIT_SERVICE, Some("10.0.0.1:22"), true),
            (EXIT_SERVICE, Some("web.corp.example:443"), true),
            (EXIT_SERVICE, Some("[fd00::1]:443"), true),
            (EXIT_SERVICE, None, false),
            (EXIT_SERVICE, Some("web"), false),
            (EXIT_SERVICE, Some("a b:80"), false),
            (EXIT_SERVICE, Some("web:0"), false),
            ("ssh", Some("10.0.0.1:22"), false),
            ("ssh", None, true),
        ] {
            let got = destination(svc, dest);
            assert_eq!(got.is_ok(), ok, "{svc} {dest:?}: {got:?}");
            if let Err(r) = got {
                assert_eq!(r.status, StatusCode::BAD_REQUEST);
            }
        }
        // An exit is published under its reserved name, which no service can be given.
        let exit = |proto| ServiceDecl {
            protocol: proto,
            name: EXIT_SERVICE.to_string(),
            users: None,
        };
        assert!(services(&[exit(Proto::Tcp)]).is_ok());
        assert!(services(&[exit(Proto::Udp)]).is_err());
        assert!(services(&[exit(Proto::Tcp), exit(Proto::Tcp)]).is_err());
    }

    #[test]
    fn tunnels() {
        let bob = Some(Target {
            id: "e1",
            owner: "bob",
        });
        let only_alice = decl(Some(&["alice"]));
        let anyone = decl(None);
        // (caller, target, ztm-endpoint-user, service, refusal status)
        type Case<'a> = (
            &'a str,
            Option<Target<'a>>,
            Option<&'a str>,
            Option<&'a ServiceDecl>,
            Option<u16>,
        );
        let cases: Vec<Case> = vec![
            ("alice", bob, None, Some(&only_alice), None),
            ("alice", bob, Some("bob"), Some(&only_alice), None),
            ("root", bob, None, Some(&only_alice), None),
            ("bob", bob, None, Some(&only_alice), None),
            ("carol", bob, None, Some(&only_alice), Some(403)),
            ("carol", bob, None, Some(&anyone), None),
            ("alice", bob, None, None, Some(404)),
            ("alice", None, None, Some(&anyone), Some(404)),
            // The caller means another user's endpoint with this id: not here.
            ("alice", bob, Some("mallory"), Some(&anyone), Some(404)),
            ("root", bob, Some("mallory"), Some(&anyone), Some(404)),
        ];
        for (caller, target, eu, service, want) in cases {
            let got = tunnel(caller, "e1", target, eu, service, "tcp/db");
            assert_eq!(
                got.as_ref().err().map(|r| r.status.as_u16()),
                want,
                "{caller} {eu:?}: {got:?}"
            );
        }
        let refused = tunnel("carol", "e1", bob, None, Some(&only_alice), "tcp/db").unwrap_err();
        assert_eq!(
            refused.message,
            "user carol may not connect to service tcp/db"
        );
        let elsewhere = tunnel("alice", "e1", bob, Some("mallory"), None, "tcp/db").unwrap_err();
        assert_eq!(
            elsewhere.message,
            "endpoint e1 of user mallory is not online at this hub"
        );
    }

    #[test]
    fn management() {
        let bob = Some(Target {
            id: "e1",
            owner: "bob",
        });
        for (caller, target, eu, want) in [
            ("bob", bob, None, None),
            ("root", bob, None, None),
            ("root", bob, Some("bob"), None),
            ("alice", bob, None, Some(403)),
            ("alice", None, None, Some(404)),
            ("root", bob, Some("alice"), Some(404)),
        ] {
            let got = manage(caller, "e1", target, eu);
            assert_eq!(
                got.as_ref().err().map(|r| r.status.as_u16()),
                want,
                "{caller}: {got:?}"
            );
        }
        assert_eq!(
            manage("alice", "e1", bob, None).unwrap_err().message,
            "user alice may not manage endpoints of user bob"
        );
    }

    #[test]
    fn endpoint_ids_belong_to_their_user() {
        let nonce = "0123456789abcdef0123456789abcdef";
        let alices = ztm_proto::wire::endpoint_id("alice", nonce);
        for (id, user, nonce, want) in [
            (alices.as_str(), "alice", Some(nonce), None),
            (alices.as_str(), "mallory", Some(nonce), Some(403)),
            (alices.as_str(), "root", Some(nonce), Some(403)),
            (
                alices.as_str(),
                "alice",
                Some("0123456789abcdef0123456789abcdee"),
                Some(403),
            ),
            (alices.as_str(), "alice", None, Some(400)),
            (alices.as_str(), "alice", Some("0123"), Some(400)),
            (&alices.to_uppercase(), "alice", Some(nonce), Some(400)),
            (
                "0b1c2d3e-4f50-4617-8829-3a4b5c6d7e8f",
                "alice",
                Some(nonce),
                Some(403),
            ),
            ("x", "alice", Some(nonce), Some(400)),
        ] {
            let got = endpoint_id(id, user, nonce);
            assert_eq!(
                got.as_ref().err().map(|r| r.status.as_u16()),
                want,
                "{id} {user} {nonce:?}: {got:?}"
            );
        }
    }

    #[test]
    fn published_services_are_checked() {
        let named = |name: &str, users: Option<Vec<String>>| ServiceDecl {
            protocol: Proto::Tcp,
            name: name.into(),
            users,
        };
        assert!(services(&[named("ssh", None), named("web", Some(vec!["a".into()]))]).is_ok());
        let too_many: Vec<_> = (0..=MAX_SERVICES)
            .map(|i| named(&format!("s{i}"), None))
            .collect();
        let bad_lists: Vec<(Vec<ServiceDecl>, &str)> = vec![
            (vec![named("a b", None)], "service \"a b\""),
            (vec![named("", None)], "service \"\""),
            (vec![named("ssh", None), named("ssh", None)], "listed twice"),
            (
                vec![named("ssh", Some(vec!["evil\u{1b}[2J".into()]))],
                "not a valid user name",
            ),
            (
                vec![named(
                    "ssh",
                    Some((0..=MAX_SERVICE_USERS).map(|i| format!("u{i}")).collect()),
                )],
                "at most 1000",
            ),
            (too_many, "at most 1000"),
            (
                (0..11)
                    .map(|i| {
                        named(
                            &format!("s{i}"),
                            Some((0..1000).map(|j| format!("u{j}")).collect()),
                        )
                    })
                    .collect(),
                "user names in all services",
            ),
        ];
        for (list, words) in bad_lists {
            let refused = services(&list).unwrap_err();
            assert_eq!(refused.status, StatusCode::BAD_REQUEST);
            assert!(refused.message.contains(words), "{}", refused.message);
        }
        // Two protocols may share a name.
        let udp = ServiceDecl {
            protocol: Proto::Udp,
            ..named("dns", None)
        };
        assert!(services(&[named("dns", None), udp]).is_ok());
    }

    #[test]
    fn listings() {
        let e = EndpointInfo {
            id: "e1".into(),
            name: "home".into(),
            username: "bob".into(),
            ip: "198.51.100.7".into(),
            port: 40000,
            heartbeat: 1,
            online: true,
        };
        assert_eq!(redacted_for("bob", &e), None, "the owner sees it as it is");
        assert_eq!(redacted_for("root", &e), None);
        let other = redacted_for("alice", &e).unwrap();
        assert_eq!((other.ip.as_str(), other.port), ("", 0));
        assert_eq!(other.name, "home");

        let provider = |id: &str, user: &str, users: Option<Vec<String>>| ServiceEndpoint {
            id: id.into(),
            name: id.into(),
            username: user.into(),
            users,
        };
        let s = ServiceInfo {
            protocol: Proto::Tcp,
            name: "db".into(),
            users: None,
            endpoints: vec![
                provider("e1", "bob", Some(vec!["alice".into()])),
                provider("e2", "carol", None),
            ],
        };
        let for_alice = service_for("alice", &s).unwrap();
        assert_eq!(for_alice.endpoints.len(), 2);
        let for_dave = service_for("dave", &s).unwrap();
        assert_eq!(for_dave.endpoints.len(), 1);
        assert_eq!(for_dave.endpoints[0].id, "e2");
        assert_eq!(for_dave.users, None);
        let only_bob = ServiceInfo {
            endpoints: vec![provider("e1", "bob", Some(vec!["alice".into()]))],
            ..s.clone()
        };
        assert_eq!(service_for("dave", &only_bob), None);
        assert_eq!(
            service_for("alice", &only_bob).unwrap().users,
            Some(vec!["alice".to_string()])
        );
        assert!(service_for("root", &only_bob).is_some());
        assert!(service_for("bob", &only_bob).is_some());
    }

    #[test]
    fn revocation_staleness() {
        assert!(revocations_fresh(1_000, 1_000, 60_000));
        assert!(revocations_fresh(1_000, 61_000, 60_000));
        assert!(!revocations_fresh(1_000, 61_001, 60_000));
        // A clock that went back is not staleness.
        assert!(revocations_fresh(5_000, 1_000, 60_000));
    }
}
