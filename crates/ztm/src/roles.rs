//! The long-running roles: each parses its flags, opens its state, binds its socket and runs
//! until SIGINT/SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::builder::TypedValueParser;
use clap::Args;
use ztm_proto::addr::{is_valid_host, HostPort};

use crate::serve::{bind, expand_home, parse_listen, shutdown_signal};

#[derive(Args)]
pub struct CaArgs {
    /// Address to listen on (HOST:PORT)
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: String,
    /// SQLite database holding the CA key and the issued certificates
    #[arg(long, default_value = "~/ztm-ca.db")]
    database: String,
    /// Admin token required on every request except GET /api/certificates/ca; mandatory when
    /// listening on a non-loopback address
    #[arg(long, env = "ZTM_CA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Serve HTTPS, with a certificate the CA signs itself (always done when listening on a
    /// non-loopback address)
    #[arg(long)]
    tls: bool,
    /// A host name or address hubs reach the CA at, named in its HTTPS certificate
    /// (repeatable; default: the listen address and localhost)
    #[arg(long = "name")]
    names: Vec<String>,
    /// Seconds the certificates signed for hubs are valid (hubs renew theirs after two thirds
    /// of it, without restarting); at least 30
    #[arg(long, default_value_t = ztm_pki::HUB_VALIDITY.as_secs(),
          value_parser = clap::value_parser!(u64).range(30..=20 * 365 * 24 * 3600))]
    hub_cert_lifetime: u64,
    /// How long the certificates issued to users are valid: seconds, or a number with s, m,
    /// h or d (agents warn from 30 days before expiry)
    #[arg(long, default_value = "1825d", value_parser = parse_lifetime)]
    user_cert_lifetime: Duration,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (off unless given); an address
    /// that is not loopback needs --metrics-token
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Bearer token Prometheus must send to read the metrics (required off loopback)
    #[arg(long, env = "ZTM_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
}

/// A lifetime: seconds, or a number followed by s, m, h or d; at least a minute.
fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a lifetime (e.g. 3600, 90d, 12h)"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    let secs = n
        .checked_mul(unit)
        .filter(|s| (60..=20 * 365 * 24 * 3600).contains(s))
        .ok_or_else(|| format!("{text:?}: give between a minute and 20 years"))?;
    Ok(Duration::from_secs(secs))
}

impl CaArgs {
    pub fn new(listen: &str, database: &str) -> Self {
        Self {
            listen: listen.into(),
            database: database.into(),
            token: None,
            tls: false,
            names: Vec::new(),
            hub_cert_lifetime: ztm_pki::HUB_VALIDITY.as_secs(),
            user_cert_lifetime: ztm_pki::USER_VALIDITY,
            metrics: None,
            metrics_token: None,
        }
    }
}

/// The names in the CA's HTTPS certificate: `--name`s (a port given with one is dropped), or
/// the listen address and localhost (all loopback names for a wildcard address).
fn ca_names(names: &[String], listen: std::net::SocketAddr) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for name in names {
        // Host names and addresses; unlike the names in hub certificates, no `_`.
        let host = HostPort::host_of(name).to_string();
        if !is_valid_host(&host) || host.contains('_') {
            bail!("bad --name {name:?}: expected a host name or an IP address");
        }
        out.push(host);
    }
    if out.is_empty() {
        if listen.ip().is_unspecified() {
            out = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
            tracing::warn!(
                "the CA listens on {listen} but its HTTPS certificate names only localhost: \
                 give the names hubs reach it at with --name"
            );
        } else {
            out = vec![listen.ip().to_string(), "localhost".into()];
        }
    }
    Ok(out)
}

/// The listener of `--metrics ADDR` (bound now, so that a taken port fails at start) and the
/// token scrapes must carry; refused off loopback without a token.
fn metrics_listener(
    at: Option<&str>,
    token: Option<&str>,
) -> Result<Option<(std::net::TcpListener, Option<String>)>> {
    let Some(at) = at else {
        return Ok(None);
    };
    let at = parse_listen(at)?;
    let token = token
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    if !at.ip().is_loopback() && token.is_none() {
        bail!(
            "--metrics {at} is not a loopback address: give --metrics-token (or \
             ZTM_METRICS_TOKEN) too"
        );
    }
    let listener = std::net::TcpListener::bind(at)
        .map_err(|e| anyhow::anyhow!("cannot listen on {at} for --metrics: {e}"))?;
    Ok(Some((listener, token)))
}

