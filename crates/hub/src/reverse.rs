//! The reverse connection (hub = HTTP/2 client, agent = server): bound to a registered
//! session, then used to open streams to the agent and pinged for liveness. Every way it ends
//! is said to the agent in a GOAWAY (PROTOCOL.md, "Closing connections").
//!
//! Two kinds (PROTOCOL.md, "Reverse connection"): one bound by `GET /api/hello` over HTTP/2
//! started at once (ALPN `ztm-reverse`), and one bound by the agent's hello line and then
//! dormant — no HTTP/2 state, buffers or pings, only TCP keepalive — until a request for the
//! endpoint first needs it (ALPN `ztm-reverse-on-demand`). Most endpoints of a large mesh are
//! never asked for anything, and their reverse connections cost the hub little.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::Reason;
use http::{Method, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;
use ztm_net::goaway::{self, Farewell, Role};
use ztm_net::h2io;
use ztm_net::now_ms;
use ztm_net::on_demand;
use ztm_proto::wire::{
    Hello, ReverseAnswer, PING_INTERVAL, PING_TIMEOUT, REQUEST_TIMEOUT, REVERSE_IDLE_TEXT,
};

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
    finish(client, goodbye, &peer).await;
    Ok(())
}

/// Ends a started reverse connection: with a GOAWAY saying `goodbye`, or at once when the
/// agent closed it.
async fn finish(client: Client, goodbye: Option<Goodbye>, peer: &Peer) {
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
}

/// Closes a reverse connection the hub does not admit, saying why.
pub async fn refuse(tls: Tls, refusal: Refusal) {
    if let Ok(Ok(client)) = tokio::time::timeout(FAREWELL_TIMEOUT, Client::start(tls)).await {
        client.close(closer::refused(&refusal)).await;
    }
}

/// Closes a reverse connection started on demand that the hub does not admit: its hello line
/// is read (closing with it unread could reset the connection before the agent reads the
/// answer), then answered with why.
pub async fn refuse_on_demand(mut tls: Tls, refusal: Refusal) {
    let _ = tokio::time::timeout(
        FAREWELL_TIMEOUT,
        on_demand::read_line::<_, serde_json::Value>(&mut tls),
    )
    .await;
    say_refused(&mut tls, &closer::refused(&refusal)).await;
}

/// Answers a hello line with a refusal and closes the connection.
async fn say_refused(tls: &mut Tls, goodbye: &Goodbye) {
    on_demand::last_line(tls, &closer::answer(goodbye), FAREWELL_TIMEOUT).await;
}

/// Serves a reverse connection started on demand: checks the agent's hello line, binds the
/// connection dormant, and starts HTTP/2 on it when a request first needs it; from then on it
/// is watched as any reverse connection is.
pub async fn serve_on_demand(
    hub: Arc<Hub>,
    mut tls: Tls,
    peer: Peer,
    kill: Closer,
) -> anyhow::Result<()> {
    let _open = hub.metrics.connection(crate::metrics::Kind::Reverse);
    let hello = tokio::select! {
        hello = Box::pin(hello_line(&hub, &mut tls, &peer)) => hello,
        _ = kill.closed() => Err(kill.why()),
    };
    let (endpoint, session) = match hello {
        Ok(bound) => bound,
        Err(goodbye) => {
            log_refused(&peer, &goodbye);
            say_refused(&mut tls, &goodbye).await;
            return Ok(());
        }
    };
    let wake = Arc::new(Notify::new());
    let Some(session_kill) = hub.bind_dormant(session, wake.clone()) else {
        say_refused(&mut tls, &closer::session_ended()).await;
        return Ok(());
    };
    tracing::debug!("reverse connection of endpoint {endpoint} bound, dormant");
    let woken = Box::pin(dormant(
        &hub,
        &mut tls,
        session,
        &wake,
        &session_kill,
        &kill,
    ))
    .await;
    let goodbye = match woken {
        Woken::Gone => {
            gone(&hub, session);
            return Ok(());
        }
        Woken::Close(goodbye) => Some(goodbye),
        Woken::Needed => None,
    };
    // HTTP/2 starts now: to serve the request that woke it, or to say the GOAWAY.
    let mut client = match Box::pin(Client::start(tls)).await {
        Ok(client) => client,
        Err(e) => {
            tracing::debug!("starting the reverse connection of endpoint {endpoint}: {e:#}");
            gone(&hub, session);
            return Ok(());
        }
    };
    if let Some(goodbye) = goodbye {
        hub.unbind_reverse(session);
        finish(client, Some(goodbye), &peer).await;
        return Ok(());
    }
    // The agent's SETTINGS come before its answer to a PING: once the PING is answered, the hub
    // knows whether the agent enabled extended CONNECT.
    let answered = tokio::time::timeout(PING_TIMEOUT, client.ping.ping(h2::Ping::opaque())).await;
    if !matches!(answered, Ok(Ok(_))) {
        tracing::info!("endpoint {endpoint} did not answer when its reverse connection started");
        hub.unbind_reverse(session);
        let why = Goodbye::new(Reason::NO_ERROR, closer::text::PINGS_UNANSWERED);
        hub.kill_session(session, why.clone());
        finish(client, Some(why), &peer).await;
        return Ok(());
    }
    tracing::debug!("reverse connection of endpoint {endpoint} started");
    let idle = Some(hub.limits.reverse_idle);
    let goodbye = settle(&hub, &mut client, &peer, &kill, &endpoint, session, idle).await;
    finish(client, goodbye, &peer).await;
    Ok(())
}

