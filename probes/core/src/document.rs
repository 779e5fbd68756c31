//! What every `--json` document of natscope shares (docs/schema/): a `schema` tag naming its kind
//! and version (`natscope.<kind>/v<N>`), and `natscope_version`, the version of natscope that
//! wrote it. The workspace's crates share one version (the workspace manifest), so this crate's
//! version is the binary's (tests/tests/schema.rs checks that they agree).
//!
//! Fields added to a document keep its `v<N>` (a v1 reader ignores what it does not know); a
//! change that breaks a reader (a field removed, renamed or retyped) bumps it.

/// The version of natscope, as every document's `natscope_version` gives it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The `natscope_version` of a document written now.
pub fn version() -> String {
    VERSION.to_owned()
}
