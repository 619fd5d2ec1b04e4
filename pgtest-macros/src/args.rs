//! The attribute's arguments: parsed strictly, checked together in
//! `build`, every error spanned on the token that caused it.

use std::path::Path;

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::parse::ParseStream;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Lit, LitInt, LitStr, Token};

const KEYS: &str = "isolation, migrations, migrator, fixtures(…), max_connections, pool, seed, \
                    role, flavor, worker_threads, database(…), crate";

/// The keys of a `database(…)` group.
const DATABASE_KEYS: &str = "migrations, migrator, fixtures(…), seed";

/// Where the migrations come from.
pub(crate) enum Migrations {
    /// `./migrations` when it exists.
    Default,
    /// `migrations = "dir"`.
    Dir(LitStr),
    /// `migrator = "path::TO::MIGRATOR"`.
    Migrator(syn::Path),
    /// `migrations = false`.
    None,
}

/// How a test is kept apart from the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isolation {
    Shared,
    Database,
    Transaction,
}

/// How the test's pool opens connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pool {
    /// A further connection only when a task of the test waits for one.
    Frugal,
    /// As a plain sqlx pool of the same size and options would.
    Sqlx,
}

/// The tokio runtime of the test's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavor {
    CurrentThread,
    MultiThread { worker_threads: Option<usize> },
}

/// The checked arguments.
pub(crate) struct Args {
    /// As written; `None` lets the expansion choose.
    pub(crate) isolation: Option<Isolation>,
    pub(crate) migrations: Migrations,
    /// Fixture paths, resolved as sqlx resolves them, relative to the test
    /// file.
    pub(crate) fixtures: Vec<LitStr>,
    /// As written; `None` lets the expansion choose from the body.
    pub(crate) max_connections: Option<u32>,
    /// As written; `None` lets the expansion choose by the attribute.
    pub(crate) pool: Option<Pool>,
    pub(crate) seeds: Vec<LitStr>,
    pub(crate) role: Option<LitStr>,
    pub(crate) flavor: Flavor,
    pub(crate) krate: syn::Path,
    /// Whether any argument concerns the database.
    pub(crate) any_database_key: Option<Span>,
    /// The `database(…)` groups, in order: empty for a test of one
    /// database (the fields above describe it).
    pub(crate) databases: Vec<Database>,
}

/// One `database(…)` group, checked.
pub(crate) struct Database {
    pub(crate) migrations: Migrations,
    pub(crate) fixtures: Vec<LitStr>,
    pub(crate) seeds: Vec<LitStr>,
}

/// What says where a database's schema and rows come from: the attribute's
/// own keys for a test of one database, or a `database(…)` group's.
#[derive(Default)]
struct RawDatabase {
    fixtures: Vec<(Span, LitStr)>,
    migrations: Option<(Span, Lit)>,
    migrator: Option<(Span, LitStr)>,
    seeds: Vec<(Span, LitStr)>,
}

impl RawDatabase {
    /// Parses `key` when it is one of a database's; `None` when it is not.
    fn parse(&mut self, key: &str, meta: &ParseNestedMeta<'_>) -> Option<syn::Result<()>> {
        let span = meta.path.span();
        Some(match key {
            "fixtures" => (|| {
                let content;
                syn::parenthesized!(content in meta.input);
                let fixtures = parse_fixtures(&content)?;
                self.fixtures
                    .extend(fixtures.into_iter().map(|path| (span, path)));
                Ok(())
            })(),
            "migrations" => meta
                .value()
                .and_then(|value| value.parse())
                .and_then(|value| set_once(&mut self.migrations, meta, span, value)),
            "migrator" => meta
                .value()
                .and_then(|value| value.parse())
                .and_then(|value| set_once(&mut self.migrator, meta, span, value)),
            "seed" => meta.value().and_then(|value| value.parse()).map(|seed| {
                self.seeds.push((span, seed));
            }),
            _ => return None,
        })
    }

    /// The first key given, if any.
    fn first_span(&self) -> Option<Span> {
        [
            self.migrations.as_ref().map(|(span, _)| *span),
            self.migrator.as_ref().map(|(span, _)| *span),
            self.fixtures.first().map(|(span, _)| *span),
            self.seeds.first().map(|(span, _)| *span),
        ]
        .into_iter()
        .flatten()
        .next()
    }

