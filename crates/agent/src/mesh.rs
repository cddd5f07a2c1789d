//! One joined mesh at run time: a link to every hub in `bootstraps`, the mesh's errors and
//! event log, and the queries that go through hubs (discovery, remote management).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use ztm_net::h2io::{self, Answer};
use ztm_net::now_ms;
use ztm_pki::rustls::ClientConfig;
use ztm_pki::CrlSlot;
use ztm_proto::model::{Endpoint, Service, TimedMessage};
use ztm_proto::wire::{
    EndpointInfo, Proto, ServiceDecl, ServiceInfo, ENDPOINT_USER_HEADER, MAX_MANAGE_BODY,
    REQUEST_TIMEOUT, TUNNEL_STREAMS,
};

use crate::ports::{PortKey, PortState, Ports};
use crate::store::{MeshRecord, ServiceRecord, Store};
use crate::ApiError;

/// The state of the link to one hub.
#[derive(Default)]
pub struct LinkState {
    /// The control connection, while registered.
    pub control: Option<Control>,
    /// Why the last attempt failed, while it keeps failing.
    pub error: Option<TimedMessage>,
}

/// A registered control connection to a hub.
#[derive(Clone)]
pub struct Control {
    pub sender: h2::client::SendRequest<Bytes>,
    /// The streams tunnels may take on it ([`TUNNEL_STREAMS`]); the others stay free for
    /// heartbeats and requests, however many tunnels are open.
    pub tunnels: Arc<tokio::sync::Semaphore>,
    /// The hub's address, for messages.
    pub hub: String,
}

impl Control {
    pub fn new(sender: h2::client::SendRequest<Bytes>, hub: &str) -> Control {
        Control {
            sender,
            tunnels: Arc::new(tokio::sync::Semaphore::new(TUNNEL_STREAMS as usize)),
            hub: hub.to_string(),
        }
    }
}

pub struct HubLink {
    pub addr: String,
    state: Mutex<LinkState>,
}

impl HubLink {
    pub fn state(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct TlsConfigs {
    pub control: Arc<ClientConfig>,
    pub reverse: Arc<ClientConfig>,
}

pub struct MeshRuntime {
    pub record: MeshRecord,
    pub username: String,
    pub links: Vec<Arc<HubLink>>,
    pub stop: CancellationToken,
    pub services_tx: watch::Sender<Vec<ServiceDecl>>,
    pub store: Arc<Store>,
    /// Problems with the configuration itself (bad PEM, certificate of another CA).
    pub config_errors: Vec<TimedMessage>,
    pub tls: Option<TlsConfigs>,
    /// The newest CRL of the mesh's CA, from any hub or the database; the TLS configurations
    /// refuse hubs it lists.
    pub crl: CrlSlot,
    /// The agent's REST API, to answer management requests forwarded by hubs.
    pub router: axum::Router,
    /// Local services by protocol and name, for incoming tunnels.
    local: RwLock<HashMap<(Proto, String), LocalService>>,
    /// Requests from hubs refused by [`crate::admission`], for the warnings about them.
    refusals: Mutex<RefusalLog>,
    /// Recent answers of the hubs' service lists, for choosing tunnel providers quickly.
    providers_cache: Mutex<Option<(Instant, HubServices)>>,
    pub ports: Ports,
    /// What this mesh's tunnel relays hold for stalled readers.
    pub stalls: ztm_net::relay::StallGuard,
    /// When the agent's and the CA's certificates expire (ms since the epoch; 0: unknown).
    pub cert_expires: u64,
    pub ca_expires: u64,
}

/// Each connected hub's service list, by link index.
type HubServices = Arc<Vec<(usize, Vec<ServiceInfo>)>>;

/// An endpoint providing a service, and the hub connections it can be reached through.
pub struct Provider {
    pub endpoint: String,
    /// The user the endpoint is registered by at the hubs in `links`.
    pub user: String,
    pub links: Vec<Control>,
}

/// How long a hub's service list is trusted for choosing tunnel providers.
const PROVIDERS_TTL: Duration = Duration::from_secs(2);

/// A service of this endpoint, as an incoming tunnel needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    pub host: String,
    pub port: u16,
    /// The users it admits besides root and this endpoint's user (`None`: every user).
    pub users: Option<Vec<String>>,
}

fn local_map(services: &[ServiceRecord]) -> HashMap<(Proto, String), LocalService> {
    services
        .iter()
        .map(|s| {
            (
                (s.protocol, s.name.clone()),
                LocalService {
                    host: s.host.clone(),
                    port: s.port,
                    users: s.users.clone(),
                },
            )
        })
        .collect()
}

/// Refusals of what a hub forwarded are warned about at most once per this period, with the
/// number of those not warned about: a compromised hub sending them in a loop must not flood
/// the log and push everything else out of the mesh's event log.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    unreported: u64,
}

