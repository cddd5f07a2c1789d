//! The agent's SQLite database: meshes it joined (with its key), the services it publishes,
//! its exit, its port mappings and proxies, each mesh's event log and the newest CRL of each mesh's CA. Every change is one transaction, so a crash at
//! any moment loses nothing that was acknowledged.

use parking_lot::{Mutex, MutexGuard};
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use ztm_proto::model::{Exit, LogEntry, PortTarget};
use ztm_proto::wire::Proto;

/// Log entries kept per mesh (older ones are dropped).
const LOG_KEEP: i64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("corrupt record in the database: {0}")]
    Corrupt(String),
}

fn short(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(_, Some(msg)) => msg.clone(),
        rusqlite::Error::SqliteFailure(code, None) => code.to_string(),
        other => other.to_string(),
    }
}

/// A joined mesh as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshRecord {
    pub name: String,
    pub ca: String,
    pub cert: String,
    pub key: String,
    pub agent_name: String,
    pub endpoint_id: String,
    /// The nonce the endpoint id is derived from with the certificate's user
    /// (`ztm_proto::wire::endpoint_id`); empty for an id from before ids were derived.
    pub id_nonce: String,
    pub bootstraps: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    pub protocol: Proto,
    pub name: String,
    pub host: String,
    pub port: u16,
    pub users: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRecord {
    pub ip: String,
    pub protocol: Proto,
    pub port: u16,
    pub target: PortTarget,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meshes (
    name TEXT PRIMARY KEY,
    ca TEXT NOT NULL,
    cert TEXT NOT NULL,
    key TEXT NOT NULL,
    agent_name TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    bootstraps TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS services (
    mesh TEXT NOT NULL,
    protocol TEXT NOT NULL,
    name TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    users TEXT,
    PRIMARY KEY (mesh, protocol, name)
);
CREATE TABLE IF NOT EXISTS ports (
    mesh TEXT NOT NULL,
    ip TEXT NOT NULL,
    protocol TEXT NOT NULL,
    port INTEGER NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (mesh, ip, protocol, port)
);
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mesh TEXT NOT NULL,
    time INTEGER NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS log_mesh ON log (mesh, id);
CREATE TABLE IF NOT EXISTS crls (
    mesh TEXT PRIMARY KEY,
    number INTEGER NOT NULL,
    pem TEXT NOT NULL
);
";

/// Changes to [`SCHEMA`], in order; `PRAGMA user_version` counts those applied. A new
/// database gets the schema above and then every one of them.
const MIGRATIONS: &[&str] = &[
    // Endpoint ids derived from the user's name and a nonce.
    "ALTER TABLE meshes ADD COLUMN id_nonce TEXT NOT NULL DEFAULT ''",
    // Exits: the destinations an endpoint lets connections out to, and who may use it.
    "CREATE TABLE exits (
        mesh TEXT PRIMARY KEY,
        allow TEXT NOT NULL,
        users TEXT
    )",
];

/// Brings the database's schema up to date, each step in its own transaction.
fn migrate(conn: &mut Connection) -> Result<(), rusqlite::Error> {
    let applied: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(0);
    for (i, step) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )?;
        tx.commit()?;
    }
    Ok(())
}

pub struct Store {
    conn: Mutex<Connection>,
}

fn proto_of(s: String) -> Result<Proto, rusqlite::Error> {
    Proto::parse(&s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("bad protocol {s:?}").into(),
        )
    })
}

