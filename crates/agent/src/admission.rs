//! What the agent admits of what a hub sends it over the reverse connection. The hub decides
//! first (PROTOCOL.md, "Who may do what"), but a compromised hub must not be able to make an
//! agent do what its owner did not allow, so the agent decides again, with the same rules
//! (`ztm_proto::acl`), from the user the hub names in `ztm-user`. Pure functions: the I/O code
//! in `tunnel.rs` and `session.rs` asks them and acts on the answer.

use http::StatusCode;
use ztm_proto::acl;
use ztm_proto::names::check_name;

/// Why a request a hub forwarded is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request names no user (`ztm-user` missing).
    NoUser,
    /// The `ztm-user` header is not a user name.
    BadUser,
    /// A tunnel for a user the service does not admit.
    NotAdmitted { user: String, service: String },
    /// Management by a user who may not manage this endpoint.
    MayNotManage { user: String, owner: String },
}

impl Refusal {
    /// The status the hub is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::NoUser | Refusal::BadUser => StatusCode::BAD_REQUEST,
            Refusal::NotAdmitted { .. } | Refusal::MayNotManage { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// Whether the refusal means that the hub let through what it should have refused (as
    /// opposed to a malformed request): worth a warning in the log.
    pub fn is_denial(&self) -> bool {
        self.status() == StatusCode::FORBIDDEN
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NoUser => write!(f, "the request names no user (header ztm-user)"),
            Refusal::BadUser => write!(f, "header ztm-user is not a user name"),
            Refusal::NotAdmitted { user, service } => write!(
                f,
                "user {user} may not connect to service {service} of this endpoint"
            ),
            Refusal::MayNotManage { user, owner } => write!(
                f,
                "user {user} may not manage this endpoint (only {owner} and {} may)",
                acl::ROOT
            ),
        }
    }
}

/// The user named by a `ztm-user` header's value.
pub fn user(header: Option<&[u8]>) -> Result<&str, Refusal> {
    let value = header.ok_or(Refusal::NoUser)?;
    let name = std::str::from_utf8(value).map_err(|_| Refusal::BadUser)?;
    check_name(name).map_err(|_| Refusal::BadUser)?;
    Ok(name)
}

/// May `user` open a tunnel to `service` of this endpoint, whose user is `own_user`, when the
/// service admits `service_users` (`None`: every user of the mesh)?
pub fn tunnel(
    user: &str,
    own_user: &str,
    service: &str,
    service_users: Option<&[String]>,
) -> Result<(), Refusal> {
    if acl::can_connect(user, own_user, service_users) {
        Ok(())
    } else {
        Err(Refusal::NotAdmitted {
            user: user.to_string(),
            service: service.to_string(),
        })
    }
}

/// May `user` manage (read or change the services and ports of) this endpoint, whose user is
/// `own_user`?
pub fn manage(user: &str, own_user: &str) -> Result<(), Refusal> {
    if acl::can_manage(user, own_user) {
        Ok(())
    } else {
        Err(Refusal::MayNotManage {
            user: user.to_string(),
            owner: own_user.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_named_by_the_hub() {
        type Case<'a> = (Option<&'a [u8]>, Result<&'a str, Refusal>);
        let table: &[Case] = &[
            (Some(b"alice"), Ok("alice")),
            (Some(b"root"), Ok("root")),
            (Some(b"a.b_c-d@e"), Ok("a.b_c-d@e")),
            (None, Err(Refusal::NoUser)),
            (Some(b""), Err(Refusal::BadUser)),
            (Some(b"bad user"), Err(Refusal::BadUser)),
            (Some(b"hub/x"), Err(Refusal::BadUser)),
            (Some(b".hidden"), Err(Refusal::BadUser)),
            (Some(b"\xff\xfe"), Err(Refusal::BadUser)),
            (Some(b"al\x1bice"), Err(Refusal::BadUser)),
            (Some(&[b'a'; 65]), Err(Refusal::BadUser)),
        ];
        for (header, want) in table {
            assert_eq!(&user(*header), want, "{header:?}");
        }
    }

    #[test]
    fn tunnels() {
        let alice = vec!["alice".to_string()];
        let nobody: Vec<String> = Vec::new();
        // (user, this endpoint's user, the service's users, admitted)
        let table: &[(&str, &str, Option<&[String]>, bool)] = &[
            // root, always
            ("root", "bob", Some(&alice), true),
            ("root", "bob", Some(&nobody), true),
            // the owner, always
            ("bob", "bob", Some(&alice), true),
            ("bob", "bob", Some(&nobody), true),
            // listed users
            ("alice", "bob", Some(&alice), true),
            // anyone else, only when the service lists nobody
            ("mallory", "bob", Some(&alice), false),
            ("mallory", "bob", Some(&nobody), false),
            ("mallory", "bob", None, true),
            // names are compared exactly
            ("Alice", "bob", Some(&alice), false),
            ("Root", "bob", Some(&alice), false),
        ];
        for (who, own, users, admitted) in table {
            let got = tunnel(who, own, "tcp/secret", *users);
            if *admitted {
                assert_eq!(got, Ok(()), "{who} {own} {users:?}");
            } else {
                let e = got.unwrap_err();
                assert_eq!(
                    e,
                    Refusal::NotAdmitted {
                        user: who.to_string(),
                        service: "tcp/secret".into()
                    }
                );
                assert_eq!(e.status(), StatusCode::FORBIDDEN);
                assert!(e.is_denial());
                assert!(e.to_string().contains(who), "{e}");
            }
        }
    }

    #[test]
    fn management() {
        // (user, this endpoint's user, may manage)
        let table = [
            ("root", "bob", true),
            ("root", "root", true),
            ("bob", "bob", true),
            ("alice", "bob", false),
            ("alice", "root", false),
            ("Bob", "bob", false),
            ("ROOT", "bob", false),
        ];
        for (who, own, may) in table {
            let got = manage(who, own);
            if may {
                assert_eq!(got, Ok(()), "{who} {own}");
            } else {
                let e = got.unwrap_err();
                assert_eq!(
                    e,
                    Refusal::MayNotManage {
                        user: who.to_string(),
                        owner: own.to_string()
                    }
                );
                assert_eq!(e.status(), StatusCode::FORBIDDEN);
                assert!(e.to_string().contains(who), "{e}");
            }
        }
    }

    #[test]
    fn malformed_requests_are_400s_not_warnings() {
        for r in [Refusal::NoUser, Refusal::BadUser] {
            assert_eq!(r.status(), StatusCode::BAD_REQUEST);
            assert!(!r.is_denial());
        }
    }
}
