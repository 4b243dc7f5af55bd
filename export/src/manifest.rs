//! `manifest.json` of an export directory: a contract shared with the runtime, defined in
//! `v2l-contracts` (see [`v2l_contracts::manifest`]).

pub use v2l_contracts::manifest::*;
