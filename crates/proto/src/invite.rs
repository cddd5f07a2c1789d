//! Invitations: everything a new computer needs to join a mesh as one user — the CA
//! certificate, the user's certificate and private key, the hub addresses and the mesh name —
//! as one JSON file or one line of text (`ztm-invite-1:` and the JSON in URL-safe base64).
//! This module is the format alone; the agent checks the certificates when it joins with one.

use base64::Engine;
use serde::{Deserialize, Serialize};

/// What the one-line form starts with.
pub const TEXT_PREFIX: &str = "ztm-invite-1:";
/// The format's version, in the JSON form's `ztmInvitation` field.
pub const VERSION: u32 = 1;
/// Largest invitation accepted (PEM texts are a few KiB).
pub const MAX_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Invitation {
    pub ztm_invitation: u32,
    pub mesh: String,
    pub user: String,
    pub hubs: Vec<String>,
    pub ca: String,
    pub certificate: String,
    pub private_key: String,
}

/// Why a text is not a usable invitation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    #[error("the invitation is empty")]
    Empty,
    #[error("the invitation is larger than {MAX_LEN} bytes")]
    TooLarge,
    #[error("this is not a ZTM invitation (it is neither the JSON file nor a line starting with {TEXT_PREFIX})")]
    NotAnInvitation,
    #[error("the invitation text is cut off or damaged (its base64 does not decode)")]
    BadText,
    #[error("the invitation is cut off or damaged: {0}")]
    BadJson(String),
    #[error("the invitation is of version {0}; this agent reads version {VERSION}")]
    Version(u32),
    #[error("the invitation has no {0}")]
    Missing(&'static str),
}

impl Invitation {
    pub fn new(
        mesh: &str,
        user: &str,
        hubs: Vec<String>,
        ca: &str,
        certificate: &str,
        key: &str,
    ) -> Self {
        Invitation {
            ztm_invitation: VERSION,
            mesh: mesh.to_string(),
            user: user.to_string(),
            hubs,
            ca: ca.to_string(),
            certificate: certificate.to_string(),
            private_key: key.to_string(),
        }
    }

    /// The file form: pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// The one-line form.
    pub fn to_text(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!(
            "{TEXT_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// Reads either form (surrounding white space, and line breaks inside the text form, are
    /// ignored).
    pub fn parse(input: &str) -> Result<Invitation, InviteError> {
        if input.len() > MAX_LEN {
            return Err(InviteError::TooLarge);
        }
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(InviteError::Empty);
        }
        let json: Vec<u8> = if let Some(b64) = trimmed.strip_prefix(TEXT_PREFIX) {
            let b64: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b64.trim_end_matches('='))
                .map_err(|_| InviteError::BadText)?
        } else if trimmed.starts_with('{') {
            trimmed.as_bytes().to_vec()
        } else {
            return Err(InviteError::NotAnInvitation);
        };
        let value: serde_json::Value =
            serde_json::from_slice(&json).map_err(|e| InviteError::BadJson(e.to_string()))?;
        match value.get("ztmInvitation").and_then(|v| v.as_u64()) {
            None => return Err(InviteError::NotAnInvitation),
            Some(v) if v != u64::from(VERSION) => {
                return Err(InviteError::Version(u32::try_from(v).unwrap_or(u32::MAX)))
            }
            Some(_) => {}
        }
        let inv: Invitation =
            serde_json::from_value(value).map_err(|e| InviteError::BadJson(e.to_string()))?;
        for (field, text) in [
            ("mesh name", &inv.mesh),
            ("user", &inv.user),
            ("CA certificate", &inv.ca),
            ("certificate", &inv.certificate),
            ("private key", &inv.private_key),
        ] {
            if text.trim().is_empty() {
                return Err(InviteError::Missing(field));
            }
        }
        if inv.hubs.iter().all(|h| h.trim().is_empty()) {
            return Err(InviteError::Missing("hub address"));
        }
        Ok(inv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Invitation {
        Invitation::new(
            "home",
            "alice",
            vec!["hub.example.org:8888".into()],
            "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nME\n-----END CERTIFICATE-----\n",
            "-----BEGIN PRIVATE KEY-----\nKEY\n-----END PRIVATE KEY-----\n",
        )
    }

    #[test]
    fn both_forms_read_back() {
        let inv = sample();
        assert_eq!(Invitation::parse(&inv.to_json()), Ok(inv.clone()));
        let text = inv.to_text();
        assert!(text.starts_with(TEXT_PREFIX));
        assert!(!text.contains('\n'), "one line: {text}");
        assert_eq!(Invitation::parse(&text), Ok(inv.clone()));
        // Pasted with surrounding space or wrapped by a chat program.
        let wrapped: String = text
            .chars()
            .enumerate()
            .flat_map(|(i, c)| {
                (i > 0 && i % 60 == 0)
                    .then_some('\n')
                    .into_iter()
                    .chain([c])
            })
            .collect();
        assert_eq!(Invitation::parse(&format!("  {wrapped}\n")), Ok(inv));
    }

    #[test]
    fn damaged_invitations_say_what_is_wrong() {
        let inv = sample();
        let text = inv.to_text();
        let json = inv.to_json();
        let cases: Vec<(String, InviteError)> = vec![
            (String::new(), InviteError::Empty),
            ("hello".into(), InviteError::NotAnInvitation),
            ("{\"some\": \"json\"}".into(), InviteError::NotAnInvitation),
            (format!("{TEXT_PREFIX}!!!"), InviteError::BadText),
            (
                json.replace("\"ztmInvitation\": 1", "\"ztmInvitation\": 2"),
                InviteError::Version(2),
            ),
            (
                json.replace("\"user\": \"alice\"", "\"user\": \"\""),
                InviteError::Missing("user"),
            ),
            (
                json.replace("\"hub.example.org:8888\"", ""),
                InviteError::Missing("hub address"),
            ),
            ("x".repeat(MAX_LEN + 1), InviteError::TooLarge),
        ];
        for (input, want) in cases {
            assert_eq!(Invitation::parse(&input), Err(want), "{input:.80}");
        }
        // Cut off anywhere: an error, never a panic.
        for cut in [10, text.len() / 2, text.len() - 3] {
            assert!(Invitation::parse(&text[..cut]).is_err(), "cut at {cut}");
        }
        for cut in [5, json.len() / 2, json.len() - 3] {
            assert!(matches!(
                Invitation::parse(&json[..cut]),
                Err(InviteError::BadJson(_))
            ));
        }
    }
}
