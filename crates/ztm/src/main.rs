//! `ztm`: one binary for every role of the mesh (CA, hub, agent) and the command-line client.

mod bench;
mod client;
mod invite;
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
    /// Create a user at the CA and write an invitation for it (join with `ztm join --invite`)
    Invite(invite::InviteArgs),
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

/// Parses the command line. Help and version go out as clap writes them; a mistake is one line
/// on stderr and exit code 2.
fn parse_cli() -> Cli {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            eprintln!("{}", one_line_error(&e.render().to_string()));
            std::process::exit(2);
        }
    }
}

/// clap's several-line error message as one line: the error, its tip if any, and where to
/// read more (the command of its usage line).
fn one_line_error(rendered: &str) -> String {
    let mut error: Option<&str> = None;
    // The error's own lines (what is missing, say) run until the first blank line.
    let mut details = Vec::new();
    let mut in_error = false;
    let mut tips = Vec::new();
    let mut command = "ztm".to_string();
    for line in rendered.lines().map(str::trim) {
        if line.is_empty() {
            in_error = false;
        } else if let Some(e) = line.strip_prefix("error: ") {
            in_error = error.is_none();
            error.get_or_insert(e.trim_end_matches(':'));
        } else if in_error {
            details.push(line);
        } else if let Some(t) = line.strip_prefix("tip: ") {
            tips.push(t);
        } else if let Some(usage) = line.strip_prefix("Usage: ") {
            command = usage
                .split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-']))
                .collect::<Vec<_>>()
                .join(" ");
        }
    }
    let mut out = format!("ztm: error: {}", error.unwrap_or("bad command line"));
    if !details.is_empty() {
        out.push_str(&format!(": {}", details.join(", ")));
    }
    for tip in tips {
        out.push_str(&format!("; {tip}"));
    }
    out.push_str(&format!(" (see '{command} --help')"));
    out
}

fn main() {
    let cli = parse_cli();
    init_logging();
    let (role, result) = match cli.command {
        Command::Ca(args) => ("ca", block_on(roles::run_ca(args))),
        Command::Hub(args) => ("hub", block_on(roles::run_hub(args))),
        Command::Agent(args) => ("agent", block_on(roles::run_agent(args))),
        Command::Up(args) => ("up", block_on(up::run_up(args))),
        Command::Invite(args) => ("invite", block_on(invite::run_invite(args))),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_mistakes_are_one_line() {
        let rendered = "error: unexpected argument '--lisen' found\n\n  tip: a similar argument \
                        exists: '--listen'\n\nUsage: ztm ca --listen <LISTEN>\n\nFor more \
                        information, try '--help'.\n";
        assert_eq!(
            one_line_error(rendered),
            "ztm: error: unexpected argument '--lisen' found; a similar argument exists: \
             '--listen' (see 'ztm ca --help')"
        );
        for args in [
            &["ztm", "ca", "--bogus-flag"][..],
            &["ztm", "hub", "--listen"],
            &["ztm", "agent", "--listen", "a", "--listen", "b"],
            &["ztm", "nonsense"],
            &["ztm", "create", "service"],
        ] {
            let Err(e) = Cli::try_parse_from(args) else {
                panic!("{args:?} parsed");
            };
            let line = one_line_error(&e.render().to_string());
            assert!(!line.contains('\n'), "{args:?}: {line}");
            assert!(
                line.starts_with("ztm: error: ") && line.ends_with("--help')"),
                "{line}"
            );
        }
    }
}
