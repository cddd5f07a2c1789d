//! Messages, paths and timers of the agent ↔ hub protocol (PROTOCOL.md).

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// An endpoint whose last heartbeat is older than this is offline.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);
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
pub const MAX_STREAMS: u32 = 1000;

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
/// `:protocol` of tunnel CONNECT requests.
pub const TUNNEL_PROTOCOL: &str = "ztm-tunnel";

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

/// Is `s` a canonical UUID in lower case (what agents use as endpoint ids)? One spelling per
/// id: an upper-case twin of another endpoint's id is not an id.
pub fn is_endpoint_id(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok_and(|u| u.hyphenated().to_string() == s)
}

/// Largest DATA frame we accept (and so the peer sends). As large as a tunnel's socket read
/// (`ztm_net::relay::READ_SIZE`), so each read travels as one frame: a quarter of the frames,
/// TLS writes and wake-ups per byte that the HTTP/2 default of 16 KiB costs.
pub const MAX_FRAME: u32 = 64 * 1024;
/// Largest header list (all headers of one request or response, as HTTP/2 counts them) either
/// side accepts.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Most bytes h2 buffers per stream ahead of the socket.
pub const SEND_BUFFER: usize = 256 * 1024;
