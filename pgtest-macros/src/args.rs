//! The attribute's arguments: parsed strictly, checked together in
//! `build`, every error spanned on the token that caused it.

use std::path::Path;

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Lit, LitInt, LitStr};

const KEYS: &str = "migrations, migrator, max_connections, seed, role, crate";

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

/// The checked arguments.
pub(crate) struct Args {
    pub(crate) migrations: Migrations,
    /// As written; `None` lets the expansion choose from the body.
    pub(crate) max_connections: Option<u32>,
    pub(crate) seeds: Vec<LitStr>,
    pub(crate) role: Option<LitStr>,
    pub(crate) krate: syn::Path,
    /// Whether any argument concerns the database.
    pub(crate) any_database_key: Option<Span>,
}

/// The arguments as written, before the cross-checks.
#[derive(Default)]
pub(crate) struct RawArgs {
    migrations: Option<(Span, Lit)>,
    migrator: Option<(Span, LitStr)>,
    max_connections: Option<(Span, LitInt)>,
    seeds: Vec<(Span, LitStr)>,
    role: Option<(Span, LitStr)>,
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
        match key.as_str() {
            "migrations" => set_once(&mut self.migrations, &meta, span, meta.value()?.parse()?),
            "migrator" => set_once(&mut self.migrator, &meta, span, meta.value()?.parse()?),
            "max_connections" => set_once(
                &mut self.max_connections,
                &meta,
                span,
                meta.value()?.parse()?,
            ),
            "role" => set_once(&mut self.role, &meta, span, meta.value()?.parse()?),
            "crate" => set_once(&mut self.krate, &meta, span, meta.value()?.parse()?),
            "seed" => {
                self.seeds.push((span, meta.value()?.parse()?));
                Ok(())
            }
            _ => Err(meta.error(format_args!(
                "unknown #[pg_test] argument `{}`; the arguments are: {KEYS}",
                path_text(&meta.path)
            ))),
        }
    }

    /// Checks the arguments together. `manifest_dir` is the directory that
    /// relative migration paths start from.
    pub(crate) fn build(self, manifest_dir: Option<&Path>) -> syn::Result<Args> {
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
        let any_database_key = [
            self.max_connections.as_ref().map(|(span, _)| *span),
            self.role.as_ref().map(|(span, _)| *span),
            self.seeds.first().map(|(span, _)| *span),
        ]
        .into_iter()
        .flatten()
        .next();
        Ok(Args {
            migrations,
            max_connections,
            seeds: self.seeds.into_iter().map(|(_, seed)| seed).collect(),
            role: self.role.map(|(_, role)| role),
            krate,
            any_database_key,
        })
    }
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
            "no migrations directory at {} (paths are relative to the package's Cargo.toml); \
             create it, fix the path, or write `migrations = false`",
            path.display()
        ),
    ))
}
