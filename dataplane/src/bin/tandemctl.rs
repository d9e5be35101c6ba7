//! tandemctl: asks a running tandemd for its status and for role changes, through its admin socket
//! (see `dataplane::admin` for the protocol and `dataplane::roles` for what each command does).
//!
//! ```text
//! tandemctl [--socket PATH | --config FILE] status [--json]
//! tandemctl [--socket PATH | --config FILE] promote [--force]
//! tandemctl [--socket PATH | --config FILE] demote
//! tandemctl [--socket PATH | --config FILE] switchover [--timeout-ms N]     (on the active)
//! ```
//!
//! Exit status: 0 done, 1 refused or failed (the reason is printed), 2 the node could not be asked.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The socket of a node with the default state directory.
const DEFAULT_SOCKET: &str = "/var/lib/tandem/admin.sock";

#[derive(Parser, Debug)]
#[command(name = "tandemctl", version = dataplane::VERSION, about = "Status and role changes of a running tandemd")]
struct Cli {
    /// The node's admin socket (default: from --config, else /var/lib/tandem/admin.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// The node's tandemd configuration, to find its admin socket.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Role, epoch, replication id, log positions, peers, service address, role changes.
    Status {
        /// One JSON object (every value a string).
        #[arg(long)]
        json: bool,
    },
    /// Make this standby the active now (refused while an active is connected to it, unless --force).
    Promote {
        #[arg(long)]
        force: bool,
    },
    /// Step this active down to standby (a standby with failover then takes over).
    Demote,
    /// Planned swap with a caught-up standby, no acknowledged write lost (run against the active).
    Switchover {
        /// Give up (writes resume here) if no standby has caught up within this many milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let socket = match socket_path(&cli) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("tandemctl: {e:#}");
            std::process::exit(2);
        }
    };
    let (request, wait) = match &cli.command {
        Command::Status { .. } => ("status".to_string(), Duration::from_secs(5)),
        Command::Promote { force } => ((if *force { "promote force" } else { "promote" }).to_string(), Duration::from_secs(15)),
        Command::Demote => ("demote".to_string(), Duration::from_secs(15)),
        Command::Switchover { timeout_ms } => (format!("switchover {timeout_ms}"), Duration::from_millis(*timeout_ms) + Duration::from_secs(15)),
    };
    let lines = match ask(&socket, &request, wait) {
        Ok(lines) => lines,
        Err(e) => {
            eprintln!("tandemctl: cannot ask the node at {}: {e}", socket.display());
            std::process::exit(2);
        }
    };
    let Some((last, fields)) = lines.split_last() else {
        eprintln!("tandemctl: the node closed the connection without an answer");
        std::process::exit(2);
    };
    if let Some(why) = last.strip_prefix("ERR ") {
        eprintln!("tandemctl: {why}");
        std::process::exit(1);
    }
    let message = last.strip_prefix("OK").map(str::trim_start).unwrap_or(last);
    match cli.command {
        Command::Status { json: true } => println!("{}", to_json(fields)),
        Command::Status { json: false } => {
            let width = fields.iter().filter_map(|l| l.split_once(' ')).map(|(k, _)| k.len()).max().unwrap_or(0);
            for line in fields {
                let (key, value) = line.split_once(' ').unwrap_or((line, ""));
                println!("{:width$}  {value}", format!("{key}:"), width = width + 1);
            }
        }
        _ => println!("{message}"),
    }
}

fn socket_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(path) = &cli.socket {
        return Ok(path.clone());
    }
    if let Some(config) = &cli.config {
        let flags = dataplane::config::Flags { config: Some(config.clone()), ..Default::default() };
        let settings = dataplane::config::Settings::from_flags(&flags)?;
        return settings
            .admin_socket
            .ok_or_else(|| anyhow::anyhow!("{}: no admin socket (it needs [replication], and [failover] or [admin] socket)", config.display()));
    }
    Ok(PathBuf::from(DEFAULT_SOCKET))
}

/// Sends one request line and reads the reply lines until the node closes the connection.
fn ask(socket: &std::path::Path, request: &str, wait: Duration) -> std::io::Result<Vec<String>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    BufReader::new(stream).lines().collect()
}

/// `key value` lines as one JSON object of strings.
fn to_json(fields: &[String]) -> String {
    let escape = |text: &str| {
        let mut out = String::with_capacity(text.len() + 2);
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out
    };
    let pairs: Vec<String> = fields
        .iter()
        .map(|line| {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            format!("\"{}\": \"{}\"", escape(key), escape(value))
        })
        .collect();
    format!("{{{}}}", pairs.join(", "))
}
