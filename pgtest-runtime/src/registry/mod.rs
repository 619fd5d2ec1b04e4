//! The registry of pgtest's databases on a server: the only code that
//! names, marks, lists, claims, keeps, sweeps and drops them. Everything
//! else (bootstrap, the isolation modes, database mode's lifecycle, the
//! spares helper, `cargo pgtest`) goes through it.
//!
//! A database is pgtest's only when the server says so: its owner
//! (`datdba`) is the role pgtest logs in as (`session_user`) **and** its
//! comment is one of pgtest's markers ([`statements::OURS`],
//! [`markers`]). A database with a name pgtest would use that fails
//! either test is never copied, claimed, snapshot, swept, re-stamped or
//! dropped: the test fails naming it and its owner
//! ([`foreign_database`]).
//!
//! | file | what |
//! |---|---|
//! | [`names`] | the names of templates, run copies, test databases and spares (63 bytes, the role hashed in) |
//! | [`markers`] | the comment on each database: what it is for, who made it, when (the server's clock) |
//! | [`statements`] | the statements that make, mark, list, claim and drop them, ownership checked in each |
//! | [`local`] | what this machine keeps beside them (locks of live databases, spares put back, kept failures) |
//! | [`sweep`] | dropping what nobody can be using any more, beside tests' bodies |
//! | [`remove`] | dropping everything (`remove_all`, `cargo pgtest clean`) |
//! | [`admin`] | the admin connection, to the one lock database, and the errors of databases not pgtest's |
//!
//! The lifecycle of a test's own database (claim, put back, retire, keep
//! a failure, spares) is database mode's, in `crate::isolation::database`,
//! on top of this.

mod admin;
mod local;
pub(crate) mod markers;
pub(crate) mod names;
mod remove;
pub(crate) mod statements;
mod sweep;

pub(crate) use self::admin::{connect_admin, create_error, foreign_database};
pub use self::remove::Removed;
pub(crate) use self::remove::remove;
pub(crate) use self::sweep::Sweep;