pub fn decls(services: &[ServiceRecord]) -> Vec<ServiceDecl> {
    services
        .iter()
        .map(|s| ServiceDecl {
            protocol: s.protocol,
            name: s.name.clone(),
            users: s.users.clone(),
        })
        .collect()
}

impl MeshRuntime {
    /// Builds the runtime and starts a link task per hub.
    pub fn start(record: MeshRecord, store: Arc<Store>, router: axum::Router) -> Arc<MeshRuntime> {
        let mut config_errors = Vec::new();
        let username = ztm_pki::cert_info_pem(&record.cert, "certificate")
            .map(|i| i.common_name)
            .unwrap_or_default();
        if let Err(e) = ztm_pki::verify_signed_by(&record.ca, &record.cert) {
            config_errors.push(TimedMessage {
                time: now_ms(),
                message: format!(
                    "{e}: the agent certificate was not issued by this mesh's CA certificate"
                ),
            });
        }
        let crl = CrlSlot::default();
        crate::crl::load(&store, &record, &crl);
        let tls = (|| -> Result<TlsConfigs, ztm_pki::PkiError> {
            Ok(TlsConfigs {
                control: Arc::new(ztm_pki::agent_client_config_with_crl(
                    &record.ca,
                    &record.cert,
                    &record.key,
                    ztm_pki::ALPN_CONTROL,
                    &crl,
                )?),
                reverse: Arc::new(ztm_pki::agent_client_config_with_crl(
                    &record.ca,
                    &record.cert,
                    &record.key,
                    ztm_pki::ALPN_REVERSE,
                    &crl,
                )?),
            })
        })();
        let tls = match tls {
            Ok(t) => Some(t),
            Err(e) => {
                config_errors.push(TimedMessage {
                    time: now_ms(),
                    message: e.to_string(),
                });
                None
            }
        };
        let services = store.services(&record.name).unwrap_or_default();
        let (services_tx, _) = watch::channel(decls(&services));
        let local = RwLock::new(local_map(&services));
        let links = record
            .bootstraps
            .iter()
            .map(|addr| {
                Arc::new(HubLink {
                    addr: addr.clone(),
                    state: Mutex::new(LinkState::default()),
                })
            })
            .collect();
        let expires = |pem: &str| {
            ztm_pki::cert_info_pem(pem, "certificate")
                .map(|i| u64::try_from(i.not_after).unwrap_or(0).saturating_mul(1000))
                .unwrap_or(0)
        };
        let (cert_expires, ca_expires) = (expires(&record.cert), expires(&record.ca));
        let rt = Arc::new(MeshRuntime {
            record,
            username,
            links,
            stop: CancellationToken::new(),
            services_tx,
            store,
            config_errors,
            tls,
            crl,
            router,
            local,
            refusals: Mutex::new(RefusalLog::default()),
            providers_cache: Mutex::new(None),
            ports: Ports::default(),
            stalls: Default::default(),
            cert_expires,
            ca_expires,
        });
        for e in &rt.config_errors {
            rt.event("error", &e.message);
        }
        // Expiry warnings in the log: at start, and once a day while they last.
        {
            let rt = rt.clone();
            tokio::spawn(async move {
                loop {
                    for w in rt.warnings() {
                        rt.event("warning", &w.message);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_secs(24 * 3600)) => {}
                        _ = rt.stop.cancelled() => return,
                    }
                }
            });
        }
        if rt.tls.is_some() {
            for link in &rt.links {
                tokio::spawn(crate::session::run_link(rt.clone(), link.clone()));
            }
        }
        rt.sync_ports();
        rt
    }

    /// Opens, closes or retargets listeners to match the stored ports.
    pub fn sync_ports(self: &Arc<Self>) {
        match self.store.ports(&self.record.name) {
            Ok(wanted) => self.ports.sync(self, &wanted),
            Err(e) => tracing::error!("reading ports: {e}"),
        }
    }

    pub fn port_state(&self, key: &PortKey) -> PortState {
        self.ports.state(key)
    }

    pub fn local_service(&self, proto: Proto, name: &str) -> Option<LocalService> {
        self.local
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(proto, name.to_string()))
            .cloned()
    }

    pub fn forget_providers(&self) {
        *self
            .providers_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Online endpoints that provide `proto/name` and that this agent's user may reach,
    /// restricted to `endpoint` (an id or a name) and to endpoints of `user` when given, and
    /// without an endpoint to users the port trusts (`acl::trusts`). An endpoint is its id and
    /// its user: should two users claim one id on different hubs, they are two providers.
    pub async fn providers(
        &self,
        proto: Proto,
        name: &str,
        endpoint: Option<&str>,
        user: Option<&str>,
        trust: Option<&[String]>,
    ) -> Vec<Provider> {
        let cached = {
            let cache = self
                .providers_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            cache
                .as_ref()
                .filter(|(at, _)| at.elapsed() < PROVIDERS_TTL)
                .map(|(_, lists)| lists.clone())
        };
        let lists = match cached {
            Some(l) => l,
            None => {
                let fresh = Arc::new(self.query_links::<Vec<ServiceInfo>>("/api/services").await);
                *self
                    .providers_cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), fresh.clone()));
                fresh
            }
        };
        let wanted = crate::discovery::Wanted {
            proto,
            name,
            me: &self.username,
            endpoint,
            user,
            trust,
        };
        crate::discovery::providers(&wanted, &lists)
            .into_iter()
            .map(|c| Provider {
                links: c
                    .hubs
                    .iter()
                    .filter_map(|i| self.links.get(*i))
                    .filter_map(|l| l.state().control.clone())
                    .collect(),
                endpoint: c.endpoint,
                user: c.user,
            })
            .filter(|p| !p.links.is_empty())
            .collect()
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }

    pub fn id(&self) -> &str {
        &self.record.endpoint_id
    }

    /// Warns (process log and mesh log, kind `warning`) that a request hub `hub` forwarded was
    /// refused, at most once per [`REFUSAL_WARN_EVERY`].
    pub fn refused(&self, hub: &str, message: &str) {
        let unreported = {
            let mut log = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            if log.last.is_some_and(|at| at.elapsed() < REFUSAL_WARN_EVERY) {
                log.unreported += 1;
                return;
            }
            log.last = Some(Instant::now());
            std::mem::take(&mut log.unreported)
        };
        let more = match unreported {
            0 => String::new(),
            n => format!(" ({n} more refused since the last warning)"),
        };
        self.event(
            "warning",
            &format!("hub {hub}: {message}; a hub should not have sent it{more}"),
        );
    }

    /// Records an event in the mesh's log and the process log.
    pub fn event(&self, kind: &str, message: &str) {
        if kind == "error" || kind == "warning" {
            tracing::warn!("mesh {}: {message}", self.record.name);
        } else {
            tracing::info!("mesh {}: {message}", self.record.name);
        }
        if let Err(e) = self
            .store
            .append_log(&self.record.name, now_ms(), kind, message)
        {
            tracing::error!("cannot write the mesh log: {e}");
        }
    }

    /// What needs attention soon: certificates near their expiry.
    pub fn warnings(&self) -> Vec<TimedMessage> {
        crate::expiry::warnings(now_ms(), self.cert_expires, self.ca_expires)
    }

    pub fn connected(&self) -> bool {
        self.links.iter().any(|l| l.state().control.is_some())
    }

    pub fn errors(&self) -> Vec<TimedMessage> {
        let mut errors = self.config_errors.clone();
        errors.extend(self.links.iter().filter_map(|l| l.state().error.clone()));
        errors
    }

    fn controls(&self) -> Vec<h2::client::SendRequest<Bytes>> {
        self.links
            .iter()
            .filter_map(|l| l.state().control.as_ref().map(|c| c.sender.clone()))
            .collect()
    }

    /// Tells every hub link to publish the current service list.
    pub fn publish(&self) {
        let services = self.store.services(&self.record.name).unwrap_or_default();
        *self.local.write().unwrap_or_else(|p| p.into_inner()) = local_map(&services);
        self.services_tx.send_replace(decls(&services));
    }

    pub fn stop(&self) {
        self.stop.cancel();
        self.ports.stop_all();
    }

    /// GETs `path` from every connected hub at once; answers that fail are skipped.
    async fn query_hubs<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
    ) -> Vec<T> {
        self.query_links(path)
            .await
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// Like `query_hubs`, with the index of the link each answer came from.
    async fn query_links<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
    ) -> Vec<(usize, T)> {
        let mut set = tokio::task::JoinSet::new();
        for (i, link) in self.links.iter().enumerate() {
            let Some(sender) = link.state().control.as_ref().map(|c| c.sender.clone()) else {
                continue;
            };
            let path = path.to_string();
            set.spawn(async move {
                let req = h2io::build(Method::GET, &path).ok()?.body(()).ok()?;
                let answer = h2io::request(&sender, req, Bytes::new(), 64 << 20, REQUEST_TIMEOUT)
                    .await
                    .ok()?;
                (answer.status == StatusCode::OK)
                    .then(|| answer.json::<T>().ok())
                    .flatten()
                    .map(|v| (i, v))
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(Some(v)) = r {
                out.push(v);
            }
        }
        out.sort_by_key(|(i, _)| *i);
        out
    }

    pub fn local_endpoint(&self) -> Endpoint {
        Endpoint {
            id: self.record.endpoint_id.clone(),
            name: self.record.agent_name.clone(),
            username: self.username.clone(),
            ip: String::new(),
            port: 0,
            heartbeat: 0,
            online: self.connected(),
            is_local: true,
        }
    }

    /// Every endpoint the hubs know, merged, this endpoint always included: one entry per id
    /// and user (two users claiming one id on different hubs show as two endpoints).
    pub async fn endpoints(&self) -> Vec<Endpoint> {
        let answers = self.query_hubs::<Vec<EndpointInfo>>("/api/endpoints").await;
        crate::discovery::endpoints(answers, self.local_endpoint())
    }

    /// Services discovered through hubs merged with the local ones.
    pub async fn services(&self) -> Vec<Service> {
        let answers = self.query_hubs::<Vec<ServiceInfo>>("/api/services").await;
        let local = self.store.services(&self.record.name).unwrap_or_default();
        crate::discovery::services(
            answers,
            &local,
            (&self.record.endpoint_id, &self.record.agent_name),
        )
    }

    /// Sends a management request to endpoint `ep` of `user` through the first hub that has
    /// it online.
    pub async fn forward(
        &self,
        ep: &str,
        user: &str,
        method: Method,
        rest: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<Answer, ApiError> {
        let controls = self.controls();
        if controls.is_empty() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not connected to any hub of this mesh",
            ));
        }
        let path = format!("/api/endpoints/{ep}/manage{rest}");
        let mut last = None;
        for sender in controls {
            let mut req = h2io::build(method.clone(), &path)
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
            if let Some(ct) = content_type {
                req = req.header(http::header::CONTENT_TYPE, ct);
            }
            let req = req
                .header(ENDPOINT_USER_HEADER, user)
                .body(())
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
            match h2io::request(&sender, req, body.clone(), MAX_MANAGE_BODY, REQUEST_TIMEOUT).await
            {
                Ok(a)
                    if a.status == StatusCode::NOT_FOUND
                        && a.error_message().contains("not online at this hub") =>
                {
                    last = Some(a)
                }
                Ok(a) => return Ok(a),
                Err(e) => {
                    last = None;
                    tracing::debug!("forwarding to {ep}: {e:#}");
                }
            }
        }
        match last {
            Some(a) => Err(ApiError::new(StatusCode::NOT_FOUND, a.error_message())),
            None => Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("no hub could reach endpoint {ep}"),
            )),
        }
    }
}
