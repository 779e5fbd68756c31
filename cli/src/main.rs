//! The `natscope` binary: parses arguments, calls the libraries, renders output. No logic lives here
//! that a library could hold (DESIGN.md, "Workspace").
//!
//! Exit codes: 0 ok, 1 the check ran and found a problem, 2 usage or runtime error. Errors are
//! printed once, as one lowercase line prefixed with the program name. The text `--help` shows
//! after each command's options (examples, exit status) is in `cli/help/`; README's "Exit status"
//! is a copy of `cli/help/exit-status.txt` (a test compares them).
//!
//! The `lab` feature (default; Linux only, see cli/Cargo.toml) adds the commands that need the
//! namespace lab: `lab …` and `bench lab`.

mod bench;
#[cfg(all(feature = "lab", target_os = "linux"))]
mod bench_lab;
mod demo;
#[cfg(all(feature = "lab", target_os = "linux"))]
mod grid;
#[cfg(all(feature = "lab", target_os = "linux"))]
mod jobs;
#[cfg(all(feature = "lab", target_os = "linux"))]
mod lab;
mod logging;
#[cfg(all(feature = "lab", target_os = "linux"))]
mod matrix;
mod probe;
mod punch;
mod reflect;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "natscope",
    version,
    about = "NAT behavior diagnostics and namespace labs",
    after_help = include_str!("../help/exit-status.txt")
)]
struct Cli {
    #[command(flatten)]
    log: logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify the NAT in front of this host against an RFC 5780 STUN server.
    #[command(after_help = include_str!("../help/probe.txt"))]
    Probe(probe::ProbeArgs),
    /// Run the RFC 5780 STUN reflector (the server NAT probes talk to).
    #[command(after_help = include_str!("../help/reflect.txt"))]
    Reflect(reflect::ReflectArgs),
    /// Start a reflector on 127.0.0.1 + 127.0.0.2 and check every RFC 5780 answer against it.
    #[command(after_help = include_str!("../help/demo.txt"))]
    Demo(demo::DemoArgs),
    /// Network-namespace labs: real programs behind userspace RFC 4787 NATs (Linux, root).
    #[cfg(all(feature = "lab", target_os = "linux"))]
    #[command(subcommand, after_help = include_str!("../help/lab.txt"))]
    Lab(lab::LabCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Connect two peers through NATs: rendezvous + relay server, listener, connector.
    #[command(subcommand, after_help = include_str!("../help/punch.txt"))]
    Punch(punch::PunchCommand),
    /// Print a shell completion script (e.g. `natscope completions bash > /etc/bash_completion.d/natscope`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout (e.g. `natscope man | man -l -`).
    Man {
        /// Write natscope.1 and a page per subcommand (natscope-probe.1, …) into DIR instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Load a STUN server with Binding requests; report requests/s and latency.
    #[command(after_help = include_str!("../help/bench-reflect.txt"))]
    Reflect(bench::BenchReflectArgs),
    /// Time lab setup and teardown; measure the userspace NAT's throughput and added latency next to the kernel's.
    #[cfg(all(feature = "lab", target_os = "linux"))]
    #[command(after_help = include_str!("../help/bench-lab.txt"))]
    Lab(bench_lab::BenchLabArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log, logging_defaults(&cli.command));
    let result = match cli.command {
        Command::Probe(a) => probe::run(a),
        Command::Reflect(a) => reflect::run(a),
        Command::Demo(a) => demo::run(a),
        #[cfg(all(feature = "lab", target_os = "linux"))]
        Command::Lab(c) => lab::run(c, &cli.log),
        Command::Bench(BenchCommand::Reflect(a)) => bench::run_reflect(a),
        #[cfg(all(feature = "lab", target_os = "linux"))]
        Command::Bench(BenchCommand::Lab(a)) => bench_lab::run(a),
        Command::Punch(c) => punch::run(c),
        Command::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            clap_complete::generate(shell, &mut Cli::command(), "natscope", &mut out);
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir: None } => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout().lock())
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
        Command::Man { dir: Some(d) } => std::fs::create_dir_all(&d)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), &d))
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| anyhow::anyhow!("cannot write man pages into {}: {e}", d.display())),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("natscope: error: {}", error_line(&e));
            ExitCode::from(2)
        }
    }
}

/// Servers log what they serve at `info` by default (and `reflect --log-format json` as JSON);
/// every other command only warns.
fn logging_defaults(c: &Command) -> (logging::Level, bool) {
    match c {
        Command::Reflect(a) => (logging::Level::INFO, a.json_logs()),
        Command::Punch(punch::PunchCommand::Serve(a)) => a.limits.log_defaults(),
        #[cfg(all(feature = "lab", target_os = "linux"))]
        Command::Lab(lab::LabCommand::Serve(_)) => (logging::Level::INFO, false),
        _ => (logging::Level::WARN, false),
    }
}

/// Writes program output to stdout. A closed pipe (`natscope ... | head`) ends output quietly
/// instead of panicking like `println!` would.
pub(crate) fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|_| out.flush());
}

/// One line: the error and its causes, joined.
pub(crate) fn error_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}
