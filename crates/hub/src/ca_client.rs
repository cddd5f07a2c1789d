//! The hub's view of the CA: who the CA is (the certificate or fingerprint the hub was given),
//! how to reach it (HTTPS, or plain HTTP on loopback only), its certificate at start,
//! revocations and the CRL while running; and the CRL service agents use on the control
//! connection.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use h2::server::SendResponse;
use http::StatusCode;
use tokio::net::TcpStream;
use tokio::sync::OnceCell;
use tokio_rustls::TlsConnector;
use ztm_net::h2io::{respond, respond_error};
use ztm_net::http1::{self, Reply};
use ztm_pki::rustls::pki_types::ServerName;
use ztm_pki::Revoked;
use ztm_proto::addr::{is_valid_host, HostPort};
use ztm_proto::model::RevocationFeed;

const CA_TIMEOUT: Duration = Duration::from_secs(10);
/// Most pages of revocations read in one go (the CA's pages hold 1,000).
const MAX_PAGES: usize = 10_000;

/// What the hub was told about its CA, to tell it from an impostor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaPin {
    /// The CA certificate (PEM).
    Certificate(String),
    /// The SHA-256 fingerprint of the CA certificate's DER, lower-case hex.
    Fingerprint(String),
}

impl CaPin {
    /// The pinned fingerprint.
    fn fingerprint(&self) -> Result<String> {
        match self {
            CaPin::Certificate(pem) => Ok(ztm_pki::fingerprint_pem(pem, "--ca-cert")?),
            CaPin::Fingerprint(f) => Ok(f.clone()),
        }
    }
}

/// Where the CA is: `https://HOST:PORT`, or `http://HOST:PORT` / `HOST:PORT` for plain HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaAddress {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl CaAddress {
    pub fn parse(text: &str) -> Result<CaAddress> {
        let (tls, rest) = if let Some(r) = text.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = text.strip_prefix("http://") {
            (false, r)
        } else {
            (false, text)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let bad = || {
            anyhow!(
                "bad CA address {text:?}: expected https://HOST:PORT, http://HOST:PORT or HOST:PORT"
            )
        };
        let HostPort { host, port } = HostPort::parse(rest).map_err(|_| bad())?;
        if !is_valid_host(&host) {
            return Err(bad());
        }
        Ok(CaAddress { tls, host, port })
    }

    /// `HOST:PORT`, brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        HostPort::new(self.host.as_str(), self.port).to_string()
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority())
    }

    /// Whether the CA is on this machine (a loopback address or `localhost`): the only place
    /// where nobody can sit between hub and CA.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// Checks a hub's CA settings before it connects anywhere: a CA that is not on loopback must
/// be pinned (its certificate or fingerprint) and reached over TLS.
pub fn check_ca(ca: &str, pin: Option<&CaPin>) -> Result<CaAddress> {
    let address = CaAddress::parse(ca)?;
    if address.is_loopback() {
        return Ok(address);
    }
    if pin.is_none() {
        let tls = if address.tls {
            String::new()
        } else {
            format!(
                ", and reach it over TLS (--ca https://{})",
                address.authority()
            )
        };
        bail!(
            "the CA at {ca} is not on this machine: give the hub the CA certificate \
             (--ca-cert FILE) or its SHA-256 fingerprint (--ca-fingerprint HEX) so that it can \
             tell the CA from an impostor{tls}"
        );
    }
    if !address.tls {
        bail!(
            "the CA at {ca} is not on this machine: reach it over TLS (--ca https://{}); plain \
             HTTP would show the hub's token to the network",
            address.authority()
        );
    }
    Ok(address)
}

/// The CA certificate once fetched and checked, and the TLS client that trusts it.
struct Trusted {
    pem: String,
    tls: Option<TlsConnector>,
}

pub struct CaClient {
    address: CaAddress,
    /// The CA's URL, for messages.
    pub addr: String,
    token: Option<String>,
    pin: Option<CaPin>,
    trusted: OnceCell<Trusted>,
}

/// A CA that is not the pinned one.
#[derive(Debug)]
pub struct NotPinned(pub String);

impl std::fmt::Display for NotPinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotPinned {}

fn connector(config: ztm_pki::rustls::ClientConfig) -> TlsConnector {
    TlsConnector::from(Arc::new(config))
}

