//! The agent: runs on every computer of the mesh. It owns one SQLite file ([`store`]), keeps a
//! running mesh per joined mesh ([`supervisor::MeshRuntime`]: the mesh's data in [`mesh`], its
//! hub links in [`session`], the CA's revocation list in [`crl`], tunnels in [`tunnel`], the
//! exit end of exit tunnels in [`exit`] (its name lookups bounded by [`lookups`]), port
//! listeners in [`ports`] and the SOCKS5 and HTTP proxies among them in [`proxy`]), and serves
//! the REST API ([`api`]) that the web UI and the CLI use. The decisions are pure functions with table tests: [`admission`]
//! (who may do what a hub forwards), [`discovery`] (what the hubs report, merged), [`balance`]
//! (which provider), [`identity`] (endpoint ids), [`expiry`] (certificate warnings). What the
//! tunnels did is counted per port in [`figures`] and for the whole agent in [`metrics`]
//! (Prometheus).
//!
//! Modules depend one way: `api` → `agent` → `supervisor` → (`session`, `ports` → `proxy`) →
//! `tunnel` → `exit` → `mesh` → (`crl`, `store`, `lookups`, `figures` → `metrics`, the pure
//! modules); `scripts/module-cycles.py` checks it.

pub mod admission;
pub mod agent;
pub mod api;
pub mod balance;
pub mod crl;
pub mod discovery;
pub mod error;
pub mod exit;
pub mod expiry;
pub mod figures;
pub mod files;
pub mod identity;
pub mod lookups;
pub mod mesh;
pub mod metrics;
pub mod ports;
pub mod proxy;
pub mod session;
pub mod store;
pub mod supervisor;
pub mod tunnel;
pub mod ui;

pub use agent::Agent;
pub use api::ApiError;
