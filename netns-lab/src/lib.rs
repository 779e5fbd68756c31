//! natscope-lab: Linux network-namespace labs with a userspace RFC 4787 NAT engine.
//!
//! Empty until the lab issue fills it; the crate exists now so the workspace has its final shape
//! (DESIGN.md, "Workspace") and later work adds modules rather than packages.
