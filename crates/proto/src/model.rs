//! The JSON model of the agent's REST API (docs/requirements.md §5) and the error body every API uses.

use serde::{Deserialize, Serialize};

/// The error body of every ZTM HTTP API: `{"status":N,"message":"..."}`, and for the errors a
/// program must tell apart, a `reason` (e.g. [`crate::wire::NOT_HERE`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            reason: None,
        }
    }

    /// With a `reason` a program can match.
    pub fn with_reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.to_string());
        self
    }
}

/// One certificate as the CA lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateEntry {
    pub name: String,
    pub serial: String,
    pub created: i64,
    pub not_after: i64,
}

/// One revocation in the CA's feed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revocation {
    pub seq: i64,
    pub name: String,
    pub serial: String,
    pub time: i64,
}

/// `GET /api/revocations?since=N`: revocations with `seq > N`, oldest first, and the newest
/// sequence number the CA has (to pass as `since` next time).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevocationFeed {
    pub last: i64,
    pub revocations: Vec<Revocation>,
}

/// `POST /api/meshes/{mesh}`: join (or update) a mesh, with the three PEM texts and the hubs,
/// or with an invitation (`crate::invite`) that holds them all.
///
/// Empty and unset fields are left out when serialised (a join with an invitation is
/// `{"agent":{"name":...},"invitation":...}`); they read back as the same defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JoinRequest {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca: String,
    #[serde(default)]
    pub agent: JoinAgent,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bootstraps: Vec<String>,
    /// An invitation, in either form; it gives `ca`, the certificate, the key and the hubs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitation: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinAgent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub certificate: String,
    /// Required to join; updating a joined mesh without it keeps the key it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimedMessage {
    /// Milliseconds since the Unix epoch.
    pub time: u64,
    pub message: String,
    /// What a program matches on, for the messages it must tell apart (e.g.
    /// [`CERTIFICATE_REVOKED`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl TimedMessage {
    pub fn new(time: u64, message: impl Into<String>) -> Self {
        Self {
            time,
            message: message.into(),
            reason: None,
        }
    }
}

/// The `reason` of a mesh error saying that a hub refused this agent's certificate as revoked.
pub const CERTIFICATE_REVOKED: &str = "certificate-revoked";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeshAgent {
    pub id: String,
    pub name: String,
    pub username: String,
    pub certificate: String,
    /// When the agent's certificate expires (ms since the epoch; 0 if it cannot be read).
    #[serde(default)]
    pub expires: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Mesh {
    pub name: String,
    pub ca: String,
    pub agent: MeshAgent,
    pub bootstraps: Vec<String>,
    pub connected: bool,
    pub errors: Vec<TimedMessage>,
    /// When the CA's certificate expires (ms since the epoch; 0 if it cannot be read).
    #[serde(default)]
    pub ca_expires: u64,
    /// What needs attention soon (a certificate near its expiry).
    #[serde(default)]
    pub warnings: Vec<TimedMessage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogEntry {
    pub time: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub id: String,
    pub name: String,
    pub username: String,
    pub ip: String,
    pub port: u16,
    pub heartbeat: u64,
    pub online: bool,
    pub is_local: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRef {
    pub id: String,
    pub name: String,
    /// The provider's user.
    #[serde(default)]
    pub username: String,
    /// The users this provider admits, if it lists them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
}

impl EndpointRef {
    /// The list every one of `providers` shares, if they share one.
    pub fn common_users(providers: &[EndpointRef]) -> Option<Vec<String>> {
        crate::acl::common_list(providers.iter().map(|e| &e.users))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub protocol: crate::wire::Proto,
    pub endpoints: Vec<EndpointRef>,
    pub is_discovered: bool,
    pub is_local: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
}

/// Body of `POST .../services/{proto}/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceBody {
    pub host: String,
    pub port: u16,
    /// Unset: every user of the mesh (left out when serialised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortTarget {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The user of the target endpoint, pinned with it when the port is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// For a target with no endpoint: the users whose endpoints may provide the service
    /// (`*`: any user). Unset: the port's own user and root (`acl::trusts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Listen {
    pub ip: String,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Port {
    pub protocol: crate::wire::Proto,
    pub listen: Listen,
    pub target: PortTarget,
    pub open: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the port's tunnels did (set by the agent that has the port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<PortStats>,
}

/// A port's live figures, since it was mapped or its agent started. A tunnel is one TCP
/// connection or one UDP flow (a client address) accepted on the port.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PortStats {
    /// Tunnels open now.
    pub active: u64,
    /// Tunnels opened.
    pub total: u64,
    /// Connections and flows whose tunnel could not be opened (no provider, refused, no
    /// answer).
    pub failed: u64,
    /// Bytes from the port's clients towards the service, counted as they move.
    pub bytes_to_service: u64,
    /// Bytes from the service back to the clients, counted as they move.
    pub bytes_from_service: u64,
    /// The last error: a tunnel that could not be opened or broke once open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<TimedMessage>,
}

/// Body of `POST .../ports/{ip}/{proto}/{port}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortBody {
    pub target: PortTarget,
}

/// An endpoint's exit (`.../endpoints/{ep}/exit`): the destinations it lets connections out
/// to (`crate::exit` rules) and the users who may use it. Also the body of its `POST`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Exit {
    pub allow: Vec<String>,
    /// Unset: every user of the mesh; the exit's own user and root always may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
}

/// The exits a proxy sends its connections through: one endpoint, or (without `endpoint`)
/// any exit of a user the proxy trusts, balanced and failed over as a port's providers are.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExitTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The user of the exit endpoint, pinned with it when the proxy is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Without an endpoint: the users whose exits may carry the connections (`*`: any
    /// user). Unset: the proxy's own user and root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<Vec<String>>,
}

impl ExitTarget {
    /// The port target a proxy's tunnels are opened to (the exit's reserved service).
    pub fn as_port_target(&self) -> PortTarget {
        PortTarget {
            service: crate::wire::EXIT_SERVICE.to_string(),
            endpoint: self.endpoint.clone(),
            user: self.user.clone(),
            trust: self.trust.clone(),
        }
    }

    /// The exit target of a proxy's port target.
    pub fn of(target: &PortTarget) -> ExitTarget {
        ExitTarget {
            endpoint: target.endpoint.clone(),
            user: target.user.clone(),
            trust: target.trust.clone(),
        }
    }
}

/// A local SOCKS5 and HTTP proxy (`.../endpoints/{ep}/proxies/{ip}/{port}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Proxy {
    pub listen: Listen,
    pub exit: ExitTarget,
    pub open: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What its connections did (a tunnel is one proxied connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<PortStats>,
}

/// Body of `POST .../proxies/{ip}/{port}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProxyBody {
    #[serde(default)]
    pub exit: ExitTarget,
}
