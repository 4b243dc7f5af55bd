//! Standard LoRA files: diffusers/PEFT, kohya/musubi and ComfyUI, read and written.
//!
//! | format | keys | alpha |
//! |---|---|---|
//! | diffusers/PEFT | `transformer.<module>.lora_A.weight [r,in]`, `.lora_B.weight [out,r]` | `lora_alpha` in the `lora_adapter_metadata` JSON (alpha = r when absent) |
//! | kohya/musubi | `lora_unet_<module, '.'→'_'>.lora_down.weight`, `.lora_up.weight` | `<..>.alpha` scalar tensor |
//! | ComfyUI | `diffusion_model.<module>.lora_A.weight`, `.lora_B.weight` | optional `diffusion_model.<module>.alpha` |
//!
//! Factors keep their stored bytes and dtype, so converting between formats is bitwise. kohya
//! names lose the dots of module paths; they are resolved against the model's module list
//! (or, for files v2l wrote, the module names it records in the file's metadata).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use v2l_graphs::DType;

/// Where a LoRA file came from / how to write one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    Diffusers,
    Kohya,
    ComfyUi,
}

impl LoraFormat {
    pub fn name(self) -> &'static str {
        match self {
            LoraFormat::Diffusers => "diffusers",
            LoraFormat::Kohya => "kohya",
            LoraFormat::ComfyUi => "comfyui",
        }
    }
}

/// Why a LoRA file cannot be read or does not fit the model.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Bad { path: PathBuf, message: String },
    #[error("{path}: no LoRA tensors in a known format (diffusers/PEFT `lora_A`/`lora_B`, kohya `lora_down`/`lora_up`, ComfyUI `diffusion_model.`)")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: layer `{module}` has {present} but no {missing}")]
    MissingPair {
        path: PathBuf,
        module: String,
        present: String,
        missing: String,
    },
    #[error("{path}: layer `{module}`: A is {a:?} and B is {b:?}: the ranks must agree, be positive and not exceed the layer's dimensions")]
    Rank {
        path: PathBuf,
        module: String,
        a: [usize; 2],
        b: [usize; 2],
    },
    #[error("{path}: tensor `{key}` holds NaN or Inf")]
    NonFinite { path: PathBuf, key: String },
    #[error("{path}: `{key}` is {value:e}, beyond ±{limit:e}: fused into the weights it would overflow them (trained LoRAs stay within ±10)")]
    OutOfRange {
        path: PathBuf,
        key: String,
        value: f32,
        limit: f32,
    },
    #[error("{path}: kohya layer name `{name}` matches no module of the model")]
    UnresolvedKohya { path: PathBuf, name: String },
    #[error("{path}: {count} of {total} LoRA layers match no linear layer of the model (first: `{first}`)")]
    Unmatched {
        path: PathBuf,
        count: usize,
        total: usize,
        first: String,
    },
    #[error("{path}: layer `{module}`: B·A is [{out}, {inp}] but the model's weight is [{w_out}, {w_in}]")]
    TargetShape {
        path: PathBuf,
        module: String,
        out: usize,
        inp: usize,
        w_out: usize,
        w_in: usize,
    },
}

type Result<T> = std::result::Result<T, LoraError>;

/// A factor matrix as stored (dtype and bytes preserved for bitwise conversion).
#[derive(Clone, Debug, PartialEq)]
pub struct Factor {
    pub dtype: DType,
    pub shape: [usize; 2],
    pub bytes: Vec<u8>,
}

impl Factor {
    pub fn from_f32(shape: [usize; 2], v: &[f32]) -> Factor {
        Factor {
            dtype: DType::F32,
            shape,
            bytes: v2l_graphs::dtype::le_bytes(v).to_vec(),
        }
    }

    /// The values widened to f32 (factors are f32, f16 or bf16 with whole elements: the
    /// readers check both, so the empty fallback is never taken).
    pub fn to_f32(&self) -> Vec<f32> {
        v2l_graphs::dtype::f32_values(&self.bytes, self.dtype).unwrap_or_default()
    }
}

