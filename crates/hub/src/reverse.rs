//! The reverse connection (hub = HTTP/2 client, agent = server): bound to a registered
//! session by `GET /api/hello`, then used to open streams to the agent and pinged for liveness.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use http::{Method, StatusCode};
use tokio_util::sync::CancellationToken;
use ztm_net::h2io;
use ztm_proto::wire::{Hello, PING_INTERVAL, PING_TIMEOUT, REQUEST_TIMEOUT};
use ztm_tls::TlsStream;

use crate::server::{Hub, Peer};

pub async fn serve(
    hub: Arc<Hub>,
    tls: TlsStream,
    peer: Peer,
    kill: CancellationToken,
) -> Result<()> {
    let (sender, mut conn) = ztm_net::h2io::client_builder()
        .handshake::<_, Bytes>(tls)
        .await?;
    let mut ping = conn
        .ping_pong()
        .ok_or_else(|| anyhow!("no ping handle on the reverse connection"))?;
    let mut driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = bind_and_watch(&hub, &sender, &mut ping, &mut driver, &peer, &kill).await;
    driver.abort();
    result
}

async fn bind_and_watch(
    hub: &Arc<Hub>,
    sender: &h2::client::SendRequest<Bytes>,
    ping: &mut h2::PingPong,
    driver: &mut tokio::task::JoinHandle<()>,
    peer: &Peer,
    kill: &CancellationToken,
) -> Result<()> {
    let req = h2io::build(Method::GET, "/api/hello")?.body(())?;
    let answer = h2io::request(sender, req, Bytes::new(), 64 * 1024, REQUEST_TIMEOUT).await?;
    if answer.status != StatusCode::OK {
        bail!("hello answered {}", answer.status);
    }
    let hello: Hello = answer.json()?;
    if hub.revoked.contains(&peer.serial) {
        bail!("the certificate of user {} has been revoked", peer.user);
    }
    let (session, session_kill) = hub
        .bind_reverse(&hello.endpoint, &hello.session, &peer.user, sender.clone())
        .ok_or_else(|| anyhow!("reverse connection for an unknown session"))?;
    tracing::debug!("reverse connection of endpoint {} bound", hello.endpoint);
    let outcome = loop {
        tokio::select! {
            _ = kill.cancelled() => break Ok(()),
            _ = session_kill.cancelled() => break Ok(()),
            _ = &mut *driver => {
                // The agent redials both connections when either breaks.
                hub.kill_session(session);
                break Ok(());
            }
            _ = tokio::time::sleep(PING_INTERVAL) => {
                match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        hub.kill_session(session);
                        break Err(anyhow!("ping failed: {e}"));
                    }
                    Err(_) => {
                        tracing::info!(
                            "endpoint {} did not answer pings for {PING_TIMEOUT:?}; closing its session",
                            hello.endpoint
                        );
                        hub.kill_session(session);
                        break Ok(());
                    }
                }
            }
        }
    };
    hub.unbind_reverse(session);
    outcome
}
