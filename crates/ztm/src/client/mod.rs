//! The command-line client of a running agent, kubectl style: `ztm get ep`, `ztm create svc
//! tcp/ssh --port 22`, `ztm join ...`. Everything goes through the agent's REST API (docs/requirements.md §5).
//!
//! Exit codes: 0 on success; 1 when the agent refuses, fails or cannot be reached (its message
//! on stderr, one line); 2 on usage errors (clap's own, and e.g. `--mesh` missing when the
//! agent joined several meshes).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

/// `print!` that does not panic when stdout is closed.
macro_rules! out {
    ($($t:tt)*) => { $crate::client::write_out(&format!($($t)*)) };
}

/// `println!` that does not panic when stdout is closed.
macro_rules! outln {
    ($($t:tt)*) => { $crate::client::write_out(&format!("{}\n", format_args!($($t)*))) };
}

/// `eprintln!` through [`table::clean_text`]: what it says may come from the mesh.
macro_rules! errln {
    ($($t:tt)*) => {
        eprintln!("{}", $crate::client::table::clean_text(&format!($($t)*)))
    };
}

mod api;
mod cmds;
mod table;

/// A usage error found after parsing (exit code 2).
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

impl ProtoArg {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtoArg::Tcp => "tcp",
            ProtoArg::Udp => "udp",
        }
    }
}

/// Options every client command takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// The agent's API address [default: $ZTM_AGENT, `agent = ...` in ~/.ztm/config, else 127.0.0.1:7777]
    #[arg(long, global = true, value_name = "HOST:PORT")]
    agent: Option<String>,
    /// The agent's API token, if it was started with one
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "ZTM_AGENT_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Output format: aligned tables, or the agent's JSON answer (pretty-printed)
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// The mesh to work in.
#[derive(Args, Debug, Clone)]
pub struct MeshOpt {
    /// The mesh (needed only when the agent joined several) [env: ZTM_MESH]
    #[arg(long, global = true, value_name = "NAME")]
    mesh: Option<String>,
}

const GET_EXAMPLES: &str = "\
Examples:
  ztm get mesh                 # the meshes this agent joined
  ztm get ep                   # endpoints of the mesh, * marks this one
  ztm get svc                  # services in the mesh
  ztm get svc --ep office-pc   # services published by one endpoint
  ztm get port --ep office-pc  # ports mapped on an endpoint (default: this one)
  ztm get exit --all           # the exits this user may use
  ztm get proxy                # this endpoint's proxies
  ztm get ep -o json           # the agent's JSON, for scripts";

const DESCRIBE_EXAMPLES: &str = "\
Examples:
  ztm describe mesh
  ztm describe ep office-pc
  ztm describe svc tcp/ssh
  ztm describe port 2222 --proto tcp
  ztm describe exit --ep home-server
  ztm describe proxy 1080";

const CREATE_EXAMPLES: &str = "\
Examples:
  ztm create svc tcp/ssh --port 22                        # publish this computer's SSH
  ztm create svc tcp/web --host 10.0.0.5 --port 80 --users alice,bob --ep office-pc
  ztm create port 2222 --service ssh --target-ep home-pc  # 127.0.0.1:2222 -> home-pc's ssh
  ztm create port 0.0.0.0:5353 --proto udp --service dns
  ztm create port 8080 --service web --trust alice,bob    # any provider of alice or bob
  ztm create exit --allow 192.168.1.0/24 --allow '*.lan' --users alice   # on the home server
  ztm create proxy 1080 --exit-ep home-server   # then: curl --socks5-hostname 127.0.0.1:1080 http://nas.lan/";

const DELETE_EXAMPLES: &str = "\
Examples:
  ztm delete svc tcp/ssh
  ztm delete svc tcp/web --ep office-pc
  ztm delete port 2222
  ztm delete port 0.0.0.0:5353 --proto udp
  ztm delete exit
  ztm delete proxy 1080";

const JOIN_EXAMPLES: &str = "\
Examples:
  ztm join --invite alice.ztm-invite --as laptop
  ztm join home --as laptop --hub hub.example.com:8888 --ca ca.crt --cert alice.crt --key alice.key";

