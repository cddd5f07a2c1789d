//! `ztm`: one binary for every role of the mesh (CA, hub, agent) and the command-line client.

mod bench;
mod client;
mod invite;
mod roles;
mod serve;
mod up;

use std::io::Write;

use clap::error::{ContextKind, ContextValue, ErrorKind};
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

/// Logs on stderr: `ZTM_LOG` filters (default `info`); `ZTM_LOG_FORMAT=json` writes one JSON
/// object a line (time, level, message, the event's fields and those of its spans) for log
/// collectors, `text` (the default) lines for people.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZTM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match log_format(std::env::var("ZTM_LOG_FORMAT").ok().as_deref()) {
        Ok(LogFormat::Text) => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        Ok(LogFormat::Json) => fmt.json().flatten_event(true).with_span_list(true).init(),
        Err(e) => {
            eprintln!("ztm: {e}");
            std::process::exit(2);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

/// The log format `ZTM_LOG_FORMAT` asks for.
fn log_format(var: Option<&str>) -> Result<LogFormat, String> {
    match var.map(str::trim) {
        None | Some("") | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(format!("ZTM_LOG_FORMAT={other:?}: give text or json")),
    }
}

/// Parses the command line. Help and version go out as clap writes them; a mistake is one line
/// on stderr and exit code 2.
fn parse_cli() -> Cli {
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
            eprintln!("{}", error_line(&e));
            std::process::exit(2);
        }
    }
}

/// A command-line mistake as one line, from what clap knows of it: its kind and context (the
/// argument, the value, the suggestions, the usage). An error clap made without context is
/// read from its rendered text ([`one_line_error`]).
fn error_line(e: &clap::Error) -> String {
    let Some((what, details)) = what_went_wrong(e) else {
        return one_line_error(&e.render().to_string());
    };
    let command = match e.get(ContextKind::Usage) {
        Some(ContextValue::StyledStr(usage)) => usage_command(&usage.to_string()),
        _ => None,
    };
    one_line(&what, &details, &tips(e), command.as_deref())
}

/// What went wrong and its details (the arguments missing, the values possible), worded as
/// clap words them; None for an error without the context to say it.
fn what_went_wrong(e: &clap::Error) -> Option<(String, Vec<String>)> {
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    let list = |kind| match e.get(kind) {
        Some(ContextValue::Strings(v)) => Some(v.as_slice()),
        _ => None,
    };
    // `[possible values: a, b]`, with a value holding blanks (or none) quoted.
    let choices = |name: &str, kind| -> Vec<String> {
        match list(kind) {
            Some(values) if !values.is_empty() => {
                let values: Vec<String> = values
                    .iter()
                    .map(|v| {
                        if v.is_empty() || v.contains(char::is_whitespace) {
                            format!("{v:?}")
                        } else {
                            v.clone()
                        }
                    })
                    .collect();
                vec![format!("[{name}: {}]", values.join(", "))]
            }
            _ => Vec::new(),
        }
    };
    Some(match e.kind() {
        ErrorKind::UnknownArgument => (
            format!(
                "unexpected argument '{}' found",
                text(ContextKind::InvalidArg)?
            ),
            Vec::new(),
        ),
        ErrorKind::InvalidSubcommand => (
            format!(
                "unrecognized subcommand '{}'",
                text(ContextKind::InvalidSubcommand)?
            ),
            Vec::new(),
        ),
        ErrorKind::InvalidValue => {
            let arg = text(ContextKind::InvalidArg)?;
            let what = match text(ContextKind::InvalidValue)? {
                "" => format!("a value is required for '{arg}' but none was supplied"),
                value => format!("invalid value '{value}' for '{arg}'"),
            };
            (what, choices("possible values", ContextKind::ValidValue))
        }
        ErrorKind::ValueValidation => {
            let arg = text(ContextKind::InvalidArg)?;
            let value = text(ContextKind::InvalidValue)?;
            let what = match std::error::Error::source(e) {
                Some(why) => format!("invalid value '{value}' for '{arg}': {why}"),
                None => format!("invalid value '{value}' for '{arg}'"),
            };
            (what, Vec::new())
        }
        ErrorKind::MissingRequiredArgument => (
            "the following required arguments were not provided".to_string(),
            list(ContextKind::InvalidArg)?.to_vec(),
        ),
        ErrorKind::MissingSubcommand => (
            format!(
                "'{}' requires a subcommand but one was not provided",
                text(ContextKind::InvalidSubcommand)?
            ),
            choices("subcommands", ContextKind::ValidSubcommand),
        ),
        ErrorKind::ArgumentConflict => {
            let arg = text(ContextKind::InvalidArg)?;
            match e.get(ContextKind::PriorArg) {
                Some(ContextValue::String(prior)) if prior == arg => (
                    format!("the argument '{arg}' cannot be used multiple times"),
                    Vec::new(),
                ),
                Some(ContextValue::String(prior)) => (
                    format!("the argument '{arg}' cannot be used with '{prior}'"),
                    Vec::new(),
                ),
                Some(ContextValue::Strings(prior)) => (
                    format!("the argument '{arg}' cannot be used with"),
                    prior.clone(),
                ),
                _ => (
                    format!(
                        "the argument '{arg}' cannot be used with one or more of the other \
                         specified arguments"
                    ),
                    Vec::new(),
                ),
            }
        }
        _ => return None,
    })
}

