//! LoRA module names people share that are not diffusers': Wan LoRAs trained with the Wan repo
//! or musubi-tuner name the original modules (`blocks.0.cross_attn.k`, kohya
//! `lora_unet_blocks_0_cross_attn_k`, ComfyUI `diffusion_model.blocks.0.cross_attn.k`) where
//! diffusers has `blocks.0.attn2.to_k`. The table is diffusers' own
//! (`_convert_non_diffusers_wan_lora_to_diffusers`, diffusers 0.42.1).

use std::collections::HashMap;

/// The Wan repo's name of a diffusers `WanTransformer3DModel` module, if it has another one.
pub fn wan_original(module: &str) -> Option<String> {
    const TOP: [(&str, &str); 8] = [
        (
            "condition_embedder.text_embedder.linear_1",
            "text_embedding.0",
        ),
        (
            "condition_embedder.text_embedder.linear_2",
            "text_embedding.2",
        ),
        (
            "condition_embedder.time_embedder.linear_1",
            "time_embedding.0",
        ),
        (
            "condition_embedder.time_embedder.linear_2",
            "time_embedding.2",
        ),
        ("condition_embedder.time_proj", "time_projection.1"),
        (
            "condition_embedder.image_embedder.ff.net.0.proj",
            "img_emb.proj.1",
        ),
        (
            "condition_embedder.image_embedder.ff.net.2",
            "img_emb.proj.3",
        ),
        ("proj_out", "head.head"),
    ];
    if let Some((_, o)) = TOP.iter().find(|(d, _)| *d == module) {
        return Some(o.to_string());
    }
    let rest = module.strip_prefix("blocks.")?;
    let (index, leaf) = rest.split_once('.')?;
    index.parse::<usize>().ok()?;
    let leaf = match leaf {
        "ffn.net.0.proj" => "ffn.0".to_string(),
        "ffn.net.2" => "ffn.2".to_string(),
        _ => {
            let (attn, proj) = leaf.split_once('.')?;
            let attn = match attn {
                "attn1" => "self_attn",
                "attn2" => "cross_attn",
                _ => return None,
            };
            let proj = match proj {
                "to_q" => "q",
                "to_k" => "k",
                "to_v" => "v",
                "to_out.0" => "o",
                "add_k_proj" => "k_img",
                "add_v_proj" => "v_img",
                _ => return None,
            };
            format!("{attn}.{proj}")
        }
    };
    Some(format!("blocks.{index}.{leaf}"))
}

/// Other names → the model's module, for a model whose modules are `modules`: Wan's original
/// names when the model is a Wan DiT (`blocks.N.attn1.*`), none otherwise (CogVideoX's
/// `proj_out` is not Wan's `head.head`).
pub fn aliases(modules: &[String]) -> HashMap<String, String> {
    let wan = modules
        .iter()
        .any(|m| m.starts_with("blocks.") && m.contains(".attn1."));
    if !wan {
        return HashMap::new();
    }
    modules
        .iter()
        .filter_map(|m| wan_original(m).map(|o| (o, m.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan_names_follow_diffusers_conversion() {
        for (d, o) in [
            ("blocks.0.attn1.to_q", "blocks.0.self_attn.q"),
            ("blocks.12.attn1.to_out.0", "blocks.12.self_attn.o"),
            ("blocks.3.attn2.to_k", "blocks.3.cross_attn.k"),
            ("blocks.3.attn2.add_k_proj", "blocks.3.cross_attn.k_img"),
            ("blocks.3.attn2.add_v_proj", "blocks.3.cross_attn.v_img"),
            ("blocks.39.ffn.net.0.proj", "blocks.39.ffn.0"),
            ("blocks.39.ffn.net.2", "blocks.39.ffn.2"),
            ("condition_embedder.time_proj", "time_projection.1"),
            (
                "condition_embedder.image_embedder.ff.net.2",
                "img_emb.proj.3",
            ),
            ("proj_out", "head.head"),
        ] {
            assert_eq!(wan_original(d).as_deref(), Some(o), "{d}");
        }
        assert_eq!(wan_original("blocks.x.attn1.to_q"), None);
        assert_eq!(wan_original("transformer_blocks.0.attn1.to_q"), None);
    }

    #[test]
    fn only_wan_models_get_aliases() {
        let cog = vec![
            "transformer_blocks.0.attn1.to_q".to_string(),
            "proj_out".to_string(),
        ];
        assert!(aliases(&cog).is_empty());
        let wan = vec!["blocks.0.attn1.to_q".to_string(), "proj_out".to_string()];
        let a = aliases(&wan);
        assert_eq!(a["blocks.0.self_attn.q"], "blocks.0.attn1.to_q");
        assert_eq!(a["head.head"], "proj_out");
    }
}
