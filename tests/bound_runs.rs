//! Bound runs (`SessionOptions::bound_runs`, what CUDA graphs need) against plain runs of the
//! same graph on the CPU provider: a fixed input is copied into a set's buffer when it changes
//! and again after a run gave the same input by name; sets are told apart by shape.

use std::collections::BTreeMap;

use v2l_graphs::{save, DType, ExternalData, Graph};
use v2l_runtime::{Model, SessionOptions, Tensor};

/// `y = x + c`, both inputs of any length.
fn sum_graph(dir: &std::path::Path) -> std::path::PathBuf {
    let mut g = Graph::new("sum");
    let x = g.input("x", DType::F32, vec!["n".into()]);
    let c = g.input("c", DType::F32, vec!["n".into()]);
    let y = g.add(&x, &c);
    g.output(&y, "y", DType::F32, vec!["n".into()]);
    let path = dir.join("sum.onnx");
    save(&g, &path, ExternalData::Never).unwrap();
    path
}

#[test]
fn fixed_inputs_reach_bound_buffers_whenever_they_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = sum_graph(dir.path());
    let v = |n: usize, at: f32| Tensor::f32(vec![n], (0..n).map(|i| at + i as f32).collect());
    let x = |n: usize| BTreeMap::from([("x".to_string(), v(n, 10.0))]);
    let mut runs: Vec<Vec<Tensor>> = Vec::new();
    for bound_runs in [false, true] {
        let opts = SessionOptions {
            bound_runs,
            ..Default::default()
        };
        let mut m = Model::load(&path, &opts).unwrap();
        let mut ys = Vec::new();
        let mut run = |m: &mut Model, inputs: &BTreeMap<String, Tensor>| {
            ys.push(m.run(inputs).unwrap()["y"].clone());
        };
        m.set_fixed_inputs(vec![("c".into(), v(3, 1.0))]).unwrap();
        run(&mut m, &x(3));
        run(&mut m, &x(3));
        // The run's own `c` over the fixed one, then the fixed one again.
        let mut over = x(3);
        over.insert("c".into(), v(3, 100.0));
        run(&mut m, &over);
        run(&mut m, &x(3));
        // A new fixed value of the same shape, then of another (a second set), and back.
        m.set_fixed_inputs(vec![("c".into(), v(3, -5.0))]).unwrap();
        run(&mut m, &x(3));
        m.set_fixed_inputs(vec![("c".into(), v(5, 2.0))]).unwrap();
        run(&mut m, &x(5));
        m.set_fixed_inputs(vec![("c".into(), v(3, 7.0))]).unwrap();
        run(&mut m, &x(3));
        runs.push(ys);
    }
    assert_eq!(runs[0], runs[1]);
    let first: Vec<f32> = match &runs[1][3].data {
        v2l_runtime::tensor::Data::F32(d) => d.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(first, [11.0, 13.0, 15.0], "the fixed `c` after a run's own");
}
