//! The long-running roles: each parses its flags, opens its state, binds its socket and runs
//! until SIGINT/SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::builder::TypedValueParser;
use clap::Args;

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
    /// Seconds the certificates signed for hubs are valid (hubs renew theirs after two thirds
    /// of it, without restarting); at least 30
    #[arg(long, default_value_t = ztm_pki::HUB_VALIDITY.as_secs(),
          value_parser = clap::value_parser!(u64).range(30..=20 * 365 * 24 * 3600))]
    hub_cert_lifetime: u64,
}

impl CaArgs {
    pub fn new(listen: &str, database: &str) -> Self {
        Self {
            listen: listen.into(),
            database: database.into(),
            token: None,
            hub_cert_lifetime: ztm_pki::HUB_VALIDITY.as_secs(),
        }
    }
}

pub async fn run_ca(args: CaArgs) -> Result<()> {
    let addr = parse_listen(&args.listen)?;
    if !addr.ip().is_loopback() && args.token.as_deref().unwrap_or("").is_empty() {
        bail!(
            "listening on {addr} (not loopback) needs an admin token: pass --token or set ZTM_CA_TOKEN"
        );
    }
    let path = expand_home(&args.database);
    let mut store = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || ztm_ca::CaStore::open(&path)).await??
    };
    store.set_hub_cert_lifetime(Duration::from_secs(args.hub_cert_lifetime));
    let listener = bind(addr).await?;
    let state = Arc::new(ztm_ca::CaState {
        store,
        token: args.token.filter(|t| !t.is_empty()),
        listen: listener.local_addr()?,
    });
    tracing::info!(
        "CA listening on http://{} (database {})",
        listener.local_addr()?,
        path.display()
    );
    axum::serve(listener, ztm_ca::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

#[derive(Args)]
pub struct HubArgs {
    /// Address to listen on (HOST:PORT)
    #[arg(long, default_value = "0.0.0.0:8888")]
    listen: String,
    /// The CA's address (HOST:PORT)
    #[arg(long, default_value = "localhost:9999")]
    ca: String,
    /// The CA's admin token, if it requires one
    #[arg(long, env = "ZTM_CA_TOKEN", hide_env_values = true)]
    ca_token: Option<String>,
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
}

impl HubArgs {
    pub fn new(listen: &str, ca: &str, names: Vec<String>) -> Self {
        let limits = ztm_hub::Limits::default();
        Self {
            listen: listen.into(),
            ca: ca.into(),
            ca_token: None,
            names,
            max_endpoints_per_user: limits.endpoints_per_user,
            max_endpoints: limits.endpoints,
            max_connections_per_user: limits.connections_per_user,
            max_handshakes_per_address: limits.unauthenticated_per_source,
            revocation_max_age: ztm_hub::server::DEFAULT_REVOCATION_MAX_AGE.as_secs(),
        }
    }
}

pub async fn run_hub(args: HubArgs) -> Result<()> {
    let addr = parse_listen(&args.listen)?;
    let listener = bind(addr).await?;
    ztm_hub::run(
        listener,
        ztm_hub::HubConfig {
            ca: args.ca,
            ca_token: args.ca_token.filter(|t| !t.is_empty()),
            names: args.names,
            limits: ztm_hub::Limits {
                endpoints_per_user: args.max_endpoints_per_user,
                endpoints: args.max_endpoints,
                connections_per_user: args.max_connections_per_user,
                unauthenticated_per_source: args.max_handshakes_per_address,
                ..ztm_hub::Limits::default()
            },
            revocation_max_age: Duration::from_secs(args.revocation_max_age),
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
}

impl AgentArgs {
    pub fn new(listen: &str, database: &str) -> Self {
        Self {
            listen: listen.into(),
            database: database.into(),
            reset: false,
            token: None,
        }
    }

    /// The API token to require (`--token`).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }
}

pub async fn run_agent(args: AgentArgs) -> Result<()> {
    let addr = parse_listen(&args.listen)?;
    let token = args.token.filter(|t| !t.is_empty());
    if !addr.ip().is_loopback() && token.is_none() {
        bail!(
            "listening on {addr} (not loopback) needs an API token: pass --token or set ZTM_AGENT_TOKEN"
        );
    }
    let path = expand_home(&args.database);
    let agent = {
        let path = path.clone();
        let reset = args.reset;
        tokio::task::spawn_blocking(move || ztm_agent::Agent::open(&path, reset, addr, token))
            .await??
    };
    let listener = bind(addr).await?;
    let router = agent.start()?;
    tracing::info!(
        "agent listening on http://{} (database {}{})",
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
