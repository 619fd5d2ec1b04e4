//! Misuse of `#[pg_test]` is a compile error on the offending token.

#[test]
fn misuse_is_a_compile_error() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