/// The client subcommands, flattened into `ztm`'s command list.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// List meshes, endpoints, services, ports, exits or proxies (of a running agent)
    #[command(after_help = GET_EXAMPLES)]
    Get(GetArgs),
    /// Show one mesh, endpoint, service, port, exit or proxy in detail
    #[command(after_help = DESCRIBE_EXAMPLES)]
    Describe(DescribeArgs),
    /// Join the agent to a mesh (or update its hubs and certificates)
    #[command(after_help = JOIN_EXAMPLES)]
    Join(JoinArgs),
    /// Leave a mesh: close its ports, withdraw its services, forget it
    Leave(LeaveArgs),
    /// Publish a service, map a local port to a service, make an exit or open a proxy
    #[command(after_help = CREATE_EXAMPLES)]
    Create(CreateArgs),
    /// Withdraw a service, unmap a port, stop an exit or close a proxy
    #[command(after_help = DELETE_EXAMPLES)]
    Delete(DeleteArgs),
    /// Show the mesh's event log
    Log(LogArgs),
    /// Is this computer fine? The agent, each mesh's hubs, certificates and ports; exit status 1
    /// when something needs attention
    Status(StatusArgs),
    /// Print a shell completion script (e.g. `source <(ztm completion bash)`)
    Completion(CompletionArgs),
}

#[derive(Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    mesh: MeshOpt,
    #[command(subcommand)]
    what: GetWhat,
}

