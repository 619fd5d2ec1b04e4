//! The `#[pg_test]` and `#[sqlx_test]` attributes. Use them through the
//! `pgtest` crate, whose documentation describes them: this crate only
//! parses, checks and emits.

use proc_macro::TokenStream;

mod args;
mod expand;

/// See `pgtest::pg_test`.
#[proc_macro_attribute]
pub fn pg_test(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::attribute(args.into(), item.into(), expand::Flavour::PgTest).into()
}

/// See `pgtest::sqlx_test`.
#[proc_macro_attribute]
pub fn sqlx_test(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::attribute(args.into(), item.into(), expand::Flavour::Sqlx).into()
}
