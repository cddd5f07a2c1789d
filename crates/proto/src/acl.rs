//! The mesh's access rules (SPEC §3), as pure functions.

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
