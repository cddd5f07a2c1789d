//! Messages, paths and timers of the agent ↔ hub protocol (PROTOCOL.md).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An agent heartbeats this often: the longest SPEC.md allows, half the hub's timeout. The
/// heartbeats of 10,000 endpoints are most of an idle hub's work (README, "Scale").
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
/// ...and times an HTTP/2 PING after every this many heartbeats (once a minute), the link's
/// round-trip time.
pub const RTT_EVERY_HEARTBEATS: u32 = 4;

/// Whether an agent times a PING after its `beats`-th heartbeat on a link (counted from 1).
pub fn rtt_due(beats: u32) -> bool {
    beats > 0 && beats.is_multiple_of(RTT_EVERY_HEARTBEATS)
}
/// An endpoint whose last heartbeat is older than this is offline.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
/// The hub pings each reverse connection this often (PROTOCOL.md, "Reverse connection"): an
/// agent that stops is offline by its heartbeats sooner; the ping finds a reverse connection
/// that died alone.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// A reverse connection started on demand that no request has asked for in this long, with no
/// tunnel open on it, goes back to dormant: the hub closes it saying [`REVERSE_IDLE_TEXT`] and
/// the agent dials a new one for the same session (PROTOCOL.md, "Reverse connection").
pub const REVERSE_IDLE: Duration = Duration::from_secs(300);
/// The debug text of the GOAWAY that sends a reverse connection back to dormant.
pub const REVERSE_IDLE_TEXT: &str = "reverse connection idle";
/// An agent's started control connection goes back to lines after this long without a request
/// and with no tunnel open (PROTOCOL.md, "Control connection on demand").
pub const CONTROL_IDLE: Duration = Duration::from_secs(300);
pub const REVOCATION_POLL: Duration = Duration::from_secs(5);
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the hub lists an endpoint as offline after its session ended.
pub const OFFLINE_RETENTION: Duration = Duration::from_secs(3600);
/// An agent's request through a hub (a tunnel to open, a management call) must be answered
/// within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The hops behind such a request give up sooner, each inside the one before, so that the
/// agent hears why instead of timing out itself: the hub waits this long for the far agent...
pub const HOP_TIMEOUT: Duration = Duration::from_secs(8);
/// ...which waits this long for its local service to accept a tunnel's connection.
pub const SERVICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(6);
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Largest management request or answer body carried through a hub.
pub const MAX_MANAGE_BODY: usize = 1 << 20;

/// HTTP/2 flow-control windows (PROTOCOL.md, "HTTP/2 settings"). A tunnel holds at most one
/// stream window per hop. The connection window is four times [`STALL_LIMIT`]: tunnels whose
/// readers stopped are reset long before their unreleased bytes could fill it and hold up
/// every other tunnel on the connection.
pub const STREAM_WINDOW: u32 = 2 << 20;
pub const CONNECTION_WINDOW: u32 = 128 << 20;
/// Most concurrent streams per connection: one tunnel (a TCP connection, a UDP flow) is one
/// stream, and one agent may hold 10,000 tunnels through one hub.
pub const MAX_STREAMS: u32 = 16_384;
/// Streams of a connection that tunnels never take, so that heartbeats, publishing, lists and
/// management always find one however many tunnels are open (PROTOCOL.md, "HTTP/2 settings").
pub const REQUEST_STREAMS: u32 = 64;
/// Most tunnels one connection carries at once.
pub const TUNNEL_STREAMS: u32 = MAX_STREAMS - REQUEST_STREAMS;

/// Most bytes a process's relays may hold for next hops that take nothing before stalled
/// tunnels are reset (PROTOCOL.md, "Stalled tunnels").
pub const STALL_LIMIT: usize = 32 << 20;
/// A tunnel counts as stalled once its next hop took nothing for this long.
pub const STALL_AFTER: Duration = Duration::from_secs(2);
/// Tunnels holding less than this are never reset for stalling.
pub const STALL_MIN: usize = 64 << 10;

