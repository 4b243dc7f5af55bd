//! The scripts a GPU lease runs (docs/status.md, "What to run on the next GPU"), checked where
//! no GPU is: a lease has minutes, and a refused upload or a mistyped phase costs them.

use std::process::Command;

use crate::common::workspace;

/// The slim tree travels beside every part of the GPU bundle within the device tool's 64 MiB a
/// call (`scripts/gpu-slim.sh --check`, which moves nothing). On 2026-11-27 the tree the shared
/// kit's `slim-tree.sh` leaves had grown 64 KB past it; this fails when the tree grows past it
/// again, before a lease finds out: hold out more in `scripts/gpu-slim.sh`.
#[test]
fn the_slim_tree_travels_with_every_bundle_part() {
    let o = Command::new("bash")
        .arg("scripts/gpu-slim.sh")
        .arg("--check")
        .current_dir(workspace())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("of 67108864"), "{out}");
}

/// `scripts/gpu-lease.sh` refuses, before any work and with exit 2, a phase it does not know,
/// minutes that are not a whole number, and a directory without the bundle's binaries; it
/// writes nothing then.
#[test]
fn the_lease_script_refuses_what_it_cannot_run() {
    let d = tempfile::tempdir().unwrap();
    let script = workspace().join("scripts/gpu-lease.sh");
    let run = |args: &[&str]| {
        Command::new("bash")
            .arg(&script)
            .args(args)
            .current_dir(d.path())
            .env("OUT", d.path().join("out"))
            .output()
            .unwrap()
    };
    for (args, says) in [
        (&["warmup"][..], "unknown argument warmup"),
        (&["vae:2.5"][..], "vae:2.5: minutes must be a whole number"),
        (&["effects:2", "dit"][..], "no bin/v2l-bench here"),
    ] {
        let o = run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!d.path().join("out").exists(), "{args:?}");
    }
    let help = run(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("effects:2 vae:3 dit:3"));
}