/// clap's tips: similar subcommands, arguments and values, then its other suggestions.
fn tips(e: &clap::Error) -> Vec<String> {
    let mut tips = Vec::new();
    for (kind, what) in [
        (ContextKind::SuggestedSubcommand, "subcommand"),
        (ContextKind::SuggestedArg, "argument"),
        (ContextKind::SuggestedValue, "value"),
    ] {
        match e.get(kind) {
            Some(ContextValue::String(similar)) => {
                tips.push(format!("a similar {what} exists: '{similar}'"))
            }
            Some(ContextValue::Strings(similar)) if !similar.is_empty() => {
                let quoted: Vec<String> = similar.iter().map(|s| format!("'{s}'")).collect();
                tips.push(match quoted.len() {
                    1 => format!("a similar {what} exists: {}", quoted.join(", ")),
                    _ => format!("some similar {what}s exist: {}", quoted.join(", ")),
                });
            }
            _ => {}
        }
    }
    if let Some(ContextValue::StyledStrs(suggestions)) = e.get(ContextKind::Suggested) {
        tips.extend(suggestions.iter().map(|s| s.to_string().trim().to_string()));
    }
    tips
}

/// The command a usage text is of: `Usage: ztm ca [OPTIONS] --listen <LISTEN>` → `ztm ca`.
fn usage_command(usage: &str) -> Option<String> {
    let first = usage.lines().next()?.trim();
    let words = first.strip_prefix("Usage:").unwrap_or(first);
    Some(
        words
            .split_whitespace()
            .take_while(|w| !w.starts_with(['[', '<', '-']))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// `ztm: error: <what>[: details][; tip] (see '<command> --help')`.
fn one_line(what: &str, details: &[String], tips: &[String], command: Option<&str>) -> String {
    let mut out = format!("ztm: error: {what}");
    if !details.is_empty() {
        out.push_str(&format!(": {}", details.join(", ")));
    }
    for tip in tips {
        out.push_str(&format!("; {tip}"));
    }
    out.push_str(&format!(" (see '{} --help')", command.unwrap_or("ztm")));
    out
}

/// clap's several-line error message, as rendered, as one line: the error, its tip if any, and
/// where to read more (the command of its usage line).
fn one_line_error(rendered: &str) -> String {
    let mut error: Option<&str> = None;
    // The error's own lines (what is missing, say) run until the first blank line.
    let mut details = Vec::new();
    let mut in_error = false;
    let mut tips = Vec::new();
    let mut command = None;
    for line in rendered.lines().map(str::trim) {
        if line.is_empty() {
            in_error = false;
        } else if let Some(e) = line.strip_prefix("error: ") {
            in_error = error.is_none();
            error.get_or_insert(e.trim_end_matches(':'));
        } else if in_error {
            details.push(line.to_string());
        } else if let Some(t) = line.strip_prefix("tip: ") {
            tips.push(t.to_string());
        } else if line.starts_with("Usage: ") {
            command = usage_command(line);
        }
    }
    one_line(
        error.unwrap_or("bad command line"),
        &details,
        &tips,
        command.as_deref(),
    )
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
        // Written without `eprintln!`, which panics (exit code 101, no message anywhere) when
        // stderr cannot be written, as when its file's disk is full: still exit code 1.
        let _ = writeln!(std::io::stderr(), "ztm {role}: error: {e:#}");
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
    fn log_formats() {
        for (var, want) in [
            (None, Ok(LogFormat::Text)),
            (Some(""), Ok(LogFormat::Text)),
            (Some("text"), Ok(LogFormat::Text)),
            (Some("json"), Ok(LogFormat::Json)),
            (Some(" json "), Ok(LogFormat::Json)),
            (
                Some("JSON"),
                Err("ZTM_LOG_FORMAT=\"JSON\": give text or json".to_string()),
            ),
            (
                Some("xml"),
                Err("ZTM_LOG_FORMAT=\"xml\": give text or json".to_string()),
            ),
        ] {
            assert_eq!(log_format(var), want, "{var:?}");
        }
    }

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

    /// The line made from clap's kind and context is the line its rendered text gives.
    #[test]
    fn error_lines_from_context_are_those_of_the_text() {
        for line in [
            "ca --lisen x",
            "ca --bogus-flag",
            "hub --listen",
            "agent --listen a --listen b",
            "nonsense",
            "gett ep",
            "get endpointz",
            "get ep extra",
            "get ep -o yaml",
            "create service",
            "create svc tcp/x",
            "create svc tcp/x --port abc",
            "create svc tcp/x --port 70000",
            "create port 1 --service x --proto sctp",
            "create port 1 --service x --target-ep a --trust b",
            "join home --invite f --hub h:1",
            "join home",
            "completion nosh",
            "completion",
            "delete port",
            "log --tail -1",
        ] {
            let args: Vec<&str> = std::iter::once("ztm")
                .chain(line.split_whitespace())
                .collect();
            let Err(e) = Cli::try_parse_from(&args) else {
                panic!("{line:?} parsed");
            };
            assert!(what_went_wrong(&e).is_some(), "{line:?}: {:?}", e.kind());
            assert_eq!(
                error_line(&e),
                one_line_error(&e.render().to_string()),
                "{line:?}"
            );
        }
    }
}
