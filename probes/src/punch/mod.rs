//! `natscope punch` over real sockets: [`driver`] moves bytes between tokio sockets and the punch
//! cores of [`natscope_core::punch`] (re-exported here: codec, server, sessions, reliable stream).

pub use natscope_core::punch::*;

pub mod driver;
pub mod family;
pub mod limits;
pub mod mapping;