impl CaClient {
    /// A client for the CA at `ca` (checked with [`check_ca`]), authenticating with `token`.
    pub fn new(ca: &str, token: Option<String>, pin: Option<CaPin>) -> Result<CaClient> {
        let address = check_ca(ca, pin.as_ref())?;
        Ok(CaClient {
            addr: address.url(),
            address,
            token,
            pin,
            trusted: OnceCell::new(),
        })
    }

    /// Why a TLS connection to the CA failed, in words.
    fn tls_failure(&self, e: &std::io::Error) -> anyhow::Error {
        let text = e.to_string();
        let who = format!("the server at {}", self.addr);
        let not_pinned = |why: String| -> anyhow::Error {
            if self.pin.is_some() {
                NotPinned(format!("{who} is not the pinned CA: {why}")).into()
            } else {
                anyhow!("{who}: {why}")
            }
        };
        if let Some(cn) = text
            .split("NotCaServer(\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        {
            not_pinned(format!(
                "its TLS certificate is signed by the pinned CA but is not the CA's own (CN {cn})"
            ))
        } else if text.contains("UnknownIssuer") || text.contains("BadSignature") {
            not_pinned("its TLS certificate is not issued by the pinned CA certificate".into())
        } else if text.contains("NotValidForName") {
            anyhow!(
                "{who}: its TLS certificate does not name {} (start the CA with --name {})",
                self.address.host,
                self.address.host
            )
        } else {
            anyhow!("TLS with {who} failed: {text}")
        }
    }

    /// One request to the CA; `with_token` sends the hub's token (only ever on a connection
    /// whose server was authenticated, or over loopback).
    async fn exchange(
        &self,
        tls: Option<&TlsConnector>,
        method: &str,
        path: &str,
        body: Bytes,
        with_token: bool,
    ) -> Result<Reply> {
        let authority = self.address.authority();
        let token = self.token.as_deref().filter(|_| with_token);
        let work = async {
            match tls {
                None => {
                    let tcp = TcpStream::connect(&authority)
                        .await
                        .with_context(|| format!("cannot connect to the CA at {}", self.addr))?;
                    let _ = tcp.set_nodelay(true);
                    http1::exchange(
                        tcp,
                        &authority,
                        method,
                        path,
                        token,
                        Some("text/plain"),
                        body,
                    )
                    .await
                }
                Some(tls) => {
                    let tcp = TcpStream::connect(&authority)
                        .await
                        .with_context(|| format!("cannot connect to the CA at {}", self.addr))?;
                    let _ = tcp.set_nodelay(true);
                    let name = ServerName::try_from(self.address.host.clone())
                        .map_err(|e| anyhow!("bad CA host {:?}: {e}", self.address.host))?;
                    let stream = tls
                        .connect(name, tcp)
                        .await
                        .map_err(|e| self.tls_failure(&e))?;
                    http1::exchange(
                        stream,
                        &authority,
                        method,
                        path,
                        token,
                        Some("text/plain"),
                        body,
                    )
                    .await
                }
            }
        };
        tokio::time::timeout(CA_TIMEOUT, work).await.map_err(|_| {
            anyhow!(
                "the CA at {} did not answer within {CA_TIMEOUT:?}",
                self.addr
            )
        })?
    }

    /// Fetches the CA certificate over `tls` (or plain HTTP) and checks it against the pin.
    async fn fetch_ca(&self, tls: Option<&TlsConnector>) -> Result<String> {
        let reply = self
            .exchange(tls, "GET", "/api/certificates/ca", Bytes::new(), false)
            .await?;
        if reply.status != 200 {
            bail!(
                "the CA at {} answered {} to GET /api/certificates/ca: {}",
                self.addr,
                reply.status,
                reply.text().trim()
            );
        }
        let pem = reply.text();
        let got = ztm_pki::fingerprint_pem(&pem, "the CA's certificate")
            .map_err(|e| anyhow!("the CA at {} sent {e}", self.addr))?;
        if let Some(pin) = &self.pin {
            let want = pin.fingerprint()?;
            if got != want {
                return Err(NotPinned(format!(
                    "the CA at {} is not the pinned CA: its certificate's SHA-256 fingerprint is \
                     {got}, not {want}",
                    self.addr
                ))
                .into());
            }
        }
        Ok(pem)
    }

