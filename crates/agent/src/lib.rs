//! The agent: runs on every computer of the mesh. It owns one SQLite file ([`store`]), keeps a
//! [`mesh::MeshRuntime`] per joined mesh (hub links in [`session`], the CA's revocation list
//! in [`crl`]), and serves the REST API ([`api`], guarded by [`guard`]) that the web UI and
//! the CLI use.

pub mod api;
pub mod balance;
pub mod crl;
pub mod guard;
pub mod mesh;
pub mod ports;
pub mod session;
pub mod store;
pub mod tunnel;
pub mod ui;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock};

pub use api::ApiError;
use mesh::MeshRuntime;
use store::{MeshRecord, Store};

/// Marks a request that a hub forwarded from another endpoint (with the user it came from).
#[derive(Clone, Debug)]
pub struct Forwarded {
    pub user: String,
}

pub struct Agent {
    pub store: Arc<Store>,
    /// The address the REST API listens on (for the Host check).
    pub listen: SocketAddr,
    meshes: RwLock<HashMap<String, Arc<MeshRuntime>>>,
    router: OnceLock<axum::Router>,
}

impl Agent {
    pub fn open(
        database: &Path,
        reset: bool,
        listen: SocketAddr,
    ) -> Result<Arc<Agent>, store::StoreError> {
        let store = Arc::new(Store::open(database, reset)?);
        Ok(Arc::new(Agent {
            store,
            listen,
            meshes: RwLock::new(HashMap::new()),
            router: OnceLock::new(),
        }))
    }

    /// Builds the REST API and starts every joined mesh. Call once, inside the runtime.
    pub fn start(self: &Arc<Self>) -> Result<axum::Router, store::StoreError> {
        let router = self
            .router
            .get_or_init(|| api::router(self.clone()))
            .clone();
        for record in self.store.meshes()? {
            self.start_mesh(record);
        }
        Ok(router)
    }

    pub fn runtime(&self, name: &str) -> Option<Arc<MeshRuntime>> {
        self.meshes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn runtimes(&self) -> Vec<Arc<MeshRuntime>> {
        let mut list: Vec<_> = self
            .meshes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        list.sort_by(|a, b| a.name().cmp(b.name()));
        list
    }

    /// Starts (or restarts, with a new configuration) a mesh's runtime.
    pub fn start_mesh(&self, record: MeshRecord) -> Arc<MeshRuntime> {
        let router = self.router.get().cloned().unwrap_or_default();
        let name = record.name.clone();
        let rt = MeshRuntime::start(record, self.store.clone(), router);
        let old = self
            .meshes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, rt.clone());
        if let Some(old) = old {
            old.stop();
        }
        rt
    }

    pub fn stop_mesh(&self, name: &str) {
        let old = self
            .meshes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(old) = old {
            old.stop();
        }
    }

    pub fn shutdown(&self) {
        for rt in self.runtimes() {
            rt.stop();
        }
    }
}
