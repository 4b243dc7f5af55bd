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
