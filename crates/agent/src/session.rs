//! The agent's session with one hub: dial the control and reverse connections, register,
//! heartbeat, publish, serve what the hub sends over the reverse connection, and reconnect with
//! backoff on any failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, StatusCode};
use tokio::net::TcpStream;
use tower::ServiceExt;
use tracing::Instrument;
use ztm_net::backoff::Backoff;
use ztm_net::goaway::{self, Farewell, Goaway, Goodbye, Role};
use ztm_net::h2io::{self, read_body, respond, respond_error, respond_json};
use ztm_net::lines::{self, LineReader};
use ztm_net::now_ms;
use ztm_net::on_demand;
use ztm_net::on_demand::Prefixed;
use ztm_pki::rustls::pki_types::ServerName;
use ztm_pki::rustls::ClientConfig;
use ztm_pki::{ALPN_CONTROL_ON_DEMAND, ALPN_REVERSE_ON_DEMAND};
use ztm_proto::model::{TimedMessage, CERTIFICATE_REVOKED};
use ztm_proto::wire::{
    rtt_due, ControlLine, Hello, LineAnswer, Register, Registered, ServiceDecl, BACKOFF_MAX,
    BACKOFF_MIN, HANDSHAKE_TIMEOUT, HEARTBEAT_INTERVAL, MAX_MANAGE_BODY, PROTOCOL_HEADER,
    PROTOCOL_VERSION, REQUEST_TIMEOUT, REVERSE_IDLE_TEXT, TUNNEL_PROTOCOL, USER_HEADER,
};
use ztm_tls::TlsStream;

use crate::admission;
use crate::mesh::{HubLink, Mesh};

/// Aborts a task when dropped, so no connection outlives its session.
type AbortOnDrop = tokio_util::task::AbortOnDropHandle<()>;

fn spawn_owned(task: impl std::future::Future<Output = ()> + Send + 'static) -> AbortOnDrop {
    AbortOnDrop::new(tokio::spawn(task))
}

/// Marks a request that a hub forwarded from another endpoint (with the user it came from): no
/// HTTP client can set it.
#[derive(Clone, Debug)]
pub struct Forwarded {
    pub user: String,
}

/// A failure of a link that a program must tell apart from others, with its words.
#[derive(Debug)]
struct Failure {
    words: String,
    reason: Option<&'static str>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.words)
    }
}

impl std::error::Error for Failure {}

pub async fn run_link(rt: Arc<Mesh>, link: Arc<HubLink>) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut last_error: Option<String> = None;
    loop {
        let result = connect_once(&rt, &link, &mut backoff, &mut last_error).await;
        {
            let mut state = link.state();
            state.control = None;
            state.rtt = None;
        }
        if rt.stopping().is_cancelled() {
            return;
        }
        let (message, reason) = match result {
            Ok(()) => (format!("disconnected from hub {}", link.addr), None),
            Err(e) => (
                format!("hub {}: {e:#}", link.addr),
                e.chain()
                    .find_map(|c| c.downcast_ref::<Failure>())
                    .and_then(|f| f.reason),
            ),
        };
        link.state().error = Some(TimedMessage {
            reason: reason.map(str::to_string),
            ..TimedMessage::new(now_ms(), message.clone())
        });
        if last_error.as_deref() != Some(message.as_str()) {
            rt.event("error", &message);
            last_error = Some(message);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = rt.stopping().cancelled() => return,
        }
    }
}

fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Words for a TLS failure a person can act on, by what rustls or the peer's alert said (a hub
/// refuses a certificate of ours only after the TLS 1.3 handshake, with an alert the first read
/// gets).
fn describe(e: &std::io::Error) -> Failure {
    match ztm_tls::tls_failure(e) {
        Some(tls) => describe_tls(tls),
        None => Failure {
            words: e.to_string(),
            reason: None,
        },
    }
}

