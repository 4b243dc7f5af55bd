//! Video2LoRA's LiLoRA: shared auxiliary matrices that turn a hypernetwork's per-layer rows
//! into standard LoRA factors (see `docs/video2lora.md` and the authors' `LoRAModule`).
//!
//! For layer i with `down_aux [a, in]`, `up_aux [out, b]` and the predicted row
//! `[down_w (a·r) | up_w (b·r)]`: `lora_A = down_w [r,a] · down_aux`, `lora_B = up_aux · up_w [b,r]`,
//! scale `multiplier · alpha / r`. Layer i is the DiT's i-th `nn.Linear` in module order.

use std::path::{Path, PathBuf};

use v2l_contracts::LinearInfo;

use super::format::{Factor, Lora, LoraFormat, LoraLayer};

/// Why a LiLoRA auxiliary file cannot be used with the DiT.
#[derive(Debug, thiserror::Error)]
pub enum LiLoraError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Bad { path: PathBuf, message: String },
    #[error("{path}: missing `{key}` for the model's layer `{module}`")]
    Missing {
        path: PathBuf,
        key: String,
        module: String,
    },
    #[error("{path}: `{key}` has shape {found:?}; the model's layer needs {expected}")]
    Shape {
        path: PathBuf,
        key: String,
        found: Vec<usize>,
        expected: String,
    },
    #[error("{path}: {extra} auxiliary pairs match no layer of the model (first: `{first}`)")]
    Extra {
        path: PathBuf,
        extra: usize,
        first: String,
    },
    #[error("hypernetwork predicts {rows} rows of width {width}, but the LiLoRA file {path} has {layers} layers needing width {needed}·r")]
    Rows {
        path: PathBuf,
        rows: usize,
        width: usize,
        layers: usize,
        needed: usize,
    },
}

type Result<T> = std::result::Result<T, LiLoraError>;

/// One layer's auxiliaries.
#[derive(Clone, Debug)]
pub struct AuxLayer {
    pub module: String,
    pub out_features: usize,
    pub in_features: usize,
    /// `[a, in]`
    down_aux: Vec<f32>,
    /// `up_aux [out, b]` transposed, `[b, out]`: `B`'s columns are then sums of its rows, as
    /// `A`'s rows are of `down_aux`'s, which vectorise (a dot product over `b` does not,
    /// summed in order).
    up_aux_t: Vec<f32>,
}

impl AuxLayer {
    /// One layer's auxiliaries: `down_aux [a, in]`, `up_aux [out, b]`, row-major.
    pub fn new(
        module: String,
        out_features: usize,
        in_features: usize,
        down_aux: Vec<f32>,
        up_aux: Vec<f32>,
    ) -> AuxLayer {
        let up_aux_t = transposed(&up_aux, out_features);
        AuxLayer {
            module,
            out_features,
            in_features,
            down_aux,
            up_aux_t,
        }
    }

    /// This layer's LoRA from its predicted row `[down_w (r·a) | up_w (b·r)]`:
    /// `A = down_w [r, a] · down_aux`, `B = up_aux · up_w [b, r]`, each element summed over
    /// `p` (or `q`) ascending, as upstream's layer computes them in f32.
    fn expand(&self, row: &[f32], a: usize, r: usize, alpha: f32) -> LoraLayer {
        let (down_w, up_w) = row.split_at((a * r).min(row.len()));
        let (n_in, n_out, r1) = (self.in_features.max(1), self.out_features.max(1), r.max(1));
        // lora_A[k, :] = Σ_p down_w[k, p] · down_aux[p, :].
        let mut lora_a = vec![0f32; r * self.in_features];
        for (dst, dw) in lora_a
            .chunks_exact_mut(n_in)
            .zip(down_w.chunks_exact(a.max(1)))
        {
            for (&w, aux) in dw.iter().zip(self.down_aux.chunks_exact(n_in)) {
                axpy(dst, w, aux);
            }
        }
        // lora_B[:, k] = Σ_q up_w[q, k] · up_aux[:, q], laid out [r, out], then as [out, r].
        let mut cols = vec![0f32; r * self.out_features];
        for (k, dst) in cols.chunks_exact_mut(n_out).enumerate() {
            for (u, aux) in up_w.chunks_exact(r1).zip(self.up_aux_t.chunks_exact(n_out)) {
                axpy(dst, u.get(k).copied().unwrap_or(0.0), aux);
            }
        }
        let lora_b = match r {
            1 => cols,
            _ => transposed(&cols, r),
        };
        LoraLayer {
            module: self.module.clone(),
            a: Factor::from_f32([r, self.in_features], &lora_a),
            b: Factor::from_f32([self.out_features, r], &lora_b),
            alpha,
        }
    }
}

/// `m` (row-major, `rows` rows) transposed.
fn transposed(m: &[f32], rows: usize) -> Vec<f32> {
    let cols = m.len() / rows.max(1);
    let mut t = vec![0f32; m.len()];
    for (i, row) in m.chunks_exact(cols.max(1)).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            if let Some(dst) = t.get_mut(j * rows + i) {
                *dst = x;
            }
        }
    }
    t
}