fn json_col<T: serde::de::DeserializeOwned>(s: String) -> Result<T, rusqlite::Error> {
    serde_json::from_str(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

impl Store {
    pub fn open(path: &Path, reset: bool) -> Result<Self, StoreError> {
        let open_err = |e: rusqlite::Error| StoreError::Open {
            path: path.display().to_string(),
            reason: short(&e),
        };
        // The database holds private keys.
        ztm_pki::owner_only_file(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        migrate(&mut conn).map_err(open_err)?;
        if reset {
            conn.execute_batch(
                "BEGIN; DELETE FROM meshes; DELETE FROM services; DELETE FROM ports; DELETE FROM log; DELETE FROM crls; COMMIT;",
            )
            .map_err(open_err)?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock()
    }

    pub fn meshes(&self) -> Result<Vec<MeshRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, ca, cert, key, agent_name, endpoint_id, bootstraps, id_nonce FROM meshes \
             ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(MeshRecord {
                name: r.get(0)?,
                ca: r.get(1)?,
                cert: r.get(2)?,
                key: r.get(3)?,
                agent_name: r.get(4)?,
                endpoint_id: r.get(5)?,
                bootstraps: json_col(r.get(6)?)?,
                id_nonce: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn mesh(&self, name: &str) -> Result<Option<MeshRecord>, StoreError> {
        Ok(self.meshes()?.into_iter().find(|m| m.name == name))
    }

    pub fn put_mesh(&self, m: &MeshRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO meshes (name, ca, cert, key, agent_name, endpoint_id, bootstraps, id_nonce)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (name) DO UPDATE SET ca = ?2, cert = ?3, key = ?4, agent_name = ?5,
               endpoint_id = ?6, bootstraps = ?7, id_nonce = ?8",
            params![
                m.name,
                m.ca,
                m.cert,
                m.key,
                m.agent_name,
                m.endpoint_id,
                to_json(&m.bootstraps),
                m.id_nonce
            ],
        )?;
        Ok(())
    }

    /// Removes a mesh and everything configured in it; false if there was none.
    pub fn delete_mesh(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.execute("DELETE FROM meshes WHERE name = ?1", [name])?;
        tx.execute("DELETE FROM services WHERE mesh = ?1", [name])?;
        tx.execute("DELETE FROM ports WHERE mesh = ?1", [name])?;
        tx.execute("DELETE FROM log WHERE mesh = ?1", [name])?;
        tx.execute("DELETE FROM crls WHERE mesh = ?1", [name])?;
        tx.execute("DELETE FROM exits WHERE mesh = ?1", [name])?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// The CRL kept for `mesh` (PEM), if any. Its signature is checked by whoever uses it.
    pub fn crl(&self, mesh: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT pem FROM crls WHERE mesh = ?1", [mesh], |r| r.get(0))
            .optional()?)
    }

    /// Forgets the CRL of `mesh` (one of another CA, after the mesh's CA changed).
    pub fn delete_crl(&self, mesh: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM crls WHERE mesh = ?1", [mesh])?;
        Ok(())
    }

    /// Keeps `pem` as the CRL of `mesh` unless one numbered `number` or above is kept already.
    pub fn put_crl(&self, mesh: &str, number: u64, pem: &str) -> Result<(), StoreError> {
        let number = i64::try_from(number).unwrap_or(i64::MAX);
        self.conn().execute(
            "INSERT INTO crls (mesh, number, pem) VALUES (?1, ?2, ?3)
             ON CONFLICT (mesh) DO UPDATE SET number = ?2, pem = ?3 WHERE ?2 > crls.number",
            params![mesh, number, pem],
        )?;
        Ok(())
    }

    pub fn services(&self, mesh: &str) -> Result<Vec<ServiceRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT protocol, name, host, port, users FROM services WHERE mesh = ?1 ORDER BY protocol, name",
        )?;
        let rows = stmt.query_map([mesh], |r| {
            let users: Option<String> = r.get(4)?;
            Ok(ServiceRecord {
                protocol: proto_of(r.get(0)?)?,
                name: r.get(1)?,
                host: r.get(2)?,
                port: r.get(3)?,
                users: users.map(json_col).transpose()?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn put_service(&self, mesh: &str, s: &ServiceRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO services (mesh, protocol, name, host, port, users) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (mesh, protocol, name) DO UPDATE SET host = ?4, port = ?5, users = ?6",
            params![
                mesh,
                s.protocol.as_str(),
                s.name,
                s.host,
                s.port,
                s.users.as_ref().map(to_json)
            ],
        )?;
        Ok(())
    }

    pub fn delete_service(
        &self,
        mesh: &str,
        protocol: Proto,
        name: &str,
    ) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM services WHERE mesh = ?1 AND protocol = ?2 AND name = ?3",
            params![mesh, protocol.as_str(), name],
        )?;
        Ok(n > 0)
    }

    /// This endpoint's exit in `mesh`, if it is one.
    pub fn exit(&self, mesh: &str) -> Result<Option<Exit>, StoreError> {
        let row = self
            .conn()
            .query_row(
                "SELECT allow, users FROM exits WHERE mesh = ?1",
                [mesh],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)),
            )
            .optional()?;
        let Some((allow, users)) = row else {
            return Ok(None);
        };
        Ok(Some(Exit {
            allow: json_col(allow)?,
            users: users.map(json_col).transpose()?,
        }))
    }

    pub fn put_exit(&self, mesh: &str, exit: &Exit) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO exits (mesh, allow, users) VALUES (?1, ?2, ?3)
             ON CONFLICT (mesh) DO UPDATE SET allow = ?2, users = ?3",
            params![mesh, to_json(&exit.allow), exit.users.as_ref().map(to_json)],
        )?;
        Ok(())
    }

    /// False if there was none.
    pub fn delete_exit(&self, mesh: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM exits WHERE mesh = ?1", [mesh])?;
        Ok(n > 0)
    }

    pub fn ports(&self, mesh: &str) -> Result<Vec<PortRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT ip, protocol, port, target FROM ports WHERE mesh = ?1 ORDER BY ip, protocol, port",
        )?;
        let rows = stmt.query_map([mesh], |r| {
            Ok(PortRecord {
                ip: r.get(0)?,
                protocol: proto_of(r.get(1)?)?,
                port: r.get(2)?,
                target: json_col(r.get(3)?)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn put_port(&self, mesh: &str, p: &PortRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO ports (mesh, ip, protocol, port, target) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (mesh, ip, protocol, port) DO UPDATE SET target = ?5",
            params![mesh, p.ip, p.protocol.as_str(), p.port, to_json(&p.target)],
        )?;
        Ok(())
    }

    pub fn delete_port(
        &self,
        mesh: &str,
        ip: &str,
        protocol: Proto,
        port: u16,
    ) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM ports WHERE mesh = ?1 AND ip = ?2 AND protocol = ?3 AND port = ?4",
            params![mesh, ip, protocol.as_str(), port],
        )?;
        Ok(n > 0)
    }

    pub fn append_log(
        &self,
        mesh: &str,
        time: u64,
        kind: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO log (mesh, time, kind, message) VALUES (?1, ?2, ?3, ?4)",
            params![mesh, time as i64, kind, message],
        )?;
        tx.execute(
            "DELETE FROM log WHERE mesh = ?1 AND id <= (SELECT MAX(id) FROM log WHERE mesh = ?1) - ?2",
            params![mesh, LOG_KEEP],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn log(&self, mesh: &str) -> Result<Vec<LogEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT time, kind, message FROM log WHERE mesh = ?1 ORDER BY id")?;
        let rows = stmt.query_map([mesh], |r| {
            Ok(LogEntry {
                time: r.get::<_, i64>(0)? as u64,
                kind: r.get(1)?,
                message: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn has_mesh(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM meshes WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> (std::path::PathBuf, Store) {
        let p = std::env::temp_dir().join(format!("ztm-agent-store-{}.db", rand::random::<u64>()));
        let s = Store::open(&p, false).unwrap();
        (p, s)
    }

    #[test]
    fn meshes_services_ports_log() {
        let (path, s) = temp_store();
        let m = MeshRecord {
            name: "m".into(),
            ca: "ca".into(),
            cert: "c".into(),
            key: "k".into(),
            agent_name: "a".into(),
            endpoint_id: "id".into(),
            id_nonce: "n".into(),
            bootstraps: vec!["h:1".into()],
        };
        s.put_mesh(&m).unwrap();
        assert_eq!(s.mesh("m").unwrap(), Some(m.clone()));
        let svc = ServiceRecord {
            protocol: Proto::Tcp,
            name: "web".into(),
            host: "127.0.0.1".into(),
            port: 80,
            users: Some(vec!["bob".into()]),
        };
        s.put_service("m", &svc).unwrap();
        assert_eq!(s.services("m").unwrap(), vec![svc]);
        let port = PortRecord {
            ip: "127.0.0.1".into(),
            protocol: Proto::Udp,
            port: 53,
            target: PortTarget {
                service: "dns".into(),
                endpoint: None,
                trust: None,
                user: None,
            },
        };
        s.put_port("m", &port).unwrap();
        assert_eq!(s.ports("m").unwrap(), vec![port]);
        for i in 0..(LOG_KEEP + 10) {
            s.append_log("m", i as u64, "info", "x").unwrap();
        }
        let log = s.log("m").unwrap();
        assert_eq!(log.len() as i64, LOG_KEEP);
        assert_eq!(log.last().unwrap().time, (LOG_KEEP + 9) as u64);
        drop(s);
        let s = Store::open(&path, false).unwrap();
        assert_eq!(s.services("m").unwrap().len(), 1);
        assert_eq!(s.exit("m").unwrap(), None);
        let exit = Exit {
            allow: vec!["10.0.0.0/8".into(), "*.corp.example:443".into()],
            users: Some(vec!["alice".into()]),
        };
        s.put_exit("m", &exit).unwrap();
        s.put_exit("m", &exit).unwrap();
        drop(s);
        let s = Store::open(&path, false).unwrap();
        assert_eq!(s.exit("m").unwrap(), Some(exit.clone()));
        assert!(s.delete_exit("m").unwrap());
        assert!(!s.delete_exit("m").unwrap());
        s.put_exit("m", &exit).unwrap();
        s.put_crl("m", 3, "three").unwrap();
        s.put_crl("m", 2, "two").unwrap();
        assert_eq!(s.crl("m").unwrap().as_deref(), Some("three"));
        s.put_crl("m", 4, "four").unwrap();
        assert_eq!(s.crl("m").unwrap().as_deref(), Some("four"));
        assert!(s.delete_mesh("m").unwrap());
        assert!(s.crl("m").unwrap().is_none());
        assert!(s.services("m").unwrap().is_empty());
        assert!(s.ports("m").unwrap().is_empty());
        assert_eq!(s.exit("m").unwrap(), None);
        drop(s);
        // The database and its WAL files.
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.clone().into_os_string();
            name.push(suffix);
            let _ = std::fs::remove_file(name);
        }
    }
}
