//! Fault points, for tests of what the server does when its own code fails: armed by
//! `V2L_FAULT` (a comma-separated list) in debug builds only; a release build has none.
//!
//! | point | what fires |
//! |---|---|
//! | `worker-panic` | a panic inside the first job a worker runs |
//! | `worker-exit` | a panic outside any job, after the first: the worker thread ends |
//! | `slow-mp4` | the first job's mp4 is written 3 s late (a window to cancel it in) |

use std::collections::BTreeSet;
use std::sync::Mutex;

/// True the first time point `name` is reached in this process while it is armed.
pub(crate) fn once(name: &str) -> bool {
    static FIRED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    if !cfg!(debug_assertions) || !armed(name) {
        return false;
    }
    let mut fired = FIRED.lock().unwrap_or_else(|p| p.into_inner());
    fired.insert(name.to_string())
}

fn armed(name: &str) -> bool {
    std::env::var("V2L_FAULT").is_ok_and(|v| v.split(',').any(|f| f.trim() == name))
}
