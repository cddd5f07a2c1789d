//! The exit end of exit tunnels (PROTOCOL.md, "Exit tunnels"; docs/exits.md): a hub asks this
//! endpoint, as an exit, to connect to `ztm-destination` on behalf of the user in `ztm-user`.
//! The user is checked again against the exit's `users` (the hub checked first), the
//! destination against the exit's rules before any name is resolved, and every address a name
//! resolves to against the rules again; only then is a connection opened. Which of these
//! allow what is decided in `ztm_proto::exit` and [`crate::admission`]; this module resolves,
//! connects and relays.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use http::StatusCode;
use tokio::net::TcpStream;
use ztm_proto::exit::{Destination, Host};
use ztm_proto::model::ApiError;
use ztm_proto::wire::{
    CONNECTION_REFUSED, DESTINATION_HEADER, HOST_UNREACHABLE, SERVICE_CONNECT_TIMEOUT,
};

use crate::admission;
use crate::lookups::Lookups;
use crate::mesh::Mesh;

/// Why the exit could not connect, as the tunnel's opener is told.
fn failure(status: StatusCode, reason: Option<&str>, message: String) -> ApiError {
    let e = ApiError::new(status.as_u16(), message);
    match reason {
        Some(r) => e.with_reason(r),
        None => e,
    }
}

/// The status and reason of a failed connect or lookup: refused, or unreachable.
fn connect_failure(dest: &Destination, e: &std::io::Error) -> ApiError {
    let reason = if e.kind() == std::io::ErrorKind::ConnectionRefused {
        CONNECTION_REFUSED
    } else {
        HOST_UNREACHABLE
    };
    failure(
        StatusCode::BAD_GATEWAY,
        Some(reason),
        format!("the exit cannot connect to {dest}: {e}"),
    )
}

/// Where to connect for `dest`: the address itself, or what the name resolves to that the
/// rules allow. A name is resolved for `user` within the bounds of [`crate::lookups`].
async fn addresses(
    rules: &ztm_proto::exit::Rules,
    dest: &Destination,
    user: &str,
    lookups: &Arc<Lookups>,
) -> Result<Vec<SocketAddr>, ApiError> {
    let forbidden =
        |d: ztm_proto::exit::Denied| failure(StatusCode::FORBIDDEN, None, d.to_string());
    if let Some(addr) = rules.admit(dest).map_err(forbidden)? {
        return Ok(vec![addr]);
    }
    let Host::Name(name) = &dest.host else {
        return Err(failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            format!("{dest}: an address the rules did not judge"),
        ));
    };
    let slot = lookups.try_take(user).map_err(|busy| {
        failure(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            format!("the exit cannot resolve {name} now: {busy}"),
        )
    })?;
    // The slot goes with the lookup to its thread and is given back when the resolver is done
    // with it, not when the tunnel stops waiting: it counts the threads held.
    let (host, port) = (name.clone(), dest.port);
    let lookup = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        (host.as_str(), port)
            .to_socket_addrs()
            .map(|addrs| addrs.collect::<Vec<SocketAddr>>())
    });
    let resolved = match tokio::time::timeout(SERVICE_CONNECT_TIMEOUT, lookup).await {
        Ok(Ok(Ok(addrs))) => addrs,
        Ok(Ok(Err(e))) => {
            return Err(failure(
                StatusCode::BAD_GATEWAY,
                Some(HOST_UNREACHABLE),
                format!("the exit cannot resolve {name}: {e}"),
            ))
        }
        Ok(Err(e)) => {
            return Err(failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                format!("resolving {name}: {e}"),
            ))
        }
        Err(_) => {
            return Err(failure(
                StatusCode::GATEWAY_TIMEOUT,
                Some(HOST_UNREACHABLE),
                format!("the exit got no answer resolving {name}"),
            ))
        }
    };
    rules.pick(name, &resolved).map_err(forbidden)
}

/// Connects to the first of `addrs` that accepts, all within [`SERVICE_CONNECT_TIMEOUT`].
async fn connect(dest: &Destination, addrs: &[SocketAddr]) -> Result<TcpStream, ApiError> {
    let attempts = async {
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no address")))
    };
    match tokio::time::timeout(SERVICE_CONNECT_TIMEOUT, attempts).await {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(e)) => Err(connect_failure(dest, &e)),
        Err(_) => Err(failure(
            StatusCode::GATEWAY_TIMEOUT,
            Some(HOST_UNREACHABLE),
            format!("{dest} did not accept the exit's connection in time"),
        )),
    }
}

/// Exit end of a tunnel for `user`, whom hub `hub` names, to the destination `headers` name:
/// the connection to it, or the error to answer with. The caller relays.
pub async fn connect_for(
    rt: &Mesh,
    hub: &str,
    user: &str,
    headers: &http::HeaderMap,
) -> Result<(TcpStream, Destination), ApiError> {
    let Some(exit) = rt.local_exit() else {
        return Err(failure(
            StatusCode::NOT_FOUND,
            None,
            "this endpoint is not an exit".into(),
        ));
    };
    if let Err(refusal) = admission::tunnel(user, rt.username(), "the exit", exit.users.as_deref())
    {
        rt.refused(
            hub,
            &format!("refused an exit tunnel for user {user}, whom the exit does not admit"),
        );
        return Err(failure(refusal.status(), None, refusal.to_string()));
    }
    let dest = headers
        .get(DESTINATION_HEADER)
        .ok_or_else(|| format!("no {DESTINATION_HEADER} header"))
        .and_then(|v| {
            v.to_str()
                .map_err(|_| "a destination that is not text".into())
        })
        .and_then(Destination::parse)
        .map_err(|e| failure(StatusCode::BAD_REQUEST, None, e))?;
    let connected = match addresses(&exit.rules, &dest, user, rt.lookups()).await {
        Ok(addrs) => connect(&dest, &addrs).await,
        Err(e) => Err(e),
    };
    match connected {
        Ok(tcp) => Ok((tcp, dest)),
        Err(e) => {
            tracing::info!(user, destination = %dest, "exit: {}", e.message);
            Err(e)
        }
    }
}
