//! One joined mesh's data: its configuration, its links to hubs and their state, its local
//! services, its CRL, its event log, and the requests that go through its hubs (discovery,
//! choosing tunnel providers, remote management). Nothing here starts tasks or listeners: the
//! [`crate::supervisor`] does, and the hub links ([`crate::session`]), tunnels
//! ([`crate::tunnel`]) and port listeners ([`crate::ports`]) use what is here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use parking_lot::{Mutex, MutexGuard, RwLock};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use ztm_net::h2io::{self, Answer};
use ztm_net::now_ms;
use ztm_pki::rustls::ClientConfig;
use ztm_pki::CrlSlot;
use ztm_proto::model::{self, ApiError, Endpoint, EndpointRef, Exit, Service, TimedMessage};
use ztm_proto::wire::{
    EndpointInfo, Proto, ServiceDecl, ServiceInfo, ENDPOINT_USER_HEADER, EXIT_SERVICE,
    MAX_MANAGE_BODY, NOT_HERE, REQUEST_TIMEOUT, TUNNEL_STREAMS,
};

use crate::discovery;
use crate::error::MeshError;
use crate::files::Files;
use crate::lookups::Lookups;
use crate::metrics::Metrics;
use crate::store::{MeshRecord, ServiceRecord, Store};

/// The state of the link to one hub.
#[derive(Default)]
pub struct LinkState {
    /// The control connection, while registered.
    pub control: Option<Control>,
    /// Why the last attempt failed, while it keeps failing.
    pub error: Option<TimedMessage>,
    /// The round trip of the latest PING on the control connection, while registered.
    pub rtt: Option<Duration>,
}

/// A registered control connection to a hub. Its HTTP/2 may not be started yet (PROTOCOL.md,
/// "Control connection on demand"): [`Control::sender`] has the link start it.
#[derive(Clone)]
pub struct Control {
    started: watch::Receiver<Option<h2::client::SendRequest<Bytes>>>,
    start: Arc<tokio::sync::Notify>,
    /// When its HTTP/2 was last asked for (ms since the epoch).
    last_used: Arc<std::sync::atomic::AtomicU64>,
    /// The streams tunnels may take on it ([`TUNNEL_STREAMS`]); the others stay free for
    /// heartbeats and requests, however many tunnels are open.
    pub tunnels: Arc<tokio::sync::Semaphore>,
    /// The hub's address, for messages.
    pub hub: String,
}

impl Control {
    /// A control connection whose HTTP/2, once started, is sent on `started`; `start` asks the
    /// link to start it.
    pub fn new(
        started: watch::Receiver<Option<h2::client::SendRequest<Bytes>>>,
        start: Arc<tokio::sync::Notify>,
        hub: &str,
    ) -> Control {
        Control {
            started,
            start,
            last_used: Arc::new(std::sync::atomic::AtomicU64::new(now_ms())),
            tunnels: Arc::new(tokio::sync::Semaphore::new(TUNNEL_STREAMS as usize)),
            hub: hub.to_string(),
        }
    }

    /// When its HTTP/2 was last asked for (ms since the epoch), and how many tunnels are open
    /// on it.
    pub fn use_of(&self) -> (u64, usize) {
        let last = self.last_used.load(std::sync::atomic::Ordering::SeqCst);
        let open = (TUNNEL_STREAMS as usize).saturating_sub(self.tunnels.available_permits());
        (last, open)
    }

    /// The connection's HTTP/2 client, started first if it is not yet.
    pub async fn sender(&self) -> Result<h2::client::SendRequest<Bytes>, String> {
        self.last_used
            .store(now_ms(), std::sync::atomic::Ordering::SeqCst);
        let mut started = self.started.clone();
        if let Some(sender) = started.borrow_and_update().clone() {
            return Ok(sender);
        }
        self.start.notify_one();
        let waited = tokio::time::timeout(REQUEST_TIMEOUT, started.wait_for(Option::is_some))
            .await
            .map(|r| r.map(|s| s.clone()));
        match waited {
            Ok(Ok(Some(sender))) => Ok(sender),
            Ok(Ok(None) | Err(_)) => Err(format!("the connection to hub {} closed", self.hub)),
            Err(_) => Err(format!(
                "hub {}: HTTP/2 did not start within {REQUEST_TIMEOUT:?}",
                self.hub
            )),
        }
    }
}

