//! Any bytes as an engine's `bundle.json`: an error or a bundle whose part names stay inside
//! the engine directory, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(b) = v2l_runtime::bundle::Bundle::parse(text, "bundle.json".as_ref()) {
            for f in &b.files {
                assert!(!f.name.contains(".."), "{}", f.name);
            }
        }
    }
});
