//! PLACEHOLDER until helper-2's load generator lands (lead wiring only; replace whole file).
use clap::Args;
#[derive(Args, Debug)]
pub struct BenchReflectArgs {
    target: String,
}
pub fn run_reflect(_a: BenchReflectArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("bench is not built yet")
}
