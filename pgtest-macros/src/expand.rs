//! Expansion: check the function's shape and emit a plain `#[test] fn` that
//! makes one call into the runtime.

use std::path::PathBuf;

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Attribute, FnArg, ItemFn};

use crate::args::{Args, Flavor, Isolation, Migrations, Pool, RawArgs};

/// Which attribute is expanding; they differ in the default isolation and
/// pool.
#[derive(Clone, Copy)]
pub(crate) enum Flavour {
    /// `#[pg_test]`: shared, or database when it has fixtures; a frugal
    /// pool.
    PgTest,
    /// `#[sqlx_test]`: database, and a pool that opens connections as
    /// sqlx's does, as `#[sqlx::test]` behaves.
    Sqlx,
}

/// The attributes' entry point: the expansion, or the function unchanged
/// plus the errors (so that rust-analyzer keeps seeing it).
pub(crate) fn attribute(args: TokenStream, item: TokenStream, flavour: Flavour) -> TokenStream {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    match expand(args, item.clone(), manifest_dir, flavour) {
        Ok(tokens) => tokens,
        Err(error) => {
            let errors = error.to_compile_error();
            quote! { #item #errors }
        }
    }
}

/// Expands `#[pg_test(args)] item`. Relative migration directories are
/// checked against `manifest_dir` when it is known.
pub(crate) fn expand(
    args: TokenStream,
    item: TokenStream,
    manifest_dir: Option<PathBuf>,
    flavour: Flavour,
) -> syn::Result<TokenStream> {
    let function: ItemFn = syn::parse2(item)?;
    let mut raw = RawArgs::default();
    let parser = syn::meta::parser(|meta| raw.parse(meta));
    let args =
        syn::parse::Parser::parse2(parser, args).and_then(|()| raw.build(manifest_dir.as_deref()));
    let shape = check_function(&function);
    let args = match (args, shape) {
        (Ok(mut args), Ok(())) => {
            let isolation = args.isolation.unwrap_or(match flavour {
                Flavour::Sqlx => Isolation::Database,
                Flavour::PgTest
                    if !args.fixtures.is_empty()
                        || args.databases.iter().any(|db| !db.fixtures.is_empty()) =>
                {
                    Isolation::Database
                }
                Flavour::PgTest => Isolation::Shared,
            });
            args.isolation = Some(isolation);
            args.pool.get_or_insert(match flavour {
                Flavour::Sqlx => Pool::Sqlx,
                Flavour::PgTest => Pool::Frugal,
            });
            if isolation == Isolation::Transaction {
                check_transaction_inputs(&function)?;
            }
            check_database_count(&function, &args)?;
            args
        }
        (Err(mut first), Err(second)) => {
            first.combine(second);
            return Err(first);
        }
        (Err(error), _) | (_, Err(error)) => return Err(error),
    };
    if function.sig.inputs.is_empty()
        && let Some(span) = args.any_database_key
    {
        return Err(syn::Error::new(
            span,
            "this test takes no database, so this argument has no effect; add a \
             `pool: PgPool` argument or remove it",
        ));
    }
    Ok(emit(&function, &args))
}

/// Rejects what the runtime cannot call, each error on its own token.
fn check_function(function: &ItemFn) -> syn::Result<()> {
    let mut errors: Vec<syn::Error> = Vec::new();
    for attribute in &function.attrs {
        if is_test_attribute(attribute) {
            errors.push(syn::Error::new_spanned(
                attribute,
                "#[pg_test] already makes this fn a test: remove this attribute, or the test \
                 would run twice",
            ));
        }
    }
    // Another test attribute that expanded first (`#[tokio::test]` above
    // this one) rewrote the fn: its shape is no longer the user's, so say
    // only what to remove.
    if !errors.is_empty() {
        return combined(errors);
    }
    let sig = &function.sig;
    if sig.asyncness.is_none() && !sig.inputs.is_empty() {
        errors.push(syn::Error::new(
            sig.fn_token.span,
            "a #[pg_test] fn that takes a database must be `async fn`",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.push(syn::Error::new(
            sig.generics.span(),
            "a #[pg_test] fn cannot be generic",
        ));
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(syn::Error::new(
            variadic.span(),
            "a #[pg_test] fn cannot be variadic",
        ));
    }
    for input in &sig.inputs {
        if let FnArg::Receiver(receiver) = input {
            errors.push(syn::Error::new(
                receiver.span(),
                "a #[pg_test] fn cannot take `self`",
            ));
        }
    }
    combined(errors)
}

fn combined(errors: Vec<syn::Error>) -> syn::Result<()> {
    let mut errors = errors.into_iter();
    match errors.next() {
        None => Ok(()),
        Some(mut first) => {
            errors.for_each(|error| first.combine(error));
            Err(first)
        }
    }
}

/// In `isolation = "transaction"` the test gets one connection inside the
/// transaction; anything that opens connections would escape it.
fn check_transaction_inputs(function: &ItemFn) -> syn::Result<()> {
    const OPENERS: &[&str] = &["PgPool", "Pool", "TestContext", "PgPoolOptions"];
    for input in &function.sig.inputs {
        let FnArg::Typed(typed) = input else { continue };
        let syn::Type::Path(path) = &*typed.ty else {
            continue;
        };
        let Some(last) = path.path.segments.last() else {
            continue;
        };
        if OPENERS.iter().any(|opener| last.ident == opener) {
            return Err(syn::Error::new(
                typed.ty.span(),
                format!(
                    "isolation = \"transaction\" runs the test on one connection inside a \
                     transaction that is rolled back; a `{}` would open connections outside it, \
                     and sqlx would commit there for real. Take `conn: PoolConnection<Postgres>` \
                     instead: its `begin()` becomes a savepoint",
                    last.ident
                ),
            ));
        }
    }
    Ok(())
}

/// A test with `database(…)` groups takes a pool (or a connection) per
/// group. Checked here when every argument's type is one pgtest names
/// (an alias is left to the runtime, which checks again).
fn check_database_count(function: &ItemFn, args: &Args) -> syn::Result<()> {
    // A test without arguments is told it takes no database, below.
    if args.databases.is_empty() || function.sig.inputs.is_empty() {
        return Ok(());
    }
    let mut pools = 0;
    for input in &function.sig.inputs {
        let FnArg::Typed(typed) = input else {
            return Ok(());
        };
        let syn::Type::Path(path) = &*typed.ty else {
            return Ok(());
        };
        let Some(last) = path.path.segments.last() else {
            return Ok(());
        };
        match last.ident.to_string().as_str() {
            "PgPool" | "Pool" | "PoolConnection" => pools += 1,
            "Tenant" => {}
            _ => return Ok(()),
        }
    }
    let groups = args.databases.len();
    if pools == groups {
        return Ok(());
    }
    Err(syn::Error::new(
        function.sig.inputs.span(),
        format!(
            "this test takes {pools} pool{} but its attribute gives {groups} `database(…)` \
             groups: take one pool (in isolation = \"transaction\", one \
             `PoolConnection<Postgres>`) per group, in the groups' order",
            if pools == 1 { "" } else { "s" },
        ),
    ))
}

/// `#[test]`, `#[tokio::test]`, `#[sqlx::test]`, `#[pg_test]` and the like,
/// and the marker the built-in `#[test]` leaves when it expands first.
fn is_test_attribute(attribute: &Attribute) -> bool {
    let path = attribute.path();
    path.segments.last().is_some_and(|last| {
        ["test", "pg_test", "sqlx_test", "rustc_test_marker"]
            .iter()
            .any(|name| last.ident == name)
    })
}

fn emit(function: &ItemFn, args: &Args) -> TokenStream {
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = function;
    let name = &sig.ident;
    let test_attribute = quote_spanned! { sig.ident.span() => #[::core::prelude::v1::test] };
    if sig.asyncness.is_none() {
        return quote! { #(#attrs)* #test_attribute #vis #sig #block };
    }
    let krate = &args.krate;
    let inputs = sig.inputs.iter().map(|input| match input {
        FnArg::Typed(typed) => &*typed.ty,
        FnArg::Receiver(_) => unreachable!("check_function rejects receivers"),
    });
    let source = |migrations: &Migrations| match migrations {
        Migrations::Default => quote! { #krate::__private::MigrationSource::Default },
        Migrations::Dir(dir) => quote! { #krate::__private::MigrationSource::Dir(#dir) },
        Migrations::Migrator(path) => {
            quote! { #krate::__private::MigrationSource::Migrator(&#path) }
        }
        Migrations::None => quote! { #krate::__private::MigrationSource::None },
    };
    // A test of several databases describes each in its group.
    let migrations = match args.databases.is_empty() {
        true => source(&args.migrations),
        false => source(&Migrations::None),
    };
    // The runtime picks the size when the attribute does not say.
    let max_connections = match args.max_connections {
        Some(max) => quote! { ::core::option::Option::Some(#max) },
        None => quote! { ::core::option::Option::None },
    };
    let role = match &args.role {
        Some(role) => quote! { ::core::option::Option::Some(#role) },
        None => quote! { ::core::option::Option::None },
    };
    let script = |path: &syn::LitStr| {
        quote! { #krate::__private::Script { path: #path, sql: ::core::include_str!(#path) } }
    };
    let seeds = args.seeds.iter().map(script);
    let fixtures = args.fixtures.iter().map(script);
    let databases = args.databases.iter().map(|database| {
        let migrations = source(&database.migrations);
        let fixtures = database.fixtures.iter().map(script);
        let seeds = database.seeds.iter().map(script);
        quote! {
            #krate::__private::DatabaseSpec {
                migrations: #migrations,
                fixtures: &[#(#fixtures),*],
                seeds: &[#(#seeds),*],
            }
        }
    });
    let flavor = match args.flavor {
        Flavor::CurrentThread => quote! { #krate::__private::Flavor::CurrentThread },
        Flavor::MultiThread { worker_threads } => {
            let threads = match worker_threads {
                Some(n) => quote! { ::core::option::Option::Some(#n) },
                None => quote! { ::core::option::Option::None },
            };
            quote! { #krate::__private::Flavor::MultiThread { worker_threads: #threads } }
        }
    };
    let isolation = match args.isolation {
        Some(Isolation::Shared) | None => quote! { Shared },
        Some(Isolation::Database) => quote! { Database },
        Some(Isolation::Transaction) => quote! { Transaction },
    };
    let pool = match args.pool {
        Some(Pool::Frugal) | None => quote! { Frugal },
        Some(Pool::Sqlx) => quote! { Sqlx },
    };
    quote! {
        #(#attrs)*
        #test_attribute
        #vis fn #name() {
            #sig #block
            let test: fn(#(#inputs),*) -> _ = #name;
            #krate::__private::run(
                #krate::__private::TestSpec {
                    name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
                    package: ::core::env!("CARGO_PKG_NAME"),
                    manifest_dir: ::core::env!("CARGO_MANIFEST_DIR"),
                    migrations: #migrations,
                    max_connections: #max_connections,
                    role: #role,
                    seeds: &[#(#seeds),*],
                    fixtures: &[#(#fixtures),*],
                    isolation: #krate::__private::Isolation::#isolation,
                    pool: #krate::__private::PoolKind::#pool,
                    flavor: #flavor,
                    databases: &[#(#databases),*],
                },
                test,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use proc_macro2::TokenStream;
    use quote::quote;

    use super::{Flavour, expand};

    fn manifest_dir() -> Option<PathBuf> {
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")))
    }

    fn pretty(args: TokenStream, item: TokenStream) -> String {
        let tokens = expand(args, item, manifest_dir(), Flavour::PgTest).expect("expands");
        prettyplease::unparse(&syn::parse2(tokens).expect("expansion is a file"))
    }

    fn error(args: TokenStream, item: TokenStream) -> String {
        match expand(args, item, manifest_dir(), Flavour::PgTest) {
            Ok(tokens) => panic!("expected an error, got {tokens}"),
            Err(error) => error
                .into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    #[test]
    fn a_pool_and_tenant_test_expands_to_one_runtime_call() {
        insta::assert_snapshot!(pretty(
            quote!(),
            quote! {
                /// Counts rows.
                async fn counts(pool: PgPool, tenant: Tenant) -> anyhow::Result<()> { Ok(()) }
            }
        ));
    }

    #[test]
    fn every_argument_reaches_the_spec() {
        insta::assert_snapshot!(pretty(
            quote!(
                migrations = "src",
                max_connections = 2,
                pool = "sqlx",
                role = "app_user",
                seed = "a.sql",
                seed = "b.sql",
                flavor = "multi_thread",
                worker_threads = 2,
                crate = "::renamed"
            ),
            quote! {
                #[ignore]
                async fn seeded(ctx: TestContext) {}
            }
        ));
    }

    #[test]
    fn the_pool_size_is_left_to_the_runtime_unless_the_attribute_says() {
        let max = |args: TokenStream, body: TokenStream| {
            let text = pretty(args, quote!(async fn t(pool: PgPool) #body));
            let line = text.lines().find(|line| line.contains("max_connections:"));
            line.expect("the spec has max_connections")
                .trim()
                .to_owned()
        };
        // No reading of the body: helpers it calls may need any number.
        for body in [
            quote!({
                q(&pool).await;
            }),
            quote!({
                tokio::join!(a, b);
            }),
        ] {
            assert_eq!(
                max(quote!(), body),
                "max_connections: ::core::option::Option::None,"
            );
        }
        assert_eq!(
            max(quote!(max_connections = 2), quote!({})),
            "max_connections: ::core::option::Option::Some(2u32),"
        );
    }

    #[test]
    fn fixtures_resolve_as_sqlx_resolves_them_and_default_to_a_database_of_its_own() {
        let text = pretty(
            quote!(
                fixtures("users", "../shared/posts.sql"),
                fixtures(path = "../fixtures", scripts("comments", "tags.sql"))
            ),
            quote!(
                async fn t(pool: PgPool) {}
            ),
        );
        for path in [
            "\"fixtures/users.sql\"",
            "\"../shared/posts.sql\"",
            "\"../fixtures/comments.sql\"",
            "\"../fixtures/tags.sql\"",
        ] {
            assert!(
                text.contains(&format!("include_str!({path})")),
                "{path} in {text}"
            );
        }
        assert!(text.contains("Isolation::Database"), "{text}");
        let shared = pretty(
            quote!(),
            quote!(
                async fn t(pool: PgPool) {}
            ),
        );
        assert!(shared.contains("Isolation::Shared"), "{shared}");
        let kept = pretty(
            quote!(fixtures("users"), isolation = "transaction"),
            quote!(
                async fn t(conn: PoolConnection<Postgres>) {}
            ),
        );
        assert!(kept.contains("Isolation::Transaction"), "{kept}");
    }

    #[test]
    fn sqlx_test_expands_to_a_database_of_its_own_and_a_pool_like_sqlxs() {
        let tokens = expand(
            quote!(fixtures("users")),
            quote! {
                async fn lists_users(pool: PgPool) -> sqlx::Result<()> { Ok(()) }
            },
            manifest_dir(),
            Flavour::Sqlx,
        )
        .expect("expands");
        insta::assert_snapshot!(prettyplease::unparse(
            &syn::parse2(tokens).expect("expansion is a file")
        ));
    }

    #[test]
    fn either_attribute_takes_the_others_pool() {
        let pool_of = |args: TokenStream, flavour: Flavour| {
            let tokens = expand(
                args,
                quote!(
                    async fn t(pool: PgPool) {}
                ),
                manifest_dir(),
                flavour,
            );
            let text = tokens.expect("expands").to_string();
            let kind = text.split("PoolKind :: ").nth(1).expect("a pool kind");
            kind.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(pool_of(quote!(), Flavour::PgTest), "Frugal");
        assert_eq!(pool_of(quote!(), Flavour::Sqlx), "Sqlx");
        assert_eq!(pool_of(quote!(pool = "sqlx"), Flavour::PgTest), "Sqlx");
        assert_eq!(pool_of(quote!(pool = "frugal"), Flavour::Sqlx), "Frugal");
    }

    #[test]
    fn a_pool_is_sqlx_or_frugal_and_has_no_place_in_a_transaction() {
        let message = error(
            quote!(pool = "eager"),
            quote!(
                async fn t(pool: PgPool) {}
            ),
        );
        assert!(
            message.contains("`pool` is \"sqlx\"") && message.contains("or \"frugal\""),
            "{message}"
        );
        let message = error(
            quote!(isolation = "transaction", pool = "sqlx"),
            quote!(
                async fn t(conn: PoolConnection<Postgres>) {}
            ),
        );
        assert!(message.contains("`pool` has no effect"), "{message}");
        let message = error(
            quote!(pool = "sqlx", pool = "frugal"),
            quote!(
                async fn t(pool: PgPool) {}
            ),
        );
        assert!(message.contains("`pool` is given twice"), "{message}");
    }

    #[test]
    fn sqlx_test_defaults_to_a_database_of_its_own() {
        let tokens = expand(
            quote!(),
            quote!(
                async fn t(pool: PgPool) {}
            ),
            manifest_dir(),
            Flavour::Sqlx,
        )
        .expect("expands");
        assert!(
            tokens.to_string().contains("Isolation :: Database"),
            "{tokens}"
        );
    }

    #[test]
    fn a_pool_in_transaction_isolation_says_to_take_a_connection() {
        let message = error(
            quote!(isolation = "transaction"),
            quote!(
                async fn t(pool: sqlx::PgPool) {}
            ),
        );
        assert!(
            message.contains("a `PgPool` would open connections outside it"),
            "{message}"
        );
        assert!(
            message.contains("Take `conn: PoolConnection<Postgres>`"),
            "{message}"
        );
        let message = error(
            quote!(isolation = "nested"),
            quote!(
                async fn t(pool: PgPool) {}
            ),
        );
        assert!(
            message.contains("\"shared\", \"database\" or \"transaction\""),
            "{message}"
        );
    }

    #[test]
    fn a_migrator_and_no_migrations_are_spelled_out() {
        let migrator = pretty(
            quote!(migrator = "crate::MIGRATOR"),
            quote!(
                async fn m(pool: PgPool) {}
            ),
        );
        assert!(
            migrator.contains("MigrationSource::Migrator(&crate::MIGRATOR)"),
            "{migrator}"
        );
        let none = pretty(
            quote!(migrations = false),
            quote!(
                async fn n(pool: PgPool) {}
            ),
        );
        assert!(none.contains("MigrationSource::None"), "{none}");
    }

    #[test]
    fn a_sync_fn_without_arguments_is_a_plain_test() {
        insta::assert_snapshot!(pretty(
            quote!(),
            quote!(
                fn plain() {
                    assert!(true)
                }
            )
        ));
    }

    #[test]
    fn an_unknown_key_lists_the_valid_ones() {
        let message = error(
            quote!(migration = "x"),
            quote!(
                async fn t(pool: PgPool) {}
            ),
        );
        assert!(
            message.contains("unknown #[pg_test] argument `migration`"),
            "{message}"
        );
        assert!(
            message.contains("isolation, migrations, migrator, fixtures(…), max_connections"),
            "{message}"
        );
    }

    #[test]
    fn worker_threads_need_the_multi_thread_flavor_and_a_flavor_is_one_of_two() {
        let body = quote!(
            async fn t(pool: PgPool) {}
        );
        for (args, expected) in [
            (
                quote!(worker_threads = 2),
                "`worker_threads` needs `flavor = \"multi_thread\"`",
            ),
            (
                quote!(flavor = "current_thread", worker_threads = 2),
                "`worker_threads` needs `flavor = \"multi_thread\"`",
            ),
            (
                quote!(flavor = "multi_thread", worker_threads = 0),
                "`worker_threads` must be at least 1",
            ),
            (
                quote!(flavor = "many"),
                "`flavor` is \"current_thread\" or \"multi_thread\"",
            ),
        ] {
            let message = error(args.clone(), body.clone());
            assert!(message.contains(expected), "{args}: {message}");
        }
        let text = pretty(quote!(flavor = "multi_thread"), body);
        assert!(
            text.contains("Flavor::MultiThread {")
                && text.contains("worker_threads: ::core::option::Option::None"),
            "{text}"
        );
    }

    #[test]
    fn a_repeated_key_is_an_error_but_seed_repeats() {
        let message = error(
            quote!(max_connections = 2, max_connections = 3),
            quote!(
                async fn t(pool: PgPool) {}
            ),
        );
        assert!(
            message.contains("`max_connections` is given twice"),
            "{message}"
        );
        pretty(
            quote!(seed = "a.sql", seed = "b.sql"),
            quote!(
                async fn t(pool: PgPool) {}
            ),
        );
    }

    #[test]
    fn shape_errors_are_all_reported_with_argument_errors() {
        let message = error(
            quote!(bogus = 1),
            quote!(
                fn t<T>(pool: PgPool) {}
            ),
        );
        for part in [
            "unknown #[pg_test] argument",
            "must be `async fn`",
            "cannot be generic",
        ] {
            assert!(message.contains(part), "{part} missing from {message}");
        }
    }

    #[test]
    fn a_second_test_attribute_is_named_without_errors_about_the_shape_it_left() {
        // What `#[tokio::test]` above `#[pg_test]` hands over: a sync fn
        // with a test attribute of its own.
        let message = error(
            quote!(),
            quote!(
                #[::core::prelude::v1::test]
                fn t(pool: PgPool) {}
            ),
        );
        assert!(message.contains("remove this attribute"), "{message}");
        assert!(!message.contains("async fn"), "{message}");
    }

    #[test]
    fn a_missing_migrations_directory_is_an_error() {
        let message = error(
            quote!(migrations = "no/such/dir"),
            quote!(
                async fn t(pool: PgPool) {}
            ),
        );
        assert!(message.contains("no migrations directory \""), "{message}");
    }

    #[test]
    fn database_arguments_on_a_test_without_database_are_an_error() {
        let message = error(
            quote!(max_connections = 2),
            quote!(
                async fn t() {}
            ),
        );
        assert!(message.contains("takes no database"), "{message}");
    }

    #[test]
    fn database_groups_expand_to_a_spec_per_database() {
        insta::assert_snapshot!(pretty(
            quote!(
                isolation = "transaction",
                database(migrations = "src"),
                database(migrator = "crate::AUDIT", fixtures("kinds"), seed = "a.sql"),
            ),
            quote! {
                async fn audited(app: PoolConnection<Postgres>, audit: PoolConnection<Postgres>) {}
            }
        ));
    }

    #[test]
    fn database_groups_with_fixtures_default_to_databases_of_their_own() {
        let text = pretty(
            quote!(database(), database(fixtures("kinds"))),
            quote!(
                async fn t(app: PgPool, audit: PgPool, tenant: Tenant) {}
            ),
        );
        assert!(text.contains("Isolation::Database"), "{text}");
        assert!(
            text.contains("include_str!(\"fixtures/kinds.sql\")"),
            "{text}"
        );
    }

    #[test]
    fn a_database_group_is_checked_as_strictly_as_the_attribute() {
        let two_pools = quote!(
            async fn t(app: PgPool, audit: PgPool) {}
        );
        for (args, expected) in [
            (
                quote!(database(), database(isolation = "shared")),
                "unknown key `isolation` in `database(…)`; a database takes: migrations, \
                 migrator, fixtures(…), seed",
            ),
            (
                quote!(database(migrations = "src", migrations = "src"), database()),
                "`migrations` is given twice",
            ),
            (
                quote!(
                    database(migrations = "src", migrator = "crate::M"),
                    database()
                ),
                "cannot both be given",
            ),
            (
                quote!(database(), database(migrations = "no/such/dir")),
                "no migrations directory \"no/such/dir\"",
            ),
            (
                quote!(migrations = "src", database(), database()),
                "with `database(…)` groups, each database names its own migrations",
            ),
            (
                quote!(database(), database(), seed = "a.sql"),
                "with `database(…)` groups, each database names its own migrations",
            ),
            (
                quote!(env(migrations = "src"), env()),
                "pgtest runs every database of a test on one server",
            ),
        ] {
            let message = error(args.clone(), two_pools.clone());
            assert!(message.contains(expected), "{args}: {message}");
        }
    }

    #[test]
    fn the_pools_must_match_the_database_groups() {
        let message = error(
            quote!(database(), database(), database()),
            quote!(
                async fn t(app: PgPool, audit: PgPool, tenant: Tenant) {}
            ),
        );
        assert!(
            message.contains("this test takes 2 pools but its attribute gives 3 `database(…)`"),
            "{message}"
        );
        let message = error(
            quote!(database(), database()),
            quote!(
                async fn t() {}
            ),
        );
        assert!(message.contains("takes no database"), "{message}");
        // A type pgtest does not know (an alias, say) is left to the runtime.
        pretty(
            quote!(database(), database()),
            quote!(
                async fn t(app: Db, audit: Db) {}
            ),
        );
    }

    #[test]
    fn migrations_and_migrator_exclude_each_other() {
        let message = error(
            quote!(migrations = "src", migrator = "crate::M"),
            quote!(
                async fn t(pool: PgPool) {}
            ),
        );
        assert!(message.contains("cannot both be given"), "{message}");
    }
}
