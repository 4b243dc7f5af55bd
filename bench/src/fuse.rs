//! `v2l-bench fuse`: LoRA fuse throughput against this machine's copy bandwidth.
//!
//! Measures, in one run:
//! * memcpy bandwidth: a 1 GiB libc `memcpy` (`copy_from_slice`), split across the same
//!   threads as the fuse, counted as bytes read + bytes written per second; and the fuse
//!   module's own streaming copy (`fuse::restore_from`, what restoring an untouched layer
//!   costs), the best copy this machine does;
//! * the fuse kernel (`v2l_runtime::lora::fuse`) at rank 1 (the Video2LoRA case) on the real
//!   layer shapes of CogVideoX-Fun-5B-InP (or `--model wan-i2v-14b`: Wan2.1-I2V-14B, 488
//!   layers), for f32, f16 and bf16, at two scopes — one transformer block
//!   (`transformer_blocks.0.*`, 8 layers; Wan's `blocks.0.*`, 12) and the full model (341) —
//!   through `fuse_from` (base → target, what LoRA switching runs) and `fuse_in_place`,
//!   counted as bytes of W read + bytes written per second.
//!
//! The full model does not fit in memory twice (22 GB per copy in f32), so its layers are laid
//! out in a ring over a base pool and a target pool of at most `--max-mem-gib` together: every
//! one of the 341 layers is fused with its real shape and all its bytes go through DRAM, but
//! layers past the end of a pool reuse it from its start. The pools are far larger than the
//! last-level cache, so nothing is served from cache; the output states the pool size.
//!
//! Numbers are medians over `--repeat` timed passes (after one untimed warm-up pass), with the
//! min and max as the machine's noise. The bandwidth of a shared machine drifts, so a copy of
//! each kind is timed between every two passes, and each pass's ratio is taken against the
//! mean of the copies just before and after it.

use std::time::Instant;

use v2l_runtime::lora::fuse::{self, bf16, f16, Factors, Weights, WeightsMut};

use crate::{bytes, Failure};

/// Which real layer shapes to fuse (keys of `tests/fixtures/fullscale_linear_shapes.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuseModel {
    /// CogVideoX-Fun-5B-InP: 341 linears, `transformer_blocks.N.*`.
    CogVideoX5b,
    /// Wan2.1-I2V-14B: 488 linears, `blocks.N.*`.
    WanI2v14b,
}

impl FuseModel {
    fn key(self) -> &'static str {
        match self {
            FuseModel::CogVideoX5b => "cogvideox-fun-5b-inp",
            FuseModel::WanI2v14b => "wan2.1-i2v-14b",
        }
    }
    fn title(self) -> &'static str {
        match self {
            FuseModel::CogVideoX5b => "CogVideoX-Fun-5B-InP",
            FuseModel::WanI2v14b => "Wan2.1-I2V-14B",
        }
    }
    /// The first block's layer-name prefix.
    fn block0(self) -> &'static str {
        match self {
            FuseModel::CogVideoX5b => "transformer_blocks.0.",
            FuseModel::WanI2v14b => "blocks.0.",
        }
    }
}

/// Options of `v2l-bench fuse`.
pub struct FuseBench {
    /// Whose layer shapes.
    pub model: FuseModel,
    /// Threads for both memcpy and the fuse (0: all cores).
    pub threads: usize,
    /// Timed passes per measurement.
    pub repeat: usize,
    /// Cap on base + target memory (GiB).
    pub max_mem_gib: f64,
    /// memcpy buffer size (MiB).
    pub memcpy_mib: usize,
    /// Also time `fuse_in_place`.
    pub in_place: bool,
    /// Storage types to time, in order (`f32`, `f16`, `bf16`).
    pub dtypes: Vec<String>,
    pub json: bool,
}

const RANK: usize = 1;
/// Length of the fill pattern (prime, so it does not line up with rows).
const PATTERN: usize = 65_521;

pub(crate) struct Layer {
    pub(crate) out: usize,
    pub(crate) inp: usize,
}

