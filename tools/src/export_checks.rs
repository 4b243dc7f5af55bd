//! The runtime's readers as the exporter's [`PartChecks`]: an export directory only ever holds
//! parts the runtime can load (a scheduler config its sampler reads, a tokenizer whose ids fit
//! the encoder, an image processor it understands, a LiLoRA file that fits the DiT).

use std::path::Path;

use v2l_contracts::{Family, LinearInfo};
use v2l_export::pipeline::{LiLoraSizes, PartChecks};

/// [`PartChecks`] by the runtime's own readers.
pub struct ExportChecks;

impl PartChecks for ExportChecks {
    fn scheduler(&self, family: Family, config: &Path) -> Result<(), String> {
        let read = match family {
            Family::Wan => v2l_runtime::flow::FlowScheduler::from_file(config).map(drop),
            Family::CogVideoX => {
                v2l_runtime::scheduler::SchedulerConfig::from_file(config).map(drop)
            }
        };
        read.map_err(|e| e.to_string())
    }

    fn tokenizer(&self, dir: &Path, vocab_size: usize) -> Result<(), String> {
        let tok = v2l_runtime::text::tokenizer::PromptTokenizer::from_dir(dir)
            .map_err(|e| e.to_string())?;
        let probe = tok.ids("<extra_id_0> a").map_err(|e| e.to_string())?;
        match probe.iter().find(|&&i| i < 0 || i as usize >= vocab_size) {
            Some(id) => Err(format!(
                "{}: gives token id {id}, outside the text encoder's vocabulary of {vocab_size}",
                dir.display()
            )),
            None => Ok(()),
        }
    }

    fn image_processor(&self, config: &Path) -> Result<(), String> {
        v2l_runtime::image_preprocess::ClipPreprocess::from_file(config)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn lilora(&self, file: &Path, linears: &[LinearInfo]) -> Result<LiLoraSizes, String> {
        let aux = v2l_runtime::lora::lilora::LiLora::load(file, linears)
            .map_err(|e| v2l_runtime::RuntimeError::from(e).to_string())?;
        Ok(LiLoraSizes {
            a: aux.a,
            b: aux.b,
            layers: aux.layers.len(),
        })
    }
}
