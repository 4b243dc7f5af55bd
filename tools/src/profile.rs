//! Where a stage's time goes: ONNX Runtime's per-node traces (`SessionOptions::profile`)
//! summed by operator and provider (`v2l-run stage --profile DIR`).
//!
//! A trace is a JSON array of Chrome trace events; each node run is a `"cat": "Node"` event
//! named `<node>_kernel_time` with its operator and provider in `args`, and each run of the
//! whole graph a `"cat": "Session"` event named `model_run`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One operator on one provider, over every run of every traced session.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpTime {
    pub op: String,
    pub provider: String,
    /// Node runs (a node run twice counts twice).
    pub calls: usize,
    pub ms: f64,
}

/// The traces of one directory, summed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Profile {
    /// The trace files read.
    pub files: Vec<PathBuf>,
    /// Graph runs (`model_run` events) and their milliseconds.
    pub runs: usize,
    pub run_ms: f64,
    /// Milliseconds inside nodes; the rest of `run_ms` is ONNX Runtime between them.
    pub node_ms: f64,
    /// Longest first.
    pub ops: Vec<OpTime>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    cat: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    dur: f64,
    #[serde(default)]
    args: Args,
}

#[derive(Default, Deserialize)]
struct Args {
    #[serde(default)]
    op_name: String,
    #[serde(default)]
    provider: String,
}

/// Reads every `*.json` trace in `dir`.
pub fn summarize(dir: &Path) -> Result<Profile, String> {
    let files = traces(dir)?;
    if files.is_empty() {
        return Err(format!("{}: no ONNX Runtime trace in it", dir.display()));
    }
    summarize_files(files)
}

/// [`summarize`] per graph: the traces of `dir` grouped by the graph file they came from
/// (`<graph>.v2l<n>_<time>.json`, as `SessionOptions::profile` names them), by graph name.
pub fn by_graph(dir: &Path) -> Result<Vec<(String, Profile)>, String> {
    let mut groups: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for f in traces(dir)? {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let graph = name.split_once(".v2l").map_or(name.as_str(), |(g, _)| g);
        groups.entry(graph.to_string()).or_default().push(f);
    }
    groups
        .into_iter()
        .map(|(g, files)| Ok((g, summarize_files(files)?)))
        .collect()
}

fn traces(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

fn summarize_files(files: Vec<PathBuf>) -> Result<Profile, String> {
    let mut p = Profile::default();
    let mut ops: BTreeMap<(String, String), (usize, f64)> = BTreeMap::new();
    for f in &files {
        let text = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let events: Vec<Event> = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not an ONNX Runtime trace ({e})", f.display()))?;
        for e in events {
            let ms = e.dur / 1e3;
            match e.cat.as_str() {
                "Session" if e.name == "model_run" => {
                    p.runs += 1;
                    p.run_ms += ms;
                }
                "Node" if e.name.ends_with("_kernel_time") => {
                    p.node_ms += ms;
                    let slot = ops.entry((e.args.op_name, e.args.provider)).or_default();
                    slot.0 += 1;
                    slot.1 += ms;
                }
                _ => {}
            }
        }
    }
    p.ops = ops
        .into_iter()
        .map(|((op, provider), (calls, ms))| OpTime {
            op,
            provider: provider.trim_end_matches("ExecutionProvider").to_string(),
            calls,
            ms,
        })
        .collect();
    p.ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    p.files = files;
    Ok(p)
}

impl fmt::Display for Profile {
    /// The ten longest operators, then the rest in one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "profile: {} graph run(s), {:.1} ms; {:.1} ms in nodes ({} trace file(s))",
            self.runs,
            self.run_ms,
            self.node_ms,
            self.files.len()
        )?;
        writeln!(
            f,
            "  {:<28} {:<10} {:>7} {:>10} {:>6}",
            "operator", "provider", "calls", "ms", "share"
        )?;
        let share = |ms: f64| match self.node_ms > 0.0 {
            true => 100.0 * ms / self.node_ms,
            false => 0.0,
        };
        for o in self.ops.iter().take(10) {
            writeln!(
                f,
                "  {:<28} {:<10} {:>7} {:>10.2} {:>5.1}%",
                o.op,
                o.provider,
                o.calls,
                o.ms,
                share(o.ms)
            )?;
        }
        if self.ops.len() > 10 {
            let rest = self.ops.get(10..).unwrap_or(&[]);
            let (calls, ms) = rest
                .iter()
                .fold((0, 0.0), |(c, m), o| (c + o.calls, m + o.ms));
            writeln!(
                f,
                "  {:<28} {:<10} {:>7} {:>10.2} {:>5.1}%",
                format!("({} more)", rest.len()),
                "",
                calls,
                ms,
                share(ms)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_times_are_summed_by_operator_and_provider() {
        let d = tempfile::tempdir().unwrap();
        let trace = |name: &str, events: serde_json::Value| {
            std::fs::write(d.path().join(name), events.to_string()).unwrap()
        };
        let node = |name: &str, op: &str, ep: &str, dur: f64| {
            serde_json::json!({"cat": "Node", "name": name, "dur": dur,
                "args": {"op_name": op, "provider": ep}})
        };
        trace(
            "vae_decoder.v2l0_2026-11-26_19-10-42_466.json",
            serde_json::json!([
                {"cat": "Session", "name": "session_initialization", "dur": 9000.0},
                {"cat": "Session", "name": "model_run", "dur": 5000.0},
                node("conv_1_kernel_time", "Conv", "CUDAExecutionProvider", 3000.0),
                node("conv_1_fence_before", "Conv", "CUDAExecutionProvider", 0.0),
                node("mean_1_kernel_time", "ReduceMean", "CUDAExecutionProvider", 500.0),
                node("shape_1_kernel_time", "Shape", "CPUExecutionProvider", 10.0),
            ]),
        );
        trace(
            "dit.v2l3_2026-11-26_19-10-43_001.json",
            serde_json::json!([
                {"cat": "Session", "name": "model_run", "dur": 4000.0},
                node("conv_1_kernel_time", "Conv", "CUDAExecutionProvider", 2000.0),
            ]),
        );
        std::fs::write(d.path().join("notes.txt"), "not a trace").unwrap();
        let graphs = by_graph(d.path()).unwrap();
        let names: Vec<&str> = graphs.iter().map(|(g, _)| g.as_str()).collect();
        assert_eq!(names, ["dit", "vae_decoder"]);
        let p = summarize(d.path()).unwrap();
        assert_eq!(p.files.len(), 2);
        assert_eq!((p.runs, p.run_ms), (2, 9.0));
        assert!((p.node_ms - 5.51).abs() < 1e-9);
        let first = &p.ops[0];
        assert_eq!(
            (first.op.as_str(), first.provider.as_str(), first.calls),
            ("Conv", "CUDA", 2)
        );
        assert!((first.ms - 5.0).abs() < 1e-9);
        assert_eq!(p.ops.len(), 3);
        let text = p.to_string();
        assert!(text.contains("Conv") && text.contains("90.7%"), "{text}");

        let empty = tempfile::tempdir().unwrap();
        assert!(summarize(empty.path())
            .unwrap_err()
            .contains("no ONNX Runtime trace"));
        std::fs::write(empty.path().join("x.json"), "{").unwrap();
        assert!(summarize(empty.path())
            .unwrap_err()
            .contains("not an ONNX Runtime trace"));
    }
}
