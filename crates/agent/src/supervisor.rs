//! A running mesh: its data ([`Mesh`]) and what runs for it — a link task per hub
//! ([`crate::session`]), the port listeners ([`Ports`]) and the expiry warnings. Started and
//! stopped as one; the only place that spawns a mesh's tasks.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use ztm_proto::model::PortStats;

use crate::files::Files;
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::ports::{PortKey, PortState, Ports};
use crate::store::{MeshRecord, Store};

/// Expiry warnings are written to the log at start and then once a day while they last.
const WARN_EVERY: Duration = Duration::from_secs(24 * 3600);

pub struct MeshRuntime {
    mesh: Arc<Mesh>,
    ports: Ports,
}

/// A running mesh is used through its data.
impl std::ops::Deref for MeshRuntime {
    type Target = Mesh;
    fn deref(&self) -> &Mesh {
        &self.mesh
    }
}

impl MeshRuntime {
    /// Builds the mesh of `record` and starts it: a link task per hub, its port listeners,
    /// its warnings. Its tunnels count in `metrics` and hold their files from `files`.
    pub fn start(
        record: MeshRecord,
        store: Arc<Store>,
        router: axum::Router,
        metrics: Arc<Metrics>,
        files: Arc<Files>,
        control_idle: Option<std::time::Duration>,
    ) -> Arc<MeshRuntime> {
        let mesh = Mesh::new(record, store, router, metrics, files, control_idle);
        for e in mesh.config_errors() {
            mesh.event("error", &e.message);
        }
        {
            let mesh = mesh.clone();
            tokio::spawn(async move {
                loop {
                    for w in mesh.warnings() {
                        mesh.event("warning", &w.message);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(WARN_EVERY) => {}
                        _ = mesh.stopping().cancelled() => return,
                    }
                }
            });
        }
        if mesh.tls().is_some() {
            for link in mesh.links() {
                let span = tracing::info_span!("link", mesh = %mesh.name(), hub = %link.addr);
                tokio::spawn(crate::session::run_link(mesh.clone(), link.clone()).instrument(span));
            }
        }
        let rt = Arc::new(MeshRuntime {
            mesh,
            ports: Ports::default(),
        });
        rt.sync_ports();
        rt
    }

    pub fn mesh(&self) -> &Arc<Mesh> {
        &self.mesh
    }

    /// Opens, closes or retargets listeners to match the stored ports.
    pub fn sync_ports(&self) {
        match self.mesh.store().ports(self.mesh.name()) {
            Ok(wanted) => self.ports.sync(&self.mesh, &wanted),
            Err(e) => tracing::error!("reading ports: {e}"),
        }
    }

    pub fn port_state(&self, key: &PortKey) -> PortState {
        self.ports.state(key)
    }

    /// A port's live figures.
    pub fn port_stats(&self, key: &PortKey) -> PortStats {
        self.ports.stats(key)
    }

    /// How many of the mesh's ports are listening.
    pub fn ports_open(&self) -> usize {
        self.ports.open()
    }

    /// Stops the links, the listeners and every tunnel of the mesh.
    pub fn stop(&self) {
        self.mesh.stop();
        self.ports.stop_all();
    }
}