/// Header naming the user on whose behalf the hub forwards a management request.
pub const USER_HEADER: &str = "ztm-user";
/// Header of tunnel and management requests naming the user the caller knows the target
/// endpoint by. A hub where that endpoint id is registered by another user answers as if the
/// endpoint were not there (endpoint ids are chosen by agents; each hub binds an id to a user
/// only while it is online there).
pub const ENDPOINT_USER_HEADER: &str = "ztm-endpoint-user";
/// The `reason` of a hub's 404 error for an endpoint that is not online at that hub (or is
/// there under another user than `ztm-endpoint-user`): the agent then tries its other hubs.
pub const NOT_HERE: &str = "endpoint-not-here";
/// Header of a list answered in part (`?q=…&offset=…&limit=…`): how many items match in all.
pub const TOTAL_HEADER: &str = "ztm-total";
/// The name an exit is published under, as a TCP service (PROTOCOL.md, "Exit tunnels"). No
/// service can be given it: service names start with a letter or a digit.
pub const EXIT_SERVICE: &str = "~exit";
/// Header of a tunnel request to an exit: where the exit should connect (`HOST:PORT`, an IPv6
/// address in brackets, a name resolved at the exit).
pub const DESTINATION_HEADER: &str = "ztm-destination";
/// `reason`s of an exit's 502: the destination refused the connection, or could not be
/// reached (no such name, no route).
pub const CONNECTION_REFUSED: &str = "connection-refused";
pub const HOST_UNREACHABLE: &str = "host-unreachable";
/// `:protocol` of tunnel CONNECT requests.
pub const TUNNEL_PROTOCOL: &str = "ztm-tunnel";
/// Header of a registration naming the versions of the wire protocol the agent speaks
/// (comma-separated), and of the hub's answer naming the one spoken on the connection
/// (PROTOCOL.md, "Versions").
pub const PROTOCOL_HEADER: &str = "ztm-protocol";
/// The version of the wire protocol this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The version to speak with an agent whose registration offered `offered` (none: an agent
/// from before versions, which speaks 1): the highest both speak, if any.
pub fn choose_version(offered: Option<&str>) -> Option<u32> {
    let Some(offered) = offered else {
        return Some(1);
    };
    offered
        .split(',')
        .filter_map(|v| v.trim().parse::<u32>().ok())
        .filter(|v| (1..=PROTOCOL_VERSION).contains(v))
        .max()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service as an endpoint publishes it to hubs (no host or port: those stay local).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDecl {
    pub protocol: Proto,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub name: String,
    #[serde(default)]
    pub services: Vec<ServiceDecl>,
    /// The nonce the endpoint id is derived from with the user's name ([`endpoint_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub session: String,
    pub hub: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub endpoint: String,
    pub session: String,
}

/// The hub's answer to the hello line of a reverse connection started on demand
/// (PROTOCOL.md, "Reverse connection"): 200, or a refusal with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseAnswer {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ReverseAnswer {
    pub fn bound() -> Self {
        ReverseAnswer {
            status: 200,
            message: None,
        }
    }

    pub fn refused(status: u16, message: impl Into<String>) -> Self {
        ReverseAnswer {
            status,
            message: Some(message.into()),
        }
    }
}

/// The longest line on a control connection before its HTTP/2 starts, its `\n` included: a
/// registration or service list of up to 256 KiB, and room for the rest of the line.
pub const CONTROL_LINE_MAX: usize = 260 * 1024;
/// Lines up to this long are read without taking one of the hub's places for requests with a
/// body (heartbeats and CRL requests are far shorter).
pub const CONTROL_LINE_SMALL: usize = 4096;

/// A request on a control connection before its HTTP/2 starts (PROTOCOL.md, "Control
/// connection on demand"): one JSON line, answered with one [`LineAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ControlLine {
    /// `POST /api/endpoints/{id}` with `ztm-protocol: {protocol}`.
    Register {
        id: String,
        protocol: String,
        name: String,
        #[serde(default)]
        services: Vec<ServiceDecl>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
    },
    /// `POST /api/endpoints/{id}/heartbeat`.
    Heartbeat { id: String },
    /// `POST /api/endpoints/{id}/services`.
    Publish {
        id: String,
        services: Vec<ServiceDecl>,
    },
    /// Moves the agent's session `session` of endpoint `id` to this connection from the one
    /// that registered it, which the hub then closes ("session moved").
    Resume { id: String, session: String },
    /// `GET /api/crl?after={after}`, answered at once (no waiting for a newer one).
    Crl {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
    },
}