/// The link to one hub of the mesh.
pub struct HubLink {
    pub addr: String,
    state: Mutex<LinkState>,
}

impl HubLink {
    pub fn state(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock()
    }

    /// The link as the REST API shows it.
    pub fn view(&self) -> model::HubLink {
        let state = self.state();
        model::HubLink {
            address: self.addr.clone(),
            connected: state.control.is_some(),
            rtt_ms: state
                .control
                .as_ref()
                .and(state.rtt)
                .map(|d| d.as_secs_f64() * 1e3),
        }
    }
}

/// The TLS configurations of the mesh's two kinds of connection.
pub struct TlsConfigs {
    pub control: Arc<ClientConfig>,
    pub reverse: Arc<ClientConfig>,
}

/// An endpoint providing a service, and the hub connections it can be reached through.
pub struct Provider {
    pub endpoint: String,
    /// The user the endpoint is registered by at the hubs in `links`.
    pub user: String,
    pub links: Vec<Control>,
}

/// A service of this endpoint, as an incoming tunnel needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    pub host: String,
    pub port: u16,
    /// The users it admits besides root and this endpoint's user (`None`: every user).
    pub users: Option<Vec<String>>,
}

/// This endpoint's exit, as an incoming exit tunnel needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalExit {
    pub rules: ztm_proto::exit::Rules,
    /// The users it admits besides root and this endpoint's user (`None`: every user).
    pub users: Option<Vec<String>>,
}

impl LocalExit {
    /// The exit as stored (rules that no longer parse make no exit, and say why).
    pub fn of(exit: &Exit) -> Result<LocalExit, String> {
        Ok(LocalExit {
            rules: ztm_proto::exit::Rules::parse(&exit.allow)?,
            users: exit.users.clone(),
        })
    }
}

/// How long a hub's answer about a service is trusted for choosing tunnel providers.
const PROVIDERS_TTL: Duration = Duration::from_secs(2);
/// Most services whose providers are kept (the cache is emptied when it would hold more).
const PROVIDERS_KEPT: usize = 1024;

/// Refusals of what a hub forwarded are warned about at most once per this period, with the
/// number of those not warned about: a compromised hub sending them in a loop must not flood
/// the log and push everything else out of the mesh's event log.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    unreported: u64,
}

/// What may not stand as it is in a path segment.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'@')
    .remove(b'~');

/// Each connected hub's service list, by link index.
type HubServices = Arc<Vec<(usize, Vec<ServiceInfo>)>>;