/// Median, min, max of a sample (sorted in place).
fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

/// CPU time (user + system) this process has used, all threads, in seconds
/// (`/proc/self/stat`, clock ticks of 1/100 s).
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: field 3 (state) is f[0]; utime is field 14, stime field 15.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// The 1-minute load average (`/proc/loadavg`).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

pub(crate) fn layers(model: FuseModel) -> Result<Vec<(String, Layer)>, Failure> {
    let v: serde_json::Value = serde_json::from_str(include_str!(
        "../../tests/fixtures/fullscale_linear_shapes.json"
    ))
    .map_err(|e| Failure::new(format!("embedded shapes: {e}")))?;
    let list = v[model.key()]["linear"]
        .as_array()
        .ok_or_else(|| Failure::new(format!("embedded shapes: no {}.linear list", model.key())))?;
    list.iter()
        .map(|e| {
            let name = e[0].as_str();
            let out = e[1][0].as_u64();
            let inp = e[1][1].as_u64();
            match (name, out, inp) {
                (Some(n), Some(o), Some(i)) => Ok((
                    n.to_string(),
                    Layer {
                        out: o as usize,
                        inp: i as usize,
                    },
                )),
                _ => Err(Failure::new(format!("embedded shapes: bad entry {e}"))),
            }
        })
        .collect()
}

/// Runs `f(part_index, part)` on `threads` contiguous parts of `v`, one thread each.
fn par_parts<T: Send>(v: &mut [T], threads: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let per = v.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (c, part) in v.chunks_mut(per).enumerate() {
            let f = &f;
            s.spawn(move || f(c * per, part));
        }
    });
}

/// Fills `v` with `pattern` repeated from `pattern[0]` at index 0.
fn fill<T: Copy + Send + Sync>(v: &mut [T], pattern: &[T], threads: usize) {
    par_parts(v, threads, |start, part| {
        let mut k = start % pattern.len();
        for x in part.iter_mut() {
            *x = pattern[k];
            k += 1;
            if k == pattern.len() {
                k = 0;
            }
        }
    });
}

/// A vector of `n` non-zero words, written by `threads` threads (every page touched).
fn touched(n: usize, threads: usize) -> Vec<u32> {
    let mut v: Vec<u32> = Vec::with_capacity(n);
    par_parts(&mut v.spare_capacity_mut()[..n], threads, |start, part| {
        for (i, x) in part.iter_mut().enumerate() {
            x.write(0x3C00_3C00 ^ (start + i) as u32);
        }
    });
    // SAFETY: all n elements were initialised above.
    unsafe { v.set_len(n) };
    v
}

/// Storage types the pools are viewed as.
trait Plain: Copy + Send + Sync {}
impl Plain for f32 {}
impl Plain for f16 {}
impl Plain for bf16 {}

/// A pool of words viewed as `T` (f32, f16, bf16: every bit pattern is a valid value).
fn view<T: Plain>(v: &mut [u32]) -> &mut [T] {
    // SAFETY: T is a plain float type of size 2 or 4 and alignment <= 4, so the u32 buffer
    // reinterprets exactly, with no prefix or suffix.
    let (pre, mid, post) = unsafe { v.align_to_mut::<T>() };
    assert!(pre.is_empty() && post.is_empty());
    mid
}

/// Deterministic standard-normal values (the runtime's seeded generator).
fn values(n: usize, seed: u64) -> Vec<f32> {
    match v2l_runtime::tensor::gaussian_noise(vec![n], seed).data {
        v2l_runtime::tensor::Data::F32(v) => v,
        _ => vec![0.0; n],
    }
}

/// The reference copies, sampled between fuse passes so that every fuse number has memcpy
/// numbers taken right before and after it (the machine's bandwidth drifts).
struct Copier {
    src: Vec<f32>,
    dst: Vec<f32>,
    threads: usize,
    memcpy: Vec<f64>,
    stream: Vec<f64>,
}

