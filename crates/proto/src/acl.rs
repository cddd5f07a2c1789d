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

#[cfg(test)]
mod tests {
    use super::*;

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