fn describe_tls(tls: &ztm_pki::rustls::Error) -> Failure {
    use ztm_pki::rustls::{AlertDescription as Alert, CertificateError as Cert, Error as Tls};
    let words = |w: &str| Failure {
        words: w.to_string(),
        reason: None,
    };
    match tls {
        Tls::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
            words("the hub's certificate is not from this mesh's CA (wrong CA certificate?)")
        }
        Tls::InvalidCertificate(Cert::Revoked) => {
            words("the hub's certificate has been revoked by the mesh CA (it is in the mesh's CRL)")
        }
        Tls::InvalidCertificate(Cert::ApplicationVerificationFailure) => {
            words("the server is not a hub of this mesh (its certificate is not a hub certificate)")
        }
        Tls::AlertReceived(Alert::CertificateRevoked) => Failure {
            words: "the hub refused our certificate: it has been revoked".into(),
            reason: Some(CERTIFICATE_REVOKED),
        },
        Tls::AlertReceived(
            Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::DecryptError
            | Alert::CertificateUnknown,
        ) => words("the hub refused our certificate (not issued by the hub's CA, or revoked)"),
        other => words(&other.to_string()),
    }
}

/// Words for a failed request on a connection whose TLS stream's end is told by `tls`: that
/// failure if TLS ended it (HTTP/2 passes read errors on without their type), else the error's
/// own words.
fn describe_any(e: &anyhow::Error, tls: &ztm_tls::Failure) -> anyhow::Error {
    if let Some(failure) = tls.get() {
        return describe_tls(failure).into();
    }
    for cause in e.chain() {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return describe(io).into();
        }
    }
    anyhow!("{e:#}")
}

fn describe_h2(e: &h2::Error) -> Failure {
    match e.get_io() {
        Some(io) => describe(io),
        None => Failure {
            words: e.to_string(),
            reason: None,
        },
    }
}

async fn dial(addr: &str, config: Arc<ClientConfig>) -> Result<TlsStream> {
    let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connecting timed out"))?
        .map_err(|e| anyhow!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let _ = on_demand::keepalive(&tcp);
    let name = ServerName::try_from(host_of(addr).to_string())
        .or_else(|_| ServerName::try_from("ztm-hub".to_string()))
        .map_err(|e| anyhow!("bad hub address: {e}"))?;
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, ztm_tls::connect(config, name, tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))?
        .map_err(|e| describe(&e))?;
    Ok(tls)
}

/// The control connection: lines until HTTP/2 is needed (PROTOCOL.md, "Control connection on
/// demand"), or HTTP/2 from the start where the hub does not know lines.
enum Io {
    Lines {
        stream: Box<TlsStream>,
        reader: LineReader,
    },
    H2 {
        sender: h2::client::SendRequest<Bytes>,
        pings: h2::PingPong,
        driver: AbortOnDrop,
        _crl: AbortOnDrop,
    },
    /// Between the two, for a moment.
    Switching,
}

/// Starts the control connection's HTTP/2 on `stream`: its client, PING handle and the task
/// that drives it.
async fn start_h2(
    stream: Prefixed<TlsStream>,
    bye: Farewell,
) -> Result<(h2::client::SendRequest<Bytes>, h2::PingPong, AbortOnDrop)> {
    let stream = goaway::wrap_with(stream, Role::Client, bye);
    let (sender, mut conn) = ztm_net::h2io::client_builder()
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(|e| describe_h2(&e))?;
    let pings = conn
        .ping_pong()
        .ok_or_else(|| anyhow!("no PING handle on the control connection"))?;
    let driver = spawn_owned(async move {
        let _ = conn.await;
    });
    Ok((sender, pings, driver))
}

/// One request line and the hub's answer, within [`REQUEST_TIMEOUT`]. An answer that closes
/// the connection is an error with the hub's words.
async fn ask(
    stream: &mut TlsStream,
    reader: &mut LineReader,
    request: &ControlLine,
    max: usize,
) -> Result<LineAnswer> {
    Ok(lines::ask(stream, reader, request, max).await?)
}

/// Resolves when the control connection ends (or, carrying lines, the hub says it closes it):
/// why.
async fn ended(io: &mut Io) -> anyhow::Error {
    match io {
        Io::H2 { driver, .. } => {
            let _ = (&mut *driver).await;
            anyhow!("the connection to the hub closed")
        }
        Io::Lines { stream, reader } => loop {
            match reader.next(MAX_CRL_LINE) {
                Some(lines::Next::Line(line)) => {
                    match serde_json::from_slice::<LineAnswer>(&line) {
                        Ok(a) if a.closing => return lines::AskError::closed(&a).into(),
                        // Nothing else comes unasked.
                        _ => return anyhow!("the hub sent a line nobody asked for"),
                    }
                }
                Some(_) => return anyhow!("the hub sent something that is not a line"),
                None => {}
            }
            match reader.fill(stream).await {
                Ok(0) | Err(_) => return anyhow!("the connection to the hub closed"),
                Ok(_) => {}
            }
        },
        Io::Switching => std::future::pending().await,
    }
}