pub struct Mesh {
    /// After how long without use a started control connection goes back to lines (`None`:
    /// never; PROTOCOL.md, "Control connection on demand").
    control_idle: Option<Duration>,
    record: MeshRecord,
    username: String,
    links: Vec<Arc<HubLink>>,
    stop: CancellationToken,
    services_tx: watch::Sender<Vec<ServiceDecl>>,
    store: Arc<Store>,
    /// Problems with the configuration itself (bad PEM, certificate of another CA).
    config_errors: Vec<TimedMessage>,
    tls: Option<TlsConfigs>,
    /// The newest CRL of the mesh's CA, from any hub or the database; the TLS configurations
    /// refuse hubs it lists.
    crl: CrlSlot,
    /// The agent's REST API, to answer management requests forwarded by hubs.
    router: axum::Router,
    /// Local services by protocol and name, for incoming tunnels.
    local: RwLock<HashMap<(Proto, String), LocalService>>,
    /// This endpoint's exit, if it is one.
    exit: RwLock<Option<Arc<LocalExit>>>,
    /// The names the exit is resolving, by user (bounded there).
    lookups: Arc<Lookups>,
    /// Requests from hubs refused by [`crate::admission`], for the warnings about them.
    refusals: Mutex<RefusalLog>,
    /// Recent answers of the hubs about one service each, for choosing tunnel providers
    /// quickly.
    providers_cache: Mutex<HashMap<(Proto, String), (Instant, HubServices)>>,
    /// What this mesh's tunnel relays hold for stalled readers.
    stalls: ztm_relay::StallGuard,
    /// The agent's figures for Prometheus, which this mesh's tunnels count in.
    metrics: Arc<Metrics>,
    /// The agent's budget of open files for connections (shared by its meshes).
    files: Arc<Files>,
    /// When the agent's and the CA's certificates expire (ms since the epoch; 0: unknown).
    cert_expires: u64,
    ca_expires: u64,
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

/// What the agent publishes of its services and its exit to hubs (no host, port or rules).
pub fn decls(services: &[ServiceRecord], exit: Option<&LocalExit>) -> Vec<ServiceDecl> {
    services
        .iter()
        .map(|s| ServiceDecl {
            protocol: s.protocol,
            name: s.name.clone(),
            users: s.users.clone(),
        })
        .chain(exit.map(|e| ServiceDecl {
            protocol: Proto::Tcp,
            name: EXIT_SERVICE.to_string(),
            users: e.users.clone(),
        }))
        .collect()
}

/// The stored exit of `mesh`, parsed; a problem with it is logged and makes no exit.
fn load_exit(store: &Store, mesh: &str) -> Option<Arc<LocalExit>> {
    let stored = store
        .exit(mesh)
        .map_err(|e| tracing::error!("reading the exit of mesh {mesh}: {e}"))
        .ok()??;
    LocalExit::of(&stored)
        .map_err(|e| tracing::error!("the exit of mesh {mesh} is not used: {e}"))
        .ok()
        .map(Arc::new)
}

/// When a PEM certificate expires, in ms since the epoch (0 if it cannot be read).
fn expiry_of(pem: &str) -> u64 {
    ztm_pki::cert_info_pem(pem, "certificate")
        .map(|i| u64::try_from(i.not_after).unwrap_or(0).saturating_mul(1000))
        .unwrap_or(0)
}

impl Mesh {
    /// The mesh of `record`: its TLS configurations, its stored CRL and services, a link
    /// state per hub. Problems with the configuration are kept as its errors.
    pub fn new(
        record: MeshRecord,
        store: Arc<Store>,
        router: axum::Router,
        metrics: Arc<Metrics>,
        files: Arc<Files>,
        control_idle: Option<Duration>,
    ) -> Arc<Mesh> {
        let mut config_errors = Vec::new();
        let username = ztm_pki::cert_info_pem(&record.cert, "certificate")
            .map(|i| i.common_name)
            .unwrap_or_default();
        if let Err(e) = ztm_pki::verify_signed_by(&record.ca, &record.cert) {
            config_errors.push(TimedMessage::new(
                now_ms(),
                format!("{e}: the agent certificate was not issued by this mesh's CA certificate"),
            ));
        }
        let crl = CrlSlot::default();
        crate::crl::load(&store, &record, &crl);
        let config = |alpn: &[&[u8]]| {
            ztm_pki::agent_client_config_with_crl(
                &record.ca,
                &record.cert,
                &record.key,
                alpn[0],
                &crl,
            )
            .map(|mut c| {
                c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
                Arc::new(c)
            })
        };
        // The reverse connection: started on demand where the hub knows how (PROTOCOL.md).
        let reverse = [ztm_pki::ALPN_REVERSE_ON_DEMAND, ztm_pki::ALPN_REVERSE];
        // So is the control connection's HTTP/2.
        let control = [ztm_pki::ALPN_CONTROL_ON_DEMAND, ztm_pki::ALPN_CONTROL];
        let tls = match (config(&control), config(&reverse)) {
            (Ok(control), Ok(reverse)) => Some(TlsConfigs { control, reverse }),
            (Err(e), _) | (_, Err(e)) => {
                config_errors.push(TimedMessage::new(now_ms(), e.to_string()));
                None
            }
        };
        let services = store.services(&record.name).unwrap_or_default();
        let exit = load_exit(&store, &record.name);
        let (services_tx, _) = watch::channel(decls(&services, exit.as_deref()));
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
        Arc::new(Mesh {
            control_idle,
            cert_expires: expiry_of(&record.cert),
            ca_expires: expiry_of(&record.ca),
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
            local: RwLock::new(local_map(&services)),
            exit: RwLock::new(exit),
            lookups: Default::default(),
            refusals: Mutex::new(RefusalLog::default()),
            providers_cache: Mutex::new(HashMap::new()),
            stalls: Default::default(),
            metrics,
            files,
        })
    }

