//! The migration set: where it comes from, and the hash that names the
//! shared database built from it.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use sha2::{Digest, Sha256};
use sqlx::migrate::Migrator;
use tokio::sync::OnceCell;

use crate::Error;
use crate::state::StateDir;
use pgtest_core::MigrationSource;

/// A resolved migration set.
pub(crate) struct Migrations {
    migrator: Resolved,
    /// Where they came from, for messages.
    pub(crate) origin: String,
    /// Hex SHA-256 of every migration's version, kind and checksum.
    pub(crate) hash: String,
}

impl Migrations {
    /// Resolves `source` for the package at `manifest_dir`, remembering
    /// directories' hashes in `home`. A directory is
    /// looked at now, so an edited migration is picked up without a
    /// rebuild; it is read only when its hash is not known yet for its
    /// files' names, sizes and times, or when a build needs it.
    pub(crate) async fn load(
        source: MigrationSource,
        manifest_dir: &Path,
        home: &StateDir,
    ) -> Result<Self, Error> {
        let default_dir = manifest_dir.join(sqlx_toml_migrations_dir(manifest_dir)?);
        let dir = match source {
            MigrationSource::Default if default_dir.is_dir() => default_dir,
            MigrationSource::Dir(dir) => manifest_dir.join(dir),
            MigrationSource::Migrator(migrator) => {
                let Some(migrator) = static_migrator(migrator) else {
                    return Err(Error::Migrations {
                        origin: "the test's migrator".to_owned(),
                        reason: format!(
                            "it is not a `static` of type `sqlx::migrate::Migrator` or \
                             `std::sync::LazyLock<Migrator>` of sqlx {}, the sqlx of this test's \
                             pool; declare it so, with the same sqlx as the test",
                            crate::compat::SQLX_VERSION
                        ),
                    });
                };
                return Ok(Self {
                    hash: hash(migrator),
                    migrator: Resolved::Static(migrator),
                    origin: "the test's migrator".to_owned(),
                });
            }
            MigrationSource::Default | MigrationSource::None => {
                let none = crate::compat::no_migrations();
                return Ok(Self {
                    hash: hash(&none),
                    migrator: Resolved::Read(none),
                    origin: "no migrations".to_owned(),
                });
            }
        };
        let origin = dir.display().to_string();
        let stamp = stamp(&dir).map_err(|error| Error::Migrations {
            origin: origin.clone(),
            reason: error.to_string(),
        })?;
        let cache = home.migrations_hash(&stamp)?;
        if let Some(hash) = std::fs::read_to_string(&cache)
            .ok()
            .filter(|hash| hash.len() == 64)
        {
            let migrator = Resolved::Dir(dir, OnceCell::new());
            return Ok(Self {
                migrator,
                origin,
                hash,
            });
        }
        let migrator = read_dir(&dir).await?;
        let hash = hash(&migrator);
        // Known from now on, for every process (a lost race writes the same).
        let partial = cache.with_extension(uuid::Uuid::new_v4().simple().to_string());
        if std::fs::write(&partial, &hash).is_ok() {
            let _ = std::fs::rename(&partial, &cache);
        }
        Ok(Self {
            migrator: Resolved::Read(migrator),
            origin,
            hash,
        })
    }

    /// The migrator, read from its directory now if it was not before.
    pub(crate) async fn migrator(&self) -> Result<&Migrator, Error> {
        match &self.migrator {
            Resolved::Read(migrator) => Ok(migrator),
            Resolved::Static(migrator) => Ok(migrator),
            Resolved::Dir(dir, migrator) => migrator.get_or_try_init(|| read_dir(dir)).await,
        }
    }
}

/// The description of the migration of `migrator` with this version.
pub(crate) fn description(migrator: &Migrator, version: i64) -> String {
    migrator
        .iter()
        .find(|migration| migration.version == version)
        .map_or_else(
            || "unknown".to_owned(),
            |migration| migration.description.to_string(),
        )
}

/// A migrator read at run time, the test's own `static` one, or a
/// directory read when first needed.
enum Resolved {
    Read(Migrator),
    Static(&'static Migrator),
    Dir(PathBuf, OnceCell<Migrator>),
}

async fn read_dir(dir: &Path) -> Result<Migrator, Error> {
    Migrator::new(dir).await.map_err(|error| Error::Migrations {
        origin: dir.display().to_string(),
        reason: error.to_string(),
    })
}

/// The names, sizes and modification times of the files in `dir`: what
/// changes when a migration is added, removed or edited.
fn stamp(dir: &Path) -> std::io::Result<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        let modified = metadata
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        lines.push(format!(
            "{}\0{}\0{modified}",
            entry.file_name().to_string_lossy(),
            metadata.len()
        ));
    }
    lines.sort();
    Ok(format!(
        "{}\n{}",
        String::from_utf8_lossy(RECIPE),
        lines.join("\n")
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The migrations directory that the package's `sqlx.toml` names, as sqlx
/// 0.9 reads it, else `migrations`.
/// The directory a test of the package at `manifest_dir` would have taken
/// its migrations from when `source` found none there: what a failure's
/// note names (a test that expected tables finds none).
pub(crate) fn missing_default_dir(source: MigrationSource, manifest_dir: &Path) -> Option<PathBuf> {
    if !matches!(source, MigrationSource::Default) {
        return None;
    }
    let dir = manifest_dir.join(sqlx_toml_migrations_dir(manifest_dir).ok()?);
    (!dir.is_dir()).then_some(dir)
}

fn sqlx_toml_migrations_dir(manifest_dir: &Path) -> Result<PathBuf, Error> {
    let dir = crate::config::sqlx_toml_value(manifest_dir, "migrate", "migrations-dir")?;
    Ok(PathBuf::from(dir.as_deref().unwrap_or("migrations")))
}

/// The migrator behind the attribute's `migrator = "PATH"`, when it is one
/// of this runtime's sqlx, directly or in a `LazyLock`.
pub(crate) fn static_migrator(
    migrator: &'static (dyn Any + Send + Sync),
) -> Option<&'static Migrator> {
    migrator.downcast_ref::<Migrator>().or_else(|| {
        migrator
            .downcast_ref::<LazyLock<Migrator>>()
            .map(|lazy| &**lazy)
    })
}

/// Changes whenever pgtest builds databases differently, so that a newer
/// pgtest never uses a database an older one built.
const RECIPE: &[u8] = b"pgtest recipe 2\0";

fn hash(migrator: &Migrator) -> String {
    let mut hasher = Sha256::new();
    hasher.update(RECIPE);
    for migration in migrator.iter() {
        hasher.update(migration.version.to_le_bytes());
        hasher.update(format!("{:?}", migration.migration_type));
        hasher.update([u8::from(migration.no_tx)]);
        hasher.update(&*migration.checksum);
    }
    hex(&hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlx_toml_names_the_migrations_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            sqlx_toml_migrations_dir(dir.path()).unwrap(),
            PathBuf::from("migrations")
        );
        std::fs::write(
            dir.path().join("sqlx.toml"),
            "[migrate]\nmigrations-dir = \"db/migrations\"\n",
        )
        .unwrap();
        assert_eq!(
            sqlx_toml_migrations_dir(dir.path()).unwrap(),
            PathBuf::from("db/migrations")
        );
        std::fs::write(dir.path().join("sqlx.toml"), "[migrate\n").unwrap();
        let error = sqlx_toml_migrations_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("sqlx.toml") && error.contains("Fix the file"),
            "{error}"
        );
    }
}
