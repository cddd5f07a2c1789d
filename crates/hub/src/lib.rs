//! The hub: a public relay that agents dial out to. It keeps no durable state: the
//! [`registry`] knows the endpoints connected right now and [`state`] holds it together with
//! the connections and sessions; [`admission`] decides who may do what and [`limits`] what
//! anyone may hold; [`server`] owns the listening socket; [`control`] serves the agents'
//! control connections; [`reverse`] drives the reverse connections over which the hub opens
//! streams to agents; [`closer`] closes connections and says why (GOAWAY); [`ca_client`] gets
//! the hub's certificate and the revocation feed from the CA.

pub mod admission;
pub mod ca_client;
pub mod closer;
pub mod control;
pub mod limits;
pub mod metrics;
mod metrics_api;
pub mod registry;
pub mod reverse;
pub mod server;
pub mod state;

pub use limits::Limits;
pub use server::{run, HubConfig};
