//! The runtime behind pgtest's `#[pg_test]`.
//!
//! Users depend on the `pgtest` crate, which re-exports what they need from
//! here. Everything that runs lives in this crate: configuration, the
//! server connection, the shared database bootstrap, tenants, errors.
//! Generated code calls [`__private::run`] and nothing else.

// An error ends a test: its size on the stack does not matter.
#![allow(clippy::result_large_err)]

mod bootstrap;
mod budget;
mod catalog;
mod cleanup;
mod compat;
mod config;
mod context;
mod disk;
mod embedded;
mod error;
mod helpers;
mod isolation;
mod lock;
pub mod manage;
mod migrations;
mod pool;
mod process;
mod recycle;
mod redact;
mod registry;
mod runner;
mod server;
mod session;
mod shapes;
mod share;
mod state;
mod wait;

pub use cleanup::remove_all;
pub use context::TestContext;
pub use error::Error;
pub use pgtest_core::Tenant;
pub use registry::Removed;

/// Items used by the code that `#[pg_test]` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::runner::run;
    pub use crate::shapes::TestFn;
    pub use pgtest_core::{
        DatabaseSpec, Flavor, Isolation, MigrationSource, PoolKind, Script, TestSpec,
        TestTermination,
    };
    /// The sqlx this runtime is built against, for the facade's dispatch.
    pub use sqlx;
}