    /// Checks the keys together.
    fn build(self, manifest_dir: Option<&Path>) -> syn::Result<Database> {
        let migrations = match (self.migrations, self.migrator) {
            (Some(_), Some((span, _))) => {
                return Err(syn::Error::new(
                    span,
                    "`migrator` and `migrations` cannot both be given: keep one",
                ));
            }
            (Some((_, Lit::Bool(flag))), None) if !flag.value => Migrations::None,
            (Some((_, Lit::Str(dir))), None) => {
                check_dir(&dir, manifest_dir)?;
                Migrations::Dir(dir)
            }
            (Some((_, other)), None) => {
                return Err(syn::Error::new(
                    other.span(),
                    "`migrations` takes a directory (\"./migrations\") or `false`",
                ));
            }
            (None, Some((_, path))) => Migrations::Migrator(path.parse().map_err(|_| {
                syn::Error::new(
                    path.span(),
                    "`migrator` takes a path such as \"crate::MIGRATOR\"",
                )
            })?),
            (None, None) => Migrations::Default,
        };
        Ok(Database {
            migrations,
            fixtures: self.fixtures.into_iter().map(|(_, path)| path).collect(),
            seeds: self.seeds.into_iter().map(|(_, seed)| seed).collect(),
        })
    }
}

/// The arguments as written, before the cross-checks.
#[derive(Default)]
pub(crate) struct RawArgs {
    isolation: Option<(Span, LitStr)>,
    /// The keys of the test's one database, when it has one.
    top: RawDatabase,
    /// The `database(…)` groups, when it has several.
    databases: Vec<(Span, RawDatabase)>,
    max_connections: Option<(Span, LitInt)>,
    pool: Option<(Span, LitStr)>,
    role: Option<(Span, LitStr)>,
    flavor: Option<(Span, LitStr)>,
    worker_threads: Option<(Span, LitInt)>,
    krate: Option<(Span, LitStr)>,
}

impl RawArgs {
    /// Parses one `key = value`; meant for `syn::meta::parser`.
    pub(crate) fn parse(&mut self, meta: ParseNestedMeta<'_>) -> syn::Result<()> {
        let key = meta
            .path
            .get_ident()
            .map(ToString::to_string)
            .unwrap_or_default();
        let span = meta.path.span();
        if let Some(parsed) = self.top.parse(&key, &meta) {
            return parsed;
        }
        match key.as_str() {
            "isolation" => set_once(&mut self.isolation, &meta, span, meta.value()?.parse()?),
            "database" => {
                let mut database = RawDatabase::default();
                let content;
                syn::parenthesized!(content in meta.input);
                let group: proc_macro2::TokenStream = content.parse()?;
                // `database()` is a database of the default migrations.
                let parser = syn::meta::parser(|inner| {
                    let key = inner
                        .path
                        .get_ident()
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    database.parse(&key, &inner).unwrap_or_else(|| {
                        Err(inner.error(format_args!(
                            "unknown key `{}` in `database(…)`; a database takes: \
                             {DATABASE_KEYS} (the other arguments are the test's, for all \
                             its databases: write them outside the group)",
                            path_text(&inner.path)
                        )))
                    })
                });
                syn::parse::Parser::parse2(parser, group)?;
                self.databases.push((span, database));
                Ok(())
            }
            "max_connections" => set_once(
                &mut self.max_connections,
                &meta,
                span,
                meta.value()?.parse()?,
            ),
            "pool" => set_once(&mut self.pool, &meta, span, meta.value()?.parse()?),
            "role" => set_once(&mut self.role, &meta, span, meta.value()?.parse()?),
            "flavor" => set_once(&mut self.flavor, &meta, span, meta.value()?.parse()?),
            "worker_threads" => set_once(
                &mut self.worker_threads,
                &meta,
                span,
                meta.value()?.parse()?,
            ),
            "crate" => set_once(&mut self.krate, &meta, span, meta.value()?.parse()?),
            // What sqlx's proposal for several databases (sqlx PR #4050)
            // names its groups.
            "env" => Err(meta.error(
                "unknown #[pg_test] argument `env`: pgtest runs every database of a test on \
                 one server, so a database names no URL variable; give each its group as \
                 `database(migrations = \"…\", fixtures(…))`, one per pool argument, in order",
            )),
            _ => Err(meta.error(format_args!(
                "unknown #[pg_test] argument `{}`; the arguments are: {KEYS}",
                path_text(&meta.path)
            ))),
        }
    }

