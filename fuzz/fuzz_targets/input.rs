//! The input opener's format bound and the engine path rule (`v2l_contracts::input`).
//!
//! - First byte even: the rest is a safetensors file whose claimed length may exceed its bytes
//!   (a sparse or shrinking file) and whose kind limit comes from the input. The read is an
//!   error or a prefix of the file: the whole file only when its header describes exactly the
//!   claimed length within the limit, else at most the length prefix and the header.
//!   The header's tensor names (`safetensors_header_names`) come from the header alone.
//! - First byte odd: the rest is a part name. One the rule accepts joins under any directory
//!   and stays there, component by component.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Component, Path};
use v2l_contracts::input::{is_part_name, safetensors_header_names, safetensors_prefix, InputKind};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let Some((extra, file)) = rest.split_first_chunk::<2>() else {
            return;
        };
        // The claimed length: the bytes there are, plus up to 64 Ki more that never come.
        let len = file.len() as u64 + u64::from(u16::from_le_bytes(*extra) & 0x00ff) * 256;
        let limit = match mode % 8 {
            0 => u64::MAX,
            2 => 0,
            4 => file.len() as u64,
            _ => 64,
        };
        let kind = [InputKind::Lora, InputKind::Tensors, InputKind::Media][(mode as usize / 8) % 3];
        // The header's names come from the header read: no more text than it holds, and never
        // the metadata entry.
        if let Ok(Some(names)) = safetensors_header_names(file, len, kind, limit) {
            let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
            assert!(names.iter().map(String::len).sum::<usize>() <= n);
            assert!(names.iter().all(|name| name != "__metadata__"));
        }
        if let Ok(got) = safetensors_prefix(file, len, kind, limit) {
            assert!(file.starts_with(&got), "not a prefix of the file");
            assert!(got.len() as u64 <= len);
            if got.len() > 8 {
                let n = u64::from_le_bytes(got[..8].try_into().unwrap());
                let head = 8 + n as usize;
                assert!(got.len() == head || (got.len() as u64 == len && len <= limit));
            }
        }
    } else if let Ok(name) = std::str::from_utf8(rest) {
        if is_part_name(name) {
            let base = Path::new("/engine");
            let joined = base.join(name);
            assert!(joined.starts_with(base), "{name}");
            assert!(
                Path::new(name)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_))),
                "{name}"
            );
            assert!(!joined.components().any(|c| c == Component::ParentDir), "{name}");
        }
    }
});
