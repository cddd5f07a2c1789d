//! Talking to a running agent's REST API: where it is (flag, environment, config file,
//! default), one request per call, and its answers and errors turned into one-line messages.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Result};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use ztm_net::http1;
use ztm_proto::addr::HostPort;

use super::Usage;

/// The agent's address when nothing else names it.
pub const DEFAULT_AGENT: &str = "127.0.0.1:7777";

/// How long one request may take (remote endpoints answer through a hub).
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// Settings read from `~/.ztm/config`: `key = value` lines, `#` comments.
#[derive(Debug, Default)]
pub struct Config {
    pub agent: Option<String>,
    pub mesh: Option<String>,
}

pub fn config_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ztm").join("config"))
}

impl Config {
    /// Reads the config file; a missing or unreadable file is an empty config.
    pub fn load() -> Config {
        config_path()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|text| Config::parse(&text))
            .unwrap_or_default()
    }

    pub fn parse(text: &str) -> Config {
        let mut c = Config::default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            let Some((key, value)) = line.split_once('=').or_else(|| line.split_once(':')) else {
                continue;
            };
            let value = value.trim().trim_matches('"').to_string();
            if value.is_empty() {
                continue;
            }
            match key.trim() {
                "agent" => c.agent = Some(value),
                "mesh" => c.mesh = Some(value),
                _ => {}
            }
        }
        c
    }
}

/// Normalizes an agent address: accepts `HOST:PORT`, `http://HOST:PORT/` or a bare port.
pub fn normalize_addr(raw: &str) -> Result<String> {
    let s = raw.trim();
    let s = s
        .strip_prefix("http://")
        .unwrap_or(s)
        .trim_end_matches('/')
        .to_string();
    if let Ok(port) = s.parse::<u16>() {
        return Ok(format!("127.0.0.1:{port}"));
    }
    if HostPort::parse(&s).is_ok_and(|at| at.port > 0) {
        Ok(s)
    } else {
        Err(Usage(format!("bad agent address {raw:?}: expected HOST:PORT")).into())
    }
}

/// Percent-encodes one path segment.
pub fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A running agent's REST API.
pub struct Agent {
    pub addr: String,
    /// Its API token, sent as `Authorization: Bearer` on every request when given.
    pub token: Option<String>,
}

impl Agent {
    /// POSTs `body` as JSON; returns the JSON answer (None for an empty answer).
    pub async fn post<B: Serialize>(&self, path: &str, body: &B) -> Result<Option<Value>> {
        let json = serde_json::to_vec(body)
            .map_err(|e| anyhow!("cannot write the request for POST {path}: {e}"))?;
        self.call("POST", path, Some(Bytes::from(json))).await
    }

    /// DELETE; returns the JSON answer (None for an empty answer).
    pub async fn delete(&self, path: &str) -> Result<Option<Value>> {
        self.call("DELETE", path, None).await
    }

