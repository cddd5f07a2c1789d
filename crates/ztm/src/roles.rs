//! The long-running roles: each parses its flags, opens its state, binds its socket and runs
//! until SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::{bail, Result};
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
}

pub async fn run_ca(args: CaArgs) -> Result<()> {
    let addr = parse_listen(&args.listen)?;
    if !addr.ip().is_loopback() && args.token.as_deref().unwrap_or("").is_empty() {
        bail!(
            "listening on {addr} (not loopback) needs an admin token: pass --token or set ZTM_CA_TOKEN"
        );
    }
    let path = expand_home(&args.database);
    let store = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || ztm_ca::CaStore::open(&path)).await??
    };
    let listener = bind(addr).await?;
    let state = Arc::new(ztm_ca::CaState {
        store,
        token: args.token.filter(|t| !t.is_empty()),
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
