//! `ztm`: one binary for every role of the mesh (CA, hub, agent) and the command-line client.

mod roles;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ztm",
    version,
    about = "Zero Trust Mesh: CA, hub, agent and client in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the certificate authority (HTTP API, state in one SQLite file)
    Ca(roles::CaArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZTM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() {
    let cli = Cli::parse();
    let (role, result) = match cli.command {
        Command::Ca(args) => {
            init_logging();
            (
                "ca",
                runtime().and_then(|rt| rt.block_on(roles::run_ca(args))),
            )
        }
    };
    if let Err(e) = result {
        eprintln!("ztm {role}: error: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