    /// The CA certificate, checked against the pin, and the TLS client that trusts it; found
    /// at the first successful call and kept.
    async fn trusted(&self) -> Result<&Trusted> {
        self.trusted
            .get_or_try_init(|| async {
                if !self.address.tls {
                    let pem = self.fetch_ca(None).await?;
                    return Ok(Trusted { pem, tls: None });
                }
                let pem = match &self.pin {
                    // The server must prove it is the pinned CA before anything is asked.
                    Some(CaPin::Certificate(pinned)) => {
                        let verified = connector(ztm_pki::ca_client_config(pinned)?);
                        self.fetch_ca(Some(&verified)).await?
                    }
                    // Only a fingerprint: fetch the certificate (nothing secret is sent),
                    // check it, and from then on trust only it.
                    Some(CaPin::Fingerprint(_)) | None => {
                        let unverified = connector(ztm_pki::unauthenticated_ca_client_config()?);
                        self.fetch_ca(Some(&unverified)).await?
                    }
                };
                let tls = Some(connector(ztm_pki::ca_client_config(&pem)?));
                Ok::<_, anyhow::Error>(Trusted { pem, tls })
            })
            .await
    }

    async fn call(&self, method: &str, path: &str, body: Bytes) -> Result<Bytes> {
        let trusted = self.trusted().await?;
        let reply = self
            .exchange(trusted.tls.as_ref(), method, path, body, true)
            .await?;
        if reply.status != 200 {
            bail!(
                "CA at {} answered {} to {method} {path}: {}",
                self.addr,
                reply.status,
                reply.text().trim()
            );
        }
        Ok(reply.body)
    }

    /// One request with the token, over the authenticated connection: the status and body,
    /// whatever the status.
    pub async fn request(&self, method: &str, path: &str) -> Result<(u16, Bytes)> {
        let trusted = self.trusted().await?;
        let reply = self
            .exchange(trusted.tls.as_ref(), method, path, Bytes::new(), true)
            .await?;
        Ok((reply.status, reply.body))
    }

    /// The CA certificate, checked against the pin.
    pub async fn ca_certificate(&self) -> Result<String> {
        Ok(self.trusted().await?.pem.clone())
    }

