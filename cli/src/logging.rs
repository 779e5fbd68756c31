//! One tracing subscriber for every command (issue 16): on stderr, at the command's default level
//! moved by `-v`/`-q`, or as `RUST_LOG` says when it is set; ANSI colours only on a terminal and
//! never when `NO_COLOR` is set to anything but the empty string (no-color.org). The lab supervisor
//! is a natscope process too: `lab up` hands it the same flags, and its stderr is the lab's log.

use std::io::IsTerminal;

use clap::{ArgAction, Args};
pub use tracing::level_filters::LevelFilter as Level;
use tracing_subscriber::EnvFilter;

#[derive(Args, Clone, Copy, Debug)]
pub struct LogArgs {
    /// More log output on stderr; repeat for more (each -v one level: info, debug, trace).
    #[arg(short, long, action = ArgAction::Count, global = true, display_order = 900)]
    verbose: u8,
    /// Less log output on stderr; repeat for less (each -q one level: warnings, errors, nothing).
    #[arg(short, long, action = ArgAction::Count, global = true, display_order = 901)]
    quiet: u8,
}

/// Least to most verbose.
const LEVELS: [Level; 6] = [
    Level::OFF,
    Level::ERROR,
    Level::WARN,
    Level::INFO,
    Level::DEBUG,
    Level::TRACE,
];

impl LogArgs {
    /// The same flags, for a natscope process this one starts (the lab supervisor).
    #[cfg_attr(not(all(feature = "lab", target_os = "linux")), allow(dead_code))]
    pub fn flags(&self) -> impl Iterator<Item = &'static str> {
        let v = std::iter::repeat_n("-v", self.verbose.into());
        v.chain(std::iter::repeat_n("-q", self.quiet.into()))
    }

    /// `default` moved one level per `-v` (more) and per `-q` (less).
    pub fn level(&self, default: Level) -> Level {
        let at = LEVELS.iter().position(|l| *l == default).unwrap_or(2) as i32;
        let i = at + i32::from(self.verbose) - i32::from(self.quiet);
        LEVELS[i.clamp(0, LEVELS.len() as i32 - 1) as usize]
    }
}

/// Colour on `stream` only when it is a terminal and `NO_COLOR` is unset or empty.
pub fn color(stream: &impl IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the subscriber: natscope's crates at the level the flags give, other crates (tokio,
/// netlink) at most at `warn`; a valid `RUST_LOG` replaces both.
pub fn init(args: &LogArgs, (default, json): (Level, bool)) {
    let level = args.level(default);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let ours = [
            "natscope",
            "natscope_core",
            "natscope_probes",
            "natscope_lab",
        ];
        let mut directives = level.min(Level::WARN).to_string();
        for c in ours {
            directives += &format!(",{c}={level}");
        }
        EnvFilter::new(directives)
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(color(&std::io::stderr()))
        .with_target(false);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    fn level(argv: &[&str], default: Level) -> Level {
        let argv = std::iter::once("natscope").chain(argv.iter().copied());
        Cli::try_parse_from(argv).expect("parse").log.level(default)
    }

    #[test]
    fn each_v_and_q_moves_one_level_within_off_and_trace() {
        assert_eq!(level(&[], Level::WARN), Level::WARN);
        assert_eq!(level(&["-v"], Level::WARN), Level::INFO);
        assert_eq!(level(&["-vv"], Level::WARN), Level::DEBUG);
        assert_eq!(level(&["-v", "-v", "-v", "-v"], Level::WARN), Level::TRACE);
        assert_eq!(level(&["-q"], Level::INFO), Level::WARN);
        assert_eq!(level(&["-qqq"], Level::INFO), Level::OFF);
        assert_eq!(level(&["--quiet", "-qqqq"], Level::WARN), Level::OFF);
        assert_eq!(level(&["-vq"], Level::INFO), Level::INFO);
    }

    #[test]
    fn the_supervisor_gets_the_same_flags() {
        let c = Cli::try_parse_from(["natscope", "-vv", "-q"]).expect("parse");
        assert_eq!(c.log.flags().collect::<Vec<_>>(), ["-v", "-v", "-q"]);
    }
}