/// Asks for a CRL newer than the one held over lines, and offers what comes.
async fn crl_by_line(
    rt: &Mesh,
    stream: &mut TlsStream,
    reader: &mut LineReader,
    from: &str,
) -> Result<()> {
    let request = ControlLine::Crl {
        after: rt.crl().number(),
    };
    let answer = ask(stream, reader, &request, MAX_CRL_LINE).await?;
    if let Some(pem) = answer.crl.filter(|_| answer.status == 200) {
        if let Err(e) = offer_crl(rt, &pem, from) {
            rt.event(
                "error",
                &format!("hub {from} sent a CRL that is not the mesh CA's: {e}"),
            );
        }
    }
    Ok(())
}

async fn connect_once(
    rt: &Arc<Mesh>,
    link: &Arc<HubLink>,
    backoff: &mut Backoff,
    last_error: &mut Option<String>,
) -> Result<()> {
    let Some(tls) = rt.tls() else {
        bail!("no usable TLS configuration");
    };
    let mut stream = dial(&link.addr, tls.control.clone()).await?;
    let control_tls = stream.failure();
    // Which hub certificate this link uses: a CRL that lists it closes the link.
    let hub_cert = stream
        .peer_certificates()
        .first()
        .and_then(|c| ztm_pki::cert_info(c.as_ref()).ok());
    let mut control_bye = Farewell::default();
    let hub_lines = stream.alpn_protocol() == Some(ALPN_CONTROL_ON_DEMAND);
    let (started_tx, started_rx) = tokio::sync::watch::channel(None);
    let start = Arc::new(tokio::sync::Notify::new());
    let mut services_rx = rt.published();
    let services = services_rx.borrow_and_update().clone();
    let (mut io, registered) = if hub_lines {
        let mut reader = LineReader::new();
        let register = ControlLine::Register {
            id: rt.id().to_string(),
            protocol: PROTOCOL_VERSION.to_string(),
            name: rt.agent_name().to_string(),
            services,
            nonce: Some(rt.record().id_nonce.clone()),
        };
        let answer = ask(&mut stream, &mut reader, &register, 64 * 1024)
            .await
            .map_err(|e| describe_any(&e, &control_tls))?;
        if answer.status != 200 {
            bail!(
                "the hub refused to register this endpoint: {}",
                answer.message.unwrap_or_else(|| answer.status.to_string())
            );
        }
        check_version(answer.protocol.as_deref())?;
        let registered = Registered {
            session: answer.session.unwrap_or_default(),
            hub: answer.hub.unwrap_or_default(),
        };
        let stream = Box::new(stream);
        (Io::Lines { stream, reader }, registered)
    } else {
        let (sender, pings, driver) =
            start_h2(Prefixed::new(Bytes::new(), stream), control_bye.clone()).await?;
        let register = Register {
            name: rt.agent_name().to_string(),
            services,
            nonce: Some(rt.record().id_nonce.clone()),
        };
        let req = h2io::build(Method::POST, &format!("/api/endpoints/{}", rt.id()))?
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .body(())?;
        let answer = h2io::request(
            &sender,
            req,
            serde_json::to_vec(&register)?.into(),
            64 * 1024,
            REQUEST_TIMEOUT,
        )
        .await
        .map_err(|e| describe_any(&e, &control_tls))?;
        if answer.status != StatusCode::OK {
            bail!(
                "the hub refused to register this endpoint: {}",
                answer.error_message()
            );
        }
        check_version(
            answer
                .headers
                .get(PROTOCOL_HEADER)
                .and_then(|v| v.to_str().ok()),
        )?;
        let registered: Registered = answer.json()?;
        started_tx.send_replace(Some(sender.clone()));
        let crl = spawn_owned(follow_crl(rt.clone(), link.addr.clone(), sender.clone()));
        let io = Io::H2 {
            sender,
            pings,
            driver,
            _crl: crl,
        };
        (io, registered)
    };

    let (mut reverse_task, mut reverse_bye) =
        open_reverse(rt, &link.addr, tls.reverse.clone(), &registered.session).await?;
    let mut crl_rx = rt.crl().subscribe();
    // Checked at once too: a CRL may have come (through another hub) since the handshake.
    crl_rx.mark_changed();
    let mut crl_open = true;

    // Connected with its round-trip time known: whoever sees the link up sees that too.
    let rtt = match &mut io {
        Io::H2 { pings, .. } => round_trip(pings).await?,
        Io::Lines { stream, reader } => {
            // Carrying lines, the CRL is asked for now and whenever a heartbeat's answer
            // names a newer one; the exchange is timed.
            let started = Instant::now();
            crl_by_line(rt, stream, reader, &link.addr).await?;
            started.elapsed()
        }
        Io::Switching => bail!("the control connection is not ready"),
    };
    let control = crate::mesh::Control::new(started_rx, start.clone(), &link.addr);
    {
        let mut state = link.state();
        state.control = Some(control.clone());
        state.error = None;
        state.rtt = Some(rtt);
    }
    backoff.reset();
    *last_error = None;
    rt.event(
        "info",
        &format!("connected to hub {} ({})", link.addr, registered.hub),
    );

    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut beats: u32 = 0;
    let heartbeat_path = format!("/api/endpoints/{}/heartbeat", rt.id());
    let outcome = loop {
        let lines = matches!(io, Io::Lines { .. });
        tokio::select! {
            _ = rt.stopping().cancelled() => break Ok(()),
            why = ended(&mut io) => break Err(why),
            _ = &mut reverse_task => {
                // The hub sends an unused reverse connection back to dormant: a new one for
                // the same session, which goes on.
                let idle = reverse_bye.heard().is_some_and(|b| b.text == REVERSE_IDLE_TEXT);
                if !idle {
                    break Err(anyhow!("the reverse connection to the hub closed"));
                }
                // Heartbeats wait meanwhile: bounded well inside the hub's heartbeat timeout.
                let again = open_reverse(rt, &link.addr, tls.reverse.clone(), &registered.session);
                match tokio::time::timeout(REQUEST_TIMEOUT, again).await {
                    Ok(Ok((task, bye))) => (reverse_task, reverse_bye) = (task, bye),
                    Ok(Err(e)) => break Err(e.context("dialling the reverse connection again")),
                    Err(_) => break Err(anyhow!(
                        "dialling the reverse connection again took over {REQUEST_TIMEOUT:?}"
                    )),
                }
            }
            _ = start.notified(), if lines => {
                // Something needs HTTP/2: the agent starts it, and the connection carries no
                // more lines.
                let Io::Lines { stream, reader } = std::mem::replace(&mut io, Io::Switching) else {
                    continue;
                };
                let stream = Prefixed::new(reader.into_rest(), *stream);
                let (sender, pings, driver) = match start_h2(stream, control_bye.clone()).await {
                    Ok(h2) => h2,
                    Err(e) => break Err(e.context("starting HTTP/2 on the control connection")),
                };
                started_tx.send_replace(Some(sender.clone()));
                let crl = spawn_owned(follow_crl(rt.clone(), link.addr.clone(), sender.clone()));
                io = Io::H2 { sender, pings, driver, _crl: crl };
            }
            changed = crl_rx.changed(), if crl_open => {
                if changed.is_err() {
                    crl_open = false;
                    continue;
                }
                crl_rx.borrow_and_update();
                if let Some(cert) = hub_cert.as_ref().filter(|c| rt.crl().revokes(&c.serial)) {
                    break Err(anyhow!(
                        "{}'s certificate has been revoked by the mesh CA (serial {}); link closed",
                        cert.common_name,
                        cert.serial
                    ));
                }
            }
            _ = tick.tick() => {
                beats += 1;
                let (last, open) = control.use_of();
                let h2 = matches!(io, Io::H2 { .. });
                if h2 && hub_lines && control_idle_due(now_ms(), last, open, rt.control_idle()) {
                    let token = &registered.session;
                    let again = back_to_lines(rt, &link.addr, tls.control.clone(), token, &control, last, &started_tx);
                    match again.await {
                        Ok(Some(lines)) => {
                            io = lines;
                            control_bye = Farewell::default();
                            tracing::debug!("hub {}: control connection unused, carrying lines again", link.addr);
                        }
                        Ok(None) => {}
                        Err(e) => tracing::debug!("hub {}: staying on HTTP/2: {e:#}", link.addr),
                    }
                }
                if let Err(e) = heartbeat(rt, link, &mut io, &heartbeat_path, beats).await {
                    break Err(e);
                }
            }
            changed = services_rx.changed() => {
                if changed.is_err() {
                    break Ok(());
                }
                let list = services_rx.borrow_and_update().clone();
                if let Err(e) = publish(rt, &mut io, list).await {
                    break Err(anyhow!("publishing services failed: {e:#}"));
                }
            }
        }
    };
    // What the hub said when it closed a connection explains the end best.
    outcome.map_err(|e| said_by_hub(&control_bye, &reverse_bye).unwrap_or(e))
}

