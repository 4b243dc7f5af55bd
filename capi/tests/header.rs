//! The checked-in C header is what cbindgen generates from the source.
//!
//! Update it after changing the C API with:
//!   V2L_UPDATE_HEADER=1 cargo test -p v2l-capi --test all header

#![allow(clippy::unwrap_used)]

use std::path::Path;

#[test]
fn checked_in_header_matches_the_source() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    // src/lib.rs and the modules it declares (cbindgen follows `mod` lines, in declaration
    // order): no `cargo metadata` run.
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen failed to generate the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let path = dir.join("include/v2l.h");
    let current = std::fs::read(&path).unwrap_or_default();
    if generated == current {
        return;
    }
    if std::env::var_os("V2L_UPDATE_HEADER").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("write include/v2l.h");
        eprintln!("updated {}", path.display());
        return;
    }
    let first = String::from_utf8_lossy(&generated)
        .lines()
        .zip(String::from_utf8_lossy(&current).lines())
        .position(|(a, b)| a != b)
        .map(|i| format!(" (first difference at line {})", i + 1))
        .unwrap_or_default();
    panic!(
        "{} is out of date with capi/src{first}.\nRegenerate it with:\n  V2L_UPDATE_HEADER=1 cargo test -p v2l-capi --test all header\nand commit the result.",
        path.display()
    );
}
