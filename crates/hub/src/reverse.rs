//! The reverse connection (hub = HTTP/2 client, agent = server): bound to a registered
//! session by `GET /api/hello`, then used to open streams to the agent and pinged for liveness.
//! Every way it ends is said to the agent in a GOAWAY (PROTOCOL.md, "Closing connections").

use std::sync::Arc;

use bytes::Bytes;
use h2::Reason;
use http::{Method, StatusCode};
use ztm_net::goaway::{self, Farewell, Role};
use ztm_net::h2io;
use ztm_proto::wire::{Hello, PING_INTERVAL, PING_TIMEOUT, REQUEST_TIMEOUT};

use crate::admission::Refusal;
use crate::closer::{self, Closer, Goodbye, FAREWELL_TIMEOUT};
use crate::registry::SessionId;
use crate::state::{Hub, Peer, Tls};

/// The hub's HTTP/2 client on a reverse connection, driven by its own task.
struct Client {
    sender: h2::client::SendRequest<Bytes>,
    ping: h2::PingPong,
    driver: tokio::task::JoinHandle<()>,
    farewell: Farewell,
}

impl Client {
    async fn start(tls: Tls) -> anyhow::Result<Client> {
        let (io, farewell) = goaway::wrap(tls, Role::Client);
        let (sender, mut conn) = h2io::client_builder().handshake::<_, Bytes>(io).await?;
        let ping = conn
            .ping_pong()
            .ok_or_else(|| anyhow::anyhow!("no ping handle on the reverse connection"))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client {
            sender,
            ping,
            driver,
            farewell,
        })
    }

    /// Closes the connection saying `goodbye`, and waits (a little) for the agent to close it.
    /// The sender is held until then: with no sender left, h2 would close the connection with a
    /// GOAWAY of its own, without a reason, before ours.
    async fn close(mut self, goodbye: Goodbye) {
        self.farewell.close(goodbye);
        if tokio::time::timeout(FAREWELL_TIMEOUT, &mut self.driver)
            .await
            .is_err()
        {
            self.driver.abort();
        }
        drop(self.sender);
    }
}

pub async fn serve(hub: Arc<Hub>, tls: Tls, peer: Peer, kill: Closer) -> anyhow::Result<()> {
    let _open = hub.metrics.connection(crate::metrics::Kind::Reverse);
    // The phases that end are boxed (server.rs, `serve_connection`): the connection's future
    // keeps room only for what watching it needs.
    let mut client = Box::pin(Client::start(tls)).await?;
    let goodbye = bind_and_watch(&hub, &mut client, &peer, &kill).await;
    if let Some(goodbye) = goodbye {
        tracing::debug!(
            "closing a reverse connection of user {} from {}: {goodbye}",
            peer.user,
            peer.addr
        );
        Box::pin(client.close(goodbye)).await;
    } else {
        client.driver.abort();
    }
    Ok(())
}

/// Closes a reverse connection the hub does not admit, saying why.
pub async fn refuse(tls: Tls, refusal: Refusal) {
    if let Ok(Ok(client)) = tokio::time::timeout(FAREWELL_TIMEOUT, Client::start(tls)).await {
        client.close(closer::refused(&refusal)).await;
    }
}