/// Whether a control connection that started HTTP/2 goes back to carrying lines: no request
/// asked for it in `idle` (`None`: never) and no tunnel is open on it.
fn control_idle_due(now: u64, last_used: u64, tunnels_open: usize, idle: Option<Duration>) -> bool {
    let Some(idle) = idle else {
        return false;
    };
    tunnels_open == 0 && now.saturating_sub(last_used) >= idle.as_millis() as u64
}

/// Takes the link's control connection back to lines: a new connection that carries them, to
/// which the hub moves the session (PROTOCOL.md, "Control connection on demand"), closing the
/// old one. `None` if a request came meanwhile (it keeps HTTP/2); on failure HTTP/2 goes on.
async fn back_to_lines(
    rt: &Mesh,
    hub: &str,
    config: Arc<ClientConfig>,
    token: &str,
    control: &crate::mesh::Control,
    idle_since: u64,
    started: &tokio::sync::watch::Sender<Option<h2::client::SendRequest<Bytes>>>,
) -> Result<Option<Io>> {
    // Requests from now on wait for HTTP/2 to start on the new connection; one that came
    // since the decision keeps this one.
    let sender = started.send_replace(None);
    if control.use_of() != (idle_since, 0) {
        started.send_replace(sender);
        return Ok(None);
    }
    let moved = async {
        let mut stream = dial(hub, config).await?;
        if stream.alpn_protocol() != Some(ALPN_CONTROL_ON_DEMAND) {
            bail!("the hub no longer carries lines");
        }
        let mut reader = LineReader::new();
        let resume = ControlLine::Resume {
            id: rt.id().to_string(),
            session: token.to_string(),
        };
        let answer = ask(&mut stream, &mut reader, &resume, 64 * 1024).await?;
        if answer.status != 200 {
            bail!("the hub did not move the session: {}", answer.words());
        }
        Ok(Io::Lines {
            stream: Box::new(stream),
            reader,
        })
    };
    match moved.await {
        Ok(io) => Ok(Some(io)),
        Err(e) => {
            started.send_replace(sender);
            Err(e)
        }
    }
}

