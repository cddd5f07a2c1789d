//! The agent: runs on every computer of the mesh. It owns one SQLite file ([`store`]), keeps a
//! [`mesh::MeshRuntime`] per joined mesh (hub links in [`session`], the CA's revocation list
//! in [`crl`]), and serves the REST API ([`api`], guarded by [`guard`]) that the web UI and
//! the CLI use.

pub mod admission;
pub mod api;
pub mod balance;
pub mod crl;
pub mod discovery;
pub mod expiry;
pub mod guard;
pub mod identity;
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
    /// When set, every API request must carry `Authorization: Bearer <token>` ([`guard`]).
    pub token: Option<String>,
    meshes: RwLock<HashMap<String, Arc<MeshRuntime>>>,
    router: OnceLock<axum::Router>,
}

impl Agent {
    /// Opens the database; the API will listen on `listen` and, with a `token`, require it.
    pub fn open(
        database: &Path,
        reset: bool,
        listen: SocketAddr,
        token: Option<String>,
    ) -> Result<Arc<Agent>, store::StoreError> {
        let store = Arc::new(Store::open(database, reset)?);
        Ok(Arc::new(Agent {
            store,
            listen,
            token: token.filter(|t| !t.is_empty()),
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
        let rt = MeshRuntime::start(record, self.store.clone(), router);
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
