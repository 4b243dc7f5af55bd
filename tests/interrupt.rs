//! An ONNX Runtime call stopped while it runs (`session::interruptible`): a cancel or time
//! limit reaches the call in flight within a node instead of after the whole call.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use v2l_graphs::{save, DType, ExternalData, Graph};
use v2l_runtime::session::{interrupted, interruptible, Interrupt};
use v2l_runtime::{Model, RuntimeError, SessionOptions, Tensor};

/// Side of the matrices; and how many products the graph chains.
const N: usize = 384;
const PRODUCTS: usize = 600;

/// `y = x · W · W · … · W`: one long call made of many short nodes.
fn long_graph(dir: &std::path::Path) -> std::path::PathBuf {
    let mut g = Graph::new("long");
    let x = g.input("x", DType::F32, vec![(N as i64).into(), (N as i64).into()]);
    // Rows of W sum to one: the values stay finite however many products.
    let w = g.const_f32(&vec![1.0 / N as f32; N * N], &[N as i64, N as i64]);
    let mut y = x;
    for _ in 0..PRODUCTS {
        y = g.matmul(&y, &w);
    }
    g.output(
        &y,
        "y",
        DType::F32,
        vec![(N as i64).into(), (N as i64).into()],
    );
    let path = dir.join("long.onnx");
    save(&g, &path, ExternalData::Never).unwrap();
    path
}

fn long_model(dir: &std::path::Path) -> (Model, BTreeMap<String, Tensor>) {
    let m = Model::load(&long_graph(dir), &SessionOptions::default()).unwrap();
    let x = Tensor::f32(vec![N, N], (0..N * N).map(|i| (i % 7) as f32).collect());
    (m, BTreeMap::from([("x".to_string(), x)]))
}

#[test]
fn a_stop_reaches_the_call_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, inputs) = long_model(dir.path());

    // Whole: a scope that never stops changes nothing.
    let t = Instant::now();
    let plain = m.run(&inputs).unwrap();
    let whole = t.elapsed();
    let watched = interruptible(|| false, || m.run(&inputs)).unwrap();
    assert_eq!(plain["y"], watched["y"]);

    // Stopped 50 ms in: the call returns Cancelled long before its end, and so does every
    // later run in the scope, at once.
    let start = Instant::now();
    let stop = || start.elapsed() > Duration::from_millis(50);
    let (first, second, after) = interruptible(stop, || {
        let first = m.run(&inputs);
        let at = start.elapsed();
        let second = m.run(&inputs);
        (first.map(drop), second.map(drop), (at, interrupted()))
    });
    let (returned, seen) = after;
    assert!(matches!(first, Err(RuntimeError::Cancelled)), "{first:?}");
    assert!(matches!(second, Err(RuntimeError::Cancelled)), "{second:?}");
    assert!(seen, "interrupted() inside the stopped scope");
    assert!(
        returned < whole / 2,
        "the stopped call returned after {returned:?}; the whole call takes {whole:?}"
    );

    // Outside the scope the model runs whole again.
    assert!(!interrupted());
    assert_eq!(m.run(&inputs).unwrap()["y"], plain["y"]);
}

/// The handle form (what the C ABI's cancel and free call): an interrupt from another thread
/// stops the call in flight; after a reset the same interrupt lets runs go whole.
#[test]
fn an_interrupt_from_another_thread_and_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, inputs) = long_model(dir.path());
    let t = Instant::now();
    let plain = m.run(&inputs).unwrap();
    let whole = t.elapsed();

    let interrupt = Interrupt::default();
    let other = interrupt.clone();
    let start = Instant::now();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        other.interrupt();
    });
    let stopped = interrupt.watch(|| m.run(&inputs).map(drop));
    let returned = start.elapsed();
    stopper.join().unwrap();
    assert!(
        matches!(stopped, Err(RuntimeError::Cancelled)),
        "{stopped:?}"
    );
    assert!(interrupt.interrupted());
    assert!(
        returned < whole / 2,
        "the stopped call returned after {returned:?}; the whole call takes {whole:?}"
    );

    interrupt.reset();
    let again = interrupt.watch(|| m.run(&inputs)).unwrap();
    assert_eq!(again["y"], plain["y"]);
}