/// Says hello, binds the connection to its session and watches it: what to tell the agent when
/// it ends (`None` when the agent closed it).
async fn bind_and_watch(
    hub: &Arc<Hub>,
    client: &mut Client,
    peer: &Peer,
    kill: &Closer,
) -> Option<Goodbye> {
    let (endpoint, session) = tokio::select! {
        hello = Box::pin(hello(hub, client, peer)) => match hello {
            Ok(bound) => bound,
            Err(goodbye) => {
                tracing::info!(
                    "refused a reverse connection of user {} from {}: {goodbye}",
                    peer.user,
                    peer.addr
                );
                return Some(goodbye);
            }
        },
        _ = kill.closed() => return Some(kill.why()),
    };
    // The agent must have enabled extended CONNECT before the hub may send one (RFC 8441 §3);
    // its SETTINGS came before its answer to the hello.
    if !client.sender.is_extended_connect_protocol_enabled() {
        tracing::warn!(
            "endpoint {endpoint} of user {} did not enable extended CONNECT \
             (SETTINGS_ENABLE_CONNECT_PROTOCOL) on its reverse connection: a protocol error of \
             the agent; no tunnel can reach it through this hub",
            peer.user
        );
        hub.refuse_reverse(
            session,
            "its reverse connection did not enable extended CONNECT \
             (SETTINGS_ENABLE_CONNECT_PROTOCOL, RFC 8441)"
                .to_string(),
        );
        return Some(Goodbye::new(
            Reason::PROTOCOL_ERROR,
            closer::text::NO_EXTENDED_CONNECT,
        ));
    }
    let Some(session_kill) = hub.bind_reverse(session, client.sender.clone()) else {
        return Some(closer::session_ended());
    };
    tracing::debug!("reverse connection of endpoint {endpoint} bound");
    let goodbye = watch(hub, client, session, &session_kill, kill, &endpoint).await;
    hub.unbind_reverse(session);
    goodbye
}

/// Asks the agent's hello and checks it: the endpoint and its session.
async fn hello(hub: &Hub, client: &Client, peer: &Peer) -> Result<(String, SessionId), Goodbye> {
    let req = h2io::build(Method::GET, "/api/hello")
        .and_then(|b| Ok(b.body(())?))
        .map_err(|e| closer::bad_hello(format!("{e:#}")))?;
    let answer = h2io::request(
        &client.sender,
        req,
        Bytes::new(),
        64 * 1024,
        REQUEST_TIMEOUT,
    )
    .await
    .map_err(|e| closer::bad_hello(format!("{e:#}")))?;
    if answer.status != StatusCode::OK {
        return Err(closer::bad_hello(format!("answered {}", answer.status)));
    }
    let hello: Hello = answer
        .json()
        .map_err(|_| closer::bad_hello("not a JSON hello"))?;
    if hub.revoked.contains(&peer.serial) {
        return Err(closer::revoked());
    }
    let session = hub
        .session_of_hello(&hello.endpoint, &hello.session, &peer.user)
        .ok_or_else(|| closer::bad_hello("no such session"))?;
    Ok((hello.endpoint, session))
}

/// Pings the agent until the connection or its session ends.
async fn watch(
    hub: &Hub,
    client: &mut Client,
    session: SessionId,
    session_kill: &Closer,
    kill: &Closer,
    endpoint: &str,
) -> Option<Goodbye> {
    let reverse_closed = || Goodbye::new(Reason::NO_ERROR, closer::text::REVERSE_CLOSED);
    loop {
        tokio::select! {
            _ = kill.closed() => {
                let why = kill.why();
                hub.kill_session(session, why.clone());
                return Some(why);
            }
            _ = session_kill.closed() => return Some(session_kill.why()),
            _ = &mut client.driver => {
                // The agent redials both connections when either breaks.
                hub.kill_session(session, reverse_closed());
                return None;
            }
            _ = tokio::time::sleep(PING_INTERVAL) => {
                match tokio::time::timeout(PING_TIMEOUT, client.ping.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!("ping of endpoint {endpoint} failed: {e}");
                        hub.kill_session(session, reverse_closed());
                        return None;
                    }
                    Err(_) => {
                        tracing::info!(
                            "endpoint {endpoint} did not answer pings for {PING_TIMEOUT:?}; \
                             closing its session"
                        );
                        let why = Goodbye::new(Reason::NO_ERROR, closer::text::PINGS_UNANSWERED);
                        hub.kill_session(session, why.clone());
                        return Some(why);
                    }
                }
            }
        }
    }
}
