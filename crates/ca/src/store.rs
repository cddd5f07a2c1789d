//! The CA's SQLite database: its key pair, the certificates it issued and its revocations.
//! Every change is one transaction; the private keys of users are never stored.

use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use ztm_pki::{CaSigner, PkiError};
use ztm_proto::model::{CertificateEntry, Revocation, RevocationFeed};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("certificate {0} already exists")]
    Exists(String),
    #[error("no certificate named {0}")]
    NotFound(String),
}

/// SQLite's own reason, without the path and code rusqlite repeats around it.
fn short(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(_, Some(msg)) => msg.clone(),
        rusqlite::Error::SqliteFailure(code, None) => code.to_string(),
        other => other.to_string(),
    }
}

pub struct CaStore {
    conn: Mutex<Connection>,
    signer: CaSigner,
    /// How long the certificates signed for hubs are valid.
    hub_lifetime: std::time::Duration,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ca (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cert_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    name TEXT PRIMARY KEY,
    serial TEXT NOT NULL UNIQUE,
    cert_pem TEXT NOT NULL,
    created INTEGER NOT NULL,
    not_after INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    serial TEXT NOT NULL,
    time INTEGER NOT NULL
);
";

impl CaStore {
    /// Opens (or creates) the database and the CA in it. A new database gets a new CA key and
    /// self-signed certificate; an existing one keeps its CA forever.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |e: rusqlite::Error| StoreError::Open {
            path: path.display().to_string(),
            reason: short(&e),
        };
        // The database holds the CA's private key: anyone who reads it can sign certificates.
        ztm_pki::owner_only_file(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        let existing: Option<(String, String)> = conn
            .query_row("SELECT cert_pem, key_pem FROM ca WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let (cert, key) = match existing {
            Some(pair) => pair,
            None => {
                let ca = ztm_pki::create_ca()?;
                let tx = conn.transaction()?;
                tx.execute(
                    "INSERT OR IGNORE INTO ca (id, cert_pem, key_pem, created) VALUES (1, ?1, ?2, ?3)",
                    params![ca.cert_pem, ca.key_pem, now()],
                )?;
                let pair =
                    tx.query_row("SELECT cert_pem, key_pem FROM ca WHERE id = 1", [], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?;
                tx.commit()?;
                tracing::info!("created a new CA certificate in {}", path.display());
                pair
            }
        };
        let signer = CaSigner::load(&cert, &key)?;
        Ok(Self {
            conn: Mutex::new(conn),
            signer,
            hub_lifetime: ztm_pki::HUB_VALIDITY,
        })
    }

    /// Signs hub certificates valid for `lifetime` from now on.
    pub fn set_hub_cert_lifetime(&mut self, lifetime: std::time::Duration) {
        self.hub_lifetime = lifetime;
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn ca_cert_pem(&self) -> &str {
        self.signer.cert_pem()
    }

    /// Issues a certificate for a new user; returns the private key PEM (never stored).
    pub fn create_user(&self, name: &str) -> Result<String, StoreError> {
        if self.get(name)?.is_some() {
            return Err(StoreError::Exists(name.to_string()));
        }
        let issued = self.signer.issue_user(name)?;
        let info = ztm_pki::cert_info_pem(&issued.cert_pem, "certificate")?;
        let result = self.conn().execute(
            "INSERT INTO certificates (name, serial, cert_pem, created, not_after) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, issued.serial, issued.cert_pem, now(), info.not_after],
        );
        match result {
            Ok(_) => Ok(issued.key_pem),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Exists(name.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn get(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT cert_pem FROM certificates WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn list(&self) -> Result<Vec<CertificateEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, serial, created, not_after FROM certificates ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(CertificateEntry {
                name: r.get(0)?,
                serial: r.get(1)?,
                created: r.get(2)?,
                not_after: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes a user's certificate and records its serial as revoked, atomically.
    pub fn revoke(&self, name: &str) -> Result<Revocation, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let serial: Option<String> = tx
            .query_row(
                "SELECT serial FROM certificates WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        let Some(serial) = serial else {
            return Err(StoreError::NotFound(name.to_string()));
        };
        let time = now();
        tx.execute("DELETE FROM certificates WHERE name = ?1", [name])?;
        tx.execute(
            "INSERT INTO revocations (name, serial, time) VALUES (?1, ?2, ?3)",
            params![name, serial, time],
        )?;
        let seq = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Revocation {
            seq,
            name: name.to_string(),
            serial,
            time,
        })
    }

    /// Revocations after `since`, at most `limit` of them, oldest first.
    pub fn revocations(&self, since: i64, limit: usize) -> Result<RevocationFeed, StoreError> {
        let conn = self.conn();
        let last: i64 =
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM revocations", [], |r| {
                r.get(0)
            })?;
        let mut stmt = conn.prepare(
            "SELECT seq, name, serial, time FROM revocations WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![since, limit as i64], |r| {
            Ok(Revocation {
                seq: r.get(0)?,
                name: r.get(1)?,
                serial: r.get(2)?,
                time: r.get(3)?,
            })
        })?;
        let revocations: Vec<Revocation> = rows.collect::<Result<_, _>>()?;
        // When the page is cut short, `last` is where this page ends, so a poller catches up.
        let last = if revocations.len() == limit {
            revocations.last().map(|r| r.seq).unwrap_or(last)
        } else {
            last
        };
        Ok(RevocationFeed { last, revocations })
    }

    pub fn sign_hub(
        &self,
        name: &str,
        public_key_pem: &str,
        sans: &[String],
    ) -> Result<String, StoreError> {
        let (cert, serial) = self
            .signer
            .sign_hub(name, public_key_pem, sans, self.hub_lifetime)?;
        tracing::info!("signed certificate {serial} for hub {name}");
        Ok(cert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db() -> (tempdir::Dir, std::path::PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.path().join("ca.db");
        (dir, path)
    }

    /// A throwaway directory removed on drop (kept tiny to avoid a dependency).
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!("ztm-ca-test-{}", rand::random::<u64>()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn create_get_revoke() {
        let (_d, path) = temp_db();
        let store = CaStore::open(&path).unwrap();
        let ca = store.ca_cert_pem().to_string();
        let key = store.create_user("alice").unwrap();
        let cert = store.get("alice").unwrap().unwrap();
        ztm_pki::key_matches_cert(&cert, &key).unwrap();
        assert!(matches!(
            store.create_user("alice"),
            Err(StoreError::Exists(_))
        ));
        assert_eq!(store.get("alice").unwrap().unwrap(), cert);
        assert_eq!(store.list().unwrap().len(), 1);
        let rev = store.revoke("alice").unwrap();
        assert!(store.get("alice").unwrap().is_none());
        assert!(matches!(
            store.revoke("alice"),
            Err(StoreError::NotFound(_))
        ));
        let feed = store.revocations(0, 100).unwrap();
        assert_eq!(feed.last, rev.seq);
        assert_eq!(feed.revocations, vec![rev.clone()]);
        assert!(store
            .revocations(rev.seq, 100)
            .unwrap()
            .revocations
            .is_empty());
        drop(store);
        let again = CaStore::open(&path).unwrap();
        assert_eq!(again.ca_cert_pem(), ca);
    }

    #[test]
    fn revocation_paging() {
        let (_d, path) = temp_db();
        let store = CaStore::open(&path).unwrap();
        for i in 0..5 {
            store.create_user(&format!("u{i}")).unwrap();
            store.revoke(&format!("u{i}")).unwrap();
        }
        let page = store.revocations(0, 2).unwrap();
        assert_eq!(page.revocations.len(), 2);
        let rest = store.revocations(page.last, 100).unwrap();
        assert_eq!(rest.revocations.len(), 3);
        assert_eq!(rest.last, 5);
    }
}