    /// Has the CA sign `public_key_pem` for hub `name` with the given SANs.
    pub async fn sign_hub(
        &self,
        name: &str,
        public_key_pem: &str,
        sans: &[String],
    ) -> Result<String> {
        let path = format!("/api/sign/hub/{name}?names={}", sans.join(","));
        let body = self
            .call("POST", &path, Bytes::from(public_key_pem.to_string()))
            .await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Every revocation after `since`: the CA answers a page at a time, so this asks again
    /// until a page comes back empty (a hub must know them all before it accepts anyone).
    pub async fn all_revocations(&self, since: i64) -> Result<RevocationFeed> {
        let mut all = RevocationFeed {
            last: since,
            revocations: Vec::new(),
        };
        for _ in 0..MAX_PAGES {
            let page = self.revocations(all.last).await?;
            if page.revocations.is_empty() || page.last <= all.last {
                return Ok(all);
            }
            all.last = page.last;
            all.revocations.extend(page.revocations);
        }
        bail!("the CA's revocation feed did not end after {MAX_PAGES} pages")
    }

    pub async fn revocations(&self, since: i64) -> Result<RevocationFeed> {
        let body = self
            .call(
                "GET",
                &format!("/api/revocations?since={since}"),
                Bytes::new(),
            )
            .await?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// The CA's CRL, its signature checked against the CA certificate.
    pub async fn crl(&self) -> Result<ztm_pki::Crl> {
        let body = self.call("GET", "/api/crl", Bytes::new()).await?;
        let pem = self.ca_certificate().await?;
        ztm_pki::parse_crl(&pem, &String::from_utf8_lossy(&body))
            .map_err(|e| anyhow!("the CA's CRL: {e}"))
    }
}

/// How long a `GET /api/crl?after=N` waits for a newer CRL before answering 204.
pub const CRL_WAIT: Duration = Duration::from_secs(50);
/// Most such requests waiting at once in the whole hub; past it they are answered at once
/// (agents then ask again a minute later).
pub const CRL_WAITERS: usize = 20_000;

/// `GET /api/crl[?after=N]` on the control connection: the CA's latest CRL as the hub got it
/// (PEM). With `after`, answers as soon as the hub holds a CRL numbered above N, or with 204
/// after [`CRL_WAIT`]; without, at once (503 while the hub has none).
pub async fn serve_crl(revoked: &Revoked, query: Option<&str>, mut send: SendResponse<Bytes>) {
    let after = match query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("after="))
    {
        None => None,
        Some(n) => match n.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return respond_error(send, StatusCode::BAD_REQUEST, "after must be a CRL number")
            }
        },
    };
    let slot = revoked.crl();
    let newer = |crl: &Option<Arc<ztm_pki::Crl>>| {
        crl.as_ref()
            .filter(|c| after.is_none_or(|a| c.number > a))
            .map(|c| Bytes::from(c.pem()))
    };
    let mut rx = slot.subscribe();
    if let Some(pem) = newer(&rx.borrow_and_update()) {
        return respond(send, StatusCode::OK, Some("text/plain; charset=utf-8"), pem);
    }
    if after.is_none() {
        return respond_error(
            send,
            StatusCode::SERVICE_UNAVAILABLE,
            "this hub has no CRL from the CA yet",
        );
    }
    let Some(_waiter) = slot.waiter(CRL_WAITERS) else {
        return respond(send, StatusCode::NO_CONTENT, None, Bytes::new());
    };
    let deadline = tokio::time::sleep(CRL_WAIT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                if let Some(pem) = newer(&rx.borrow_and_update()) {
                    return respond(send, StatusCode::OK, Some("text/plain; charset=utf-8"), pem);
                }
            }
            // The agent went away: stop waiting for it.
            _ = std::future::poll_fn(|cx| send.poll_reset(cx)) => return,
            _ = &mut deadline => break,
        }
    }
    respond(send, StatusCode::NO_CONTENT, None, Bytes::new())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use super::*;

    #[test]
    fn remote_cas_must_be_pinned_and_reached_over_tls() {
        let pin = CaPin::Fingerprint("ab".repeat(32));
        for ok in [
            "localhost:9999",
            "127.0.0.1:9999",
            "http://127.0.0.5:1",
            "[::1]:9",
        ] {
            assert!(check_ca(ok, None).is_ok(), "{ok}");
        }
        assert!(check_ca("https://ca.example.com:9999", Some(&pin)).is_ok());
        for (bad, pin, words) in [
            ("198.51.100.1:9999", None, "--ca-cert"),
            ("https://ca.example.com:9999", None, "--ca-fingerprint"),
            (
                "http://198.51.100.1:9999",
                Some(&pin),
                "https://198.51.100.1:9999",
            ),
            ("ca.example.com", Some(&pin), "bad CA address"),
            ("ftp://x:1", Some(&pin), "bad CA address"),
        ] {
            let err = check_ca(bad, pin).unwrap_err().to_string();
            assert!(err.contains(words), "{bad}: {err}");
        }
        let a = CaAddress::parse("https://[::1]:9999/").unwrap();
        assert_eq!(a.url(), "https://[::1]:9999");
        assert!(a.is_loopback());
    }

    /// A CA with more revocations than fit in one page of its feed: the hub must get them
    /// all, or certificates revoked after the first thousand would be let in.
    #[tokio::test]
    async fn reads_every_page_of_the_revocation_feed() {
        let dir = std::env::temp_dir().join(format!(
            "ztm-hub-feed-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = ztm_ca::CaStore::open(&dir.join("ca.db")).unwrap();
        let mut revoked = Vec::new();
        for i in 0..1_005 {
            let name = format!("u{i}");
            store.create_user(&name).unwrap();
            revoked.push(store.revoke(&name).unwrap());
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = listener.local_addr().unwrap();
        let state = Arc::new(ztm_ca::CaState {
            store,
            token: None,
            listen,
        });
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, ztm_ca::router(state)).await;
        });
        let ca = CaClient::new(&listen.to_string(), None, None).unwrap();

        let feed = ca.all_revocations(0).await.unwrap();
        let serials = |v: &[ztm_proto::model::Revocation]| -> HashSet<String> {
            v.iter().map(|r| r.serial.clone()).collect()
        };
        assert_eq!(feed.revocations.len(), revoked.len());
        assert_eq!(serials(&feed.revocations), serials(&revoked));
        assert_eq!(Some(feed.last), revoked.last().map(|r| r.seq));
        // Continuing from the middle gets the rest, and from the end nothing.
        let mid = revoked[499].seq;
        let rest = ca.all_revocations(mid).await.unwrap();
        assert_eq!(serials(&rest.revocations), serials(&revoked[500..]));
        let none = ca.all_revocations(feed.last).await.unwrap();
        assert!(none.revocations.is_empty());
        assert_eq!(none.last, feed.last);
        // The CRL lists them all too.
        let crl = ca.crl().await.unwrap();
        assert_eq!(crl.len(), revoked.len());

        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
