//! natscope's network-namespace labs: real programs behind userspace RFC 4787 NATs (or the
//! kernel's masquerade), built over netlink inside namespaces the lab creates, never touching
//! the root namespace (DESIGN.md, "Lab" and "Safety").

#![forbid(unsafe_code)]

pub mod app;
pub mod app_run;
pub mod bench;
pub mod config;
pub mod conntrack;
pub mod control;
pub mod driver;
pub mod engine;
pub mod grid;
pub mod grid_run;
pub mod jobs;
mod lab;
pub mod links;
pub mod matrix;
pub mod matrix_run;
pub mod miniupnpd;
pub mod netns;
mod plan;
pub mod presets;
pub mod punch_lab;
pub mod registry;
pub mod resolver;
pub mod rootless;
pub mod topology;
pub mod upnp;

pub use lab::{
    check_lab_name, namespace_name, wire_name, Lab, LabBuilder, LabError, LabNode, LabOptions,
    LabStatus, NodeStatus, StatusDocument, STATUS_SCHEMA,
};