/// One layer's low-rank update `ΔW = (alpha / r)·B·A`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraLayer {
    /// Module path in the model (`transformer_blocks.0.attn1.to_q`).
    pub module: String,
    /// `A` (`lora_A` / `lora_down`), `[r, in]`.
    pub a: Factor,
    /// `B` (`lora_B` / `lora_up`), `[out, r]`.
    pub b: Factor,
    pub alpha: f32,
}

impl LoraLayer {
    pub fn rank(&self) -> usize {
        self.a.shape[0]
    }

    /// The fuse scale `multiplier · alpha / r`.
    pub fn scale(&self, multiplier: f32) -> f32 {
        multiplier * self.alpha / self.rank() as f32
    }

    /// The factors widened to f32 with the fuse scale at `multiplier`, for the fuse kernel.
    pub fn fuse_plan(&self, multiplier: f32) -> super::fuse::FusePlan {
        super::fuse::FusePlan {
            b: self.b.to_f32(),
            a: self.a.to_f32(),
            rank: self.rank(),
            scale: self.scale(multiplier),
        }
    }
}

/// A LoRA: layers sorted by module path.
#[derive(Clone, Debug, PartialEq)]
pub struct Lora {
    pub format: LoraFormat,
    pub layers: Vec<LoraLayer>,
}

struct Raw {
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    Some(match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        _ => return None,
    })
}

fn to_st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        _ => safetensors::Dtype::F32,
    }
}

/// PEFT's alphas: `lora_alpha`, the per-module `alpha_pattern`, and whether rsLoRA scaling is on.
type PeftAlpha = (Option<f32>, BTreeMap<String, f32>, bool);

/// The PEFT `lora_alpha` (and per-module `alpha_pattern`) from diffusers' metadata JSON.
///
/// Metadata that is present but unreadable is an error, never "alpha = rank": silently
/// defaulting would fuse the LoRA at the wrong strength.
fn peft_alpha(path: &Path, meta: Option<&HashMap<String, String>>) -> Result<PeftAlpha> {
    let Some(json) = meta.and_then(|m| m.get("lora_adapter_metadata")) else {
        return Ok((None, BTreeMap::new(), false));
    };
    let bad = |message: String| LoraError::Bad {
        path: path.into(),
        message,
    };
    let v = serde_json::from_str::<serde_json::Value>(json)
        .map_err(|e| bad(format!("`lora_adapter_metadata` is not valid JSON: {e}")))?;
    let get = |k: &str| {
        v.get(format!("transformer.{k}"))
            .or_else(|| v.get(k))
            .or_else(|| v.get("transformer").and_then(|t| t.get(k)))
    };
    let number = |what: &str, x: &serde_json::Value| {
        x.as_f64()
            .map(|a| a as f32)
            .filter(|a| a.is_finite())
            .ok_or_else(|| {
                bad(format!(
                    "`lora_adapter_metadata`: {what} is {x}, not a finite number"
                ))
            })
    };
    let alpha = get("lora_alpha")
        .map(|a| number("lora_alpha", a))
        .transpose()?;
    let mut pattern = BTreeMap::new();
    if let Some(p) = get("alpha_pattern").filter(|p| !p.is_null()) {
        let o = p.as_object().ok_or_else(|| {
            bad(format!(
                "`lora_adapter_metadata`: alpha_pattern is {p}, not an object"
            ))
        })?;
        for (k, x) in o {
            pattern.insert(k.clone(), number(&format!("alpha_pattern `{k}`"), x)?);
        }
    }
    let rslora = get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
    Ok((alpha, pattern, rslora))
}

