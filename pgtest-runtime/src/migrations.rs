//! The migration set: where it comes from, and the hash that names the
//! shared database built from it.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use sha2::{Digest, Sha256};
use sqlx::migrate::Migrator;

use crate::Error;
use crate::runner::MigrationSource;

/// A resolved migration set.
pub(crate) struct Migrations {
    migrator: Resolved,
    /// Where they came from, for messages.
    pub(crate) origin: String,
    /// Hex SHA-256 of every migration's version, kind and checksum.
    pub(crate) hash: String,
}

impl Migrations {
    /// Resolves `source` for the package at `manifest_dir`. A directory is
    /// read now, so an edited migration is picked up without a rebuild.
    pub(crate) async fn load(source: MigrationSource, manifest_dir: &Path) -> Result<Self, Error> {
        let default_dir = manifest_dir.join(sqlx_toml_migrations_dir(manifest_dir)?);
        let (migrator, origin) = match source {
            MigrationSource::Default if default_dir.is_dir() => {
                (read_dir(&default_dir).await?, default_dir)
            }
            MigrationSource::Dir(dir) => {
                let dir = manifest_dir.join(dir);
                (read_dir(&dir).await?, dir)
            }
            MigrationSource::Migrator(migrator) => match static_migrator(migrator) {
                Some(migrator) => (
                    Resolved::Static(migrator),
                    PathBuf::from("the test's migrator"),
                ),
                None => {
                    return Err(Error::Migrations {
                        origin: "the test's migrator".to_owned(),
                        reason: format!(
                            "it is not a `static` of type `sqlx::migrate::Migrator` or \
                             `std::sync::LazyLock<Migrator>` of sqlx {}, the sqlx of this test's \
                             pool; declare it so, with the same sqlx as the test",
                            crate::compat::SQLX_VERSION
                        ),
                    });
                }
            },
            MigrationSource::Default | MigrationSource::None => (
                Resolved::Read(crate::compat::no_migrations()),
                PathBuf::from("no migrations"),
            ),
        };
        let hash = hash(migrator.get());
        Ok(Self {
            migrator,
            origin: origin.display().to_string(),
            hash,
        })
    }

    pub(crate) fn migrator(&self) -> &Migrator {
        self.migrator.get()
    }

    /// The description of the migration with this version.
    pub(crate) fn description(&self, version: i64) -> String {
        self.migrator()
            .iter()
            .find(|migration| migration.version == version)
            .map_or_else(
                || "unknown".to_owned(),
                |migration| migration.description.to_string(),
            )
    }
}

/// A migrator read at run time, or the test's own `static` one.
enum Resolved {
    Read(Migrator),
    Static(&'static Migrator),
}

impl Resolved {
    fn get(&self) -> &Migrator {
        match self {
            Self::Read(migrator) => migrator,
            Self::Static(migrator) => migrator,
        }
    }
}

async fn read_dir(dir: &Path) -> Result<Resolved, Error> {
    Migrator::new(dir)
        .await
        .map(Resolved::Read)
        .map_err(|error| Error::Migrations {
            origin: dir.display().to_string(),
            reason: error.to_string(),
        })
}

/// The migrations directory that the package's `sqlx.toml` names, as sqlx
/// 0.9 reads it, else `migrations`.
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
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
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
