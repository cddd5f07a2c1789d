//! What can go wrong in a mesh's runtime, as its own type; the REST API turns it into HTTP in
//! one place (`api/error.rs`).

/// Why a request through the mesh's hubs failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// No hub of the mesh is connected.
    #[error("not connected to any hub of this mesh")]
    NotConnected,
    /// No connected hub has the endpoint online (the last hub's words).
    #[error("{0}")]
    NotHere(String),
    /// The hubs that have it could not carry the request to it.
    #[error("no hub could reach endpoint {0}")]
    Unreachable(String),
    /// The request cannot be put on the wire (a path or header that is not valid).
    #[error("{0}")]
    BadRequest(String),
}
