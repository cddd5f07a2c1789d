//! The CA's SQLite database: its key pair, the certificates it issued, the hubs it knows (with
//! the hash of each hub's token and every certificate signed for it) and its revocations.
//! Every change is one transaction; the private keys of users and the hub tokens are never
//! stored.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, MutexGuard};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use serde::Serialize;
use ztm_pki::{CaSigner, PkiError};
use ztm_proto::model::{CertificateEntry, Revocation, RevocationFeed};

/// How long a CRL is valid (its next-update time) ...
pub const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// ... and how often one is signed anew even without a new revocation, so that the one
/// served is never close to its next-update time.
const CRL_REFRESH: Duration = Duration::from_secs(3600);

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
    #[error("no hub named {0}")]
    NoHub(String),
    #[error("hub {0} already has a token")]
    HubExists(String),
    #[error("hub {0} has been revoked: the CA signs nothing more for it")]
    HubRevoked(String),
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
    signer: Arc<CaSigner>,
    /// How long the certificates signed for hubs are valid.
    hub_lifetime: std::time::Duration,
    /// How long the certificates issued to users are valid.
    user_lifetime: std::time::Duration,
    /// The last CRL signed: its number, when, and the PEM.
    crl: Mutex<Option<(u64, Instant, String)>>,
}

/// A hub the CA knows: created with a token, or seen when a certificate was signed for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HubEntry {
    pub name: String,
    pub created: i64,
    /// Whether a hub token was issued for it (and not revoked).
    pub token: bool,
    pub revoked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
    /// Every certificate signed for it, oldest first.
    pub certificates: Vec<HubCertificate>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HubCertificate {
    pub serial: String,
    pub created: i64,
    pub not_after: i64,
}

/// Who a hub token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenHub {
    pub name: String,
    pub revoked: bool,
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

/// Version 1: hubs and the certificates signed for them. A database of version 0 (before
/// hubs were recorded) gets the new tables; what it holds stays as it is.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS hubs (
    name TEXT PRIMARY KEY,
    token_hash TEXT UNIQUE,
    created INTEGER NOT NULL,
    revoked INTEGER
);
CREATE TABLE IF NOT EXISTS hub_certificates (
    serial TEXT PRIMARY KEY,
    hub TEXT NOT NULL REFERENCES hubs (name),
    created INTEGER NOT NULL,
    not_after INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS hub_certificates_by_hub ON hub_certificates (hub);
";
const SCHEMA_VERSION: i64 = 1;

/// Brings a database of any earlier version up to [`SCHEMA_VERSION`], in one transaction.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute_batch(SCHEMA)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < 1 {
        tx.execute_batch(SCHEMA_V1)?;
    }
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()
}