impl Copier {
    fn new(mib: usize, threads: usize) -> Copier {
        let n = (mib << 20) / 4;
        Copier {
            src: view::<f32>(&mut touched(n, threads)).to_vec(),
            dst: view::<f32>(&mut touched(n, threads)).to_vec(),
            threads,
            memcpy: Vec::new(),
            stream: Vec::new(),
        }
    }

    fn bytes(&self) -> u64 {
        (self.src.len() * 4) as u64
    }

    /// One libc memcpy (`copy_from_slice`) of the buffer, split across the threads: GB/s.
    fn memcpy(&mut self) -> f64 {
        let src = &self.src;
        let t0 = Instant::now();
        par_parts(&mut self.dst, self.threads, |start, part| {
            part.copy_from_slice(&src[start..start + part.len()])
        });
        let g = 2.0 * self.bytes() as f64 / t0.elapsed().as_secs_f64() / 1e9;
        self.memcpy.push(g);
        g
    }

    /// One `fuse::restore_from` (the kernel's streaming copy) of the buffer: GB/s.
    fn stream(&mut self) -> Result<f64, Failure> {
        let t0 = Instant::now();
        fuse::restore_from(
            Weights::F32(&self.src),
            WeightsMut::F32(&mut self.dst),
            self.threads,
        )
        .map_err(|e| Failure::new(format!("restore_from: {e}")))?;
        let g = 2.0 * self.bytes() as f64 / t0.elapsed().as_secs_f64() / 1e9;
        self.stream.push(g);
        Ok(g)
    }
}

/// One row of results.
struct Row {
    path: &'static str,
    dtype: &'static str,
    scope: &'static str,
    layers: usize,
    weight_bytes: u64,
    pool_bytes: u64,
    pool_reused: bool,
    seconds: f64,
    /// CPU time used during the timed passes over (their wall time × threads): below 1 when
    /// other processes took the cores (a compute-heavier dtype then loses more).
    cpu_share: f64,
    gbps: (f64, f64, f64),
    /// fuse GB/s over the mean of the memcpy samples right before and after the pass.
    ratio: (f64, f64, f64),
    /// The same against the streaming-copy samples.
    ratio_stream: (f64, f64, f64),
}

struct Scope<'a> {
    name: &'static str,
    layers: Vec<&'a Layer>,
    /// `(B, A)` per layer.
    factors: Vec<(Vec<f32>, Vec<f32>)>,
}

struct Ctx<'a> {
    o: &'a FuseBench,
    threads: usize,
    scopes: &'a [Scope<'a>],
    copier: Copier,
    progress: bool,
}

impl Ctx<'_> {
    fn say(&self, msg: std::fmt::Arguments) {
        if self.progress {
            eprint!("\r{:<70}", msg.to_string());
        }
    }
}