/// One heartbeat on the control connection (PROTOCOL.md, "Control connection"), and the
/// round trip measured with it.
async fn heartbeat(rt: &Mesh, link: &HubLink, io: &mut Io, path: &str, beats: u32) -> Result<()> {
    match io {
        Io::H2 { sender, pings, .. } => {
            let req = h2io::build(Method::POST, path)?.body(())?;
            match h2io::request(sender, req, Bytes::new(), 64 * 1024, REQUEST_TIMEOUT).await {
                Ok(a) if a.status.is_success() => {}
                Ok(a) => bail!("the hub dropped our session ({})", a.error_message()),
                Err(e) => bail!("heartbeat failed: {e:#}"),
            }
            if rtt_due(beats) {
                link.state().rtt = Some(round_trip(pings).await?);
            }
        }
        Io::Lines { stream, reader } => {
            let started = Instant::now();
            let request = ControlLine::Heartbeat {
                id: rt.id().to_string(),
            };
            let answer = ask(stream, reader, &request, 64 * 1024)
                .await
                .map_err(|e| e.context("heartbeat failed"))?;
            if !answer.is_success() {
                bail!("the hub dropped our session ({})", answer.words());
            }
            link.state().rtt = Some(started.elapsed());
            if answer.crl_number > rt.crl().number() {
                crl_by_line(rt, stream, reader, &link.addr).await?;
            }
        }
        Io::Switching => {}
    }
    Ok(())
}