pub async fn run_ca(args: CaArgs) -> Result<()> {
    let addr = parse_listen(&args.listen)?;
    if !addr.ip().is_loopback() && args.token.as_deref().unwrap_or("").is_empty() {
        bail!(
            "listening on {addr} (not loopback) needs an admin token: pass --token or set ZTM_CA_TOKEN"
        );
    }
    let metrics = metrics_listener(args.metrics.as_deref(), args.metrics_token.as_deref())?;
    let path = expand_home(&args.database);
    let mut store = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || ztm_ca::CaStore::open(&path)).await??
    };
    store.set_hub_cert_lifetime(Duration::from_secs(args.hub_cert_lifetime));
    store.set_user_cert_lifetime(args.user_cert_lifetime);
    // Off loopback, the network between hubs and the CA may read and change what they say:
    // always TLS there.
    let tls = args.tls || !addr.ip().is_loopback();
    let listener = bind(addr).await?;
    let local = listener.local_addr()?;
    let sans = if tls {
        ca_names(&args.names, local)?
    } else {
        Vec::new()
    };
    let fingerprint = ztm_pki::fingerprint_pem(store.ca_cert_pem(), "CA certificate")?;
    let signer = store.signer();
    let state = Arc::new(ztm_ca::CaState {
        store,
        token: args.token.filter(|t| !t.is_empty()),
        listen: local,
    });
    let mut router = ztm_ca::router(state);
    if let Some((listener, token)) = metrics {
        let counts = Arc::new(
            ztm_ca::metrics::Metrics::new()
                .map_err(|e| anyhow::anyhow!("setting up the metrics: {e}"))?,
        );
        router = ztm_ca::metrics::counted(router, counts.clone());
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tracing::info!("CA metrics on http://{}/metrics", listener.local_addr()?);
        let scrape = ztm_ca::metrics::scrape_router(counts, token);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, scrape).await {
                tracing::warn!("the metrics listener stopped: {e}");
            }
        });
    }
    if tls {
        let config = ztm_pki::ca_server_config(signer, &sans)?;
        tracing::info!(
            "CA listening on https://{local} (database {}; certificate for {}; CA certificate \
             SHA-256 fingerprint {fingerprint})",
            path.display(),
            sans.join(", ")
        );
        let listener = ztm_ca::tls::TlsListener::new(listener, Arc::new(config))?;
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await?;
    } else {
        tracing::info!(
            "CA listening on http://{local} (database {}; CA certificate SHA-256 fingerprint \
             {fingerprint})",
            path.display()
        );
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await?;
    }
    Ok(())
}

#[derive(Args)]
pub struct HubArgs {
    /// Address to listen on (HOST:PORT)
    #[arg(long, default_value = "0.0.0.0:8888")]
    listen: String,
    /// The CA: https://HOST:PORT, or HOST:PORT (plain HTTP, only for a CA on this machine)
    #[arg(long, default_value = "localhost:9999")]
    ca: String,
    /// The CA certificate (PEM file): the hub trusts no other CA. This or --ca-fingerprint is
    /// required for a CA that is not on this machine
    #[arg(long, value_name = "FILE", conflicts_with = "ca_fingerprint")]
    ca_cert: Option<String>,
    /// The SHA-256 fingerprint of the CA certificate (hex, ':' between bytes allowed), as
    /// `ztm ca` prints it at start
    #[arg(long, value_name = "HEX")]
    ca_fingerprint: Option<String>,
    /// The token the hub gives the CA: its hub token (POST /api/hubs/NAME at the CA) or the
    /// CA's admin token
    #[arg(long, env = "ZTM_CA_TOKEN", hide_env_values = true)]
    ca_token: Option<String>,
    /// This hub's name at the CA (its certificate's CN is hub/NAME; a hub token is for one
    /// name); default: made from the first --name
    #[arg(long, value_name = "NAME")]
    id: Option<String>,
    /// The CA certificate given by `ztm up`, which created it
    #[arg(skip)]
    ca_cert_pem: Option<String>,
    /// An address agents can reach this hub at (HOST:PORT); repeatable
    #[arg(long = "name")]
    names: Vec<String>,
    /// Endpoints one user may have online at this hub
    #[arg(long, default_value_t = ztm_hub::Limits::default().endpoints_per_user,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|n| n as usize))]
    max_endpoints_per_user: usize,
    /// Endpoints the hub keeps, online and recently offline (more are refused: "the hub is
    /// full")
    #[arg(long, default_value_t = ztm_hub::Limits::default().endpoints,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000).map(|n| n as usize))]
    max_endpoints: usize,
    /// Connections one user may hold (each endpoint uses two)
    #[arg(long, default_value_t = ztm_hub::Limits::default().connections_per_user,
          value_parser = clap::value_parser!(u64).range(2..=2_000_000).map(|n| n as usize))]
    max_connections_per_user: usize,
    /// Connections one address may have in their TLS handshake at once
    #[arg(long, default_value_t = ztm_hub::Limits::default().unauthenticated_per_source,
          value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    max_handshakes_per_address: usize,
    /// Seconds the hub goes on admitting new sessions while the CA does not answer its
    /// revocation polls (a certificate revoked meanwhile could not be refused)
    #[arg(long, default_value_t = ztm_hub::server::DEFAULT_REVOCATION_MAX_AGE.as_secs(),
          value_parser = clap::value_parser!(u64).range(10..=7 * 24 * 3600))]
    revocation_max_age: u64,
    /// Seconds a reverse connection keeps its HTTP/2 (about 30 KiB in the hub) with no
    /// request for its endpoint and no tunnel open, before it goes back to dormant
    #[arg(long, default_value_t = ztm_proto::wire::REVERSE_IDLE.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=7 * 24 * 3600))]
    reverse_idle: u64,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (off unless given); an address
    /// that is not loopback needs --metrics-token
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Bearer token Prometheus must send to read the metrics (required off loopback)
    #[arg(long, env = "ZTM_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
}

