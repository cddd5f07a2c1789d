//! The agent's state: its database, where its API listens, and the running meshes by name,
//! started, restarted with a new configuration, and stopped here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;

use anyhow::Context;

use crate::files::Files;
use crate::identity;
use crate::metrics::{self, Metrics};
use crate::store::{self, MeshRecord, Store};
use crate::supervisor::MeshRuntime;
use ztm_proto::wire::CONTROL_IDLE;

pub struct Agent {
    pub store: Arc<Store>,
    /// The address the REST API listens on (for the Host check).
    pub listen: SocketAddr,
    /// When set, every API request must carry `Authorization: Bearer <token>` ([`guard`]).
    pub token: Option<String>,
    /// What Prometheus is shown (`GET /metrics`); counted whether or not anyone looks.
    pub metrics: Arc<Metrics>,
    /// Open files for connections, shared by every mesh (`crate::files`).
    pub files: Arc<Files>,
    meshes: RwLock<HashMap<String, Arc<MeshRuntime>>>,
    router: OnceLock<axum::Router>,
    /// Seconds without use after which a started control connection goes back to lines (0:
    /// never); [`CONTROL_IDLE`] unless set.
    control_idle: std::sync::atomic::AtomicU64,
}

impl Agent {
    /// Opens the database; the API will listen on `listen` and, with a `token`, require it.
    /// Connections hold files from a budget set by the open-file limit now: raise it first.
    pub fn open(
        database: &Path,
        reset: bool,
        listen: SocketAddr,
        token: Option<String>,
    ) -> anyhow::Result<Arc<Agent>> {
        let store = Arc::new(Store::open(database, reset)?);
        let metrics = Metrics::new().context("setting up the metrics")?;
        Ok(Arc::new(Agent {
            store,
            listen,
            token: token.filter(|t| !t.is_empty()),
            metrics: Arc::new(metrics),
            files: Arc::new(Files::for_this_process()),
            meshes: RwLock::new(HashMap::new()),
            router: OnceLock::new(),
            control_idle: std::sync::atomic::AtomicU64::new(CONTROL_IDLE.as_secs()),
        }))
    }

    /// Sets after how many seconds without use a started control connection goes back to
    /// lines (PROTOCOL.md, "Control connection on demand"); 0: never. For meshes started after.
    pub fn set_control_idle(&self, secs: u64) {
        self.control_idle
            .store(secs, std::sync::atomic::Ordering::SeqCst);
    }

    fn control_idle(&self) -> Option<std::time::Duration> {
        let secs = self.control_idle.load(std::sync::atomic::Ordering::SeqCst);
        (secs > 0).then(|| std::time::Duration::from_secs(secs))
    }

    /// Starts every joined mesh, with `router` (the agent's REST API, `crate::api::router`)
    /// to answer the management requests hubs forward. Call once, inside the runtime.
    pub fn start(&self, router: axum::Router) -> Result<(), store::StoreError> {
        let _ = self.router.set(router);
        for record in self.store.meshes()? {
            self.start_mesh(record);
        }
        Ok(())
    }

    pub fn runtime(&self, name: &str) -> Option<Arc<MeshRuntime>> {
        self.meshes.read().get(name).cloned()
    }

    pub fn runtimes(&self) -> Vec<Arc<MeshRuntime>> {
        let mut list: Vec<_> = self.meshes.read().values().cloned().collect();
        list.sort_by(|a, b| a.name().cmp(b.name()));
        list
    }

    /// Starts (or restarts, with a new configuration) a mesh's runtime. A mesh whose endpoint
    /// id is not derived from its certificate's user gets one that is (see [`identity`]).
    pub fn start_mesh(&self, mut record: MeshRecord) -> Arc<MeshRuntime> {
        let router = self.router.get().cloned().unwrap_or_default();
        let name = record.name.clone();
        let user = ztm_pki::cert_info_pem(&record.cert, "certificate")
            .map(|i| i.common_name)
            .ok();
        let rebound = user.as_deref().and_then(|user| {
            let old = identity::bind(&mut record, user)?;
            if let Err(e) = self.store.put_mesh(&record) {
                tracing::error!("cannot save the endpoint id of mesh {name}: {e}");
            }
            Some((old, user.to_string()))
        });
        let rt = MeshRuntime::start(
            record,
            self.store.clone(),
            router,
            self.metrics.clone(),
            self.files.clone(),
            self.control_idle(),
        );
        if let Some((old, user)) = rebound.filter(|(old, _)| !old.is_empty()) {
            rt.event(
                "info",
                &format!(
                    "endpoint id is now {} (derived from user {user}; it was {old}): ports \
                     elsewhere that named the old id must be mapped again",
                    rt.id()
                ),
            );
        }
        let old = self.meshes.write().insert(name, rt.clone());
        if let Some(old) = old {
            old.stop();
        }
        rt
    }

    pub fn stop_mesh(&self, name: &str) {
        let old = self.meshes.write().remove(name);
        if let Some(old) = old {
            old.stop();
        }
    }

    /// The metrics in Prometheus' text format, with what the meshes hold read now.
    pub fn metrics_text(&self) -> String {
        let mut held = metrics::Held::default();
        for rt in self.runtimes() {
            held.meshes.push(metrics::MeshHubs {
                mesh: rt.name().to_string(),
                hubs: rt.links().len(),
                connected: rt.hubs_connected(),
            });
            held.ports_open += rt.ports_open();
        }
        held.connection_files = self.files.in_use();
        held.connection_files_budget = self.files.budget();
        held.connections_refused = self.files.refused();
        self.metrics.render(&held)
    }

    pub fn shutdown(&self) {
        for rt in self.runtimes() {
            rt.stop();
        }
    }
}