fn log_refused(peer: &Peer, goodbye: &Goodbye) {
    tracing::info!(
        "refused a reverse connection of user {} from {}: {goodbye}",
        peer.user,
        peer.addr
    );
}

/// The agent's reverse connection closed or broke: the session ends with it.
fn gone(hub: &Hub, session: SessionId) {
    hub.unbind_reverse(session);
    hub.kill_session(session, closer::reverse_closed());
}

/// Reads and checks the hello line of a reverse connection started on demand: the endpoint
/// and session it binds to, or what to refuse it with.
async fn hello_line(hub: &Hub, tls: &mut Tls, peer: &Peer) -> Result<(String, SessionId), Goodbye> {
    let hello: Hello = match tokio::time::timeout(REQUEST_TIMEOUT, on_demand::read_line(tls)).await
    {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => return Err(closer::bad_hello(e)),
        Err(_) => {
            return Err(closer::bad_hello(format!(
                "no hello within {}s",
                REQUEST_TIMEOUT.as_secs()
            )))
        }
    };
    bind_to(hub, peer, hello)
}

/// The session a hello binds its connection to: the one whose token it names, if the
/// certificate is that session's user's and is not revoked.
fn bind_to(hub: &Hub, peer: &Peer, hello: Hello) -> Result<(String, SessionId), Goodbye> {
    if hub.revoked.contains(&peer.serial) {
        return Err(closer::revoked());
    }
    let session = hub
        .session_of_hello(&hello.endpoint, &hello.session, &peer.user)
        .ok_or_else(|| closer::bad_hello("no such session"))?;
    Ok((hello.endpoint, session))
}

/// Whether a started reverse connection goes back to dormant: no tunnel is open on it and no
/// request has asked for it for `idle` (times in ms since the epoch).
fn idle_due(now: u64, last_used: u64, tunnels_open: usize, idle: Duration) -> bool {
    let idle = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    tunnels_open == 0 && now.saturating_sub(last_used) >= idle
}

/// What ended a reverse connection's dormancy.
enum Woken {
    /// A request needs it.
    Needed,
    /// The agent closed it, or it broke.
    Gone,
    /// The hub closes it, saying this.
    Close(Goodbye),
}

/// Says the connection is bound, then waits — holding nothing but the TLS stream — for a
/// request that needs it, for its session or the hub to close it, or for the agent to go.
async fn dormant(
    hub: &Hub,
    tls: &mut Tls,
    session: SessionId,
    wake: &Notify,
    session_kill: &Closer,
    kill: &Closer,
) -> Woken {
    let _dormant = hub.metrics.dormant();
    let said = tokio::time::timeout(
        REQUEST_TIMEOUT,
        on_demand::write_line(tls, &ReverseAnswer::bound()),
    )
    .await;
    if !matches!(said, Ok(Ok(()))) {
        return Woken::Gone;
    }
    let mut byte = [0u8; 1];
    tokio::select! {
        _ = wake.notified() => Woken::Needed,
        _ = kill.closed() => {
            let why = kill.why();
            hub.kill_session(session, why.clone());
            Woken::Close(why)
        }
        _ = session_kill.closed() => Woken::Close(session_kill.why()),
        read = tls.read(&mut byte) => match read {
            Ok(0) | Err(_) => Woken::Gone,
            Ok(_) => {
                let why = Goodbye::new(Reason::PROTOCOL_ERROR, closer::text::SPOKE_WHILE_DORMANT);
                hub.kill_session(session, why.clone());
                Woken::Close(why)
            }
        },
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
                log_refused(peer, &goodbye);
                return Some(goodbye);
            }
        },
        _ = kill.closed() => return Some(kill.why()),
    };
    settle(hub, client, peer, kill, &endpoint, session, None).await
}

