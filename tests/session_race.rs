//! Sessions built at the same moment on different threads, in a process that has built none yet.
//!
//! ONNX Runtime enters a custom operator domain (ours is `ai.v2l`, registered with every session)
//! in ONNX's process-wide domain map on a session's first build, by a check then an insert with
//! no lock. Two first builds at once can both insert, and one fails with "Trying to add a domain
//! to DomainToVersion map, but the domain is already exist". The server, the C ABI and this test
//! harness all build sessions on several threads. Only a process's first builds race, so each
//! round runs in a child process of its own.

use std::process::Command;
use std::sync::{Arc, Barrier};

use v2l_export::sdpa_graph;
use v2l_graphs::{save, ExternalData};
use v2l_runtime::{Model, SessionOptions};

/// Set in the child processes: build the sessions instead of spawning.
const CHILD: &str = "V2L_TEST_SESSION_RACE_CHILD";
/// Fresh processes tried, each starting its threads' builds on one barrier. Without the guard in
/// `Model::load_with_weights` about 1 round in 20 failed here (15 of 300), so 60 rounds miss the
/// race with probability ~5 %.
const ROUNDS: usize = 60;
const THREADS: usize = 6;

#[test]
fn first_sessions_built_at_once_on_several_threads_all_load() {
    if std::env::var_os(CHILD).is_some() {
        return build_at_once();
    }
    let exe = std::env::current_exe().unwrap();
    for round in 0..ROUNDS {
        let out = Command::new(&exe)
            .args([
                "--exact",
                "session_race::first_sessions_built_at_once_on_several_threads_all_load",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round}: a session failed to build\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The child: `THREADS` sessions of one small graph, released together.
fn build_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdpa.onnx");
    save(&sdpa_graph(2, 4), &path, ExternalData::Never).unwrap();
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (start, path) = (start.clone(), path.clone());
            std::thread::spawn(move || {
                start.wait();
                Model::load(&path, &SessionOptions::default()).map(drop)
            })
        })
        .collect();
    for t in threads {
        if let Err(e) = t.join().unwrap() {
            panic!("{e}");
        }
    }
}
