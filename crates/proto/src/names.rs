//! Rules for the names users type: user names, mesh names, endpoint and service names.

use std::fmt;

/// Longest user, mesh, endpoint or service name.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong(usize),
    BadChar(char),
    BadStart,
    Reserved,
    BadEncoding,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => write!(f, "name is empty"),
            NameError::TooLong(n) => {
                write!(
                    f,
                    "name is {n} characters long; the limit is {MAX_NAME_LEN}"
                )
            }
            NameError::BadChar(c) => write!(
                f,
                "name contains {c:?}; allowed are letters, digits and . _ - @"
            ),
            NameError::BadStart => write!(f, "name must start with a letter or a digit"),
            NameError::Reserved => write!(f, "name is reserved"),
            NameError::BadEncoding => write!(f, "name is not valid percent-encoded UTF-8"),
        }
    }
}

impl std::error::Error for NameError {}

/// Percent-decodes one path segment; invalid escapes or non-UTF-8 results are errors.
pub fn decode_segment(raw: &str) -> Result<String, NameError> {
    // `percent_decode_str` keeps a `%` without two hex digits after it as it is; here that is
    // an error, like a decoded text that is not UTF-8.
    let escapes_ok = raw.split('%').skip(1).all(|after| {
        after
            .as_bytes()
            .get(..2)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return Err(NameError::BadEncoding);
    }
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| NameError::BadEncoding)
}

/// A plain name: 1–64 characters of letters, digits, `.`, `_`, `-`, `@`, starting with a
/// letter or digit (so `.`, `..` and hidden-file look-alikes are impossible).
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    let n = name.chars().count();
    if n > MAX_NAME_LEN {
        return Err(NameError::TooLong(n));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')))
    {
        return Err(NameError::BadChar(c));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(NameError::BadStart);
    }
    Ok(())
}

/// Names the CA never gives to users: `ca`, `hub` and anything under `hub/`.
pub fn is_reserved_user(name: &str) -> bool {
    name == "ca" || name == "hub" || name.starts_with("hub/")
}

/// A user name as the CA accepts it for a new certificate.
pub fn check_user_name(name: &str) -> Result<(), NameError> {
    if is_reserved_user(name) {
        return Err(NameError::Reserved);
    }
    check_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "root",
            "alice",
            "bob.smith@example",
            "a",
            "x-1_2",
            &"a".repeat(64),
        ] {
            assert_eq!(check_user_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert_eq!(check_name(".."), Err(NameError::BadStart));
        assert_eq!(check_name(".hidden"), Err(NameError::BadStart));
        assert_eq!(check_name(&"a".repeat(300)), Err(NameError::TooLong(300)));
        assert_eq!(check_name("a\u{7}b"), Err(NameError::BadChar('\u{7}')));
        assert_eq!(check_name("a/b"), Err(NameError::BadChar('/')));
        assert_eq!(check_name("a b"), Err(NameError::BadChar(' ')));
        for r in ["ca", "hub", "hub/x", "hub/"] {
            assert_eq!(check_user_name(r), Err(NameError::Reserved), "{r}");
        }
    }

    #[test]
    fn decoding() {
        assert_eq!(decode_segment("ab%20c").unwrap(), "ab c");
        assert_eq!(decode_segment("%2e%2E").unwrap(), "..");
        assert_eq!(decode_segment("a%zz"), Err(NameError::BadEncoding));
        assert_eq!(decode_segment("a%2"), Err(NameError::BadEncoding));
        assert_eq!(decode_segment("%ff%fe"), Err(NameError::BadEncoding));
        assert_eq!(decode_segment("%e2%82%ac").unwrap(), "€");
    }
}