impl HubArgs {
    pub fn new(listen: &str, ca: &str, names: Vec<String>) -> Self {
        let limits = ztm_hub::Limits::default();
        Self {
            listen: listen.into(),
            ca: ca.into(),
            ca_cert: None,
            ca_fingerprint: None,
            ca_token: None,
            id: None,
            ca_cert_pem: None,
            names,
            max_endpoints_per_user: limits.endpoints_per_user,
            max_endpoints: limits.endpoints,
            max_connections_per_user: limits.connections_per_user,
            max_handshakes_per_address: limits.unauthenticated_per_source,
            revocation_max_age: ztm_hub::server::DEFAULT_REVOCATION_MAX_AGE.as_secs(),
            reverse_idle: ztm_proto::wire::REVERSE_IDLE.as_secs(),
            metrics: None,
            metrics_token: None,
        }
    }
}

/// Checks `ZTM_TLS` (who moves TLS records after the handshake) before a role starts, and
/// says when it is not our own record layer.
fn check_tls_records() -> Result<()> {
    match ztm_tls::Records::from_env().map_err(anyhow::Error::msg)? {
        ztm_tls::Records::Own => {}
        ztm_tls::Records::Rustls => {
            tracing::info!("TLS records moved by tokio-rustls' stream (ZTM_TLS=rustls)")
        }
    }
    Ok(())
}

impl HubArgs {
    /// Pins the hub to the CA certificate `pem`.
    pub fn pin_ca(mut self, pem: String) -> Self {
        self.ca_cert_pem = Some(pem);
        self
    }

    /// What the hub was told about its CA.
    fn ca_pin(&self) -> Result<Option<ztm_hub::ca_client::CaPin>> {
        if let Some(pem) = &self.ca_cert_pem {
            return Ok(Some(ztm_hub::ca_client::CaPin::Certificate(pem.clone())));
        }
        ca_pin(self.ca_cert.as_deref(), self.ca_fingerprint.as_deref())
    }
}

/// The CA pin given by `--ca-cert FILE` or `--ca-fingerprint HEX`, if any.
pub fn ca_pin(
    ca_cert: Option<&str>,
    ca_fingerprint: Option<&str>,
) -> Result<Option<ztm_hub::ca_client::CaPin>> {
    use ztm_hub::ca_client::CaPin;
    if let Some(file) = ca_cert {
        let path = expand_home(file);
        let pem = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read --ca-cert {}: {e}", path.display()))?;
        ztm_pki::fingerprint_pem(&pem, "--ca-cert").map_err(|_| {
            anyhow::anyhow!("--ca-cert {} holds no PEM certificate", path.display())
        })?;
        return Ok(Some(CaPin::Certificate(pem)));
    }
    if let Some(text) = ca_fingerprint {
        let Some(hex) = ztm_pki::parse_fingerprint(text) else {
            bail!("bad --ca-fingerprint {text:?}: expected the 64 hex digits of a SHA-256 fingerprint");
        };
        return Ok(Some(CaPin::Fingerprint(hex)));
    }
    Ok(None)
}

