//! The DiT graphs an engine bundle holds beside the export's: one per precision below fp32
//! (`int8`), one per LoRA strategy that keeps a single session (`bound`, `unfused`), and, where
//! the engine calls v2l's attention operator, each one's twin on ONNX Runtime's attention
//! (`unfused.ort`) for CPUs without the kernel. Typed here, stored in `bundle.json` by those
//! names.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::bundle::{Precision, Strategy};

/// What a variant graph computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VariantGraph {
    /// The DiT at this precision (below fp32), LoRAs fused into its weights.
    Precision(Precision),
    /// The graph a LoRA strategy runs: `bound` (targeted weights are inputs) or `unfused` (a
    /// low-rank branch per targeted layer).
    Strategy(Strategy),
}

/// One variant: its graph, on v2l's attention operator or (`ort_twin`) on ONNX Runtime's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DitVariant {
    pub graph: VariantGraph,
    pub ort_twin: bool,
}

impl DitVariant {
    pub fn of(graph: VariantGraph) -> DitVariant {
        DitVariant {
            graph,
            ort_twin: false,
        }
    }

    /// This variant's twin on ONNX Runtime's attention.
    pub fn twin(self) -> DitVariant {
        DitVariant {
            ort_twin: true,
            ..self
        }
    }
}

impl fmt::Display for DitVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.graph {
            VariantGraph::Precision(p) => p.name(),
            VariantGraph::Strategy(s) => s.name(),
        };
        match self.ort_twin {
            true => write!(f, "{name}.ort"),
            false => f.write_str(name),
        }
    }
}

impl FromStr for DitVariant {
    type Err = String;

    fn from_str(s: &str) -> Result<DitVariant, String> {
        let (name, ort_twin) = match s.strip_suffix(".ort") {
            Some(n) => (n, true),
            None => (s, false),
        };
        let graph = match name {
            "bound" => VariantGraph::Strategy(Strategy::Bound),
            "unfused" => VariantGraph::Strategy(Strategy::Unfused),
            "fp16" => VariantGraph::Precision(Precision::Fp16),
            "bf16" => VariantGraph::Precision(Precision::Bf16),
            "int8" => VariantGraph::Precision(Precision::Int8),
            "int4" => VariantGraph::Precision(Precision::Int4),
            _ => {
                return Err(format!(
                    "unknown DiT variant `{s}`: expected a precision below fp32 (fp16, bf16, int8, int4) or a strategy (bound, unfused), optionally with `.ort`"
                ))
            }
        };
        Ok(DitVariant { graph, ort_twin })
    }
}

impl Serialize for DitVariant {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DitVariant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<DitVariant, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The bundle's variant graphs: variant → file name (one of the bundle's hashed parts).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DitVariants(BTreeMap<DitVariant, String>);

impl DitVariants {
    pub fn insert(&mut self, variant: DitVariant, file: impl Into<String>) {
        self.0.insert(variant, file.into());
    }

    /// The file of `variant`.
    pub fn get(&self, variant: DitVariant) -> Option<&str> {
        self.0.get(&variant).map(String::as_str)
    }

    /// The file of `graph` on v2l's attention (`ort_twin` false) or ONNX Runtime's.
    pub fn file(&self, graph: VariantGraph, ort_twin: bool) -> Option<&str> {
        self.get(DitVariant { graph, ort_twin })
    }

    /// Whether the bundle holds `graph` (on either attention).
    pub fn has(&self, graph: VariantGraph) -> bool {
        self.0.keys().any(|v| v.graph == graph)
    }

    /// Whether the bundle holds ONNX Runtime attention twins.
    pub fn has_ort_twins(&self) -> bool {
        self.0.keys().any(|v| v.ort_twin)
    }

    pub fn iter(&self) -> impl Iterator<Item = (DitVariant, &str)> {
        self.0.iter().map(|(v, f)| (*v, f.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_are_stored_by_their_names() {
        for name in ["int8", "bf16", "unfused", "bound", "unfused.ort", "int8.ort"] {
            let v: DitVariant = name.parse().expect("a known variant");
            assert_eq!(v.to_string(), name);
        }
        for bad in ["fused", "fp32", "unfused.trt", "", "../x.onnx"] {
            assert!(bad.parse::<DitVariant>().is_err(), "{bad}");
        }
        let mut vs = DitVariants::default();
        let unfused = VariantGraph::Strategy(Strategy::Unfused);
        vs.insert(DitVariant::of(unfused), "dit_unfused.onnx");
        vs.insert(DitVariant::of(unfused).twin(), "dit_unfused_ort.onnx");
        let json = serde_json::to_string(&vs).expect("serialises");
        assert_eq!(
            json,
            r#"{"unfused":"dit_unfused.onnx","unfused.ort":"dit_unfused_ort.onnx"}"#
        );
        let back: DitVariants = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, vs);
        assert_eq!(back.file(unfused, true), Some("dit_unfused_ort.onnx"));
        assert!(back.has_ort_twins() && back.has(unfused));
        let err = serde_json::from_str::<DitVariants>(r#"{"fast":"x.onnx"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown DiT variant `fast`"), "{err}");
    }
}
