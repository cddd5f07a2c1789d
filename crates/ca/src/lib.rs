//! The certificate authority: owns the mesh's root of trust (one SQLite file) and issues
//! user and hub certificates over a small HTTP API (docs/requirements.md §4).
//!
//! - [`store`] owns the database: the CA key pair, issued certificates, hubs, revocations.
//! - [`api`] is the HTTP shell over it.
//! - [`metrics`] counts what the API did, for Prometheus.
//! - [`tls`] serves it over HTTPS (always, when it listens on a non-loopback address).

pub mod api;
pub mod metrics;
pub mod store;
pub mod tls;

pub use api::{router, CaState};
pub use store::{CaStore, StoreError};