pub async fn run_hub(args: HubArgs) -> Result<()> {
    check_tls_records()?;
    let ca_pin = args.ca_pin()?;
    // Refused before the hub listens or connects anywhere.
    ztm_hub::ca_client::check_ca(&args.ca, ca_pin.as_ref())?;
    let addr = parse_listen(&args.listen)?;
    let metrics = metrics_listener(args.metrics.as_deref(), args.metrics_token.as_deref())?
        .map(|(listener, token)| ztm_hub::server::MetricsListen { listener, token });
    let listener = bind(addr).await?;
    // The bound address (the port the kernel chose for port 0), said before the hub waits for
    // its certificate: a hub whose CA never answers would not say it otherwise.
    tracing::info!(
        "hub bound to {}; getting its certificate from the CA at {}",
        listener.local_addr()?,
        args.ca
    );
    ztm_hub::run(
        listener,
        ztm_hub::HubConfig {
            ca: args.ca,
            ca_token: args
                .ca_token
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
            ca_pin,
            id: args.id,
            names: args.names,
            limits: ztm_hub::Limits {
                endpoints_per_user: args.max_endpoints_per_user,
                endpoints: args.max_endpoints,
                connections_per_user: args.max_connections_per_user,
                unauthenticated_per_source: args.max_handshakes_per_address,
                reverse_idle: Duration::from_secs(args.reverse_idle),
                ..ztm_hub::Limits::default()
            },
            revocation_max_age: Duration::from_secs(args.revocation_max_age),
            metrics,
        },
        shutdown_signal(),
    )
    .await
}

#[derive(Args)]
pub struct AgentArgs {
    /// Address of the REST API and web UI (HOST:PORT)
    #[arg(long, default_value = "127.0.0.1:7777")]
    listen: String,
    /// SQLite database holding the agent's meshes, keys, services and ports
    #[arg(long, default_value = "~/ztm.db")]
    database: String,
    /// Forget every mesh, service and port in the database before starting
    #[arg(long)]
    reset: bool,
    /// API token required on every API request (Authorization: Bearer TOKEN); mandatory when
    /// listening on a non-loopback address
    #[arg(long, env = "ZTM_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Seconds without a request (and with no tunnel open) after which a control connection
    /// that started HTTP/2 goes back to carrying lines; 0: never
    #[arg(
        long,
        env = "ZTM_CONTROL_IDLE",
        default_value_t = 300,
        value_name = "SECS"
    )]
    control_idle: u64,
}

impl AgentArgs {
    pub fn new(listen: &str, database: &str) -> Self {
        Self {
            listen: listen.into(),
            database: database.into(),
            reset: false,
            token: None,
            control_idle: ztm_proto::wire::CONTROL_IDLE.as_secs(),
        }
    }

    /// The API token to require (`--token`).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }
}

pub async fn run_agent(args: AgentArgs) -> Result<()> {
    check_tls_records()?;
    let addr = parse_listen(&args.listen)?;
    let token = args.token.filter(|t| !t.is_empty());
    if !addr.ip().is_loopback() && token.is_none() {
        bail!(
            "listening on {addr} (not loopback) needs an API token: pass --token or set ZTM_AGENT_TOKEN"
        );
    }
    let path = expand_home(&args.database);
    // Bound first: the Host and Origin checks compare against the port actually bound (the
    // one the kernel chose for port 0), which is also the one the UI's pages come from.
    let listener = bind(addr).await?;
    let local = listener.local_addr()?;
    // Each tunnel holds a file at each end of the agent (a client's or a service's
    // connection): thousands of them need more than the common default of 1,024. Raised
    // before the agent opens: its connections' budget of files comes from the limit.
    let raised = rlimit::increase_nofile_limit(u64::MAX);
    let agent = {
        let path = path.clone();
        let reset = args.reset;
        tokio::task::spawn_blocking(move || ztm_agent::Agent::open(&path, reset, local, token))
            .await??
    };
    agent.set_control_idle(args.control_idle);
    let router = ztm_agent::api::router(agent.clone());
    agent.start(router.clone())?;
    let budget = agent.files.budget();
    let files = match raised {
        Ok(n) => format!("; open-file limit {n}, {budget} of them for connections"),
        Err(e) => {
            format!("; cannot raise the open-file limit ({e}): {budget} files for connections")
        }
    };
    tracing::info!(
        "agent listening on http://{} (database {}{}{files})",
        listener.local_addr()?,
        path.display(),
        if agent.token.is_some() {
            "; the API requires the token"
        } else {
            ""
        }
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    agent.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        for (text, secs) in [
            ("3600", 3600),
            ("90d", 90 * 86_400),
            ("12h", 43_200),
            ("5m", 300),
        ] {
            assert_eq!(
                parse_lifetime(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for bad in ["", "d", "10", "1x", "-5d", "30000000d", "1.5d"] {
            assert!(parse_lifetime(bad).is_err(), "{bad}");
        }
    }
}
