//! Element types shared by checkpoints, ONNX tensors, engine weights and the records that
//! describe them (`manifest.json`'s `weight_dtype`), stored by name (`f32`, `bf16`, …).

/// An element type v2l stores weights or activations in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    U8,
    /// Quantised weights (int8 engines).
    I8,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 | DType::I8 | DType::Bool => 1,
        }
    }

    /// The `TensorProto.DataType` code.
    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::BF16 => 16,
        }
    }

    /// The inverse of [`DType::onnx_code`].
    pub fn from_onnx_code(code: i32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.onnx_code() == code)
    }

    const ALL: [DType; 9] = [
        DType::F32,
        DType::U8,
        DType::I8,
        DType::I32,
        DType::I64,
        DType::Bool,
        DType::F16,
        DType::F64,
        DType::BF16,
    ];

    /// Floating types that weights may be stored in.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::I8 => "i8",
            DType::Bool => "bool",
        }
    }
}

impl DType {
    /// The type [`DType::name`] names.
    pub fn parse(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for DType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for DType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DType, D::Error> {
        let name = String::deserialize(d)?;
        DType::parse(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{name}` is not an element type (f32, f16, bf16, f64, i64, i32, u8, i8, bool)"
            ))
        })
    }
}

/// How a quantised engine stores its linear weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightQuant {
    /// `DynamicQuantizeMatMul`: int8 per output channel, activations u8 per tensor. Engines
    /// compiled before [`WeightQuant::Int8U8`] store this; ONNX Runtime's u8·s8 kernel on CPUs
    /// without VNNI saturates on it (`v2l_runtime::cpu`), so it is read, no longer written.
    Int8,
    /// `DynamicQuantizeMatMul` with the same symmetric int8 codes stored as u8 (`q + 128`,
    /// zero point 128 per output channel): ONNX Runtime then runs its u8·u8 kernel, whose
    /// int16 operands and int32 pair sums cannot saturate on any x86-64 CPU. Same values and
    /// accuracy as [`WeightQuant::Int8`]; about half its GEMM speed on VNNI CPUs
    /// (docs/precision.md, "int8 on every CPU").
    Int8U8,
    /// `MatMulNBits`, 4 bits in blocks of 32.
    Int4,
    /// `MatMulNBits`, 8 bits in blocks of 32 (`ACCURACY_8BIT` in `v2l_graphs`): for the conditioning
    /// linears of an integer engine (one row per sample, a memory-bound GEMV whose error
    /// scales every token), at 1.125 bytes a weight instead of f32's 4.
    Int8Block,
}

impl WeightQuant {
    /// The name in a bundle's target table (`dtype`).
    pub fn name(self) -> &'static str {
        match self {
            WeightQuant::Int8 => "i8",
            WeightQuant::Int8U8 => "u8",
            WeightQuant::Int4 => "i4",
            WeightQuant::Int8Block => "i8b",
        }
    }

    pub fn parse(name: &str) -> Option<WeightQuant> {
        [
            WeightQuant::Int8,
            WeightQuant::Int8U8,
            WeightQuant::Int4,
            WeightQuant::Int8Block,
        ]
        .into_iter()
        .find(|q| q.name() == name)
    }

    /// Names of the quantised weight and its scales that replace the f32 initializer `weight`
    /// (`<module>.weight`): int8 `[in, out]` + `[out]`; int4 `[out, blocks, 16]` u8 +
    /// `[out·blocks]`.
    pub fn names(self, weight: &str) -> [String; 2] {
        match self {
            WeightQuant::Int8 => [format!("{weight}.int8"), format!("{weight}.scale")],
            WeightQuant::Int8U8 => [format!("{weight}.u8"), format!("{weight}.scale")],
            WeightQuant::Int4 => [format!("{weight}.int4"), format!("{weight}.int4_scale")],
            WeightQuant::Int8Block => [format!("{weight}.q8b"), format!("{weight}.q8b_scale")],
        }
    }

    /// Bits a code holds.
    pub fn bits(self) -> u32 {
        match self {
            WeightQuant::Int4 => 4,
            WeightQuant::Int8 | WeightQuant::Int8U8 | WeightQuant::Int8Block => 8,
        }
    }
}

/// How an engine stores one LoRA-targetable weight: its bundle's target table (`dtype`), by
/// name (`f32`, `bf16`, `u8`, `i4`, `qdq`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    Float(DType),
    Quantized(WeightQuant),
    /// f32, quantised by the backend through Q/DQ with per-channel scales the engine carries
    /// (`crate::io::QdqNames`): a fused weight brings its recomputed scales.
    Qdq,
}

impl Stored {
    pub fn parse(name: &str) -> Option<Stored> {
        if name == Stored::Qdq.name() {
            return Some(Stored::Qdq);
        }
        WeightQuant::parse(name).map(Stored::Quantized).or_else(|| {
            DType::parse(name)
                .filter(|d| d.is_float())
                .map(Stored::Float)
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Stored::Float(d) => d.name(),
            Stored::Quantized(q) => q.name(),
            Stored::Qdq => "qdq",
        }
    }
}

impl serde::Serialize for Stored {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Stored {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Stored, D::Error> {
        let s = String::deserialize(d)?;
        Stored::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown stored weight type `{s}`: expected a float type (f32, f16, bf16), a quantisation (i8, u8, i4, i8b) or qdq"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_are_stored_by_name() {
        for d in DType::ALL {
            let text = serde_json::to_string(&d).unwrap();
            assert_eq!(text, format!("\"{}\"", d.name()));
            assert_eq!(serde_json::from_str::<DType>(&text).unwrap(), d);
        }
        assert!(serde_json::from_str::<DType>("\"f8\"").is_err());
    }
}