/// `dst += w · x`, element by element (a multiply, then an add: no fused rounding).
fn axpy(dst: &mut [f32], w: f32, x: &[f32]) {
    for (o, &v) in dst.iter_mut().zip(x) {
        *o += w * v;
    }
}

/// The auxiliaries of every layer, in the hypernetwork's row order.
#[derive(Clone, Debug)]
pub struct LiLora {
    pub path: PathBuf,
    pub a: usize,
    pub b: usize,
    pub layers: Vec<AuxLayer>,
}

/// The upstream key prefix of a module (`lora_unet__` + path with '.' → '_').
pub fn upstream_name(module: &str) -> String {
    format!("lora_unet__{}", module.replace('.', "_"))
}

impl LiLora {
    /// Loads `path` and maps it onto `linears` (the DiT's `nn.Linear`s in module order),
    /// checking every name exists and every shape agrees.
    pub fn load(path: &Path, linears: &[LinearInfo]) -> Result<LiLora> {
        let bytes =
            v2l_contracts::input::read_safetensors(path, v2l_contracts::input::InputKind::Tensors)
                .map_err(|source| LiLoraError::Io {
                    path: path.into(),
                    source,
                })?;
        let bad = |message: String| LiLoraError::Bad {
            path: path.into(),
            message,
        };
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(v2l_contracts::safetensors_problem(&e)))?;
        let get = |key: &str, module: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let v = st.tensor(key).map_err(|_| LiLoraError::Missing {
                path: path.into(),
                key: key.into(),
                module: module.into(),
            })?;
            let dtype = match v.dtype() {
                safetensors::Dtype::F32 => v2l_graphs::DType::F32,
                safetensors::Dtype::F16 => v2l_graphs::DType::F16,
                safetensors::Dtype::BF16 => v2l_graphs::DType::BF16,
                d => return Err(bad(format!("`{key}` has dtype {d:?}"))),
            };
            let data = v2l_graphs::dtype::f32_values(v.data(), dtype)
                .ok_or_else(|| bad(format!("`{key}` holds a partial element")))?;
            if data.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("`{key}` holds NaN or Inf")));
            }
            Ok((v.shape().to_vec(), data))
        };
        let mut layers = Vec::with_capacity(linears.len());
        let (mut a, mut b) = (0, 0);
        for (i, l) in linears.iter().enumerate() {
            let name = upstream_name(&l.name);
            let (kd, ku) = (format!("{name}.down_aux"), format!("{name}.up_aux"));
            let (ds, down_aux) = get(&kd, &l.name)?;
            let (us, up_aux) = get(&ku, &l.name)?;
            if i == 0 {
                a = ds.first().copied().unwrap_or(0);
                b = us.get(1).copied().unwrap_or(0);
            }
            if ds != [a, l.in_features] {
                return Err(LiLoraError::Shape {
                    path: path.into(),
                    key: kd,
                    found: ds,
                    expected: format!("[{a}, {}]", l.in_features),
                });
            }
            if us != [l.out_features, b] {
                return Err(LiLoraError::Shape {
                    path: path.into(),
                    key: ku,
                    found: us,
                    expected: format!("[{}, {b}]", l.out_features),
                });
            }
            layers.push(AuxLayer::new(
                l.name.clone(),
                l.out_features,
                l.in_features,
                down_aux,
                up_aux,
            ));
        }
        let used: std::collections::HashSet<String> =
            linears.iter().map(|l| upstream_name(&l.name)).collect();
        let extra: Vec<String> = st
            .names()
            .into_iter()
            .filter(|k| !used.contains(k.trim_end_matches(".down_aux").trim_end_matches(".up_aux")))
            .cloned()
            .collect();
        if let Some(first) = extra.first() {
            return Err(LiLoraError::Extra {
                path: path.into(),
                extra: extra.len(),
                first: first.clone(),
            });
        }
        Ok(LiLora {
            path: path.into(),
            a,
            b,
            layers,
        })
    }

    /// Turns hypernetwork rows `[N, (a+b)·r]` (one batch item) into a standard LoRA whose
    /// alpha makes the fuse scale `multiplier · alpha / r` (upstream passes both as the LoRA weight).
    pub fn to_lora(&self, rows: &[f32], width: usize, multiplier: f32, alpha: f32) -> Result<Lora> {
        // Every core where the auxiliaries are large (gigabytes at 5B width: one core does not
        // reach the memory's bandwidth), one thread per AUX_BYTES_PER_THREAD; the caller's
        // thread alone for small models (no thread is started for a few megabytes).
        const AUX_BYTES_PER_THREAD: usize = 16 << 20;
        let bytes: usize = self
            .layers
            .iter()
            .map(|l| 4 * (l.down_aux.len() + l.up_aux_t.len()))
            .sum();
        let threads = v2l_kernels::fuse::resolve_threads(0)
            .min(bytes.div_ceil(AUX_BYTES_PER_THREAD))
            .max(1);
        self.to_lora_on(rows, width, multiplier, alpha, threads)
    }

    /// [`LiLora::to_lora`] on `threads` threads, each a run of consecutive layers.
    fn to_lora_on(
        &self,
        rows: &[f32],
        width: usize,
        multiplier: f32,
        alpha: f32,
        threads: usize,
    ) -> Result<Lora> {
        let n = self.layers.len();
        let ab = self.a + self.b;
        if width == 0 || rows.len() != n * width || width % ab != 0 {
            return Err(LiLoraError::Rows {
                path: self.path.clone(),
                rows: rows.len() / width.max(1),
                width,
                layers: n,
                needed: ab,
            });
        }
        let r = width / ab;
        let alpha = multiplier * alpha;
        let threads = threads.clamp(1, n.max(1));
        // A run of consecutive layers (on a thread: a block's mix of shapes in each).
        let run = move |layers: &[AuxLayer], rows: &[f32]| -> Vec<LoraLayer> {
            layers
                .iter()
                .zip(rows.chunks_exact(width))
                .map(|(l, row)| l.expand(row, self.a, r, alpha))
                .collect()
        };
        if threads == 1 {
            return Ok(Lora {
                format: LoraFormat::Diffusers,
                layers: run(&self.layers, rows),
            });
        }
        let per = n.div_ceil(threads).max(1);
        let layers: Vec<LoraLayer> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .layers
                .chunks(per)
                .zip(rows.chunks(per * width))
                .map(|(layers, rows)| s.spawn(move || run(layers, rows)))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        if layers.len() != n {
            return Err(LiLoraError::Bad {
                path: self.path.clone(),
                message: "a thread expanding the LiLoRA layers panicked".into(),
            });
        }
        Ok(Lora {
            format: LoraFormat::Diffusers,
            layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The factors summed element by element in upstream's order (`p`, `q` ascending), as
    /// plainly as it can be written.
    fn reference(
        l: &AuxLayer,
        up_aux: &[f32],
        row: &[f32],
        a: usize,
        b: usize,
        r: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (down_w, up_w) = row.split_at(a * r);
        let mut lora_a = vec![0f32; r * l.in_features];
        for k in 0..r {
            for j in 0..l.in_features {
                let mut s = 0f32;
                for p in 0..a {
                    s += down_w[k * a + p] * l.down_aux[p * l.in_features + j];
                }
                lora_a[k * l.in_features + j] = s;
            }
        }
        let mut lora_b = vec![0f32; l.out_features * r];
        for i in 0..l.out_features {
            for k in 0..r {
                let mut s = 0f32;
                for q in 0..b {
                    s += up_aux[i * b + q] * up_w[q * r + k];
                }
                lora_b[i * r + k] = s;
            }
        }
        (lora_a, lora_b)
    }

    #[test]
    fn expanded_factors_are_the_ordered_sums_on_one_thread_or_several() {
        let wave = |n: usize, salt: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 * 0.37 + salt).sin()) * 0.5)
                .collect()
        };
        let (a, b) = (5, 3);
        for r in [1, 3] {
            let shapes = [(7, 4), (2, 9), (6, 6), (1, 3), (8, 5)];
            let up: Vec<Vec<f32>> = shapes
                .iter()
                .enumerate()
                .map(|(k, &(o, _))| wave(o * b, k as f32))
                .collect();
            let layers: Vec<AuxLayer> = shapes
                .iter()
                .zip(&up)
                .enumerate()
                .map(|(k, (&(o, i), up))| {
                    AuxLayer::new(
                        format!("l{k}"),
                        o,
                        i,
                        wave(a * i, 10.0 + k as f32),
                        up.clone(),
                    )
                })
                .collect();
            let lilora = LiLora {
                path: "t".into(),
                a,
                b,
                layers,
            };
            let width = (a + b) * r;
            let rows = wave(shapes.len() * width, 3.0);
            let lora = lilora.to_lora(&rows, width, 2.0, 0.5).unwrap();
            // On the caller's thread (a few bytes) and on three threads: the same factors.
            let on_three = lilora.to_lora_on(&rows, width, 2.0, 0.5, 3).unwrap();
            assert_eq!(lora.layers, on_three.layers);
            assert_eq!(lora.layers.len(), shapes.len());
            for (k, (got, l)) in lora.layers.iter().zip(&lilora.layers).enumerate() {
                let (ra, rb) = reference(l, &up[k], &rows[k * width..(k + 1) * width], a, b, r);
                let f = |x: &Factor| v2l_graphs::dtype::f32_values(&x.bytes, x.dtype).unwrap();
                assert_eq!(f(&got.a), ra, "r {r}, layer {k}: A");
                assert_eq!(f(&got.b), rb, "r {r}, layer {k}: B");
                assert_eq!(
                    (got.a.shape, got.b.shape),
                    ([r, l.in_features], [l.out_features, r])
                );
                assert_eq!(got.alpha, 1.0);
            }
        }
    }
}
