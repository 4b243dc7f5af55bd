//! Sessions built with the process's shared arena (`SessionOptions::shared_arena`; on for
//! cuda engines) take their working memory from one arena, on the CPU provider here: what one
//! session allocates shows in another's arena counts, a session of its own keeps its own, and
//! every session computes what it computed alone.

use std::collections::BTreeMap;

use v2l_graphs::{save, DType, ExternalData, Graph};
use v2l_runtime::{Model, SessionOptions, Tensor};

/// `y = (x + c) · (x + c)`: an intermediate and an output to allocate per run.
fn square_graph(dir: &std::path::Path) -> std::path::PathBuf {
    let mut g = Graph::new("square");
    let x = g.input("x", DType::F32, vec!["n".into()]);
    let c = g.input("c", DType::F32, vec!["n".into()]);
    let s = g.add(&x, &c);
    let y = g.mul(&s, &s);
    g.output(&y, "y", DType::F32, vec!["n".into()]);
    let path = dir.join("square.onnx");
    save(&g, &path, ExternalData::Never).unwrap();
    path
}

fn allocs(m: &Model) -> u64 {
    let stats = m.arena_stats().unwrap();
    *stats
        .get("NumAllocs")
        .unwrap_or_else(|| panic!("no NumAllocs in {stats:?}"))
}

#[test]
fn sessions_with_the_shared_arena_allocate_from_one_arena() {
    let _held = v2l_tests::SHARED_ARENA
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let path = square_graph(dir.path());
    let shared = SessionOptions {
        shared_arena: true,
        ..Default::default()
    };
    let mut a = Model::load(&path, &shared).unwrap();
    let mut b = Model::load(&path, &shared).unwrap();
    let mut own = Model::load(&path, &SessionOptions::default()).unwrap();
    assert!(a.shares_arena() && b.shares_arena() && !own.shares_arena());
    let n = 1 << 16;
    let inputs = BTreeMap::from([
        (
            "x".to_string(),
            Tensor::f32(vec![n], (0..n).map(|i| i as f32 * 1e-3).collect()),
        ),
        ("c".to_string(), Tensor::f32(vec![n], vec![0.5; n])),
    ]);
    let want = own.run(&inputs).unwrap();
    assert_eq!(a.run(&inputs).unwrap(), want);
    let (a0, own0) = (allocs(&a), allocs(&own));
    assert_eq!(b.run(&inputs).unwrap(), want);
    // `b`'s run allocated from the arena `a` reads; not from `own`'s.
    assert!(allocs(&a) > a0, "b's run is not in a's arena");
    assert_eq!(allocs(&b), allocs(&a));
    assert_eq!(allocs(&own), own0, "b's run is in own's arena");
    // And `own`'s runs stay out of the shared one.
    let a1 = allocs(&a);
    own.run(&inputs).unwrap();
    assert_eq!(allocs(&a), a1);
}