/// Reads a LoRA file in any supported format. `modules` (the model's module paths) resolves
/// kohya names; without it, only kohya files that record their module names can be read.
pub fn read(path: &Path, modules: Option<&[String]>) -> Result<Lora> {
    let bytes = v2l_contracts::input::read_safetensors(path, v2l_contracts::input::InputKind::Lora)
        .map_err(|source| LoraError::Io {
            path: path.into(),
            source,
        })?;
    parse(&bytes, path, modules)
}

/// [`read`] on bytes already in memory; `path` names them in errors. Untrusted input: fuzzed
/// (`fuzz/fuzz_targets/lora.rs`).
pub fn parse(bytes: &[u8], path: &Path, modules: Option<&[String]>) -> Result<Lora> {
    let bad = |message: String| LoraError::Bad {
        path: path.into(),
        message,
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(v2l_contracts::safetensors_problem(&e)))?;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| bad(v2l_contracts::safetensors_problem(&e)))?;
    let mut raw: BTreeMap<String, Raw> = BTreeMap::new();
    for (k, v) in st.tensors() {
        let Some(dtype) = st_dtype(v.dtype()) else {
            return Err(bad(format!(
                "tensor `{k}` has dtype {:?}; LoRA factors must be f32, f16 or bf16",
                v.dtype()
            )));
        };
        raw.insert(
            k,
            Raw {
                dtype,
                shape: v.shape().to_vec(),
                bytes: v.data().to_vec(),
            },
        );
    }
    let metadata = meta.metadata().as_ref();

    let any = |suffix: &str| raw.keys().any(|k| k.ends_with(suffix));
    let (format, lora) = if any(".lora_down.weight") {
        (
            LoraFormat::Kohya,
            read_kohya(path, &raw, metadata, modules)?,
        )
    } else if raw.keys().any(|k| k.starts_with("diffusion_model.")) && any(".lora_A.weight") {
        (
            LoraFormat::ComfyUi,
            read_ab(path, &raw, "diffusion_model.", |_, m| {
                alpha_tensor(&raw, &format!("diffusion_model.{m}.alpha"))
            })?,
        )
    } else if any(".lora_A.weight") {
        let (alpha, pattern, rslora) = peft_alpha(path, metadata)?;
        let prefix = if raw.keys().any(|k| k.starts_with("transformer.")) {
            "transformer."
        } else if raw.keys().any(|k| k.starts_with("base_model.model.")) {
            "base_model.model."
        } else {
            ""
        };
        let layers = read_ab(path, &raw, prefix, |r, m| {
            let a = pattern
                .iter()
                .find(|(p, _)| m == p.as_str() || m.ends_with(&format!(".{p}")))
                .map(|(_, a)| *a)
                .or(alpha);
            // PEFT: alpha = r when absent; rsLoRA scales by alpha/√r, expressed here as an alpha.
            let a = a.unwrap_or(r as f32);
            Some(if rslora { a * (r as f32).sqrt() } else { a })
        })?;
        (LoraFormat::Diffusers, layers)
    } else {
        return Err(LoraError::UnknownFormat { path: path.into() });
    };
    // Modules under their authors' names (Wan's `blocks.0.cross_attn.k`) → the model's.
    let mut lora = lora;
    if let Some(m) = modules {
        let other = super::names::aliases(m);
        if !other.is_empty() {
            for l in &mut lora {
                if let Some(p) = other.get(&l.module) {
                    l.module = p.clone();
                }
            }
            lora.sort_by(|a, b| a.module.cmp(&b.module));
        }
    }
    check_values(path, &lora)?;
    Ok(Lora {
        format,
        layers: lora,
    })
}

/// Largest factor or alpha magnitude v2l accepts. Trained LoRAs stay within ±10; a factor of
/// 1e30 is finite yet overflows every weight it is fused into (a black video).
pub const MAX_VALUE: f32 = 1e6;

