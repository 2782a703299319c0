//! Suites that search everything every crate logs at TRACE for secrets. They share one capture:
//! a process has one global log subscriber, so they cannot live in `tests/it` beside tests that
//! must not run under TRACE logging of every HTTP frame.

#[path = "../common/mod.rs"]
#[allow(dead_code, unused_macros, unused_imports)] // these suites use a part of the harness
mod common;

mod audit;
mod capture;
mod identity;
mod import;
mod secrets;
mod team;
