//! `v2l-bench fuse`: LoRA fuse throughput against this machine's memcpy bandwidth.
//!
//! Measures, in one run:
//! * memcpy bandwidth: a large buffer copy (split across the same threads as the fuse),
//!   counted as bytes read + bytes written per second;
//! * the fuse kernel (`v2l_runtime::lora::fuse`) at rank 1 (the Video2LoRA case) on the real
//!   layer shapes of CogVideoX-Fun-5B-InP, for f32, f16 and bf16, at two scopes — one
//!   transformer block (`transformer_blocks.0.*`, 8 layers) and the full model (341 layers) —
//!   through `fuse_from` (base → target, what LoRA switching runs) and `fuse_in_place`,
//!   counted as bytes of W read + bytes written per second.
//!
//! The full model does not fit in memory twice (22 GB per copy in f32), so its layers are laid
//! out in a ring over a base pool and a target pool of at most `--max-mem-gib` together: every
//! one of the 341 layers is fused with its real shape and all its bytes move through DRAM,
//! but layers past the end of a pool reuse it from its start. The pools are far larger than
//! the last-level cache, so nothing is served from cache; the output states the pool size.
//!
//! All numbers are medians over `--repeat` timed passes (after one untimed warm-up pass), with
//! the min and max as the machine's noise.

use std::time::Instant;

use v2l_runtime::lora::fuse::{self, bf16, f16, Factors, Weights, WeightsMut};

use crate::{bytes, Failure};

/// Options of `v2l-bench fuse`.
pub struct FuseBench {
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
    pub json: bool,
}

const RANK: usize = 1;
/// Length of the fill pattern (prime, so it does not line up with rows).
const PATTERN: usize = 65_521;

