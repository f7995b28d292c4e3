//! The model's shape and options, from an HF config.json (transformers v4 and v5
//! spellings) or from GGUF metadata (llama.*), as transformers reads them.
//! Anything amthal cannot compute exactly is an error naming the key, never a
//! silently different model.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::bail_input;
use crate::error::bad_input;
use crate::gguf::GgufFile;

/// How rotary position embeddings are scaled (transformers' `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    Dynamic {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        attention_factor: Option<f64>,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

/// A Llama-architecture decoder's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_ids: Vec<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The folder's generation_config.json as read (an object), so that a merged or
    /// fully fine-tuned model written from it keeps the generation defaults (sampling
    /// settings, stop ids) HF's `save_pretrained` keeps; `evaluate` reads them
    /// (`generation_settings.rs`). None for GGUF files and folders without one.
    pub generation_config: Option<Value>,
}

impl LlamaConfig {
    /// Reads `config.json` of an HF model folder.
    pub fn from_hf_file(path: &Path) -> Result<LlamaConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad_input(format!("{}: cannot read: {e}", path.display())))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| bad_input(format!("{}: invalid JSON: {e}", path.display())))?;
        Self::from_hf_json(&json).with_context(|| format!("{}", path.display()))
    }

    /// Parses an HF config (as JSON).
    pub fn from_hf_json(json: &Value) -> Result<LlamaConfig> {
        let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
        let architectures: Vec<&str> = json
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if model_type != "llama" && !architectures.contains(&"LlamaForCausalLM") {
            bail_input!(
                "model_type '{model_type}' (architectures {architectures:?}) is not supported: \
                 amthal runs Llama-architecture models (model_type \"llama\")"
            );
        }
        if let Some(act) = json.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            bail_input!("hidden_act '{act}' is not supported (Llama uses \"silu\")");
        }
        let usize_key = |key: &str| -> Result<usize> {
            json.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| {
                    bad_input(format!("config key '{key}' is missing or not an integer"))
                })
        };
        let hidden_size = usize_key("hidden_size")?;
        let num_attention_heads = usize_key("num_attention_heads")?;
        let num_key_value_heads = match json.get("num_key_value_heads") {
            Some(Value::Null) | None => num_attention_heads,
            Some(_) => usize_key("num_key_value_heads")?,
        };
        let head_dim = match json.get("head_dim") {
            Some(Value::Null) | None => hidden_size / num_attention_heads,
            Some(_) => usize_key("head_dim")?,
        };
        // v5 keeps rope settings in `rope_parameters`; v4 in `rope_theta` + `rope_scaling`.
        let rope = json
            .get("rope_parameters")
            .filter(|v| !v.is_null())
            .or_else(|| json.get("rope_scaling").filter(|v| !v.is_null()));
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| json.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let max_position_embeddings = usize_key("max_position_embeddings").unwrap_or(2048);
        let rope_scaling = parse_rope(rope, json, max_position_embeddings)?;
        if let Some(factor) = rope
            .and_then(|r| r.get("partial_rotary_factor"))
            .or_else(|| json.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            && factor != 1.0
        {
            bail_input!(
                "partial_rotary_factor {factor} is not supported (Llama rotates whole heads)"
            );
        }
        LlamaConfig {
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_hidden_layers: usize_key("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: json
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            vocab_size: usize_key("vocab_size")?,
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias: json
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            mlp_bias: json
                .get("mlp_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_ids: token_ids(json.get("bos_token_id")),
            eos_token_ids: token_ids(json.get("eos_token_id")),
            pad_token_id: token_ids(json.get("pad_token_id")).first().copied(),
            generation_config: None,
        }
        .validated()
    }

    /// Reads the `llama.*` metadata of a GGUF file, as transformers' GGUF loader does.
    pub fn from_gguf(gguf: &GgufFile) -> Result<LlamaConfig> {
        let arch = gguf.get_str("general.architecture").unwrap_or("");
        if arch != "llama" {
            bail_input!(
                "{}: general.architecture '{arch}' is not supported (amthal runs 'llama' GGUF files)",
                gguf.path.display()
            );
        }
        let int = |key: &str| -> Result<usize> {
            gguf.get_i64(&format!("llama.{key}"))
                .map(|v| v as usize)
                .ok_or_else(|| {
                    bad_input(format!(
                        "{}: GGUF metadata 'llama.{key}' is missing",
                        gguf.path.display()
                    ))
                })
        };
        let hidden_size = int("embedding_length")?;
        let num_attention_heads = int("attention.head_count")?;
        let head_dim = int("attention.key_length")
            .or_else(|_| int("rope.dimension_count"))
            .unwrap_or(hidden_size / num_attention_heads);
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => gguf
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(|t| t.len())
                .ok_or_else(|| {
                    bad_input(format!("{}: no llama.vocab_size", gguf.path.display()))
                })?,
        };
        let max_position_embeddings = int("context_length")?;
        let factor = gguf
            .get("llama.rope.scaling.factor")
            .and_then(|v| v.as_f64());
        let rope_scaling = match (gguf.get_str("llama.rope.scaling.type"), factor) {
            (None | Some("none"), _) => RopeScaling::Default,
            (Some("linear"), Some(factor)) => RopeScaling::Linear { factor },
            (Some("yarn"), Some(factor)) => RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: int("rope.scaling.original_context_length")?
                    as f64,
                attention_factor: None,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                truncate: true,
            },
            (Some(other), _) => bail_input!(
                "{}: GGUF llama.rope.scaling.type '{other}' is not supported",
                gguf.path.display()
            ),
        };
        let id = |key: &str| gguf.get_i64(key).filter(|&v| v >= 0).map(|v| v as u32);
        LlamaConfig {
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_hidden_layers: int("block_count")?,
            num_attention_heads,
            num_key_value_heads: int("attention.head_count_kv").unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: gguf
                .get("llama.attention.layer_norm_rms_epsilon")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-5),
            rope_theta: gguf
                .get("llama.rope.freq_base")
                .and_then(|v| v.as_f64())
                .unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings,
            vocab_size,
            // llama.cpp writes the output projection only when it is not the embedding matrix.
            tie_word_embeddings: !gguf.tensors.iter().any(|t| t.name == "output.weight"),
            attention_bias: false,
            mlp_bias: false,
            bos_token_ids: id("tokenizer.ggml.bos_token_id").into_iter().collect(),
            eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
            pad_token_id: id("tokenizer.ggml.padding_token_id"),
            generation_config: None,
        }
        .validated()
    }

    fn validated(self) -> Result<LlamaConfig> {
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            bail_input!("num_attention_heads and num_key_value_heads must be positive");
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail_input!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail_input!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            );
        }
        Ok(self)
    }

    /// The config.json transformers writes for this model (v4 keys, which v5 also reads).
    pub fn to_hf_json(&self) -> Value {
        let ids = |ids: &[u32]| match ids {
            [] => Value::Null,
            [one] => Value::from(*one),
            many => Value::from(many.to_vec()),
        };
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::Default => Value::Null,
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Dynamic { factor } => {
                serde_json::json!({"rope_type": "dynamic", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
            }),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => serde_json::json!({
                "rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
                "attention_factor": attention_factor, "beta_fast": beta_fast, "beta_slow": beta_slow,
                "mscale": mscale, "mscale_all_dim": mscale_all_dim, "truncate": truncate,
            }),
        };
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "initializer_range": 0.02,
            "use_cache": true,
            "bos_token_id": ids(&self.bos_token_ids),
            "eos_token_id": ids(&self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        })
    }
}

fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_rope(
    rope: Option<&Value>,
    json: &Value,
    max_position_embeddings: usize,
) -> Result<RopeScaling> {
    let Some(rope) = rope else {
        return Ok(RopeScaling::Default);
    };
    let kind = rope
        .get("rope_type")
        .or_else(|| rope.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let float = |key: &str| rope.get(key).and_then(Value::as_f64);
    let need = |key: &str| {
        float(key).ok_or_else(|| bad_input(format!("rope scaling '{kind}' needs '{key}'")))
    };
    // transformers prefers a top-level original_max_position_embeddings, then the rope dict's, then max_position_embeddings.
    let original = || {
        json.get("original_max_position_embeddings")
            .and_then(Value::as_f64)
            .or_else(|| float("original_max_position_embeddings"))
            .unwrap_or(max_position_embeddings as f64)
    };
    Ok(match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: original(),
        },
        "yarn" => RopeScaling::Yarn {
            factor: float("factor").unwrap_or(max_position_embeddings as f64 / original()),
            original_max_position_embeddings: original(),
            attention_factor: float("attention_factor"),
            beta_fast: float("beta_fast").filter(|&v| v != 0.0).unwrap_or(32.0),
            beta_slow: float("beta_slow").filter(|&v| v != 0.0).unwrap_or(1.0),
            mscale: float("mscale"),
            mscale_all_dim: float("mscale_all_dim"),
            truncate: rope
                .get("truncate")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        },
        other => bail_input!(
            "rope scaling type '{other}' is not supported (default, linear, dynamic, llama3, yarn are)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 100, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
               "eos_token_id": [2, 7], "bos_token_id": 1})
    }

    #[test]
    fn v4_and_v5_rope_spellings_agree() {
        let mut v4 = base();
        v4["rope_theta"] = json!(500000.0);
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let mut v5 = base();
        v5["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64});
        let (a, b) = (
            LlamaConfig::from_hf_json(&v4).unwrap(),
            LlamaConfig::from_hf_json(&v5).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.head_dim, 16);
        assert_eq!(a.eos_token_ids, vec![2, 7]);
        // And what we write reads back the same.
        assert_eq!(LlamaConfig::from_hf_json(&a.to_hf_json()).unwrap(), a);
    }

    #[test]
    fn unsupported_options_name_the_key() {
        let mut c = base();
        c["model_type"] = json!("gpt2");
        c["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = format!("{:#}", LlamaConfig::from_hf_json(&c).unwrap_err());
        assert!(e.contains("model_type 'gpt2'"), "{e}");
        let mut c = base();
        c["rope_scaling"] = json!({"type": "longrope", "factor": 2.0});
        let e = format!("{:#}", LlamaConfig::from_hf_json(&c).unwrap_err());
        assert!(e.contains("rope scaling type 'longrope'"), "{e}");
        let mut c = base();
        c["hidden_act"] = json!("gelu");
        assert!(
            format!("{:#}", LlamaConfig::from_hf_json(&c).unwrap_err())
                .contains("hidden_act 'gelu'")
        );
        let mut c = base();
        c.as_object_mut().unwrap().remove("intermediate_size");
        assert!(
            format!("{:#}", LlamaConfig::from_hf_json(&c).unwrap_err())
                .contains("'intermediate_size'")
        );
    }
}