#[derive(Subcommand, Debug)]
pub enum GetWhat {
    /// The meshes this agent joined
    #[command(visible_alias = "mesh")]
    Meshes,
    /// The endpoints of the mesh (* marks this agent's own)
    #[command(visible_aliases = ["endpoint", "ep", "eps"])]
    Endpoints,
    /// The services of the mesh, or those of one endpoint with --ep
    #[command(visible_aliases = ["service", "svc"])]
    Services {
        /// Only the services this endpoint publishes (name or id)
        #[arg(long, value_name = "ENDPOINT")]
        ep: Option<String>,
    },
    /// The ports mapped on an endpoint
    #[command(visible_alias = "port")]
    Ports {
        /// The endpoint (name or id) [default: this agent's]
        #[arg(long, value_name = "ENDPOINT")]
        ep: Option<String>,
    },
    /// An endpoint's exit, or with --all the online exits this user may use
    #[command(visible_alias = "exits")]
    Exit {
        /// The endpoint (name or id) [default: this agent's]
        #[arg(long, value_name = "ENDPOINT", conflicts_with = "all")]
        ep: Option<String>,
        /// The mesh's exits this user may use
        #[arg(long)]
        all: bool,
    },
    /// The proxies on an endpoint
    #[command(visible_alias = "proxy")]
    Proxies {
        /// The endpoint (name or id) [default: this agent's]
        #[arg(long, value_name = "ENDPOINT")]
        ep: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct DescribeArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    mesh: MeshOpt,
    #[command(subcommand)]
    what: DescribeWhat,
}

/// Names one port mapping (`describe port`, `delete port`).
#[derive(Args, Debug)]
pub struct PortRef {
    /// [IP:]PORT it listens on (IP defaults to 127.0.0.1)
    pub listen: String,
    /// Protocol
    #[arg(long, value_enum, default_value_t = ProtoArg::Tcp)]
    pub proto: ProtoArg,
    /// The endpoint (name or id) [default: this agent's]
    #[arg(long, value_name = "ENDPOINT")]
    pub ep: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum DescribeWhat {
    /// A mesh: identity, hubs, connection, errors, recent log
    #[command(visible_alias = "meshes")]
    Mesh {
        /// The mesh [default: --mesh, or the only one]
        name: Option<String>,
    },
    /// An endpoint, with its services and ports
    #[command(visible_aliases = ["ep", "endpoints"])]
    Endpoint {
        /// Endpoint name or id
        name: String,
    },
    /// A service of the mesh and the endpoints providing it
    #[command(visible_aliases = ["svc", "services"])]
    Service {
        /// [PROTO/]NAME, e.g. tcp/ssh
        name: String,
    },
    /// A port mapping
    #[command(visible_aliases = ["ports"])]
    Port(PortRef),
    /// An endpoint's exit: who may use it and where it lets connections out
    #[command(visible_aliases = ["exits"])]
    Exit {
        /// The endpoint (name or id) [default: this agent's]
        #[arg(long, value_name = "ENDPOINT")]
        ep: Option<String>,
    },
    /// A proxy
    #[command(visible_aliases = ["proxies"])]
    Proxy(ProxyRef),
}

/// Names one proxy (`describe proxy`, `delete proxy`).
#[derive(Args, Debug)]
pub struct ProxyRef {
    /// [IP:]PORT it listens on (IP defaults to 127.0.0.1)
    pub listen: String,
    /// The endpoint (name or id) [default: this agent's]
    #[arg(long, value_name = "ENDPOINT")]
    pub ep: Option<String>,
}

#[derive(Args, Debug)]
pub struct JoinArgs {
    #[command(flatten)]
    common: Common,
    /// Name of the mesh to join [default with --invite: the invitation's]
    #[arg(required_unless_present = "invite")]
    mesh: Option<String>,
    /// This endpoint's name in the mesh [default: the agent picks the host name]
    #[arg(long = "as", value_name = "NAME")]
    name: Option<String>,
    /// An invitation (`ztm invite`): its file, or its text (ztm-invite-1:...); it gives the
    /// hubs, the CA certificate, the certificate and the key
    #[arg(long, value_name = "FILE|TEXT", conflicts_with_all = ["hubs", "ca", "cert", "key"])]
    invite: Option<String>,
    /// A hub's address (repeatable, or comma-separated)
    #[arg(
        long = "hub",
        value_name = "HOST:PORT",
        required_unless_present = "invite",
        value_delimiter = ','
    )]
    hubs: Vec<String>,
    /// The mesh CA's certificate (PEM file)
    #[arg(long, value_name = "FILE", required_unless_present = "invite")]
    ca: Option<PathBuf>,
    /// The user's certificate (PEM file)
    #[arg(long, value_name = "FILE", required_unless_present = "invite")]
    cert: Option<PathBuf>,
    /// The user's private key (PEM file)
    #[arg(long, value_name = "FILE", required_unless_present = "invite")]
    key: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
pub struct LeaveArgs {
    #[command(flatten)]
    common: Common,
    /// Name of the mesh to leave
    mesh: String,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    mesh: MeshOpt,
    #[command(subcommand)]
    what: CreateWhat,
}

#[derive(Subcommand, Debug)]
pub enum CreateWhat {
    /// Publish a service: HOST:PORT reachable from the endpoint, under PROTO/NAME
    #[command(visible_aliases = ["svc", "services"])]
    Service(NewService),
    /// Map a port: connections to [IP:]PORT on the endpoint go to a service of the mesh
    #[command(visible_aliases = ["ports"])]
    Port(NewPort),
    /// Make the endpoint an exit: it lets other endpoints' proxied connections out to the
    /// destinations allowed (docs/exits.md)
    #[command(visible_aliases = ["exits"])]
    Exit(NewExit),
    /// Open a local SOCKS5 and HTTP proxy on [IP:]PORT whose connections leave through an exit
    #[command(visible_aliases = ["proxies"])]
    Proxy(NewProxy),
}

/// `create exit`.
#[derive(Args, Debug)]
pub struct NewExit {
    /// A destination it lets out (repeatable): CIDR or address, host name, *.DOMAIN or *
    /// (any name), each optionally :PORT or :PORT-PORT; an IPv6 one with a port in brackets.
    /// A name goes out only to an address that is allowed too
    #[arg(long, value_name = "RULE", required = true)]
    pub allow: Vec<String>,
    /// Only these users may use it (comma-separated) [default: every user of the mesh]
    #[arg(long, value_delimiter = ',', value_name = "USER,...")]
    pub users: Option<Vec<String>>,
    /// The endpoint that is the exit (name or id) [default: this agent's]
    #[arg(long, value_name = "ENDPOINT")]
    pub ep: Option<String>,
}

/// `create proxy`.
#[derive(Args, Debug)]
pub struct NewProxy {
    /// [IP:]PORT to listen on (IP defaults to 127.0.0.1)
    pub listen: String,
    /// Always use this exit (name or id) [default: any exit of a trusted user]
    #[arg(long, value_name = "ENDPOINT")]
    pub exit_ep: Option<String>,
    /// Without --exit-ep: users whose exits may carry the connections, comma-separated or
    /// repeated; `*` for any user [default: the proxy's own user and root]
    #[arg(
        long,
        value_name = "USERS",
        value_delimiter = ',',
        conflicts_with = "exit_ep"
    )]
    pub trust: Vec<String>,
    /// The endpoint that listens (name or id) [default: this agent's]
    #[arg(long, value_name = "ENDPOINT")]
    pub ep: Option<String>,
}