struct Layer {
    out: usize,
    inp: usize,
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

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn layers() -> Result<Vec<(String, Layer)>, Failure> {
    let v: serde_json::Value = serde_json::from_str(include_str!(
        "../../tests/fixtures/fullscale_linear_shapes.json"
    ))
    .map_err(|e| Failure::new(format!("embedded shapes: {e}")))?;
    let list = v["cogvideox-fun-5b-inp"]["linear"]
        .as_array()
        .ok_or_else(|| Failure::new("embedded shapes: no cogvideox-fun-5b-inp.linear list"))?;
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

/// Copies `src` into `dst` with `threads` threads (the same split the fuse uses: contiguous).
fn par_copy(src: &[u8], dst: &mut [u8], threads: usize) {
    let per = src.len().div_ceil(threads.max(1));
    std::thread::scope(|s| {
        for (d, sr) in dst.chunks_mut(per).zip(src.chunks(per)) {
            s.spawn(move || d.copy_from_slice(sr));
        }
    });
}

/// A vector of `n` copies of `pattern` repeated, written in parallel (the first touch of every
/// page happens here, not in a timed pass).
fn filled<T: Copy + Send + Sync>(n: usize, pattern: &[T], threads: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    let per = n.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (c, part) in v.spare_capacity_mut()[..n].chunks_mut(per).enumerate() {
            s.spawn(move || {
                let mut k = (c * per) % pattern.len();
                for x in part.iter_mut() {
                    x.write(pattern[k]);
                    k += 1;
                    if k == pattern.len() {
                        k = 0;
                    }
                }
            });
        }
    });
    // SAFETY: the loop above initialised all n elements.
    unsafe { v.set_len(n) };
    v
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

struct Memcpy {
    bytes: u64,
    gbps: (f64, f64, f64),
    gbps_1t: (f64, f64, f64),
}

fn bench_memcpy(mib: usize, threads: usize, repeat: usize) -> Memcpy {
    let n = mib << 20;
    let src = vec![0x5Au8; n];
    let mut dst = vec![0xA5u8; n];
    let mut run = |t: usize| {
        par_copy(&src, &mut dst, t); // warm-up
        let mut g: Vec<f64> = (0..repeat)
            .map(|_| {
                let t0 = Instant::now();
                par_copy(&src, &mut dst, t);
                2.0 * n as f64 / t0.elapsed().as_secs_f64() / 1e9
            })
            .collect();
        stats(&mut g)
    };
    let gbps = run(threads);
    let gbps_1t = if threads == 1 { gbps } else { run(1) };
    Memcpy {
        bytes: n as u64,
        gbps,
        gbps_1t,
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
    gbps: (f64, f64, f64),
}

struct Scope<'a> {
    name: &'static str,
    layers: Vec<&'a Layer>,
}

/// Times `fuse_from` (and `fuse_in_place`) over the layers of each scope in storage type `T`.
fn bench_dtype<T>(
    dtype: &'static str,
    conv: fn(f32) -> T,
    scopes: &[Scope],
    factors: &[Vec<(Vec<f32>, Vec<f32>)>],
    pool_cap: u64,
    o: &FuseBench,
    threads: usize,
) -> Result<Vec<Row>, Failure>
where
    T: Copy + Send + Sync,
    for<'a> &'a [T]: Into<Weights<'a>>,
    for<'a> &'a mut [T]: Into<WeightsMut<'a>>,
{
    let size = std::mem::size_of::<T>();
    let mut rows = Vec::new();
    let pattern: Vec<T> = values(PATTERN, 7)
        .into_iter()
        .map(|x| conv(0.1 * x + 0.001))
        .collect();
    for (scope, facs) in scopes.iter().zip(factors) {
        let total: usize = scope.layers.iter().map(|l| l.out * l.inp).sum();
        let largest = scope.layers.iter().map(|l| l.out * l.inp).max().unwrap_or(0);
        let cap_elems = (pool_cap / size as u64) as usize;
        if largest > cap_elems {
            return Err(Failure::new(format!(
                "{dtype}: the largest layer ({}) does not fit the memory cap ({} per copy)",
                bytes((largest * size) as u64),
                bytes(pool_cap)
            ))
            .with_hint("raise --max-mem-gib or free memory"));
        }
        let pool = total.min(cap_elems);
        // Ring layout: a layer that does not fit before the end of the pool starts over at 0.
        let mut offsets = Vec::with_capacity(scope.layers.len());
        let mut pos = 0;
        for l in &scope.layers {
            let n = l.out * l.inp;
            if pos + n > pool {
                pos = 0;
            }
            offsets.push(pos);
            pos += n;
        }
        if !o.json {
            eprint!(
                "\r{dtype} {}: filling {} + {}...          ",
                scope.name,
                bytes((pool * size) as u64),
                bytes((pool * size) as u64)
            );
        }
        let base = filled(pool, &pattern, threads);
        let mut target = filled(pool, &pattern[1..], threads);

        let weight_bytes = (total * size) as u64;
        let mut paths: Vec<&'static str> = vec!["from"];
        if o.in_place {
            paths.push("in-place");
        }
        for path in paths {
            let mut pass = || -> Result<f64, Failure> {
                let t0 = Instant::now();
                for ((l, &off), (b, a)) in scope.layers.iter().zip(&offsets).zip(facs) {
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
            if !o.json {
                eprint!("\r{dtype} {} {path}: warm-up...            ", scope.name);
            }
            pass()?;
            let mut secs = Vec::with_capacity(o.repeat);
            for r in 0..o.repeat {
                if !o.json {
                    eprint!(
                        "\r{dtype} {} {path}: pass {}/{}...         ",
                        scope.name,
                        r + 1,
                        o.repeat
                    );
                }
                secs.push(pass()?);
            }
            let traffic = 2.0 * weight_bytes as f64;
            let mut g: Vec<f64> = secs.iter().map(|s| traffic / s / 1e9).collect();
            let (s_med, _, _) = stats(&mut secs);
            rows.push(Row {
                path,
                dtype,
                scope: scope.name,
                layers: scope.layers.len(),
                weight_bytes,
                pool_bytes: (pool * size) as u64,
                pool_reused: pool < total,
                seconds: s_med,
                gbps: stats(&mut g),
            });
        }
    }
    if !o.json {
        eprint!("\r{:60}\r", "");
    }
    Ok(rows)
}

/// Runs `v2l-bench fuse`.
pub fn bench_fuse(o: &FuseBench) -> Result<(), Failure> {
    if o.repeat == 0 {
        return Err(Failure::new("--repeat must be at least 1"));
    }
    let threads = fuse::resolve_threads(o.threads);
    let all = layers()?;
    let block: Vec<&Layer> = all
        .iter()
        .filter(|(n, _)| n.starts_with("transformer_blocks.0."))
        .map(|(_, l)| l)
        .collect();
    let scopes = [
        Scope {
            name: "block",
            layers: block,
        },
        Scope {
            name: "full-model",
            layers: all.iter().map(|(_, l)| l).collect(),
        },
    ];
    let factors: Vec<Vec<(Vec<f32>, Vec<f32>)>> = scopes
        .iter()
        .map(|s| {
            s.layers
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let b = values(l.out * RANK, 2 * i as u64 + 1);
                    let a = values(RANK * l.inp, 2 * i as u64 + 2);
                    (
                        b.iter().map(|x| 0.01 * x).collect(),
                        a.iter().map(|x| 0.01 * x).collect(),
                    )
                })
                .collect()
        })
        .collect();

    if !o.json {
        eprint!("memcpy...");
    }
    let mc = bench_memcpy(o.memcpy_mib, threads, o.repeat);

    // base + target pools: within --max-mem-gib and 70 % of the memory available now.
    let cap = (o.max_mem_gib * (1u64 << 30) as f64) as u64;
    let avail = mem_available().map_or(cap, |a| a / 10 * 7);
    let pool_cap = cap.min(avail) / 2;

    let mut rows = Vec::new();
    let f = &factors;
    rows.extend(bench_dtype::<f32>("f32", |x| x, &scopes, f, pool_cap, o, threads)?);
    rows.extend(bench_dtype::<f16>("f16", f16::from_f32, &scopes, f, pool_cap, o, threads)?);
    rows.extend(bench_dtype::<bf16>("bf16", bf16::from_f32, &scopes, f, pool_cap, o, threads)?);

    let memcpy = mc.gbps.0;
    if o.json {
        let results: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "dtype": r.dtype, "scope": r.scope, "path": r.path,
                    "layers": r.layers, "bytes": r.weight_bytes,
                    "traffic_bytes": 2 * r.weight_bytes,
                    "pool_bytes": r.pool_bytes, "pool_reused": r.pool_reused,
                    "seconds": r.seconds,
                    "gbps": r.gbps.0, "gbps_min": r.gbps.1, "gbps_max": r.gbps.2,
                    "ratio": r.gbps.0 / memcpy,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "memcpy_gbps": memcpy, "memcpy_gbps_min": mc.gbps.1, "memcpy_gbps_max": mc.gbps.2,
                "memcpy_1thread_gbps": mc.gbps_1t.0, "memcpy_bytes": mc.bytes,
                "threads": threads, "kernel": fuse::kernel_name(), "rank": RANK,
                "repeat": o.repeat, "results": results,
            })
        );
        return Ok(());
    }

    println!(
        "LoRA fuse, CogVideoX-Fun-5B-InP layer shapes, rank {RANK}, kernel {}, {threads} thread(s)",
        fuse::kernel_name()
    );
    println!(
        "GB/s = (bytes of W read + bytes written) / s; median of {} passes [min .. max]",
        o.repeat
    );
    println!();
    println!(
        "memcpy {} ({threads} threads)  {:>6.1} GB/s  [{:.1} .. {:.1}]",
        bytes(mc.bytes),
        mc.gbps.0,
        mc.gbps.1,
        mc.gbps.2
    );
    println!(
        "memcpy {} (1 thread)   {:>6.1} GB/s  [{:.1} .. {:.1}]",
        bytes(mc.bytes),
        mc.gbps_1t.0,
        mc.gbps_1t.1,
        mc.gbps_1t.2
    );
    println!();
    println!(
        "{:<9} {:<5} {:<11} {:>6} {:>10} {:>8} {:>7} {:>17} {:>9}",
        "path", "dtype", "scope", "layers", "W bytes", "time", "GB/s", "[min .. max]", "/memcpy"
    );
    for r in &rows {
        println!(
            "{:<9} {:<5} {:<11} {:>6} {:>10} {:>7.3}s {:>7.1} {:>17} {:>8.0}%",
            r.path,
            r.dtype,
            r.scope,
            r.layers,
            bytes(r.weight_bytes),
            r.seconds,
            r.gbps.0,
            format!("[{:.1} .. {:.1}]", r.gbps.1, r.gbps.2),
            100.0 * r.gbps.0 / memcpy
        );
    }
    println!();
    let mut reused: Vec<&Row> = rows.iter().filter(|r| r.pool_reused && r.path == "from").collect();
    reused.dedup_by_key(|r| r.dtype);
    for r in reused {
        println!(
            "{} {}: all {} layers ({} per copy) streamed through a {} base + {} target pool \
             (layers past the end reuse it from the start; far larger than the cache)",
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
