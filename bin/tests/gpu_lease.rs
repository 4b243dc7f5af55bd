//! The scripts a GPU lease runs (docs/status.md, "What to run on the next GPU"), checked where
//! no GPU is: a lease has minutes, and a refused upload or a mistyped phase costs them.

use std::process::Command;

use crate::common::workspace;

/// The slim tree travels beside every part of the GPU bundle within the device tool's 64 MiB a
/// call (`scripts/gpu-slim.sh --check`, which moves nothing). On 2026-11-27 the tree the shared
/// kit's `slim-tree.sh` leaves had grown 64 KB past it; this fails when the tree grows past it
/// again, before a lease finds out: hold out more in `scripts/gpu-slim.sh`. Since 2026-11-29
/// that script holds out every top-level folder but `scripts/` (about 120 KB travel).
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

/// A phase whose `v2l-bench` dies by a signal runs once more with `V2L_SHARED_ARENA=0` (each
/// session's own arena, the newest code no GPU has run), its rows appended, and later phases
/// keep the arena off; one that fails with an exit status is not run again.
#[test]
fn a_crashed_phase_runs_again_without_the_shared_arena() {
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    // A stand-in for the bundle's bench: crashes while the arena is shared, fails with exit 1
    // when asked to, and otherwise prints one row naming the arena setting it ran under.
    let bench = bin.join("v2l-bench");
    std::fs::write(
        &bench,
        "#!/usr/bin/env bash\n\
         echo \"bench $* arena=${V2L_SHARED_ARENA:-shared}\" >&2\n\
         [ \"${FAKE_FAIL:-}\" = 1 ] && exit 1\n\
         [ \"${V2L_SHARED_ARENA:-}\" = 0 ] || kill -SEGV $$\n\
         echo '{\"model\": \"fake\", \"backend\": \"cuda\", \"precision\": \"fp32\"}'\n",
    )
    .unwrap();
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&bench, mode).unwrap();
    let run = |fail: bool| {
        Command::new("bash")
            .arg(workspace().join("scripts/gpu-lease.sh"))
            .args(["effects:2", "vae:2"])
            .current_dir(d.path())
            .env("OUT", d.path().join("out"))
            .env_remove("V2L_SHARED_ARENA")
            .env("FAKE_FAIL", if fail { "1" } else { "0" })
            .output()
            .unwrap()
    };
    let o = run(false);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("effects: exit 139 (killed by signal 11)"),
        "{out}"
    );
    assert!(
        out.contains("effects: again with V2L_SHARED_ARENA=0"),
        "{out}"
    );
    assert!(out.contains("== effects: 1 rows"), "{out}");
    assert!(out.contains("== vae: 1 rows"), "{out}");
    assert!(!out.contains("vae: again"), "{out}");
    let log = std::fs::read_to_string(d.path().join("out/vae.log")).unwrap();
    assert!(
        log.contains("arena=0") && !log.contains("arena=shared"),
        "{log}"
    );
    let log = std::fs::read_to_string(d.path().join("out/effects.log")).unwrap();
    assert!(
        log.contains("arena=shared") && log.contains("arena=0"),
        "{log}"
    );
    let o = run(true);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("effects: exit 1 after"), "{out}");
    assert!(!out.contains("again with"), "{out}");
}