/// A new hub token: 32 random bytes, hex.
fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

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
        migrate(&mut conn).map_err(open_err)?;
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
        let signer = Arc::new(CaSigner::load(&cert, &key)?);
        Ok(Self {
            conn: Mutex::new(conn),
            signer,
            hub_lifetime: ztm_pki::HUB_VALIDITY,
            user_lifetime: ztm_pki::USER_VALIDITY,
            crl: Mutex::new(None),
        })
    }

    /// Signs hub certificates valid for `lifetime` from now on.
    pub fn set_hub_cert_lifetime(&mut self, lifetime: std::time::Duration) {
        self.hub_lifetime = lifetime;
    }

    /// Issues user certificates valid for `lifetime` from now on.
    pub fn set_user_cert_lifetime(&mut self, lifetime: std::time::Duration) {
        self.user_lifetime = lifetime;
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // The lock outlives a panic of its holder (parking_lot's locks are not poisoned):
        // such a panic cannot leave SQLite inconsistent, transactions roll back.
        self.conn.lock()
    }

    pub fn ca_cert_pem(&self) -> &str {
        self.signer.cert_pem()
    }

    /// The CA's signer, for its own HTTPS certificate.
    pub fn signer(&self) -> Arc<CaSigner> {
        self.signer.clone()
    }

    /// Issues a certificate for a new user; returns the private key PEM (never stored).
    pub fn create_user(&self, name: &str) -> Result<String, StoreError> {
        if self.get(name)?.is_some() {
            return Err(StoreError::Exists(name.to_string()));
        }
        let issued = self.signer.issue_user_for(name, self.user_lifetime)?;
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

    /// Signs a certificate for hub `name` (unless it was revoked) and records it; a hub not
    /// known yet is recorded too, without a token.
    pub fn sign_hub(
        &self,
        name: &str,
        public_key_pem: &str,
        sans: &[String],
    ) -> Result<String, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let revoked: Option<Option<i64>> = tx
            .query_row("SELECT revoked FROM hubs WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        match revoked {
            Some(Some(_)) => return Err(StoreError::HubRevoked(name.to_string())),
            Some(None) => {}
            None => {
                tx.execute(
                    "INSERT INTO hubs (name, token_hash, created, revoked) VALUES (?1, NULL, ?2, NULL)",
                    params![name, now()],
                )?;
            }
        }
        let (cert, serial) = self
            .signer
            .sign_hub(name, public_key_pem, sans, self.hub_lifetime)?;
        let not_after = ztm_pki::cert_info_pem(&cert, "hub certificate")?.not_after;
        tx.execute(
            "INSERT INTO hub_certificates (serial, hub, created, not_after) VALUES (?1, ?2, ?3, ?4)",
            params![serial, name, now(), not_after],
        )?;
        tx.commit()?;
        tracing::info!("signed certificate {serial} for hub {name}");
        Ok(cert)
    }

    /// Issues the token of hub `name`, creating the hub if it is new; the token is returned
    /// once and only its hash is kept.
    pub fn create_hub(&self, name: &str) -> Result<String, StoreError> {
        let token = new_token();
        let hash = ztm_pki::sha256_hex(token.as_bytes());
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing: Option<(Option<String>, Option<i64>)> = tx
            .query_row(
                "SELECT token_hash, revoked FROM hubs WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match existing {
            Some((_, Some(_))) => return Err(StoreError::HubRevoked(name.to_string())),
            Some((Some(_), None)) => return Err(StoreError::HubExists(name.to_string())),
            Some((None, None)) => {
                tx.execute(
                    "UPDATE hubs SET token_hash = ?2 WHERE name = ?1",
                    params![name, hash],
                )?;
            }
            None => {
                tx.execute(
                    "INSERT INTO hubs (name, token_hash, created, revoked) VALUES (?1, ?2, ?3, NULL)",
                    params![name, hash, now()],
                )?;
            }
        }
        tx.commit()?;
        Ok(token)
    }

    /// The hub whose token is `token`, revoked or not.
    pub fn hub_for_token(&self, token: &str) -> Result<Option<TokenHub>, StoreError> {
        let hash = ztm_pki::sha256_hex(token.as_bytes());
        Ok(self
            .conn()
            .query_row(
                "SELECT name, revoked FROM hubs WHERE token_hash = ?1",
                [hash],
                |r| {
                    Ok(TokenHub {
                        name: r.get(0)?,
                        revoked: r.get::<_, Option<i64>>(1)?.is_some(),
                    })
                },
            )
            .optional()?)
    }

    /// Every hub with its certificates, by name.
    pub fn hubs(&self) -> Result<Vec<HubEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name, token_hash, created, revoked FROM hubs ORDER BY name")?;
        let mut hubs: Vec<HubEntry> = stmt
            .query_map([], |r| {
                let revoked_at: Option<i64> = r.get(3)?;
                Ok(HubEntry {
                    name: r.get(0)?,
                    token: r.get::<_, Option<String>>(1)?.is_some() && revoked_at.is_none(),
                    created: r.get(2)?,
                    revoked: revoked_at.is_some(),
                    revoked_at,
                    certificates: Vec::new(),
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT hub, serial, created, not_after FROM hub_certificates ORDER BY created, serial",
        )?;
        let certs = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                HubCertificate {
                    serial: r.get(1)?,
                    created: r.get(2)?,
                    not_after: r.get(3)?,
                },
            ))
        })?;
        let mut by_name: std::collections::HashMap<String, Vec<HubCertificate>> =
            std::collections::HashMap::new();
        for c in certs {
            let (hub, cert) = c?;
            by_name.entry(hub).or_default().push(cert);
        }
        for h in &mut hubs {
            h.certificates = by_name.remove(&h.name).unwrap_or_default();
        }
        Ok(hubs)
    }

    /// Revokes hub `name`: its token stops working, every certificate ever signed for it is
    /// revoked (named `hub/{name}` in the feed and listed in the CRL), and nothing is signed
    /// for that name again. Returns the revocations.
    pub fn revoke_hub(&self, name: &str) -> Result<Vec<Revocation>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let revoked: Option<Option<i64>> = tx
            .query_row("SELECT revoked FROM hubs WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        match revoked {
            None => return Err(StoreError::NoHub(name.to_string())),
            Some(Some(_)) => return Err(StoreError::HubRevoked(name.to_string())),
            Some(None) => {}
        }
        let time = now();
        tx.execute(
            "UPDATE hubs SET revoked = ?2 WHERE name = ?1",
            params![name, time],
        )?;
        let serials: Vec<String> = {
            let mut stmt =
                tx.prepare("SELECT serial FROM hub_certificates WHERE hub = ?1 ORDER BY created")?;
            let rows = stmt.query_map([name], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let cn = format!("{}{name}", ztm_pki::HUB_CN_PREFIX);
        let mut out = Vec::new();
        for serial in serials {
            tx.execute(
                "INSERT INTO revocations (name, serial, time) VALUES (?1, ?2, ?3)",
                params![cn, serial, time],
            )?;
            out.push(Revocation {
                seq: tx.last_insert_rowid(),
                name: cn.clone(),
                serial,
                time,
            });
        }
        tx.commit()?;
        Ok(out)
    }

    /// The CA's CRL (PEM): every revoked serial, numbered by the latest revocation, so the
    /// number grows with each one. Signed anew when the number changes and every hour.
    pub fn crl(&self) -> Result<String, StoreError> {
        let mut cached = self.crl.lock();
        let (number, revoked) = {
            let conn = self.conn();
            let number: i64 =
                conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM revocations", [], |r| {
                    r.get(0)
                })?;
            let number = u64::try_from(number).unwrap_or(0);
            if let Some((n, at, pem)) = cached.as_ref() {
                if *n == number && at.elapsed() < CRL_REFRESH {
                    return Ok(pem.clone());
                }
            }
            let mut stmt = conn.prepare("SELECT serial, time FROM revocations ORDER BY seq")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let revoked: Vec<(String, i64)> = rows.collect::<Result<_, _>>()?;
            (number, revoked)
        };
        let pem = self.signer.crl(&revoked, number, CRL_VALIDITY)?;
        *cached = Some((number, Instant::now(), pem.clone()));
        Ok(pem)
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
    fn hubs_tokens_certificates_and_revocation() {
        let (_d, path) = temp_db();
        let store = CaStore::open(&path).unwrap();
        let (_, public) = ztm_pki::generate_key().unwrap();
        let token = store.create_hub("h1").unwrap();
        assert_eq!(token.len(), 64);
        assert!(matches!(
            store.create_hub("h1"),
            Err(StoreError::HubExists(_))
        ));
        assert_eq!(
            store.hub_for_token(&token).unwrap(),
            Some(TokenHub {
                name: "h1".into(),
                revoked: false
            })
        );
        assert_eq!(store.hub_for_token("nope").unwrap(), None);
        // Only the hash is stored.
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(token.len()).any(|w| w == token.as_bytes()));

        let c1 = store.sign_hub("h1", &public, &[]).unwrap();
        let c2 = store.sign_hub("h1", &public, &[]).unwrap();
        // A hub signed for without a token (the admin, or a CA without a token) is recorded.
        store.sign_hub("h2", &public, &[]).unwrap();
        let hubs = store.hubs().unwrap();
        assert_eq!(
            hubs.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
            ["h1", "h2"]
        );
        assert!(hubs[0].token && !hubs[1].token);
        let serials: Vec<String> = [&c1, &c2]
            .iter()
            .map(|c| ztm_pki::cert_info_pem(c, "c").unwrap().serial)
            .collect();
        let mut listed: Vec<String> = hubs[0]
            .certificates
            .iter()
            .map(|c| c.serial.clone())
            .collect();
        listed.sort();
        let mut want = serials.clone();
        want.sort();
        assert_eq!(listed, want);

        let before = ztm_pki::parse_crl(store.ca_cert_pem(), &store.crl().unwrap()).unwrap();
        let revs = store.revoke_hub("h1").unwrap();
        assert_eq!(revs.len(), 2);
        assert!(revs.iter().all(|r| r.name == "hub/h1"));
        assert!(matches!(
            store.revoke_hub("h1"),
            Err(StoreError::HubRevoked(_))
        ));
        assert!(matches!(store.revoke_hub("h9"), Err(StoreError::NoHub(_))));
        assert!(matches!(
            store.sign_hub("h1", &public, &[]),
            Err(StoreError::HubRevoked(_))
        ));
        assert!(matches!(
            store.create_hub("h1"),
            Err(StoreError::HubRevoked(_))
        ));
        assert!(store.hub_for_token(&token).unwrap().unwrap().revoked);
        let hubs = store.hubs().unwrap();
        assert!(hubs[0].revoked && !hubs[0].token && hubs[0].revoked_at.is_some());

        // The CRL lists both serials, and its number grew.
        let crl = ztm_pki::parse_crl(store.ca_cert_pem(), &store.crl().unwrap()).unwrap();
        assert!(crl.number > before.number);
        assert!(serials.iter().all(|s| crl.revokes(s)));
        store.create_user("alice").unwrap();
        let alice = store.revoke("alice").unwrap();
        let crl2 = ztm_pki::parse_crl(store.ca_cert_pem(), &store.crl().unwrap()).unwrap();
        assert!(crl2.number > crl.number);
        assert!(crl2.revokes(&alice.serial) && crl2.len() == 3);
    }

    /// A database made before hubs were recorded opens, keeps what it had and gets the new
    /// tables.
    #[test]
    fn an_older_database_is_migrated() {
        let (_d, path) = temp_db();
        let ca = ztm_pki::create_ca().unwrap();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO ca (id, cert_pem, key_pem, created) VALUES (1, ?1, ?2, 0)",
                params![ca.cert_pem, ca.key_pem],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO revocations (name, serial, time) VALUES ('bob', '0a0b', 5)",
                [],
            )
            .unwrap();
        }
        let store = CaStore::open(&path).unwrap();
        assert_eq!(store.ca_cert_pem(), ca.cert_pem);
        assert!(store.hubs().unwrap().is_empty());
        store.create_hub("h1").unwrap();
        let crl = ztm_pki::parse_crl(store.ca_cert_pem(), &store.crl().unwrap()).unwrap();
        assert!(crl.revokes("0a0b"));
        assert_eq!(crl.number, 1);
        let version: i64 = store
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(store);
        // And opening it again changes nothing.
        let again = CaStore::open(&path).unwrap();
        assert_eq!(again.hubs().unwrap().len(), 1);
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
