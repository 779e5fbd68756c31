//! Shared helpers for natscope's end-to-end tests.
