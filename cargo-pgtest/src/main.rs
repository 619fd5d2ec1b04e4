//! `cargo pgtest`: look at, open, clean and stop what pgtest keeps for the
//! package in the current directory, as its tests see it (the same
//! configuration, names and home). Install it with
//! `cargo install --path cargo-pgtest`, then run `cargo pgtest status`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use pgtest_runtime::manage;

const USAGE: &str = "\
cargo pgtest: what pgtest keeps for the package in the current directory

Usage: cargo pgtest <command>

Commands:
  status                the server in use and why, the embedded server, pgtest's
                        databases (templates, shared databases, kept failures,
                        spares) with age and size, and who holds connection slots
  psql [TEST|DATABASE] [-- PSQL ARGS]
                        psql on a failed test's kept database (its name, or its
                        end: module::test), on a database of pgtest's, or on the
                        newest run's shared database; starts the embedded server
                        if it stopped, and holds it while psql runs
  clean [--dry-run]     drop every database of pgtest's on that server (those in
                        use stay); --dry-run lists them and drops nothing
  stop                  stop the embedded server
";

fn main() -> ExitCode {
    // The embedded server's watchdog is this binary, run again.
    if let Some(code) = manage::run_helper_if_asked() {
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // `cargo pgtest …` runs `cargo-pgtest pgtest …`.
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("pgtest") {
        args.remove(0);
    }
    // What follows `--` goes to psql.
    let psql_args: Vec<String> = match args.iter().position(|arg| arg == "--") {
        Some(at) => args.split_off(at).into_iter().skip(1).collect(),
        None => Vec::new(),
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let package = package_dir();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(&format!("cannot start a tokio runtime: {error}")),
    };
    let result = match args.as_slice() {
        ["status"] => runtime.block_on(manage::status(&package)).map(|text| {
            print!("{text}");
            0
        }),
        ["psql"] => runtime.block_on(manage::psql(&package, None, &psql_args)),
        ["psql", target] => runtime.block_on(manage::psql(&package, Some(target), &psql_args)),
        ["clean"] | ["clean", "--dry-run"] => {
            let dry_run = args.len() == 2;
            runtime
                .block_on(manage::clean(&package, dry_run))
                .map(|removed| {
                    let verb = if dry_run { "would drop" } else { "dropped" };
                    for database in &removed.dropped {
                        println!("{verb} {database}");
                    }
                    for database in &removed.in_use {
                        println!("in use, kept: {database}");
                    }
                    println!(
                        "{} {verb}, {} in use",
                        removed.dropped.len(),
                        removed.in_use.len()
                    );
                    0
                })
        }
        ["stop"] => manage::stop(&package).map(|ran| {
            match ran {
                true => println!("stopped the embedded server"),
                false => println!("no embedded server of this package runs"),
            }
            0
        }),
        ["help" | "--help" | "-h"] => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(error) => fail(&error.to_string()),
    }
}

/// The nearest directory at or above the current one with a `Cargo.toml`:
/// the package whose tests pgtest serves (its `.env`, `sqlx.toml`).
fn package_dir() -> PathBuf {
    let here = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    here.ancestors()
        .find(|dir| dir.join("Cargo.toml").is_file())
        .map_or_else(|| here.clone(), Path::to_owned)
}

fn fail(message: &str) -> ExitCode {
    eprintln!("cargo pgtest: {message}");
    ExitCode::FAILURE
}