/// `create service`.
#[derive(Args, Debug)]
pub struct NewService {
    /// PROTO/NAME, e.g. tcp/ssh (PROTO defaults to tcp)
    pub name: String,
    /// Host the endpoint connects to for this service
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port the endpoint connects to for this service
    #[arg(long)]
    pub port: u16,
    /// Only these users may connect (comma-separated) [default: every user of the mesh]
    #[arg(long, value_delimiter = ',', value_name = "USER,...")]
    pub users: Option<Vec<String>>,
    /// The endpoint that provides it (name or id) [default: this agent's]
    #[arg(long, value_name = "ENDPOINT")]
    pub ep: Option<String>,
}

/// `create port`.
#[derive(Args, Debug)]
pub struct NewPort {
    /// [IP:]PORT to listen on (IP defaults to 127.0.0.1)
    pub listen: String,
    /// Protocol
    #[arg(long, value_enum, default_value_t = ProtoArg::Tcp)]
    pub proto: ProtoArg,
    /// The service connections go to
    #[arg(long, value_name = "NAME")]
    pub service: String,
    /// Always use this provider of the service (name or id) [default: any provider of a
    /// trusted user]
    #[arg(long, value_name = "ENDPOINT")]
    pub target_ep: Option<String>,
    /// Without --target-ep: users whose endpoints may provide the service, comma-separated
    /// or repeated; `*` for any user [default: the port's own user and root]
    #[arg(
        long,
        value_name = "USERS",
        value_delimiter = ',',
        conflicts_with = "target_ep"
    )]
    pub trust: Vec<String>,
    /// The endpoint that listens (name or id) [default: this agent's]
    #[arg(long, value_name = "ENDPOINT")]
    pub ep: Option<String>,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    mesh: MeshOpt,
    #[command(subcommand)]
    what: DeleteWhat,
}

#[derive(Subcommand, Debug)]
pub enum DeleteWhat {
    /// Withdraw a service
    #[command(visible_aliases = ["svc", "services"])]
    Service(ServiceRef),
    /// Unmap a port
    #[command(visible_aliases = ["ports"])]
    Port(PortRef),
    /// Stop being an exit
    #[command(visible_aliases = ["exits"])]
    Exit {
        /// The endpoint (name or id) [default: this agent's]
        #[arg(long, value_name = "ENDPOINT")]
        ep: Option<String>,
    },
    /// Close a proxy
    #[command(visible_aliases = ["proxies"])]
    Proxy(ProxyRef),
}

/// Names one service an endpoint provides (`delete service`).
#[derive(Args, Debug)]
pub struct ServiceRef {
    /// PROTO/NAME, e.g. tcp/ssh (PROTO defaults to tcp)
    pub name: String,
    /// The endpoint that provides it (name or id) [default: this agent's]
    #[arg(long, value_name = "ENDPOINT")]
    pub ep: Option<String>,
}

#[derive(Args, Debug)]
pub struct LogArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    mesh: MeshOpt,
    /// Only the last N entries (0: all)
    #[arg(long, default_value_t = 50)]
    tail: usize,
}

#[derive(Args, Debug)]
pub struct CompletionArgs {
    /// The shell
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// Writes to stdout, through [`table::clean_text`] (what the client prints comes from the mesh
/// in good part); a closed pipe (`ztm get ep | head -1`) ends the process quietly.
pub fn write_out(text: &str) {
    write_raw(&table::clean_text(text));
}

/// Writes to stdout as it is (for text the client made itself, such as completion scripts).
fn write_raw(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("ztm: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// Runs a client command and exits the process with its exit code.
pub fn main(cmd: ClientCommand, command: impl FnOnce() -> clap::Command) -> ! {
    if let ClientCommand::Completion(args) = &cmd {
        let mut c = command();
        let mut script = Vec::new();
        clap_complete::generate(args.shell, &mut c, "ztm", &mut script);
        write_raw(&String::from_utf8_lossy(&script));
        std::process::exit(0);
    }
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(cmds::run(cmd)));
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            let code = if e.downcast_ref::<Usage>().is_some() {
                2
            } else {
                1
            };
            let msg = format!("{e:#}").replace(['\n', '\r'], " ");
            errln!("ztm: {}", msg.trim());
            std::process::exit(code);
        }
    }
}
