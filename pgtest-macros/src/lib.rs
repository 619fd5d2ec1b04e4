//! The `#[pg_test]` attribute. Use it through the `pgtest` crate, whose
//! documentation describes it: this crate only parses, checks and emits.

use proc_macro::TokenStream;

mod args;
mod expand;

/// See `pgtest::pg_test`.
#[proc_macro_attribute]
pub fn pg_test(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::pg_test(args.into(), item.into()).into()
}