/// Publishes the service list on the control connection.
async fn publish(rt: &Mesh, io: &mut Io, services: Vec<ServiceDecl>) -> Result<()> {
    match io {
        Io::H2 { sender, .. } => {
            let req = h2io::build(
                Method::POST,
                &format!("/api/endpoints/{}/services", rt.id()),
            )?
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(())?;
            let body = serde_json::to_vec(&services)?.into();
            let a = h2io::request(sender, req, body, 64 * 1024, REQUEST_TIMEOUT).await?;
            if !a.status.is_success() {
                bail!("{}", a.error_message());
            }
        }
        Io::Lines { stream, reader } => {
            let request = ControlLine::Publish {
                id: rt.id().to_string(),
                services,
            };
            let answer = ask(stream, reader, &request, 64 * 1024).await?;
            if !answer.is_success() {
                bail!("{}", answer.words());
            }
        }
        Io::Switching => {}
    }
    Ok(())
}

/// Dials the reverse connection of session `token` to hub `hub` and serves it in a task: the
/// task, and what the hub says when it closes the connection. Where the hub starts it on
/// demand (PROTOCOL.md, "Reverse connection"), it is bound by a hello line and the HTTP/2
/// server starts when the hub's first bytes come.
async fn open_reverse(
    rt: &Arc<Mesh>,
    hub: &str,
    config: Arc<ClientConfig>,
    token: &str,
) -> Result<(AbortOnDrop, Farewell)> {
    let mut reverse_stream = dial(hub, config).await?;
    let reverse_bye = Farewell::default();
    let task = if reverse_stream.alpn_protocol() == Some(ALPN_REVERSE_ON_DEMAND) {
        let hello = Hello {
            endpoint: rt.id().to_string(),
            session: token.to_string(),
        };
        on_demand::say_hello(&mut reverse_stream, &hello).await?;
        let (rt, hub, bye, token) = (
            rt.clone(),
            hub.to_string(),
            reverse_bye.clone(),
            token.to_string(),
        );
        spawn_owned(async move {
            let Some(stream) = on_demand::await_first_bytes(reverse_stream).await else {
                return;
            };
            let stream = goaway::wrap_with(stream, Role::Server, bye);
            let reverse = ztm_net::h2io::server_builder()
                .handshake::<_, Bytes>(stream)
                .await;
            match reverse {
                Ok(reverse) => serve_reverse(rt, hub, reverse, token).await,
                Err(e) => tracing::debug!("reverse connection to {hub}: {}", describe_h2(&e)),
            }
        })
    } else {
        let reverse_stream = goaway::wrap_with(reverse_stream, Role::Server, reverse_bye.clone());
        let reverse = ztm_net::h2io::server_builder()
            .handshake::<_, Bytes>(reverse_stream)
            .await;
        let reverse = reverse
            .map_err(|e| anyhow::Error::from(describe_h2(&e)).context("reverse connection"))?;
        spawn_owned(serve_reverse(
            rt.clone(),
            hub.to_string(),
            reverse,
            token.to_string(),
        ))
    };
    Ok((task, reverse_bye))
}

/// Sends an HTTP/2 PING on the control connection and times its acknowledgement: the link's
/// round-trip time (PROTOCOL.md, "Control connection"). A hub that does not answer within
/// [`REQUEST_TIMEOUT`] is as gone as one that does not answer a heartbeat.
async fn round_trip(pings: &mut h2::PingPong) -> Result<Duration> {
    let started = Instant::now();
    tokio::time::timeout(REQUEST_TIMEOUT, pings.ping(h2::Ping::opaque()))
        .await
        .map_err(|_| anyhow!("the hub did not answer a PING within {REQUEST_TIMEOUT:?}"))?
        .map_err(|e| anyhow!("PING failed: {e}"))?;
    Ok(started.elapsed())
}

/// The version of the wire protocol a hub's registration answer names must be ours (a hub
/// from before versions names none, and speaks version 1).
fn check_version(named: Option<&str>) -> Result<()> {
    let Some(v) = named else {
        return Ok(());
    };
    if v != PROTOCOL_VERSION.to_string() {
        bail!(
            "the hub answered in version {v:?} of the ztm protocol; this agent speaks version \
             {PROTOCOL_VERSION}"
        );
    }
    Ok(())
}

/// What the hub said in the GOAWAY it closed a connection with, if it closed one: in words.
fn said_by_hub(control: &Farewell, reverse: &Farewell) -> Option<anyhow::Error> {
    let (which, bye) = match (control.heard(), reverse.heard()) {
        (Some(bye), _) => ("connection", bye),
        (None, Some(bye)) => ("reverse connection", bye),
        (None, None) => return None,
    };
    Some(anyhow!(
        "the hub closed the {which}: {}",
        goodbye_words(&bye)
    ))
}

