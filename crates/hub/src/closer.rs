//! Closing a connection and saying why. A [`Closer`] is what the hub keeps of a connection to
//! close it; the connection's task says the reason to the agent in a GOAWAY (code and debug
//! text, `ztm_net::goaway`). PROTOCOL.md ("Closing connections") lists them.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use h2::Reason;
use tokio_util::sync::CancellationToken;
pub use ztm_net::goaway::Goodbye;

/// How long a connection that says goodbye waits for the agent to close its side.
pub const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);

/// The debug texts of the hub's GOAWAY frames.
pub mod text {
    /// The endpoint registered again (on another connection, or on this one: then only the
    /// old session's reverse connection is closed).
    pub const SESSION_REPLACED: &str = "session replaced";
    /// The control connection that registered the session closed (said on its reverse).
    pub const SESSION_ENDED: &str = "session ended";
    /// The session's reverse connection closed (said on its control connection).
    pub const REVERSE_CLOSED: &str = "reverse connection closed";
    pub const HEARTBEATS_MISSED: &str = "heartbeats missed";
    pub const PINGS_UNANSWERED: &str = "pings not answered";
    pub const REVOKED: &str = "certificate revoked";
    pub const NOT_REGISTERED: &str = "no registration within 30 s";
    /// Followed by ": " and what was wrong with it.
    pub const BAD_HELLO: &str = "bad hello";
    pub const NO_EXTENDED_CONNECT: &str = "extended CONNECT not enabled";
    pub const TOO_MANY_CONNECTIONS: &str = "too many connections";
    pub const SHUTTING_DOWN: &str = "hub shutting down";
    /// The session moved to another control connection of the agent (said on the old one).
    pub const SESSION_MOVED: &str = "session moved";
    /// An agent sent bytes on a dormant reverse connection, which only the hub may start.
    pub const SPOKE_WHILE_DORMANT: &str = "the agent spoke before the hub started HTTP/2";
}

pub fn session_replaced() -> Goodbye {
    Goodbye::new(Reason::NO_ERROR, text::SESSION_REPLACED)
}

pub fn session_moved() -> Goodbye {
    Goodbye::new(Reason::NO_ERROR, text::SESSION_MOVED)
}

pub fn session_ended() -> Goodbye {
    Goodbye::new(Reason::NO_ERROR, text::SESSION_ENDED)
}

/// Said on the control connection when the session's reverse connection closed or failed.
pub fn reverse_closed() -> Goodbye {
    Goodbye::new(Reason::NO_ERROR, text::REVERSE_CLOSED)
}

pub fn revoked() -> Goodbye {
    Goodbye::new(Reason::INADEQUATE_SECURITY, text::REVOKED)
}

pub fn bad_hello(what: impl std::fmt::Display) -> Goodbye {
    Goodbye::new(
        Reason::PROTOCOL_ERROR,
        format!("{}: {what}", text::BAD_HELLO),
    )
}

/// What a reverse connection started on demand is answered, instead of a GOAWAY, when the hub
/// does not bind it: the status says what kind of refusal it is, the message is the GOAWAY's
/// text (PROTOCOL.md, "Reverse connection").
pub fn answer(goodbye: &Goodbye) -> ztm_proto::wire::ReverseAnswer {
    let status = if goodbye.code == Reason::PROTOCOL_ERROR {
        400
    } else if goodbye.code == Reason::INADEQUATE_SECURITY {
        403
    } else if goodbye.code == Reason::ENHANCE_YOUR_CALM {
        429
    } else {
        503
    };
    ztm_proto::wire::ReverseAnswer::refused(status, goodbye.text.clone())
}

/// What a connection the hub does not admit is told: its certificate was revoked, or its user
/// holds as many connections as it may.
pub fn refused(refusal: &crate::admission::Refusal) -> Goodbye {
    if refusal.status == http::StatusCode::FORBIDDEN {
        revoked()
    } else {
        Goodbye::new(Reason::ENHANCE_YOUR_CALM, text::TOO_MANY_CONNECTIONS)
    }
}

/// Closes one connection (or the connections of one session), with the reason given first.
#[derive(Clone, Debug)]
pub struct Closer {
    token: CancellationToken,
    why: Arc<OnceLock<Goodbye>>,
}

impl Default for Closer {
    fn default() -> Self {
        Self::new()
    }
}

impl Closer {
    pub fn new() -> Self {
        Self {
            token: CancellationToken::new(),
            why: Arc::default(),
        }
    }

    /// A closer that also closes when `parent` is cancelled (the hub stopping).
    pub fn child_of(parent: &CancellationToken) -> Self {
        Self {
            token: parent.child_token(),
            why: Arc::default(),
        }
    }

    /// Closes with `why`, unless it was closed already (the first reason stays).
    pub fn close(&self, why: Goodbye) {
        let _ = self.why.set(why);
        self.token.cancel();
    }

    pub fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn closed(&self) {
        self.token.cancelled().await
    }

    /// Why it was closed: the reason given, or the hub stopping.
    pub fn why(&self) -> Goodbye {
        self.why
            .get()
            .cloned()
            .unwrap_or_else(|| Goodbye::new(Reason::NO_ERROR, text::SHUTTING_DOWN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_of_a_dormant_connection_are_answered_by_kind() {
        let admission = |status| crate::admission::Refusal {
            status,
            message: String::new(),
            reason: None,
        };
        let cases = [
            (
                bad_hello("no such session"),
                400,
                "bad hello: no such session",
            ),
            (revoked(), 403, "certificate revoked"),
            (
                refused(&admission(http::StatusCode::FORBIDDEN)),
                403,
                "certificate revoked",
            ),
            (
                refused(&admission(http::StatusCode::TOO_MANY_REQUESTS)),
                429,
                "too many connections",
            ),
            (session_ended(), 503, "session ended"),
            (session_replaced(), 503, "session replaced"),
        ];
        for (goodbye, status, message) in cases {
            let a = answer(&goodbye);
            assert_eq!((a.status, a.message.as_deref()), (status, Some(message)));
        }
    }

    #[test]
    fn the_first_reason_stays_and_a_stopping_hub_says_so() {
        let c = Closer::new();
        assert!(!c.is_closed());
        c.close(session_replaced());
        c.close(revoked());
        assert!(c.is_closed());
        assert_eq!(c.why(), session_replaced());

        let root = CancellationToken::new();
        let child = Closer::child_of(&root);
        root.cancel();
        assert!(child.is_closed());
        assert_eq!(child.why().text, text::SHUTTING_DOWN);
        assert_eq!(bad_hello("no answer").text, "bad hello: no answer");
    }
}