    /// Checks the arguments together. `manifest_dir` is the directory that
    /// relative migration paths start from.
    pub(crate) fn build(self, manifest_dir: Option<&Path>) -> syn::Result<Args> {
        if let (Some(span), false) = (self.top.first_span(), self.databases.is_empty()) {
            return Err(syn::Error::new(
                span,
                "with `database(…)` groups, each database names its own migrations, fixtures \
                 and seeds: move this into the group of the database it is for",
            ));
        }
        let database_span = self.databases.first().map(|(span, _)| *span);
        let first_fixture = self.top.fixtures.first().map(|(span, _)| *span);
        let first_seed = self.top.seeds.first().map(|(span, _)| *span);
        let top = self.top.build(manifest_dir)?;
        let databases = self
            .databases
            .into_iter()
            .map(|(_, database)| database.build(manifest_dir))
            .collect::<syn::Result<Vec<_>>>()?;
        let max_connections = match &self.max_connections {
            Some((_, lit)) => match lit.base10_parse::<u32>() {
                Ok(n) if n >= 1 => Some(n),
                _ => {
                    return Err(syn::Error::new(
                        lit.span(),
                        "`max_connections` must be at least 1",
                    ));
                }
            },
            None => None,
        };
        let krate = match self.krate {
            Some((_, lit)) => lit.parse().map_err(|_| {
                syn::Error::new(lit.span(), "`crate` takes a path such as \"::my_pgtest\"")
            })?,
            None => syn::parse_quote!(::pgtest),
        };
        if let Some((_, role)) = &self.role
            && role.value().is_empty()
        {
            return Err(syn::Error::new(role.span(), "`role` must name a role"));
        }
        let flavor = match (&self.flavor, &self.worker_threads) {
            (None, None) => Flavor::CurrentThread,
            (Some((_, lit)), threads) => match (lit.value().as_str(), threads) {
                ("current_thread", None) => Flavor::CurrentThread,
                ("current_thread", Some((span, _))) => {
                    return Err(syn::Error::new(
                        *span,
                        "`worker_threads` needs `flavor = \"multi_thread\"`",
                    ));
                }
                ("multi_thread", threads) => Flavor::MultiThread {
                    worker_threads: threads.as_ref().map(worker_threads).transpose()?,
                },
                _ => {
                    return Err(syn::Error::new(
                        lit.span(),
                        "`flavor` is \"current_thread\" or \"multi_thread\"",
                    ));
                }
            },
            (None, Some((span, _))) => {
                return Err(syn::Error::new(
                    *span,
                    "`worker_threads` needs `flavor = \"multi_thread\"`",
                ));
            }
        };
        let isolation = match &self.isolation {
            None => None,
            Some((_, lit)) => Some(match lit.value().as_str() {
                "shared" => Isolation::Shared,
                "database" => Isolation::Database,
                "transaction" => Isolation::Transaction,
                _ => {
                    return Err(syn::Error::new(
                        lit.span(),
                        "`isolation` is \"shared\", \"database\" or \"transaction\"",
                    ));
                }
            }),
        };
        let pool = match &self.pool {
            None => None,
            Some((_, lit)) => Some(match lit.value().as_str() {
                "frugal" => Pool::Frugal,
                "sqlx" => Pool::Sqlx,
                _ => {
                    return Err(syn::Error::new(
                        lit.span(),
                        "`pool` is \"sqlx\" (connections opened as a plain sqlx pool opens \
                         them) or \"frugal\" (one more only when the test waits for one)",
                    ));
                }
            }),
        };
        if let (Some(Isolation::Transaction), Some((span, _))) = (isolation, &self.pool) {
            return Err(syn::Error::new(
                *span,
                "`pool` has no effect with isolation = \"transaction\": the test gets one \
                 connection; remove it",
            ));
        }
        let any_database_key = [
            self.isolation.as_ref().map(|(span, _)| *span),
            first_fixture,
            self.max_connections.as_ref().map(|(span, _)| *span),
            self.pool.as_ref().map(|(span, _)| *span),
            self.role.as_ref().map(|(span, _)| *span),
            first_seed,
            database_span,
        ]
        .into_iter()
        .flatten()
        .next();
        Ok(Args {
            isolation,
            migrations: top.migrations,
            fixtures: top.fixtures,
            max_connections,
            pool,
            seeds: top.seeds,
            role: self.role.map(|(_, role)| role),
            flavor,
            krate,
            any_database_key,
            databases,
        })
    }
}

