//! Any bytes as an export directory's `manifest.json`: an error or a manifest, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = v2l_contracts::Manifest::parse(text, "manifest.json".as_ref());
    }
});