    /// Sends one request, with a JSON body if given; returns the JSON answer (None for an
    /// empty answer). Any failure is an error whose message fits on one line.
    async fn call(&self, method: &str, path: &str, json: Option<Bytes>) -> Result<Option<Value>> {
        let (ct, bytes) = match json {
            Some(b) => (Some("application/json"), b),
            None => (None, Bytes::new()),
        };
        let reply = http1::request(
            &self.addr,
            method,
            path,
            self.token.as_deref(),
            ct,
            bytes,
            REQUEST_DEADLINE,
        )
        .await
        .map_err(|e| self.transport_error(e))?;
        let text = reply.text();
        // The agent's own refusal (a far endpoint's 401, relayed, carries no challenge).
        let challenged = reply
            .headers
            .get(http::header::WWW_AUTHENTICATE)
            .is_some_and(|v| v.as_bytes().starts_with(b"Bearer"));
        if reply.status == 401 && challenged {
            return Err(anyhow!(
                "{}",
                match self.token {
                    None => format!(
                        "the agent at {} requires its API token: pass --token or set ZTM_AGENT_TOKEN",
                        self.addr
                    ),
                    Some(_) => format!("the agent at {} refused the API token given", self.addr),
                }
            ));
        }
        if reply.status >= 400 {
            let message = serde_json::from_str::<ztm_proto::model::ApiError>(&text)
                .map(|e| e.message)
                .unwrap_or_else(|_| {
                    let first = text.lines().next().unwrap_or("").trim();
                    if first.is_empty() {
                        format!("the agent answered {} to {method} {path}", reply.status)
                    } else {
                        format!("the agent answered {}: {first}", reply.status)
                    }
                });
            return Err(anyhow!("{message}"));
        }
        if text.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text).map(Some).map_err(|e| {
            anyhow!(
                "the agent at {} answered {method} {path} with something that is not JSON ({e})",
                self.addr
            )
        })
    }

    /// GET returning JSON (an empty answer is an error).
    pub async fn get(&self, path: &str) -> Result<Value> {
        self.call("GET", path, None)
            .await?
            .ok_or_else(|| anyhow!("the agent answered GET {path} with nothing"))
    }

    /// GET, also decoded as `T`; returns both (the raw JSON is what `-o json` prints).
    pub async fn get_as<T: DeserializeOwned>(&self, path: &str) -> Result<(T, Value)> {
        let v = self.get(path).await?;
        Ok((decode(&v, path)?, v))
    }

    /// What went wrong on the way to the agent, by the error's type: no connection, no
    /// answer in time, or a broken exchange.
    fn transport_error(&self, e: anyhow::Error) -> anyhow::Error {
        match e.downcast_ref::<http1::NoAnswer>() {
            Some(http1::NoAnswer::Timeout { .. }) => anyhow!(
                "the agent at {} did not answer within {} s",
                self.addr,
                REQUEST_DEADLINE.as_secs()
            ),
            Some(http1::NoAnswer::Connect { source, .. }) => {
                let reason = match source.kind() {
                    std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                    std::io::ErrorKind::TimedOut => "timed out".to_string(),
                    _ => strip_os_error(&source.to_string()),
                };
                anyhow!("cannot reach the agent at {}: {reason}", self.addr)
            }
            None => anyhow!(
                "talking to the agent at {}: {}",
                self.addr,
                strip_os_error(&format!("{e:#}"))
            ),
        }
    }
}

/// Decodes an answer into the model type, naming the request when it does not fit.
pub fn decode<T: DeserializeOwned>(v: &Value, path: &str) -> Result<T> {
    serde_json::from_value(v.clone())
        .map_err(|e| anyhow!("unexpected answer from the agent to GET {path}: {e}"))
}

fn strip_os_error(s: &str) -> String {
    let s = match s.find(" (os error") {
        Some(i) => &s[..i],
        None => s,
    };
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lines() {
        let c = Config::parse("# comment\nagent = 127.0.0.1:1234\n\nmesh=home # mine\nother = x\n");
        assert_eq!(c.agent.as_deref(), Some("127.0.0.1:1234"));
        assert_eq!(c.mesh.as_deref(), Some("home"));
    }

    #[test]
    fn addresses() {
        assert_eq!(
            normalize_addr("127.0.0.1:7777").ok().as_deref(),
            Some("127.0.0.1:7777")
        );
        assert_eq!(
            normalize_addr("http://localhost:80/").ok().as_deref(),
            Some("localhost:80")
        );
        assert_eq!(
            normalize_addr("7000").ok().as_deref(),
            Some("127.0.0.1:7000")
        );
        assert!(normalize_addr("nohost").is_err());
        assert!(normalize_addr("h:0").is_err());
    }

    #[test]
    fn transport_errors_by_type() {
        let agent = Agent {
            addr: "127.0.0.1:7777".into(),
            token: None,
        };
        let said = |e: http1::NoAnswer| agent.transport_error(e.into()).to_string();
        assert_eq!(
            said(http1::NoAnswer::Timeout {
                addr: agent.addr.clone(),
                deadline: REQUEST_DEADLINE,
            }),
            "the agent at 127.0.0.1:7777 did not answer within 60 s"
        );
        assert_eq!(
            said(http1::NoAnswer::Connect {
                addr: agent.addr.clone(),
                source: std::io::ErrorKind::ConnectionRefused.into(),
            }),
            "cannot reach the agent at 127.0.0.1:7777: connection refused"
        );
        assert_eq!(
            said(http1::NoAnswer::Connect {
                addr: agent.addr.clone(),
                source: std::io::Error::other("No route to host (os error 113)"),
            }),
            "cannot reach the agent at 127.0.0.1:7777: no route to host"
        );
        assert_eq!(
            agent
                .transport_error(anyhow!("connection closed before message completed"))
                .to_string(),
            "talking to the agent at 127.0.0.1:7777: connection closed before message completed"
        );
    }

    #[test]
    fn encoding() {
        assert_eq!(enc("a-b.c_d@e"), "a-b.c_d@e");
        assert_eq!(enc("::1"), "%3A%3A1");
        assert_eq!(enc("a/b c"), "a%2Fb%20c");
    }
}
