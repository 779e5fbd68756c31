//! The RFC 5780 reflector over real sockets: [`driver`] runs the sans-IO answer logic of
//! [`natscope_core::reflector`] (re-exported here) on tokio UDP and TCP sockets; [`families`] runs one deployment per address family.

pub use natscope_core::reflector::*;

pub mod driver;
pub mod families;
