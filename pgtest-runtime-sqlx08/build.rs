//! Tells the shared sources (`../pgtest-runtime/src`) that they are built
//! against sqlx 0.8; see `compat.rs` there.

fn main() {
    println!("cargo::rustc-cfg=pgtest_sqlx08");
}