/// Times `fuse_from` (and `fuse_in_place`) over the layers of each scope in storage type `T`,
/// in the pools `base` and `target`.
fn bench_dtype<T>(
    cx: &mut Ctx,
    dtype: &'static str,
    conv: fn(f32) -> T,
    base: &mut [u32],
    target: &mut [u32],
) -> Result<Vec<Row>, Failure>
where
    T: Plain,
    for<'a> &'a [T]: Into<Weights<'a>>,
    for<'a> &'a mut [T]: Into<WeightsMut<'a>>,
{
    let size = std::mem::size_of::<T>();
    let pattern: Vec<T> = values(PATTERN, 7)
        .into_iter()
        .map(|x| conv(0.1 * x + 0.001))
        .collect();
    let base: &mut [T] = view(base);
    let target: &mut [T] = view(target);
    cx.say(format_args!("{dtype}: filling the pools"));
    fill(base, &pattern, cx.threads);
    fill(target, &pattern[1..], cx.threads);
    let base: &[T] = base;
    let cap = base.len();

    let mut rows = Vec::new();
    for scope in cx.scopes {
        let total: usize = scope.layers.iter().map(|l| l.out * l.inp).sum();
        let pool = total.min(cap);
        // Ring layout: a layer that does not fit before the end of the pool starts over at 0.
        let mut offsets = Vec::with_capacity(scope.layers.len());
        let mut pos = 0;
        for l in &scope.layers {
            let n = l.out * l.inp;
            if n > pool {
                return Err(Failure::new(format!(
                    "{dtype}: a {}x{} layer does not fit the {} memory cap per copy",
                    l.out,
                    l.inp,
                    bytes(std::mem::size_of_val(base) as u64)
                ))
                .with_hint("raise --max-mem-gib or free memory"));
            }
            if pos + n > pool {
                pos = 0;
            }
            offsets.push(pos);
            pos += n;
        }
        let weight_bytes = (total * size) as u64;
        let mut paths: Vec<&'static str> = vec!["from"];
        if cx.o.in_place {
            paths.push("in-place");
        }
        for path in paths {
            let threads = cx.threads;
            let pass = |target: &mut [T]| -> Result<f64, Failure> {
                let t0 = Instant::now();
                for ((l, &off), (b, a)) in scope.layers.iter().zip(&offsets).zip(&scope.factors) {
                    let n = l.out * l.inp;
                    let f = Factors {
                        b,
                        a,
                        rank: RANK,
                        scale: 0.5,
                    };
                    let t = &mut target[off..off + n];
                    let r = if path == "from" {
                        fuse::fuse_from(
                            (&base[off..off + n]).into(),
                            t.into(),
                            l.out,
                            l.inp,
                            &f,
                            threads,
                        )
                    } else {
                        fuse::fuse_in_place(t.into(), l.out, l.inp, &f, threads)
                    };
                    r.map_err(|e| Failure::new(format!("fuse: {e}")))?;
                }
                Ok(t0.elapsed().as_secs_f64())
            };
            cx.say(format_args!("{dtype} {} {path}: warm-up", scope.name));
            pass(target)?;
            let traffic = 2.0 * weight_bytes as f64;
            let (mut secs, mut gbps) = (Vec::new(), Vec::new());
            let mut cpu = 0.0;
            let (mut ratio, mut ratio_stream) = (Vec::new(), Vec::new());
            let mut m_before = cx.copier.memcpy();
            let mut s_before = cx.copier.stream()?;
            for r in 0..cx.o.repeat {
                cx.say(format_args!(
                    "{dtype} {} {path}: pass {}/{}",
                    scope.name,
                    r + 1,
                    cx.o.repeat
                ));
                let c0 = cpu_seconds();
                let s = pass(target)?;
                if let (Some(c0), Some(c1)) = (c0, cpu_seconds()) {
                    cpu += c1 - c0;
                }
                let m_after = cx.copier.memcpy();
                let s_after = cx.copier.stream()?;
                let g = traffic / s / 1e9;
                secs.push(s);
                gbps.push(g);
                ratio.push(g / ((m_before + m_after) / 2.0));
                ratio_stream.push(g / ((s_before + s_after) / 2.0));
                (m_before, s_before) = (m_after, s_after);
            }
            rows.push(Row {
                path,
                dtype,
                scope: scope.name,
                layers: scope.layers.len(),
                weight_bytes,
                pool_bytes: (pool * size) as u64,
                pool_reused: pool < total,
                cpu_share: cpu / (secs.iter().sum::<f64>() * threads as f64),
                seconds: stats(&mut secs).0,
                gbps: stats(&mut gbps),
                ratio: stats(&mut ratio),
                ratio_stream: stats(&mut ratio_stream),
            });
        }
    }
    Ok(rows)
}

