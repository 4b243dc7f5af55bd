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
    pub down_aux: Vec<f32>,
    /// `[out, b]`
    pub up_aux: Vec<f32>,
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
            layers.push(AuxLayer {
                module: l.name.clone(),
                out_features: l.out_features,
                in_features: l.in_features,
                down_aux,
                up_aux,
            });
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
        let (a, b) = (self.a, self.b);
        let layers = self
            .layers
            .iter()
            .zip(rows.chunks_exact(width))
            .map(|(l, row)| {
                let (down_w, up_w) = row.split_at(a * r); // down_w [r, a], up_w [b, r]
                let (n_in, r1) = (l.in_features.max(1), r.max(1));
                // lora_A[k, :] = Σ_p down_w[k, p] · down_aux[p, :], p ascending.
                let mut lora_a = vec![0f32; r * l.in_features];
                for (dst, dw) in lora_a
                    .chunks_exact_mut(n_in)
                    .zip(down_w.chunks_exact(a.max(1)))
                {
                    for (&w, aux) in dw.iter().zip(l.down_aux.chunks_exact(n_in)) {
                        for (o, &x) in dst.iter_mut().zip(aux) {
                            *o += w * x;
                        }
                    }
                }
                // lora_B[i, k] = Σ_q up_aux[i, q] · up_w[q, k], q ascending.
                let mut lora_b = vec![0f32; l.out_features * r];
                for (row, aux) in lora_b
                    .chunks_exact_mut(r1)
                    .zip(l.up_aux.chunks_exact(b.max(1)))
                {
                    for (k, o) in row.iter_mut().enumerate() {
                        *o = aux
                            .iter()
                            .zip(up_w.chunks_exact(r1))
                            .map(|(&x, u)| x * u.get(k).copied().unwrap_or(0.0))
                            .sum();
                    }
                }
                LoraLayer {
                    module: l.module.clone(),
                    a: Factor::from_f32([r, l.in_features], &lora_a),
                    b: Factor::from_f32([l.out_features, r], &lora_b),
                    alpha: multiplier * alpha,
                }
            })
            .collect();
        Ok(Lora {
            format: LoraFormat::Diffusers,
            layers,
        })
    }
}