    /// The configuration as stored.
    pub fn record(&self) -> &MeshRecord {
        &self.record
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// This endpoint's id.
    pub fn id(&self) -> &str {
        &self.record.endpoint_id
    }

    /// This endpoint's name.
    pub fn agent_name(&self) -> &str {
        &self.record.agent_name
    }

    /// The user of this agent's certificate.
    pub fn username(&self) -> &str {
        &self.username
    }

    pub fn control_idle(&self) -> Option<Duration> {
        self.control_idle
    }

    pub fn links(&self) -> &[Arc<HubLink>] {
        &self.links
    }

    /// The TLS configurations, unless the configuration is unusable.
    pub fn tls(&self) -> Option<&TlsConfigs> {
        self.tls.as_ref()
    }

    pub fn crl(&self) -> &CrlSlot {
        &self.crl
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn router(&self) -> &axum::Router {
        &self.router
    }

    pub fn stalls(&self) -> &ztm_relay::StallGuard {
        &self.stalls
    }

    /// The agent's figures, which this mesh's tunnels count in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The agent's budget of open files, which this mesh's connections hold theirs from.
    pub fn files(&self) -> &Files {
        &self.files
    }

    /// Each hub link as the REST API shows it, in the order of the configuration.
    pub fn hub_links(&self) -> Vec<model::HubLink> {
        self.links.iter().map(|l| l.view()).collect()
    }

    /// Hubs with a registered control connection.
    pub fn hubs_connected(&self) -> usize {
        self.links
            .iter()
            .filter(|l| l.state().control.is_some())
            .count()
    }

    /// Cancelled when the mesh stops (left, or reconfigured).
    pub fn stopping(&self) -> &CancellationToken {
        &self.stop
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The list of services to publish, as it changes.
    pub fn published(&self) -> watch::Receiver<Vec<ServiceDecl>> {
        self.services_tx.subscribe()
    }

    pub fn config_errors(&self) -> &[TimedMessage] {
        &self.config_errors
    }

    pub fn cert_expires(&self) -> u64 {
        self.cert_expires
    }

    pub fn ca_expires(&self) -> u64 {
        self.ca_expires
    }

    pub fn local_service(&self, proto: Proto, name: &str) -> Option<LocalService> {
        self.local.read().get(&(proto, name.to_string())).cloned()
    }

    /// This endpoint's exit, if it is one.
    pub fn local_exit(&self) -> Option<Arc<LocalExit>> {
        self.exit.read().clone()
    }

    /// The names the exit is resolving.
    pub fn lookups(&self) -> &Arc<Lookups> {
        &self.lookups
    }

    pub fn forget_providers(&self) {
        self.providers_cache.lock().clear();
    }

    /// Online endpoints that provide `proto/name` and that this agent's user may reach,
    /// restricted to `endpoint` (an id or a name) and to endpoints of `user` when given, and
    /// without an endpoint to users the port trusts (`acl::trusts`); see
    /// [`discovery::providers`].
    pub async fn providers(
        &self,
        proto: Proto,
        name: &str,
        endpoint: Option<&str>,
        user: Option<&str>,
        trust: Option<&[String]>,
    ) -> Vec<Provider> {
        // Each hub is asked about this one service: the cost of what a tunnel needs, not of
        // the size of the mesh.
        let key = (proto, name.to_string());
        let cached = self
            .providers_cache
            .lock()
            .get(&key)
            .filter(|(at, _)| at.elapsed() < PROVIDERS_TTL)
            .map(|(_, lists)| lists.clone());
        let lists = match cached {
            Some(l) => l,
            None => {
                let path = format!(
                    "/api/services/{proto}/{}",
                    percent_encoding::utf8_percent_encode(name, SEGMENT)
                );
                let answers = self.query_links::<ServiceInfo>(&path).await;
                let fresh: HubServices =
                    Arc::new(answers.into_iter().map(|(i, s)| (i, vec![s])).collect());
                let mut cache = self.providers_cache.lock();
                if cache.len() >= PROVIDERS_KEPT {
                    cache.clear();
                }
                cache.insert(key, (Instant::now(), fresh.clone()));
                fresh
            }
        };
        let wanted = discovery::Wanted {
            proto,
            name,
            me: &self.username,
            endpoint,
            user,
            trust,
        };
        discovery::providers(&wanted, &lists)
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

    /// Warns (process log and mesh log, kind `warning`) that a request hub `hub` forwarded was
    /// refused, at most once per [`REFUSAL_WARN_EVERY`].
    pub fn refused(&self, hub: &str, message: &str) {
        let unreported = {
            let mut log = self.refusals.lock();
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
            tracing::warn!(mesh = %self.record.name, "mesh {}: {message}", self.record.name);
        } else {
            tracing::info!(mesh = %self.record.name, "mesh {}: {message}", self.record.name);
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

    fn controls(&self) -> Vec<Control> {
        self.links
            .iter()
            .filter_map(|l| l.state().control.clone())
            .collect()
    }

    /// Tells every hub link to publish the current service list and exit.
    pub fn publish(&self) {
        let services = self.store.services(&self.record.name).unwrap_or_default();
        let exit = load_exit(&self.store, &self.record.name);
        *self.local.write() = local_map(&services);
        self.services_tx
            .send_replace(decls(&services, exit.as_deref()));
        *self.exit.write() = exit;
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
            let Some(control) = link.state().control.clone() else {
                continue;
            };
            let path = path.to_string();
            set.spawn(async move {
                let sender = control.sender().await.ok()?;
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
        self.endpoints_matching(None).await
    }

    /// Like [`Mesh::endpoints`], only those whose name, user or id contains `q` (lower case):
    /// the hubs are asked for those only.
    pub async fn endpoints_matching(&self, q: Option<&str>) -> Vec<Endpoint> {
        let answers = self
            .query_hubs::<Vec<EndpointInfo>>(&with_search("/api/endpoints", q))
            .await;
        discovery::endpoints(answers, self.local_endpoint())
    }

    /// Service `proto/name` as [`Mesh::services_matching`] would list it, from each hub's
    /// answer for that one service (`None`: neither a hub nor this endpoint has it).
    pub async fn service(&self, proto: Proto, name: &str) -> Option<Service> {
        let path = format!(
            "/api/services/{proto}/{}",
            percent_encoding::utf8_percent_encode(name, SEGMENT)
        );
        let answers = self.query_hubs::<ServiceInfo>(&path).await;
        let local: Vec<_> = self
            .store
            .services(&self.record.name)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.protocol == proto && s.name == name)
            .collect();
        discovery::services(
            answers.into_iter().map(|s| vec![s]).collect(),
            &local,
            (
                &self.record.endpoint_id,
                &self.record.agent_name,
                self.username(),
            ),
        )
        .into_iter()
        .find(|s| s.protocol == proto && s.name == name)
    }

    /// Services discovered through hubs merged with the local ones: those whose name or a
    /// provider's name or user contains `q` (lower case), the hubs asked for those only.
    pub async fn services_matching(&self, q: Option<&str>) -> Vec<Service> {
        let answers = self
            .query_hubs::<Vec<ServiceInfo>>(&with_search("/api/services", q))
            .await;
        let local = self.store.services(&self.record.name).unwrap_or_default();
        let mut services = discovery::services(
            answers,
            &local,
            (
                &self.record.endpoint_id,
                &self.record.agent_name,
                self.username(),
            ),
        );
        // Exits are listed as exits (`Mesh::exits`), not as a service.
        services.retain(|s| s.name != EXIT_SERVICE);
        services
    }

    /// The online exits this agent's user may use, as the hubs list them (their own user and
    /// root may use any; others those that admit them).
    pub async fn exits(&self) -> Vec<EndpointRef> {
        let path = format!("/api/services/tcp/{EXIT_SERVICE}");
        let answers = self.query_hubs::<ServiceInfo>(&path).await;
        discovery::services(
            answers.into_iter().map(|s| vec![s]).collect(),
            &[],
            (
                &self.record.endpoint_id,
                &self.record.agent_name,
                self.username(),
            ),
        )
        .into_iter()
        .find(|s| s.protocol == Proto::Tcp && s.name == EXIT_SERVICE)
        .map(|s| s.endpoints)
        .unwrap_or_default()
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
    ) -> Result<Answer, MeshError> {
        let controls = self.controls();
        if controls.is_empty() {
            return Err(MeshError::NotConnected);
        }
        let path = format!("/api/endpoints/{ep}/manage{rest}");
        let mut not_here = None;
        for control in controls {
            let sender = match control.sender().await {
                Ok(s) => s,
                Err(e) => {
                    not_here = None;
                    tracing::debug!("forwarding to {ep}: {e}");
                    continue;
                }
            };
            let mut req = h2io::build(method.clone(), &path)
                .map_err(|e| MeshError::BadRequest(e.to_string()))?;
            if let Some(ct) = content_type {
                req = req.header(http::header::CONTENT_TYPE, ct);
            }
            let req = req
                .header(ENDPOINT_USER_HEADER, user)
                .body(())
                .map_err(|e| MeshError::BadRequest(e.to_string()))?;
            match h2io::request(&sender, req, body.clone(), MAX_MANAGE_BODY, REQUEST_TIMEOUT).await
            {
                // The hub says the endpoint is not online there: try the next hub.
                Ok(a) if answered_not_here(&a) => not_here = Some(a.error_message()),
                Ok(a) => return Ok(a),
                Err(e) => {
                    not_here = None;
                    tracing::debug!("forwarding to {ep}: {e:#}");
                }
            }
        }
        Err(match not_here {
            Some(message) => MeshError::NotHere(message),
            None => MeshError::Unreachable(ep.to_string()),
        })
    }
}

/// `path` with the search `q`, if any.
fn with_search(path: &str, q: Option<&str>) -> String {
    match q {
        Some(q) => format!(
            "{path}?q={}",
            percent_encoding::utf8_percent_encode(q, SEGMENT)
        ),
        None => path.to_string(),
    }
}

/// Whether a hub's answer says that the endpoint asked for is not online at that hub (its
/// error body's `reason`, PROTOCOL.md).
fn answered_not_here(a: &Answer) -> bool {
    a.status == StatusCode::NOT_FOUND
        && serde_json::from_slice::<ApiError>(&a.body)
            .is_ok_and(|e| e.reason.as_deref() == Some(NOT_HERE))
}
