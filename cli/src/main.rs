//! The `natscope` binary: parses arguments, calls the libraries, renders output. No logic lives here
//! that a library could hold (DESIGN.md, "Workspace").
//!
//! Exit codes: 0 ok, 1 the check ran and found a problem, 2 usage or runtime error. Errors are
//! printed once, as one lowercase line prefixed with the program name.

mod bench;
mod bench_lab;
mod demo;
mod grid;
mod jobs;
mod lab;
mod matrix;
mod probe;
mod punch;
mod reflect;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "natscope",
    version,
    about = "NAT behavior diagnostics and namespace labs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify the NAT in front of this host against an RFC 5780 STUN server.
    Probe(probe::ProbeArgs),
    /// Run the RFC 5780 STUN reflector (the server NAT probes talk to).
    Reflect(reflect::ReflectArgs),
    /// Start a reflector on 127.0.0.1 + 127.0.0.2 and check every RFC 5780 answer against it.
    Demo(demo::DemoArgs),
    /// Network-namespace labs: real programs behind userspace RFC 4787 NATs (Linux, root).
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Connect two peers through NATs: rendezvous + relay server, listener, connector.
    #[command(subcommand)]
    Punch(punch::PunchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Load a STUN server with Binding requests; report requests/s and latency.
    Reflect(bench::BenchReflectArgs),
    /// Time lab setup and teardown; measure the userspace NAT's throughput and added latency next to the kernel's.
    Lab(bench_lab::BenchLabArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe(a) => probe::run(a),
        Command::Reflect(a) => reflect::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Lab(c) => lab::run(c),
        Command::Bench(BenchCommand::Reflect(a)) => bench::run_reflect(a),
        Command::Bench(BenchCommand::Lab(a)) => bench_lab::run(a),
        Command::Punch(c) => punch::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("natscope: error: {}", error_line(&e));
            ExitCode::from(2)
        }
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