/// Every factor and alpha of `layers` finite and within ±[`MAX_VALUE`]: checked where a LoRA
/// is read and before one is written, so v2l never writes a file it would refuse.
pub fn check_values(path: &Path, layers: &[LoraLayer]) -> Result<()> {
    for l in layers {
        let alpha = [l.alpha];
        let a = l.a.to_f32();
        let b = l.b.to_f32();
        for (values, which) in [(&alpha[..], "alpha"), (&a[..], "A"), (&b[..], "B")] {
            let key = || format!("{} ({which})", l.module);
            if values.iter().any(|x| !x.is_finite()) {
                return Err(LoraError::NonFinite {
                    path: path.into(),
                    key: key(),
                });
            }
            if let Some(&value) = values.iter().find(|x| x.abs() > MAX_VALUE) {
                return Err(LoraError::OutOfRange {
                    path: path.into(),
                    key: key(),
                    value,
                    limit: MAX_VALUE,
                });
            }
        }
    }
    Ok(())
}

fn alpha_tensor(raw: &BTreeMap<String, Raw>, key: &str) -> Option<f32> {
    let r = raw.get(key)?;
    Factor {
        dtype: r.dtype,
        shape: [1, 1],
        bytes: r.bytes.clone(),
    }
    .to_f32()
    .first()
    .copied()
}

fn factor(path: &Path, key: &str, r: &Raw) -> Result<Factor> {
    match r.shape.as_slice() {
        [a, b] => Ok(Factor {
            dtype: r.dtype,
            shape: [*a, *b],
            bytes: r.bytes.clone(),
        }),
        // Some trainers store linear factors as 1×1 convolutions.
        [a, b, 1, 1] => Ok(Factor {
            dtype: r.dtype,
            shape: [*a, *b],
            bytes: r.bytes.clone(),
        }),
        s => Err(LoraError::Bad {
            path: path.into(),
            message: format!("tensor `{key}` has shape {s:?}; expected a matrix"),
        }),
    }
}

fn pair(
    path: &Path,
    module: &str,
    a: Option<(&str, &Raw)>,
    b: Option<(&str, &Raw)>,
    names: [&str; 2],
    alpha: Option<f32>,
) -> Result<LoraLayer> {
    let missing = |present: &str, missing: &str| LoraError::MissingPair {
        path: path.into(),
        module: module.into(),
        present: present.into(),
        missing: missing.into(),
    };
    let (ka, ra) = a.ok_or_else(|| missing(names[1], names[0]))?;
    let (kb, rb) = b.ok_or_else(|| missing(names[0], names[1]))?;
    let a = factor(path, ka, ra)?;
    let b = factor(path, kb, rb)?;
    if a.shape[0] != b.shape[1] || a.shape[0] == 0 || a.shape[0] > a.shape[1].min(b.shape[0]) {
        return Err(LoraError::Rank {
            path: path.into(),
            module: module.into(),
            a: a.shape,
            b: b.shape,
        });
    }
    let alpha = alpha.unwrap_or(a.shape[0] as f32);
    Ok(LoraLayer {
        module: module.into(),
        a,
        b,
        alpha,
    })
}

/// Reads `<prefix><module>.lora_A.weight` / `.lora_B.weight` pairs.
fn read_ab(
    path: &Path,
    raw: &BTreeMap<String, Raw>,
    prefix: &str,
    alpha: impl Fn(usize, &str) -> Option<f32>,
) -> Result<Vec<LoraLayer>> {
    let mut modules: Vec<String> = raw
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|k| {
            k.strip_suffix(".lora_A.weight")
                .or_else(|| k.strip_suffix(".lora_B.weight"))
        })
        .map(String::from)
        .collect();
    modules.sort();
    modules.dedup();
    modules
        .iter()
        .map(|m| {
            let ka = format!("{prefix}{m}.lora_A.weight");
            let kb = format!("{prefix}{m}.lora_B.weight");
            let a = raw.get(&ka).map(|r| (ka.as_str(), r));
            let b = raw.get(&kb).map(|r| (kb.as_str(), r));
            let rank = a.and_then(|(_, r)| r.shape.first().copied()).unwrap_or(0);
            pair(path, m, a, b, ["lora_A", "lora_B"], alpha(rank, m))
        })
        .collect()
}

