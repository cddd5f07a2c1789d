//! `ztm invite NAME`: creates user NAME at the CA and writes one invitation (the CA
//! certificate, NAME's certificate and key, the hub addresses and the mesh name) to hand to the
//! new computer, which joins with `ztm join --invite`. The key is handed out once: an existing
//! user is refused.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use ztm_hub::ca_client::CaClient;
use ztm_proto::invite::Invitation;
use ztm_proto::names::check_user_name;

#[derive(Args)]
pub struct InviteArgs {
    /// The new user's name
    name: String,
    /// A hub the new computer can reach (HOST:PORT); repeatable or comma-separated
    #[arg(
        long = "hub",
        value_name = "HOST:PORT",
        required = true,
        value_delimiter = ','
    )]
    hubs: Vec<String>,
    /// The mesh the invitation joins
    #[arg(long, default_value = "default")]
    mesh: String,
    /// The CA: HOST:PORT on this computer, or https://HOST:PORT with --ca-cert or
    /// --ca-fingerprint
    #[arg(long, default_value = "127.0.0.1:9999")]
    ca: String,
    /// The CA certificate (PEM file) the CA must have
    #[arg(long, value_name = "FILE", conflicts_with = "ca_fingerprint")]
    ca_cert: Option<String>,
    /// The SHA-256 fingerprint of the CA certificate the CA must have
    #[arg(long, value_name = "HEX")]
    ca_fingerprint: Option<String>,
    /// The CA's admin token, if it requires one
    #[arg(long, env = "ZTM_CA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where to write the invitation (created owner-only) [default: NAME.ztm-invite]
    #[arg(long, value_name = "FILE", conflicts_with = "print")]
    file: Option<PathBuf>,
    /// Print the invitation as one line of text instead of writing a file
    #[arg(long)]
    print: bool,
}

async fn ca_call(ca: &CaClient, method: &str, path: &str) -> Result<(u16, String)> {
    let (status, body) = ca
        .request(method, path)
        .await
        .with_context(|| format!("the CA at {}", ca.addr))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The message of the CA's JSON error body, or the body.
fn message_of(body: &str) -> String {
    serde_json::from_str::<ztm_proto::model::ApiError>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| body.trim().to_string())
}

pub async fn run_invite(args: InviteArgs) -> Result<()> {
    check_user_name(&args.name).map_err(|e| anyhow!("user name {:?}: {e}", args.name))?;
    ztm_proto::names::check_name(&args.mesh)
        .map_err(|e| anyhow!("mesh name {:?}: {e}", args.mesh))?;
    let hubs: Vec<String> = args
        .hubs
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    if hubs.is_empty() {
        bail!("--hub: give at least one hub address (HOST:PORT)");
    }
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.ztm-invite", args.name)));
    // The file is made first: the key can be fetched only once, so there must be somewhere to
    // put it before the CA creates it.
    let mut out = if args.print {
        None
    } else {
        let f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&file)
            .with_context(|| {
                format!(
                    "creating {} (give another --file if it exists)",
                    file.display()
                )
            })?;
        Some(f)
    };
    let result = fetch(&args, hubs).await;
    let invitation = match result {
        Ok(i) => i,
        Err(e) => {
            if out.take().is_some() {
                let _ = std::fs::remove_file(&file);
            }
            return Err(e);
        }
    };
    match out.as_mut() {
        None => println!("{}", invitation.to_text()),
        Some(f) => {
            f.write_all(invitation.to_json().as_bytes())
                .and_then(|_| f.sync_all())
                .with_context(|| format!("writing {}", file.display()))?;
            eprintln!(
                "invitation for user {} to mesh {} written to {} (it holds the user's private \
                 key: hand it over privately). On the new computer: ztm join --invite {}",
                args.name,
                args.mesh,
                file.display(),
                file.display()
            );
        }
    }
    Ok(())
}

/// Creates the user at the CA and gathers the invitation.
async fn fetch(args: &InviteArgs, hubs: Vec<String>) -> Result<Invitation> {
    let pin = crate::roles::ca_pin(args.ca_cert.as_deref(), args.ca_fingerprint.as_deref())?;
    let token = args.token.clone().filter(|t| !t.is_empty());
    let ca_client = &CaClient::new(&args.ca, token, pin)?;
    let ca = ca_client.ca_certificate().await?;
    let (status, key) = ca_call(
        ca_client,
        "POST",
        &format!("/api/certificates/{}", args.name),
    )
    .await?;
    match status {
        200 => {}
        409 => bail!(
            "user {} exists at the CA already: its key was handed out when it was created and \
             cannot be again. Invite another name, or revoke this user (DELETE \
             /api/certificates/{}) to issue a new one",
            args.name,
            args.name
        ),
        _ => bail!(
            "the CA refused to create user {}: {status} {}",
            args.name,
            message_of(&key)
        ),
    }
    let (status, cert) = ca_call(
        ca_client,
        "GET",
        &format!("/api/certificates/{}", args.name),
    )
    .await?;
    if status != 200 {
        bail!("the CA answered {status}: {}", message_of(&cert));
    }
    Ok(Invitation::new(
        &args.mesh, &args.name, hubs, &ca, &cert, &key,
    ))
}
