//! The hub: a public relay that agents dial out to. It keeps no durable state: the
//! [`registry`] knows the endpoints connected right now; [`control`] serves the agents' control
//! connections; [`reverse`] drives the reverse connections over which the hub opens streams to
//! agents; [`ca_client`] gets the hub's certificate and the revocation feed from the CA.

pub mod ca_client;
pub mod control;
pub mod registry;
pub mod reverse;
pub mod server;

pub use server::{run, HubConfig};