/// Runs `v2l-bench fuse`.
pub fn bench_fuse(o: &FuseBench) -> Result<(), Failure> {
    if o.repeat == 0 {
        return Err(Failure::new("--repeat must be at least 1"));
    }
    if let Some(d) = o
        .dtypes
        .iter()
        .find(|d| !["f32", "f16", "bf16"].contains(&d.as_str()))
    {
        return Err(Failure::new(format!("unknown dtype `{d}`")).with_hint("use f32, f16, bf16"));
    }
    let threads = fuse::resolve_threads(o.threads);
    let load_before = load_average();
    let all = layers(o.model)?;
    let factors = |ls: &[&Layer]| -> Vec<(Vec<f32>, Vec<f32>)> {
        ls.iter()
            .enumerate()
            .map(|(i, l)| {
                let small = |v: Vec<f32>| v.into_iter().map(|x| 0.01 * x).collect();
                (
                    small(values(l.out * RANK, 2 * i as u64 + 1)),
                    small(values(RANK * l.inp, 2 * i as u64 + 2)),
                )
            })
            .collect()
    };
    let block: Vec<&Layer> = all
        .iter()
        .filter(|(n, _)| n.starts_with(o.model.block0()))
        .map(|(_, l)| l)
        .collect();
    let full: Vec<&Layer> = all.iter().map(|(_, l)| l).collect();
    let scopes = [
        Scope {
            name: "block",
            factors: factors(&block),
            layers: block,
        },
        Scope {
            name: "full-model",
            factors: factors(&full),
            layers: full,
        },
    ];

    // base + target pools: within --max-mem-gib and 70 % of the memory available now (after
    // the memcpy buffers are allocated).
    let progress = !o.json;
    if progress {
        eprint!("memcpy buffers...");
    }
    let copier = Copier::new(o.memcpy_mib, threads);
    let cap = (o.max_mem_gib * (1u64 << 30) as f64) as u64;
    let avail = mem_available().map_or(cap, |a| a / 10 * 7);
    let per_copy = (cap.min(avail) / 2) as usize / 4;
    if progress {
        eprint!(
            "\rpools: {} + {}...",
            bytes(per_copy as u64 * 4),
            bytes(per_copy as u64 * 4)
        );
    }
    let mut base = touched(per_copy, threads);
    let mut target = touched(per_copy, threads);
    let mut cx = Ctx {
        o,
        threads,
        scopes: &scopes,
        copier,
        progress,
    };

    // The reference copies on their own, interleaved.
    for r in 0..o.repeat {
        cx.say(format_args!(
            "memcpy / streaming copy {}/{}",
            r + 1,
            o.repeat
        ));
        cx.copier.memcpy();
        cx.copier.stream()?;
    }
    let mut rows = Vec::new();
    for dtype in &o.dtypes {
        let (b, t) = (&mut base, &mut target);
        rows.extend(match dtype.as_str() {
            "f32" => bench_dtype::<f32>(&mut cx, "f32", |x| x, b, t)?,
            "f16" => bench_dtype::<f16>(&mut cx, "f16", f16::from_f32, b, t)?,
            "bf16" => bench_dtype::<bf16>(&mut cx, "bf16", bf16::from_f32, b, t)?,
            _ => unreachable!("checked above"),
        });
    }
    if progress {
        eprint!("\r{:70}\r", "");
    }
    let load_after = load_average();
    let mut mc = cx.copier.memcpy.clone();
    let memcpy = stats(&mut mc);
    let mut sc = cx.copier.stream.clone();
    let stream = stats(&mut sc);
    let copy_bytes = cx.copier.bytes();

    if o.json {
        let results: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "dtype": r.dtype, "scope": r.scope, "path": r.path,
                    "layers": r.layers, "bytes": r.weight_bytes,
                    "traffic_bytes": 2 * r.weight_bytes,
                    "pool_bytes": r.pool_bytes, "pool_reused": r.pool_reused,
                    "seconds": r.seconds, "cpu_share": r.cpu_share,
                    "gbps": r.gbps.0, "gbps_min": r.gbps.1, "gbps_max": r.gbps.2,
                    "ratio": r.ratio.0, "ratio_min": r.ratio.1, "ratio_max": r.ratio.2,
                    "ratio_to_streaming_copy": r.ratio_stream.0,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "memcpy_gbps": memcpy.0, "memcpy_gbps_min": memcpy.1, "memcpy_gbps_max": memcpy.2,
                "load_average_before": load_before, "load_average_after": load_after,
                "memcpy_samples": mc.len(), "memcpy_bytes": copy_bytes,
                "streaming_copy_gbps": stream.0, "streaming_copy_gbps_min": stream.1,
                "streaming_copy_gbps_max": stream.2,
                "threads": threads, "kernel": fuse::kernel_name(), "rank": RANK,
                "repeat": o.repeat, "results": results,
            })
        );
        return Ok(());
    }

    println!(
        "LoRA fuse W' = W + s·B·A, rank {RANK}, {} layer shapes; kernel {}, {threads} thread(s)",
        o.model.title(),
        fuse::kernel_name()
    );
    println!(
        "GB/s = (bytes of W read + bytes written) / s: median [min .. max] of {} passes",
        o.repeat
    );
    let la = |l: Option<f64>| l.map_or("?".to_string(), |l| format!("{l:.2}"));
    println!(
        "machine: {} cores, 1-min load average {} before, {} after (other processes on the cores \
         slow the fuse, f16/bf16 most: see cpu)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        la(load_before),
        la(load_after)
    );
    println!();
    println!(
        "memcpy {} (libc, {threads} threads)  {:>6.1} GB/s  [{:.1} .. {:.1}]  ({} samples, taken between all passes)",
        bytes(copy_bytes),
        memcpy.0,
        memcpy.1,
        memcpy.2,
        mc.len()
    );
    println!(
        "streaming copy (fuse::restore_from)     {:>6.1} GB/s  [{:.1} .. {:.1}]  ({} samples, likewise)",
        stream.0, stream.1, stream.2, sc.len()
    );
    println!();
    println!(
        "{:<9} {:<5} {:<11} {:>6} {:>10} {:>8} {:>6} {:>15} {:>8} {:>13} {:>8} {:>5}",
        "path",
        "dtype",
        "scope",
        "layers",
        "W bytes",
        "time",
        "GB/s",
        "[min .. max]",
        "/memcpy",
        "[min .. max]",
        "/stream",
        "cpu"
    );
    for r in &rows {
        println!(
            "{:<9} {:<5} {:<11} {:>6} {:>10} {:>7.3}s {:>6.1} {:>15} {:>7.0}% {:>13} {:>7.0}% {:>4.0}%",
            r.path,
            r.dtype,
            r.scope,
            r.layers,
            bytes(r.weight_bytes),
            r.seconds,
            r.gbps.0,
            format!("[{:.1} .. {:.1}]", r.gbps.1, r.gbps.2),
            100.0 * r.ratio.0,
            format!("[{:.0} .. {:.0}%]", 100.0 * r.ratio.1, 100.0 * r.ratio.2),
            100.0 * r.ratio_stream.0,
            100.0 * r.cpu_share,
        );
    }
    println!();
    println!(
        "/memcpy, /stream: each pass over the mean of the memcpy (streaming copy) samples taken just \
         before and after it; median over the passes"
    );
    println!(
        "cpu: CPU time the fuse threads got during the passes / (wall time x threads); 1/100 s \
         resolution, rough for the short block passes"
    );
    let mut seen = Vec::new();
    for r in rows.iter().filter(|r| r.pool_reused) {
        if seen.contains(&r.dtype) {
            continue;
        }
        seen.push(r.dtype);
        println!(
            "{} {}: all {} layers ({} per copy) streamed through a {} base + {} target pool \
             (a layer past the end of the pool reuses it from the start; far larger than the cache)",
            r.dtype,
            r.scope,
            r.layers,
            bytes(r.weight_bytes),
            bytes(r.pool_bytes),
            bytes(r.pool_bytes)
        );
    }
    println!("targets at full-model scope: f32 and bf16 >= 70% of memcpy, f16 >= 50%");
    Ok(())
}
