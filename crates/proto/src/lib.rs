//! Shared types of ZTM: names and their rules, `HOST:PORT` addresses, the JSON model of the
//! agent's REST API, and the messages and timers of the agent ↔ hub wire protocol (see
//! PROTOCOL.md).
//!
//! Nothing here does I/O, so every rule can be unit-tested.

pub mod acl;
pub mod addr;
pub mod capsule;
pub mod exit;
pub mod invite;
pub mod listing;
pub mod local;
pub mod model;
pub mod names;
pub mod wire;