/// A GOAWAY's text, or its code in words if it has none.
fn goodbye_words(bye: &Goodbye) -> String {
    if bye.text.is_empty() {
        format!("{} ({:?})", bye.code.description(), bye.code)
    } else if bye.code == h2::Reason::NO_ERROR {
        bye.text.clone()
    } else {
        bye.to_string()
    }
}

/// Serves what hub `hub` sends over the reverse connection.
async fn serve_reverse<S>(
    rt: Arc<Mesh>,
    hub: String,
    mut conn: h2::server::Connection<Goaway<S>, Bytes>,
    token: String,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let token = Arc::new(token);
    let hub: Arc<str> = hub.into();
    while let Some(next) = conn.accept().await {
        let Ok((req, send)) = next else { break };
        let rt = rt.clone();
        let token = token.clone();
        let hub = hub.clone();
        tokio::spawn(async move { handle_reverse(rt, &hub, &token, req, send).await });
    }
}

async fn handle_reverse(
    rt: Arc<Mesh>,
    hub: &str,
    token: &str,
    req: Request<RecvStream>,
    send: SendResponse<Bytes>,
) {
    let path = req.uri().path().to_string();
    if req.method() == Method::GET && path == "/api/hello" {
        return respond_json(
            send,
            StatusCode::OK,
            &Hello {
                endpoint: rt.id().to_string(),
                session: token.to_string(),
            },
        );
    }
    if req.method() == Method::CONNECT {
        let tunnel = req
            .extensions()
            .get::<h2::ext::Protocol>()
            .is_some_and(|p| p.as_str() == TUNNEL_PROTOCOL);
        if !tunnel {
            return respond_error(
                send,
                StatusCode::BAD_REQUEST,
                format!("expected :protocol {TUNNEL_PROTOCOL} (extended CONNECT, RFC 8441)"),
            );
        }
        let span = tracing::info_span!("tunnel", hub = %hub, path = %path);
        return crate::tunnel::accept(rt, hub, req, send)
            .instrument(span)
            .await;
    }
    forwarded(rt, hub, req, send).await
}

/// What of an endpoint's API other endpoints may reach through a hub (PROTOCOL.md, "Reverse
/// connection"): its services, its ports, and (read only: the routes allow no more) its hubs.
const FORWARDED_APIS: [&str; 3] = ["services", "ports", "hubs"];