/// The kohya flat name of a module path.
pub fn kohya_name(module: &str) -> String {
    format!("lora_unet_{}", module.replace('.', "_"))
}

/// Metadata key under which v2l records kohya names → module paths.
const KOHYA_MODULES_KEY: &str = "v2l_module_names";

fn read_kohya(
    path: &Path,
    raw: &BTreeMap<String, Raw>,
    meta: Option<&HashMap<String, String>>,
    modules: Option<&[String]>,
) -> Result<Vec<LoraLayer>> {
    let mut resolve: HashMap<String, String> = HashMap::new();
    if let Some(m) = modules {
        resolve.extend(m.iter().map(|p| (kohya_name(p), p.clone())));
        let other = super::names::aliases(m);
        resolve.extend(other.iter().map(|(o, p)| (kohya_name(o), p.clone())));
    }
    if let Some(recorded) = meta
        .and_then(|m| m.get(KOHYA_MODULES_KEY))
        .and_then(|j| serde_json::from_str::<BTreeMap<String, String>>(j).ok())
    {
        resolve.extend(recorded);
    }
    let mut names: Vec<&str> = raw
        .keys()
        .filter_map(|k| {
            k.strip_suffix(".lora_down.weight")
                .or_else(|| k.strip_suffix(".lora_up.weight"))
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut layers = Vec::new();
    for n in names {
        let module = resolve.get(n).ok_or_else(|| LoraError::UnresolvedKohya {
            path: path.into(),
            name: n.into(),
        })?;
        let kd = format!("{n}.lora_down.weight");
        let ku = format!("{n}.lora_up.weight");
        let a = raw.get(&kd).map(|r| (kd.as_str(), r));
        let b = raw.get(&ku).map(|r| (ku.as_str(), r));
        layers.push(pair(
            path,
            module,
            a,
            b,
            ["lora_down", "lora_up"],
            alpha_tensor(raw, &format!("{n}.alpha")),
        )?);
    }
    layers.sort_by(|x, y| x.module.cmp(&y.module));
    Ok(layers)
}

/// Writes `lora` in `format` to `path` atomically; a LoRA with a non-finite or overflowing
/// value is refused (naming `path` and the layer) and nothing is written.
pub fn write(path: &Path, lora: &Lora, format: LoraFormat) -> Result<()> {
    check_values(path, &lora.layers)?;
    // Each format's key prefix, names of A and B, and whether alpha is a per-layer tensor.
    let (down, up, alpha_tensor) = match format {
        LoraFormat::Diffusers => ("lora_A.weight", "lora_B.weight", false),
        LoraFormat::Kohya => ("lora_down.weight", "lora_up.weight", true),
        LoraFormat::ComfyUi => ("lora_A.weight", "lora_B.weight", true),
    };
    let prefix = |module: &str| match format {
        LoraFormat::Diffusers => format!("transformer.{module}"),
        LoraFormat::Kohya => kohya_name(module),
        LoraFormat::ComfyUi => format!("diffusion_model.{module}"),
    };
    let mut tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)> = Vec::new();
    for l in &lora.layers {
        let n = prefix(&l.module);
        for (name, f) in [(down, &l.a), (up, &l.b)] {
            tensors.push((
                format!("{n}.{name}"),
                f.dtype,
                f.shape.to_vec(),
                f.bytes.clone(),
            ));
        }
        if alpha_tensor {
            tensors.push((
                format!("{n}.alpha"),
                DType::F32,
                vec![],
                l.alpha.to_le_bytes().to_vec(),
            ));
        }
    }
    let mut meta: HashMap<String, String> = HashMap::new();
    match format {
        LoraFormat::Diffusers => {
            // One `lora_alpha` for the common value, `alpha_pattern` for the others (full paths).
            let common = lora.layers.first().map(|l| l.alpha).unwrap_or(1.0);
            let pattern: serde_json::Map<String, serde_json::Value> = lora
                .layers
                .iter()
                .filter(|l| l.alpha.to_bits() != common.to_bits())
                .map(|l| (l.module.clone(), serde_json::json!(l.alpha)))
                .collect();
            let rank = lora.layers.first().map(|l| l.rank()).unwrap_or(1);
            let m = serde_json::json!({
                "transformer.lora_alpha": common, "transformer.r": rank,
                "transformer.alpha_pattern": pattern, "transformer.peft_type": "LORA",
                "transformer.target_modules": lora.layers.iter().map(|l| l.module.clone()).collect::<Vec<_>>(),
            });
            meta.insert("lora_adapter_metadata".into(), m.to_string());
            meta.insert("format".into(), "pt".into());
        }
        LoraFormat::Kohya => {
            // kohya names drop the dots; record the module paths so v2l can read them back alone.
            let names: BTreeMap<String, String> = lora
                .layers
                .iter()
                .map(|l| (kohya_name(&l.module), l.module.clone()))
                .collect();
            meta.insert(
                KOHYA_MODULES_KEY.into(),
                serde_json::to_string(&names).unwrap_or_default(),
            );
        }
        LoraFormat::ComfyUi => {}
    }
    let bad = |e: safetensors::SafeTensorError| LoraError::Bad {
        path: path.into(),
        message: e.to_string(),
    };
    let views = tensors
        .iter()
        .map(|(k, d, s, b)| {
            safetensors::tensor::TensorView::new(to_st_dtype(*d), s.clone(), b)
                .map(|v| (k.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(bad)?;
    let blob = safetensors::serialize(views, &Some(meta)).map_err(bad)?;
    v2l_contracts::atomic::write_atomic(path, &blob).map_err(|source| LoraError::Io {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Lora {
        let layer = |m: &str, alpha: f32| LoraLayer {
            module: m.into(),
            a: Factor {
                dtype: DType::BF16,
                shape: [2, 3],
                bytes: (0..12u8).collect(),
            },
            b: Factor::from_f32([4, 2], &[0.5, -1.0, 2.0, 3.0, 1e-3, 7.0, -2.5, 0.25]),
            alpha,
        };
        Lora {
            format: LoraFormat::Diffusers,
            layers: vec![
                layer("ff.net.0.proj", 4.0),
                layer("transformer_blocks.0.attn1.to_out.0", 2.0),
            ],
        }
    }

    #[test]
    fn every_format_round_trips_bitwise() {
        let d = tempfile::tempdir().unwrap();
        let mut lora = sample();
        for f in [
            LoraFormat::Diffusers,
            LoraFormat::Kohya,
            LoraFormat::ComfyUi,
            LoraFormat::Diffusers,
        ] {
            let p = d.path().join(format!("{}.safetensors", f.name()));
            write(&p, &lora, f).unwrap();
            let back = read(&p, None).unwrap();
            assert_eq!(back.format, f);
            assert_eq!(back.layers, lora.layers);
            lora = back;
        }
    }

    #[test]
    fn a_rank_above_the_layer_size_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.safetensors");
        let lora = Lora {
            format: LoraFormat::Diffusers,
            layers: vec![LoraLayer {
                module: "attn1.to_q".into(),
                a: Factor::from_f32([64, 32], &[0.0; 64 * 32]),
                b: Factor::from_f32([32, 64], &[0.0; 32 * 64]),
                alpha: 64.0,
            }],
        };
        write(&p, &lora, LoraFormat::Diffusers).unwrap();
        let err = read(&p, None).unwrap_err().to_string();
        assert!(err.contains("not exceed the layer's dimensions"), "{err}");
    }

    #[test]
    fn kohya_names_resolve_against_the_model() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.safetensors");
        write(&p, &sample(), LoraFormat::Kohya).unwrap();
        // Strip v2l's recorded names: a foreign kohya file.
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        safetensors::serialize_to_file(st.tensors(), &None, &p).unwrap();
        let err = read(&p, None).unwrap_err().to_string();
        assert!(
            err.contains("lora_unet_ff_net_0_proj") && err.contains("matches no module"),
            "{err}"
        );
        let modules = vec![
            "ff.net.0.proj".to_string(),
            "transformer_blocks.0.attn1.to_out.0".to_string(),
        ];
        assert_eq!(read(&p, Some(&modules)).unwrap().layers, sample().layers);
    }

    /// Wan LoRAs shared under the Wan repo's module names (musubi-tuner's kohya
    /// `lora_unet_blocks_0_cross_attn_k`, ComfyUI `diffusion_model.blocks.0.self_attn.o`) read
    /// as the diffusers modules, with the same factors and alphas.
    #[test]
    fn wan_original_names_resolve_to_diffusers_modules() {
        let d = tempfile::tempdir().unwrap();
        let with = |names: [&str; 2]| {
            let mut l = sample();
            l.layers[0].module = names[0].into();
            l.layers[1].module = names[1].into();
            l
        };
        let original = with(["blocks.0.cross_attn.k", "blocks.0.self_attn.o"]);
        let modules = vec![
            "blocks.0.attn1.to_out.0".to_string(),
            "blocks.0.attn2.to_k".to_string(),
        ];
        for f in [LoraFormat::Kohya, LoraFormat::ComfyUi] {
            let p = d.path().join(format!("wan_{}.safetensors", f.name()));
            write(&p, &original, f).unwrap();
            // A foreign file: no v2l metadata.
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            safetensors::serialize_to_file(st.tensors(), &None, &p).unwrap();
            let got = read(&p, Some(&modules)).unwrap();
            let by_module = |l: &Lora, m: &str| l.layers.iter().find(|x| x.module == m).cloned();
            for (orig, diff) in [
                ("blocks.0.cross_attn.k", "blocks.0.attn2.to_k"),
                ("blocks.0.self_attn.o", "blocks.0.attn1.to_out.0"),
            ] {
                let mut w = by_module(&original, orig).unwrap();
                w.module = diff.into();
                assert_eq!(by_module(&got, diff), Some(w), "{f:?} {diff}");
            }
            let names: Vec<&str> = got.layers.iter().map(|l| l.module.as_str()).collect();
            assert_eq!(names, ["blocks.0.attn1.to_out.0", "blocks.0.attn2.to_k"]);
        }
    }

    #[test]
    fn rank_mismatch_and_nan_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let mut lora = sample();
        lora.layers[0].b = Factor::from_f32([4, 3], &[0.0; 12]);
        let p = d.path().join("r.safetensors");
        write(&p, &lora, LoraFormat::ComfyUi).unwrap();
        let err = read(&p, None).unwrap_err().to_string();
        assert!(
            err.contains("ranks must agree") && err.contains("ff.net.0.proj"),
            "{err}"
        );

        // A NaN factor: v2l refuses to write it (the check reading applies too), and an
        // overflowing one likewise; nothing is written.
        let mut lora = sample();
        lora.layers[1].b = Factor::from_f32([4, 2], &[0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let q = d.path().join("nan.safetensors");
        let err = write(&q, &lora, LoraFormat::Diffusers)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("NaN or Inf") && err.contains("to_out.0"),
            "{err}"
        );
        lora.layers[1].b = Factor::from_f32([4, 2], &[0.0, 1e30, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let err = write(&q, &lora, LoraFormat::Kohya).unwrap_err().to_string();
        assert!(
            err.contains("beyond ±1e6") && err.contains("to_out.0"),
            "{err}"
        );
        assert!(!q.exists());
    }
}
