//! The names of pgtest's databases. PostgreSQL cuts a name silently at 63
//! bytes, so every name here is made to fit whole, whatever the package's
//! name: a template keeps at most [`PACKAGE_ROOM`] bytes of the package and
//! leaves room for the longest suffix made from it, a run's shared copy
//! under construction.
//!
//! ```text
//! template("my-app", role, migrations, fixtures) == "pgtest_my_app_0123456789ab"
//! run_copy(template, host, run)             == "pgtest_my_app_0123456789ab_rf00dcaf"
//! own_copy(template, "2b1a…")  (a test's)   == "pgtest_my_app_0123456789ab_2b1a09c3"
//! spare(template, "5e77a01c…")              == "pgtest_my_app_0123456789ab_s5e77a01"
//! building(any of these)                    == "…_building"
//! ```

use pgtest_core::Script;
use sha2::{Digest, Sha256};

/// The longest database name PostgreSQL keeps (NAMEDATALEN - 1).
pub(crate) const MAX_NAME_LEN: usize = 63;
/// Hex digits of the template's hash in its name.
const HASH_LEN: usize = 12;
/// Hex digits that tell a run's copy, a test's copy or a spare apart.
const COPY_KEY_LEN: usize = 7;
/// The suffix of a database under construction.
const BUILDING_SUFFIX: &str = "_building";
/// The most a copy's name adds to its template's: `_r`, its key, and the
/// building suffix.
const LONGEST_SUFFIX: usize = 2 + COPY_KEY_LEN + BUILDING_SUFFIX.len();
/// Bytes of the package's name a template keeps.
const PACKAGE_ROOM: usize = MAX_NAME_LEN - LONGEST_SUFFIX - "pgtest__".len() - HASH_LEN;

/// The template of `package` for a migration set (its hash, hex) and
/// fixture set, made by `role`: the package's name lowercased, other
/// characters than ASCII letters and digits made `_`, cut to
/// [`PACKAGE_ROOM`] bytes, then a hash of what goes in it and of the role
/// (two roles on one server make templates of their own, since pgtest
/// uses only the databases its role owns).
pub(crate) fn template(package: &str, role: &str, migrations: &str, fixtures: &[Script]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"template\0");
    hash.update(role.as_bytes());
    hash.update([0]);
    hash.update(migrations.as_bytes());
    for fixture in fixtures {
        hash.update([0]);
        hash.update(fixture.path.as_bytes());
        hash.update([0]);
        hash.update(fixture.sql.as_bytes());
    }
    template_for_hash(package, &hex(&hash.finalize()))
}

fn template_for_hash(package: &str, hash: &str) -> String {
    let package: String = package
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() {
            true => c.to_ascii_lowercase(),
            false => '_',
        })
        .take(PACKAGE_ROOM)
        .collect();
    format!("pgtest_{package}_{}", &hash[..HASH_LEN])
}

/// The run `run` on the machine `host`'s shared copy of `template`.
pub(crate) fn run_copy(template: &str, host: &str, run: &str) -> String {
    let key = hex(&Sha256::digest(format!("{host}\0{run}")));
    format!("{template}_r{}", &key[..COPY_KEY_LEN])
}

/// A test's own copy of `template`, `key` (hex) telling it apart.
pub(crate) fn own_copy(template: &str, key: &str) -> String {
    format!("{template}_{}", &key[..COPY_KEY_LEN + 1])
}

/// A spare copy of `template` made ahead, `key` (hex) telling it apart.
pub(crate) fn spare(template: &str, key: &str) -> String {
    format!("{template}_s{}", &key[..COPY_KEY_LEN])
}

/// The name `name` is built under before it is renamed to `name`.
pub(crate) fn building(name: &str) -> String {
    format!("{name}{BUILDING_SUFFIX}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn the_name_keeps_the_package_and_twelve_hash_digits() {
        assert_eq!(
            template_for_hash("my-App.rs", HASH),
            "pgtest_my_app_rs_0123456789ab"
        );
    }

    #[test]
    fn two_roles_make_templates_of_their_own() {
        assert_ne!(
            template("app", "alice", HASH, &[]),
            template("app", "bob", HASH, &[])
        );
    }

    #[test]
    fn every_name_fits_whole_and_none_is_another_cut_short() {
        for length in [1, 26, 33, 34, 35, 40, 70, 200] {
            let package = "billing-Service".repeat(20)[..length].to_owned();
            let template = template(&package, "postgres", HASH, &[]);
            let names = [
                template.clone(),
                building(&template),
                run_copy(&template, "a-host", "a-run"),
                building(&run_copy(&template, "a-host", "a-run")),
                own_copy(&template, "fedcba9876543210"),
                spare(&template, "fedcba9876543210"),
                building(&own_copy(&template, "fedcba9876543210")),
            ];
            for name in &names {
                assert!(name.len() <= MAX_NAME_LEN, "{length}: {name} is cut");
            }
            for (index, name) in names.iter().enumerate() {
                for other in &names[index + 1..] {
                    assert_ne!(name, other);
                }
            }
        }
    }
}