/// Answers a management request hub `hub` forwarded from another endpoint by running it
/// through this agent's own REST API, scoped to this endpoint, if the user it names may
/// manage this endpoint (checked here again: see [`crate::admission`]).
async fn forwarded(rt: Arc<Mesh>, hub: &str, req: Request<RecvStream>, send: SendResponse<Bytes>) {
    let user = match admission::user(req.headers().get(USER_HEADER).map(|v| v.as_bytes())) {
        Ok(u) => u.to_string(),
        Err(refusal) => return respond_error(send, refusal.status(), refusal.to_string()),
    };
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let rest = pq.strip_prefix("/api/").unwrap_or("");
    if let Err(refusal) = admission::manage(&user, rt.username()) {
        let what: String = format!("{} {rest}", req.method())
            .chars()
            .take(200)
            .collect();
        rt.refused(
            hub,
            &format!(
                "refused management by user {user}, who may not manage this endpoint ({what})"
            ),
        );
        return respond_error(send, refusal.status(), refusal.to_string());
    }
    if !FORWARDED_APIS.iter().any(|api| rest.starts_with(api)) {
        return respond_error(send, StatusCode::NOT_FOUND, "no such management API");
    }
    let uri = format!("/api/meshes/{}/endpoints/{}/{rest}", rt.name(), rt.id());
    let method = req.method().clone();
    let content_type = req.headers().get(http::header::CONTENT_TYPE).cloned();
    let mut body = req.into_body();
    let body = match read_body(&mut body, MAX_MANAGE_BODY).await {
        Ok(b) => b,
        Err(e) => return respond_error(send, StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
    };
    let mut builder = Request::builder()
        .method(method.clone())
        .uri(uri)
        .header(http::header::HOST, "127.0.0.1");
    if let Some(ct) = content_type {
        builder = builder.header(http::header::CONTENT_TYPE, ct);
    }
    let Ok(mut local) = builder.body(axum::body::Body::from(body)) else {
        return respond_error(send, StatusCode::BAD_REQUEST, "bad forwarded request");
    };
    local
        .extensions_mut()
        .insert(Forwarded { user: user.clone() });
    let Ok(resp) = rt.router().clone().oneshot(local).await;
    let (parts, body) = resp.into_parts();
    let ct = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match axum::body::to_bytes(body, MAX_MANAGE_BODY).await {
        Ok(bytes) => {
            if method != Method::GET && parts.status.is_success() {
                rt.event("info", &format!("user {user} (remote): {method} {rest}"));
            }
            respond(send, parts.status, ct.as_deref(), bytes)
        }
        Err(e) => respond_error(send, StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Each hub link asks for the CRL at least this often.
pub const CRL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// A hub answers `GET /api/crl?after=N` within 50 s; this is how long the agent waits.
const CRL_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(70);
/// Largest CRL read (about 40 bytes per revoked certificate).
const MAX_CRL: usize = 16 << 20;
/// Largest line read on a control connection: a CRL, in JSON.
const MAX_CRL_LINE: usize = 2 * MAX_CRL;

/// Offers a CRL that hub `from` sent: kept, and stored, if the mesh's CA signed it and it is
/// newer than the one held. Whether it was kept.
fn offer_crl(rt: &Mesh, pem: &str, from: &str) -> Result<bool, ztm_pki::PkiError> {
    let crl = ztm_pki::parse_crl(&rt.record().ca, pem)?;
    let (number, len, pem) = (crl.number, crl.len(), crl.pem());
    if !rt.crl().offer(crl) {
        return Ok(false);
    }
    tracing::info!(
        "mesh {}: CRL number {number} from hub {from} ({len} revoked certificates)",
        rt.name()
    );
    if let Err(e) = rt.store().put_crl(rt.name(), number, &pem) {
        tracing::error!("mesh {}: cannot store the CRL: {e}", rt.name());
    }
    Ok(true)
}

/// Follows the CRL on one hub link (its control connection `sender`) until the link ends.
async fn follow_crl(rt: Arc<Mesh>, from: String, sender: h2::client::SendRequest<Bytes>) {
    let mut told_bad = false;
    loop {
        let started = std::time::Instant::now();
        let path = match rt.crl().number() {
            Some(n) => format!("/api/crl?after={n}"),
            None => "/api/crl".to_string(),
        };
        let Ok(req) = h2io::build(Method::GET, &path).and_then(|b| Ok(b.body(())?)) else {
            return;
        };
        let mut newer = false;
        match h2io::request(&sender, req, Bytes::new(), MAX_CRL, CRL_REQUEST_TIMEOUT).await {
            Ok(a) if a.status == StatusCode::OK => {
                match offer_crl(&rt, &String::from_utf8_lossy(&a.body), &from) {
                    Ok(kept) => newer = kept,
                    Err(e) if !told_bad => {
                        told_bad = true;
                        rt.event(
                            "error",
                            &format!("hub {from} sent a CRL that is not the mesh CA's: {e}"),
                        );
                    }
                    Err(_) => {}
                }
            }
            // Nothing newer (204), or the hub has none yet: ask again later.
            Ok(_) => {}
            // The connection is gone; the link notices and dials again.
            Err(e) => {
                tracing::debug!("mesh {}: CRL from hub {from}: {e:#}", rt.name());
                if sender.clone().ready().await.is_err() {
                    return;
                }
            }
        }
        // A long wait that ended without news, or a newer CRL: ask again at once. An answer
        // that came back quickly without one: not before a minute has passed.
        let waited = started.elapsed();
        if !newer && waited < CRL_INTERVAL / 2 {
            tokio::time::sleep(CRL_INTERVAL - waited).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unused_control_connection_goes_back_to_lines() {
        let idle = Some(Duration::from_secs(300));
        let cases = [
            // now (s), last used (s), tunnels open, idle, due
            (1_000, 700, 0, idle, true),
            (1_000, 701, 0, idle, false),
            (1_000, 0, 1, idle, false),
            (1_000, 0, 0, None, false),
            (100, 200, 0, idle, false),
        ];
        for (now, last, open, idle, due) in cases {
            assert_eq!(
                control_idle_due(now * 1000, last * 1000, open, idle),
                due,
                "now {now}, last {last}, open {open}, idle {idle:?}"
            );
        }
    }
}