/// Checks the settings of a started reverse connection, binds it to `session` and watches it:
/// what to tell the agent when it ends (`None` when the agent closed it).
async fn settle(
    hub: &Hub,
    client: &mut Client,
    peer: &Peer,
    kill: &Closer,
    endpoint: &str,
    session: SessionId,
    idle: Option<Duration>,
) -> Option<Goodbye> {
    // The agent must have enabled extended CONNECT before the hub may send one (RFC 8441 §3);
    // its SETTINGS came before its answer to the hello, or to the first PING.
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
    let goodbye = watch(hub, client, session, (&session_kill, kill), endpoint, idle).await;
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
    bind_to(hub, peer, hello)
}

/// Pings the agent until the connection or its session ends; sends a connection started on
/// demand back to dormant after `idle` without use (`None`: never).
async fn watch(
    hub: &Hub,
    client: &mut Client,
    session: SessionId,
    (session_kill, kill): (&Closer, &Closer),
    endpoint: &str,
    idle: Option<Duration>,
) -> Option<Goodbye> {
    let every = |period: Duration| {
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    };
    let mut ping = every(PING_INTERVAL);
    let mut look = every(idle.map_or(PING_INTERVAL, |i| {
        (i / 2).clamp(Duration::from_millis(100), PING_INTERVAL)
    }));
    loop {
        tokio::select! {
            _ = look.tick(), if idle.is_some() => {
                let Some(idle) = idle else { continue };
                let Some((last, open)) = hub.reverse_use(session) else { continue };
                if !idle_due(now_ms(), last, open, idle) {
                    continue;
                }
                // Unbound first, then looked at again: a request that took the sender before
                // it was unbound said so before it looked (`Hub::reverse_of`).
                hub.unbind_reverse(session);
                if hub.reverse_use(session) == Some((last, 0)) {
                    tracing::debug!(
                        "reverse connection of endpoint {endpoint} unused for {idle:?}: dormant again"
                    );
                    return Some(Goodbye::new(Reason::NO_ERROR, REVERSE_IDLE_TEXT));
                }
                if hub.bind_reverse(session, client.sender.clone()).is_none() {
                    return Some(closer::session_ended());
                }
            }
            _ = kill.closed() => {
                let why = kill.why();
                hub.kill_session(session, why.clone());
                return Some(why);
            }
            _ = session_kill.closed() => return Some(session_kill.why()),
            _ = &mut client.driver => {
                // The agent redials both connections when either breaks.
                hub.kill_session(session, closer::reverse_closed());
                return None;
            }
            _ = ping.tick() => {
                match tokio::time::timeout(PING_TIMEOUT, client.ping.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!("ping of endpoint {endpoint} failed: {e}");
                        hub.kill_session(session, closer::reverse_closed());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unused_started_connection_goes_back_to_dormant() {
        let idle = Duration::from_secs(300);
        let cases = [
            // (now, last used, tunnels open, due)
            (1_000_000, 1_000_000, 0, false),
            (1_299_999, 1_000_000, 0, false),
            (1_300_000, 1_000_000, 0, true),
            (9_000_000, 1_000_000, 0, true),
            // A tunnel open keeps it, however long ago it was asked for.
            (9_000_000, 1_000_000, 1, false),
            // A clock that went back is not idleness.
            (999_000, 1_000_000, 0, false),
        ];
        for (now, last, open, due) in cases {
            assert_eq!(idle_due(now, last, open, idle), due, "{now} {last} {open}");
        }
        // An idle time too long for milliseconds in a u64 never passes.
        assert!(!idle_due(u64::MAX - 1, 0, 0, Duration::MAX));
    }
}