/// A `worker_threads = N`, at least 1.
fn worker_threads((_, lit): &(Span, LitInt)) -> syn::Result<usize> {
    match lit.base10_parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(syn::Error::new(
            lit.span(),
            "`worker_threads` must be at least 1",
        )),
    }
}

/// The inside of `fixtures(…)`, as `#[sqlx::test]` reads it: names
/// (`"users"` is `fixtures/users.sql` beside the test file), paths ending
/// in `.sql` (relative to the test file), or `path = "dir", scripts("a",
/// "b")` (`dir/a.sql`, `dir/b.sql`).
fn parse_fixtures(input: ParseStream<'_>) -> syn::Result<Vec<LitStr>> {
    let resolved = |lit: &LitStr, dir: &str| {
        let name = lit.value();
        let file = if name.ends_with(".sql") {
            name
        } else {
            format!("{name}.sql")
        };
        LitStr::new(&format!("{dir}{file}"), lit.span())
    };
    if !input.peek(syn::Ident) {
        let names = Punctuated::<LitStr, Token![,]>::parse_terminated(input)?;
        return Ok(names
            .iter()
            .map(|lit| match lit.value().ends_with(".sql") {
                true => lit.clone(),
                false => resolved(lit, "fixtures/"),
            })
            .collect());
    }
    let mut dir: Option<LitStr> = None;
    let mut scripts: Option<Punctuated<LitStr, Token![,]>> = None;
    while !input.is_empty() {
        let key: syn::Ident = input.parse()?;
        if key == "path" && dir.is_none() {
            input.parse::<Token![=]>()?;
            dir = Some(input.parse()?);
        } else if key == "scripts" && scripts.is_none() {
            let content;
            syn::parenthesized!(content in input);
            scripts = Some(Punctuated::parse_terminated(&content)?);
        } else {
            return Err(syn::Error::new(
                key.span(),
                "`fixtures` takes names (\"users\"), paths (\"../x.sql\"), or \
                 `path = \"dir\", scripts(\"a\", \"b\")`, each once",
            ));
        }
        if !input.is_empty() {
            input.parse::<Token![,]>()?;
        }
    }
    let (Some(dir), Some(scripts)) = (dir, scripts) else {
        return Err(
            input.error("`fixtures(path = …)` needs `scripts(…)` too, and the other way round")
        );
    };
    let dir = format!("{}/", dir.value().trim_end_matches('/'));
    Ok(scripts.iter().map(|lit| resolved(lit, &dir)).collect())
}

fn set_once<T>(
    slot: &mut Option<(Span, T)>,
    meta: &ParseNestedMeta<'_>,
    span: Span,
    value: T,
) -> syn::Result<()> {
    if slot.is_some() {
        return Err(meta.error(format_args!(
            "`{}` is given twice; give it once",
            path_text(&meta.path)
        )));
    }
    *slot = Some((span, value));
    Ok(())
}

fn path_text(path: &syn::Path) -> String {
    path.segments
        .iter()
        .map(|segment| segment.ident.to_string())
        .collect::<Vec<_>>()
        .join("::")
}

fn check_dir(dir: &LitStr, manifest_dir: Option<&Path>) -> syn::Result<()> {
    let Some(manifest_dir) = manifest_dir else {
        return Ok(());
    };
    let path = manifest_dir.join(dir.value());
    if path.is_dir() {
        return Ok(());
    }
    Err(syn::Error::new(
        dir.span(),
        format!(
            "no migrations directory {:?} beside the package's Cargo.toml (paths are relative \
             to it); create it, fix the path, or write `migrations = false`",
            dir.value()
        ),
    ))
}
