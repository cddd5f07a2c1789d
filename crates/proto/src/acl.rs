//! The mesh's access rules (docs/requirements.md §3), as pure functions.

/// The user with every right in the mesh.
pub const ROOT: &str = "root";

/// May `user` manage (read and change services and ports of) an endpoint owned by `owner`?
pub fn can_manage(user: &str, owner: &str) -> bool {
    user == ROOT || user == owner
}

/// May `user` open a tunnel to a service owned by `owner` that allows `users`?
pub fn can_connect(user: &str, owner: &str, users: Option<&[String]>) -> bool {
    if user == ROOT || user == owner {
        return true;
    }
    match users {
        Some(list) => list.iter().any(|u| u == user),
        None => true,
    }
}

/// Written in a port's `trust` list: providers of any user.
pub const ANY_USER: &str = "*";

/// May a port of user `owner` that names no endpoint send its connections to a provider of
/// user `provider`? Only to users the port trusts: those in `trust` (`*` for any), or without
/// a list its own user and root. Anyone may publish a service of any name, so a port that
/// trusted every provider would hand its connections to whoever published the name.
pub fn trusts(owner: &str, trust: Option<&[String]>, provider: &str) -> bool {
    match trust {
        Some(list) => list.iter().any(|u| u == ANY_USER || u == provider),
        None => provider == owner || provider == ROOT,
    }
}

/// The `users` list that every one of several providers of a service has, if they all have
/// the same one (`None` also when they differ: each provider's own list decides).
pub fn common_list<'a>(
    mut lists: impl Iterator<Item = &'a Option<Vec<String>>>,
) -> Option<Vec<String>> {
    let first = lists.next()?;
    lists.all(|l| l == first).then(|| first.clone()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_lists() {
        let a = Some(vec!["alice".to_string()]);
        let b = Some(vec!["bob".to_string()]);
        assert_eq!(common_list([].iter()), None);
        assert_eq!(common_list([a.clone(), a.clone()].iter()), a);
        assert_eq!(common_list([a.clone(), b].iter()), None);
        assert_eq!(common_list([a, None].iter()), None);
        assert_eq!(common_list([None, None].iter()), None);
    }

    #[test]
    fn ports_trust_their_own_user_and_root_unless_told() {
        let list = |l: &[&str]| l.iter().map(|u| u.to_string()).collect::<Vec<_>>();
        let (alice_bob, any, none) = (list(&["alice", "bob"]), list(&["*"]), list(&[]));
        for (owner, trust, provider, ok) in [
            ("alice", None, "alice", true),
            ("alice", None, "root", true),
            ("alice", None, "mallory", false),
            ("root", None, "alice", false),
            ("alice", Some(&alice_bob), "bob", true),
            ("alice", Some(&alice_bob), "root", false),
            ("alice", Some(&any), "mallory", true),
            ("alice", Some(&none), "alice", false),
        ] {
            assert_eq!(
                trusts(owner, trust.map(Vec::as_slice), provider),
                ok,
                "{owner} {trust:?} {provider}"
            );
        }
    }

    #[test]
    fn manage() {
        assert!(can_manage("root", "bob"));
        assert!(can_manage("bob", "bob"));
        assert!(!can_manage("alice", "bob"));
        assert!(!can_manage("Root", "bob"));
    }

    #[test]
    fn connect() {
        let list = vec!["alice".to_string()];
        assert!(can_connect("root", "bob", Some(&list)));
        assert!(can_connect("bob", "bob", Some(&list)));
        assert!(can_connect("alice", "bob", Some(&list)));
        assert!(!can_connect("carol", "bob", Some(&list)));
        assert!(can_connect("carol", "bob", None));
        assert!(!can_connect("carol", "bob", Some(&[])));
    }
}
