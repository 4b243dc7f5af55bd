//! The parts of a SentencePiece model file (`spiece.model`, a protobuf `ModelProto`) a
//! tokenizer needs: pieces with scores and types, the model type, the normaliser's precompiled
//! character map. Field numbers from SentencePiece's `sentencepiece_model.proto`.

use std::path::Path;

use prost::Message;

use crate::error::{Result, RuntimeError};

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<Piece>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct Piece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    /// NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
    #[prost(int32, optional, tag = "3")]
    r#type: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct TrainerSpec {
    /// UNIGRAM 1, BPE 2, WORD 3, CHAR 4.
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct NormalizerSpec {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "2")]
    precompiled_charsmap: Option<Vec<u8>>,
}

/// A piece's type (SentencePiece's `ModelProto.SentencePiece.Type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

/// A SentencePiece unigram model, as read from `spiece.model`.
#[derive(Clone, Debug)]
pub struct SpModel {
    pub pieces: Vec<(String, f64, PieceType)>,
    /// The normaliser's name (`nmt_nfkc` for T5) and its compiled character map.
    pub normalizer: String,
    pub charsmap: Vec<u8>,
}

impl SpModel {
    /// Reads and checks `path`: a unigram model with exactly one unknown piece.
    pub fn read(path: &Path) -> Result<SpModel> {
        let bytes =
            v2l_contracts::input::read_regular(path, v2l_contracts::input::InputKind::Record)
                .map_err(|source| RuntimeError::Io {
                    path: path.into(),
                    source,
                })?;
        let bad = |m: String| RuntimeError::BadFile {
            path: path.into(),
            message: m,
        };
        let m = ModelProto::decode(bytes.as_slice())
            .map_err(|e| bad(format!("not a SentencePiece model ({e})")))?;
        let model_type = m
            .trainer_spec
            .as_ref()
            .and_then(|t| t.model_type)
            .unwrap_or(1);
        if model_type != 1 {
            return Err(bad(format!(
                "is a SentencePiece model of type {model_type} (1 is unigram, T5's; BPE/word/char models are not read)"
            )));
        }
        if m.pieces.is_empty() {
            return Err(bad("holds no pieces: not a SentencePiece model".into()));
        }
        let pieces: Vec<(String, f64, PieceType)> = m
            .pieces
            .into_iter()
            .map(|p| {
                let t = match p.r#type.unwrap_or(1) {
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    _ => PieceType::Normal,
                };
                (
                    p.piece.unwrap_or_default(),
                    f64::from(p.score.unwrap_or(0.0)),
                    t,
                )
            })
            .collect();
        let unknown = pieces.iter().filter(|p| p.2 == PieceType::Unknown).count();
        if unknown != 1 {
            return Err(bad(format!(
                "has {unknown} unknown pieces; a unigram model has exactly one"
            )));
        }
        let spec = m.normalizer_spec.unwrap_or_default();
        Ok(SpModel {
            pieces,
            normalizer: spec.name.unwrap_or_default(),
            charsmap: spec.precompiled_charsmap.unwrap_or_default(),
        })
    }

    /// The id of the unknown piece.
    pub fn unk_id(&self) -> usize {
        self.pieces
            .iter()
            .position(|p| p.2 == PieceType::Unknown)
            .unwrap_or(0)
    }
}