/// The hub's answer to a [`ControlLine`], or the line it closes the connection with
/// (`closing`). Only the fields the request has are present.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineAnswer {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Registration: the session's token, the hub's name and the version spoken (or, with
    /// 400, the version the hub speaks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Heartbeats: the number of the newest CRL the hub holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl_number: Option<u64>,
    /// CRL requests: the CRL, in PEM, exactly as the CA signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<String>,
    /// The hub closes the connection after this line.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closing: bool,
}

impl LineAnswer {
    pub fn status(status: u16) -> Self {
        LineAnswer {
            status,
            ..LineAnswer::default()
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        LineAnswer {
            status,
            message: Some(message.into()),
            ..LineAnswer::default()
        }
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The message, or the status alone.
    pub fn words(&self) -> String {
        match &self.message {
            Some(m) => format!("{} {m}", self.status),
            None => self.status.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub id: String,
    pub name: String,
    pub username: String,
    pub ip: String,
    pub port: u16,
    /// Milliseconds since the Unix epoch.
    pub heartbeat: u64,
    pub online: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEndpoint {
    pub id: String,
    pub name: String,
    pub username: String,
    /// The users this provider admits (its service's `users`); none: every user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub protocol: Proto,
    pub name: String,
    /// The providers' `users` when they all have the same list; each provider's own list is
    /// in `endpoints` and is what access is decided by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
    pub endpoints: Vec<ServiceEndpoint>,
}

impl ServiceInfo {
    /// The list every provider shares, if they share one.
    pub fn common_users(endpoints: &[ServiceEndpoint]) -> Option<Vec<String>> {
        crate::acl::common_list(endpoints.iter().map(|e| &e.users))
    }
}

/// Length of an endpoint id's nonce: 32 lower-case hex digits (128 random bits).
pub const ID_NONCE_LEN: usize = 32;

/// Is `s` a nonce an endpoint id may be derived from?
pub fn is_id_nonce(s: &str) -> bool {
    s.len() == ID_NONCE_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A fresh random nonce for a new endpoint id.
pub fn new_id_nonce() -> String {
    use std::fmt::Write;
    let mut bytes = [0u8; ID_NONCE_LEN / 2];
    // The system's generator failing is not something a nonce can do without; fall back on
    // a UUID's randomness, which comes from the same source by another path.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        bytes = *uuid::Uuid::new_v4().as_bytes();
    }
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The endpoint id of user `user` with nonce `nonce`: a version-8 UUID made of the first 128
/// bits of SHA-256 over both. A hub admits a registration only if the id is derived from the
/// certificate's user this way, so no other user can ever hold an endpoint's id (finding a
/// nonce that gives another user's id would take a second preimage of SHA-256).
pub fn endpoint_id(user: &str, nonce: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"ztm endpoint id\n");
    ctx.update(user.as_bytes());
    ctx.update(b"\n");
    ctx.update(nonce.as_bytes());
    let digest = ctx.finish();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// Is `id` the endpoint id of `user` with `nonce`?
pub fn id_belongs_to(id: &str, user: &str, nonce: &str) -> bool {
    is_id_nonce(nonce) && endpoint_id(user, nonce) == id
}

/// Is `s` a canonical UUID in lower case (what agents use as endpoint ids)? One spelling per
/// id: an upper-case twin of another endpoint's id is not an id.
pub fn is_endpoint_id(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok_and(|u| u.hyphenated().to_string() == s)
}

/// Largest DATA frame we accept (and so the peer sends). As large as a tunnel's socket read
/// (`ztm_relay::READ_SIZE`), so each read travels as one frame: a quarter of the frames,
/// TLS writes and wake-ups per byte that the HTTP/2 default of 16 KiB costs.
pub const MAX_FRAME: u32 = 64 * 1024;
/// Largest header list (all headers of one request or response, as HTTP/2 counts them) either
/// side accepts.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Most bytes h2 buffers per stream ahead of the socket.
pub const SEND_BUFFER: usize = 256 * 1024;

#[cfg(test)]
mod tests {
    #[test]
    fn control_lines_read_and_write_as_protocol_md_shows() {
        let beat: ControlLine = serde_json::from_str(r#"{"op":"heartbeat","id":"x"}"#).unwrap();
        assert_eq!(beat, ControlLine::Heartbeat { id: "x".into() });
        let crl: ControlLine = serde_json::from_str(r#"{"op":"crl"}"#).unwrap();
        assert_eq!(crl, ControlLine::Crl { after: None });
        let reg = ControlLine::Register {
            id: "i".into(),
            protocol: "1".into(),
            name: "n".into(),
            services: vec![],
            nonce: None,
        };
        assert_eq!(
            serde_json::to_string(&reg).unwrap(),
            r#"{"op":"register","id":"i","protocol":"1","name":"n","services":[]}"#
        );
        for bad in [
            r#"{"op":"shutdown"}"#,
            r#"{"id":"x"}"#,
            r#"{"op":"heartbeat"}"#,
            "[]",
        ] {
            assert!(serde_json::from_str::<ControlLine>(bad).is_err(), "{bad}");
        }
        let answer = LineAnswer {
            crl_number: Some(3),
            ..LineAnswer::status(204)
        };
        assert_eq!(
            serde_json::to_string(&answer).unwrap(),
            r#"{"status":204,"crl_number":3}"#
        );
        let closing: LineAnswer =
            serde_json::from_str(r#"{"status":503,"message":"m","closing":true}"#).unwrap();
        assert!(closing.closing && !closing.is_success());
        assert_eq!(closing.words(), "503 m");
    }

    use super::*;

    #[test]
    fn an_agent_times_a_ping_once_a_minute() {
        for (beats, due) in [
            (0, false),
            (1, false),
            (3, false),
            (4, true),
            (5, false),
            (8, true),
        ] {
            assert_eq!(rtt_due(beats), due, "after heartbeat {beats}");
        }
        assert_eq!(
            HEARTBEAT_INTERVAL * RTT_EVERY_HEARTBEATS,
            Duration::from_secs(60)
        );
        // Two heartbeats fit in the hub's timeout: one late or lost does not make it offline.
        assert!(HEARTBEAT_INTERVAL * 2 <= HEARTBEAT_TIMEOUT);
    }

    #[test]
    fn endpoint_ids_are_bound_to_their_user() {
        let nonce = "00112233445566778899aabbccddeeff";
        let id = endpoint_id("alice", nonce);
        assert!(is_endpoint_id(&id), "{id}");
        assert_eq!(id.as_bytes()[14], b'8', "version 8: {id}");
        assert!(
            matches!(id.as_bytes()[19], b'8' | b'9' | b'a' | b'b'),
            "variant: {id}"
        );
        assert_eq!(
            endpoint_id("alice", nonce),
            id,
            "the same inputs give the same id"
        );
        assert!(id_belongs_to(&id, "alice", nonce));
        assert!(!id_belongs_to(&id, "mallory", nonce));
        assert!(!id_belongs_to(
            &id,
            "alice",
            "00112233445566778899aabbccddeefe"
        ));
        assert_ne!(endpoint_id("alice", nonce), endpoint_id("alicf", nonce));
        // User and nonce cannot be shifted into each other.
        assert_ne!(endpoint_id("ab", "c"), endpoint_id("a", "bc"));
        // Nonces are 32 lower-case hex digits.
        assert!(!id_belongs_to(&id, "alice", &nonce.to_uppercase()));
        assert!(!is_id_nonce("0011"));
        assert!(!is_id_nonce(&format!("{nonce}00")));
        let fresh = new_id_nonce();
        assert!(is_id_nonce(&fresh), "{fresh}");
        assert_ne!(fresh, new_id_nonce());
    }

    #[test]
    fn the_highest_version_both_speak_is_chosen() {
        assert_eq!(choose_version(None), Some(1));
        assert_eq!(choose_version(Some("1")), Some(1));
        assert_eq!(choose_version(Some(" 2, 1 ")), Some(1));
        assert_eq!(choose_version(Some("2")), None);
        assert_eq!(choose_version(Some("0")), None);
        assert_eq!(choose_version(Some("")), None);
        assert_eq!(choose_version(Some("one")), None);
    }

    #[test]
    fn endpoint_ids_have_one_spelling() {
        let id = "0b1c2d3e-4f50-4617-8829-3a4b5c6d7e8f";
        assert!(is_endpoint_id(id));
        assert!(!is_endpoint_id(&id.to_uppercase()));
        assert!(!is_endpoint_id("0b1c2d3e4f5046178829-3a4b5c6d7e8f"));
        assert!(!is_endpoint_id("{0b1c2d3e-4f50-4617-8829-3a4b5c6d7e8f}"));
        assert!(!is_endpoint_id("not an id"));
    }
}
