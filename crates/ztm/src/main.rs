//! `ztm`: one binary for every role of the mesh (CA, hub, agent) and the command-line client.

mod bench;
mod client;
mod roles;
mod serve;
mod up;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Run a hub: the public relay agents dial out to (mutual TLS, HTTP/2)
    Hub(roles::HubArgs),
    /// Run an agent: joins meshes, publishes services, maps ports; REST API and web UI
    Agent(roles::AgentArgs),
    /// Bring up a CA, a hub and an agent joined as root on this machine (first run)
    Up(up::UpArgs),
    /// Measure the mesh: CA, hub and two agents on loopback, tunnel vs. direct connections
    Bench(bench::BenchArgs),
    /// The benchmark's plain reference relay (started by `ztm bench`)
    #[command(hide = true)]
    BenchRelay(bench::RelayArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
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
    init_logging();
    let (role, result) = match cli.command {
        Command::Ca(args) => ("ca", block_on(roles::run_ca(args))),
        Command::Hub(args) => ("hub", block_on(roles::run_hub(args))),
        Command::Agent(args) => ("agent", block_on(roles::run_agent(args))),
        Command::Up(args) => ("up", block_on(up::run_up(args))),
        Command::Bench(args) => ("bench", block_on(bench::run_bench(args))),
        Command::BenchRelay(args) => ("bench-relay", block_on(bench::run_relay(args))),
        Command::Client(cmd) => client::main(cmd, <Cli as clap::CommandFactory>::command),
    };
    if let Err(e) = result {
        eprintln!("ztm {role}: error: {e:#}");
        std::process::exit(1);
    }
}

fn block_on(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    runtime()?.block_on(f)
}

/// The tokio runtime: one worker thread per core unless `ZTM_THREADS` says otherwise.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("ZTM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        builder.worker_threads(n);
    }
    Ok(builder.enable_all().build()?)
}
