//! The plain reference relay (`ztm bench-relay`, hidden): forwards TCP connections as they
//! are, with 64 KiB copies on the same tokio runtime as the mesh, and no TLS or HTTP/2. The
//! benchmark chains three of them (the tunnel's hop count) to measure what relaying alone
//! costs on this machine, beside the direct reference and the tunnel.

use anyhow::{Context, Result};
use clap::Args;
use tokio::net::{TcpListener, TcpStream};

/// Buffer of each direction of a plain relay: the size of a tunnel's largest read.
const COPY_BUF: usize = ztm_relay::READ_SIZE;

#[derive(Args)]
pub struct RelayArgs {
    /// LISTEN=TARGET: accept on LISTEN and forward every connection to TARGET (repeatable)
    #[arg(long = "map", required = true, value_parser = parse_map)]
    maps: Vec<(String, String)>,
}

fn parse_map(s: &str) -> Result<(String, String), String> {
    let (listen, target) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not LISTEN=TARGET"))?;
    if listen.is_empty() || target.is_empty() {
        return Err(format!("{s:?} is not LISTEN=TARGET"));
    }
    Ok((listen.to_string(), target.to_string()))
}

pub async fn run_relay(args: RelayArgs) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    for (listen, target) in args.maps {
        let listener = TcpListener::bind(&listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        // The address bound (the port the kernel chose for port 0), for the benchmark to read.
        tracing::info!(
            "plain relay listening on {} for {target}",
            listener.local_addr()?
        );
        tokio::spawn(async move {
            loop {
                let inbound = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of descriptors, say: let connections close before trying again.
                        tracing::warn!("plain relay on {listen}: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let target = target.clone();
                tokio::spawn(async move {
                    if let Err(e) = forward(inbound, &target).await {
                        tracing::debug!("plain relay to {target}: {e}");
                    }
                });
            }
        });
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

async fn forward(mut inbound: TcpStream, target: &str) -> std::io::Result<()> {
    let mut outbound = TcpStream::connect(target).await?;
    inbound.set_nodelay(true)?;
    outbound.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut outbound, COPY_BUF, COPY_BUF)
        .await?;
    Ok(())
}
