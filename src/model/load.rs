//! Building a `Llama` from a model source: the config, then every expected tensor by
//! its HF name, checked against the config's shapes. Missing, unexpected or
//! mis-shaped tensors are errors naming the tensor (and both shapes).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::config::LlamaConfig;
use super::gguf_source::GgufSource;
use super::linear::{Linear, Weight};
use super::llama::{Attention, DecoderLayer, Llama, Mlp, PROJECTIONS};
use super::quantized::{Quantization, QuantizedWeight};
use super::rope::Rope;
use super::safetensors_source::SafetensorsSource;
use crate::bail_input;
use crate::gguf::GgufFile;
use crate::model_source::ModelSource;

/// Where and in which dtype to put the weights, and whether to keep the projections
/// quantized.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub device: Device,
    pub kind: Kind,
    /// `--quantize`: every decoder projection (q/k/v/o, gate/up/down) is quantized as
    /// it arrives on the device, so the dense model is never there whole.
    pub quantize: Option<Quantization>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            quantize: None,
        }
    }
}

/// Tensors by HF name, from whichever file format the model came in.
pub enum WeightSource {
    Safetensors(SafetensorsSource),
    Gguf(GgufSource),
}

impl WeightSource {
    fn names(&self) -> Vec<String> {
        match self {
            WeightSource::Safetensors(s) => s.names().cloned().collect(),
            WeightSource::Gguf(s) => s.names().cloned().collect(),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<i64>> {
        match self {
            WeightSource::Safetensors(s) => s.shape(name).map(<[i64]>::to_vec),
            WeightSource::Gguf(s) => s.shape(name),
        }
    }

    fn load(&self, name: &str, options: LoadOptions) -> Result<Option<Tensor>> {
        match self {
            WeightSource::Safetensors(s) => s.load(name, options.kind, options.device),
            WeightSource::Gguf(s) => s.load(name, options.kind, options.device),
        }
    }

    /// Loads `names` in order, each passed through `keep` as soon as it is on the
    /// device (where a projection gets quantized); safetensors files are read ahead on
    /// a second thread, so the disk stays busy while each tensor is copied.
    fn load_all(
        &self,
        names: &[&str],
        options: LoadOptions,
        keep: &dyn Fn(&str, Tensor) -> Weight,
    ) -> Result<HashMap<String, Weight>> {
        let consumed = AtomicUsize::new(0);
        let load_one = |index: usize, name: &str| -> Result<(String, Weight)> {
            let tensor = self.load(name, options)?.expect("presence checked before");
            let kept = keep(name, tensor);
            consumed.store(index + 1, Ordering::Release);
            Ok((name.to_string(), kept))
        };
        match self {
            WeightSource::Safetensors(source) => std::thread::scope(|scope| {
                let reader = scope.spawn(|| source.read_ahead(names, &consumed));
                let loaded = names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| load_one(i, name))
                    .collect::<Result<HashMap<_, _>>>();
                // Let the reader finish (it stops early once everything is consumed).
                consumed.store(names.len(), Ordering::Release);
                let _ = reader.join();
                loaded
            }),
            WeightSource::Gguf(_) => names
                .iter()
                .enumerate()
                .map(|(i, name)| load_one(i, name))
                .collect(),
        }
    }
}

/// The config and weight source of a model.
pub fn open_model(source: &ModelSource) -> Result<(LlamaConfig, WeightSource)> {
    match source {
        ModelSource::Gguf(path) => {
            let gguf = GgufFile::open(path)?;
            let config = LlamaConfig::from_gguf(&gguf)?;
            let weights = GgufSource::open(gguf, &config)?;
            Ok((config, WeightSource::Gguf(weights)))
        }
        ModelSource::HfFolder(dir) => {
            let config_path = dir.join("config.json");
            if !config_path.is_file() {
                bail_input!("{}: no config.json", dir.display());
            }
            let mut config = LlamaConfig::from_hf_file(&config_path)?;
            // Kept to be written back (an unreadable one is `evaluate`'s to refuse).
            config.generation_config = std::fs::read_to_string(dir.join("generation_config.json"))
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .filter(serde_json::Value::is_object);
            let weights = SafetensorsSource::open_folder(dir)?;
            Ok((config, WeightSource::Safetensors(weights)))
        }
    }
}

/// Loads a model with frozen (no-grad) weights in `options.kind` on `options.device`.
pub fn load_llama(source: &ModelSource, options: LoadOptions) -> Result<Llama> {
    let (config, weights) = open_model(source)?;
    build_llama(config, &weights, options, &source.display())
}

/// The tensors a config calls for, with their shapes.
pub fn expected_tensors(config: &LlamaConfig) -> Vec<(String, Vec<i64>)> {
    let h = config.hidden_size as i64;
    let i = config.intermediate_size as i64;
    let q = (config.num_attention_heads * config.head_dim) as i64;
    let kv = (config.num_key_value_heads * config.head_dim) as i64;
    let v = config.vocab_size as i64;
    let mut expected = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for layer in 0..config.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        expected.push((format!("{p}.input_layernorm.weight"), vec![h]));
        expected.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        let projections = [
            ("self_attn.q_proj", q, h, config.attention_bias),
            ("self_attn.k_proj", kv, h, config.attention_bias),
            ("self_attn.v_proj", kv, h, config.attention_bias),
            ("self_attn.o_proj", h, q, config.attention_bias),
            ("mlp.gate_proj", i, h, config.mlp_bias),
            ("mlp.up_proj", i, h, config.mlp_bias),
            ("mlp.down_proj", h, i, config.mlp_bias),
        ];
        for (name, out, inp, bias) in projections {
            expected.push((format!("{p}.{name}.weight"), vec![out, inp]));
            if bias {
                expected.push((format!("{p}.{name}.bias"), vec![out]));
            }
        }
    }
    expected.push(("model.norm.weight".to_string(), vec![h]));
    if !config.tie_word_embeddings {
        expected.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    expected
}

/// Whether `name` is a decoder projection's weight (what `--quantize` stores quantized;
/// embeddings, norms, biases and lm_head stay dense, as bitsandbytes leaves them).
pub fn is_projection_weight(name: &str) -> bool {
    name.starts_with("model.layers.")
        && PROJECTIONS
            .iter()
            .any(|projection| name.ends_with(&format!(".{projection}.weight")))
}

fn build_llama(
    config: LlamaConfig,
    weights: &WeightSource,
    options: LoadOptions,
    origin: &str,
) -> Result<Llama> {
    let expected = expected_tensors(&config);
    let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let unexpected: Vec<String> = weights
        .names()
        .into_iter()
        .filter(|n| !expected_names.contains(n.as_str()))
        // Harmless extras: a tied head saved anyway, rotary caches from old checkpoints.
        .filter(|n| !(config.tie_word_embeddings && n == "lm_head.weight"))
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .collect();
    if !unexpected.is_empty() {
        bail_input!(
            "{origin}: unexpected tensor(s) for this config: {}{}",
            unexpected
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if unexpected.len() > 5 {
                format!(" and {} more", unexpected.len() - 5)
            } else {
                String::new()
            }
        );
    }
    for (name, shape) in &expected {
        match weights.shape(name) {
            None => bail_input!("{origin}: missing tensor {name} (expected shape {shape:?})"),
            Some(found) if &found != shape => bail_input!(
                "{origin}: tensor {name} has shape {found:?} but the config calls for {shape:?}"
            ),
            Some(_) => {}
        }
    }
    let names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let keep = |name: &str, tensor: Tensor| -> Weight {
        match options.quantize {
            Some(quantization) if is_projection_weight(name) => {
                Weight::Quantized(Box::new(QuantizedWeight::new(&tensor, quantization)))
            }
            _ => Weight::Dense(tensor),
        }
    };
    let loaded = std::cell::RefCell::new(weights.load_all(&names, options, &keep)?);
    let take_weight = |name: &str| -> Weight {
        loaded
            .borrow_mut()
            .remove(name)
            .expect("every expected tensor was loaded")
    };
    let take = |name: &str| -> Result<Tensor> {
        match take_weight(name) {
            Weight::Dense(tensor) => Ok(tensor),
            Weight::Quantized(_) => unreachable!("only projection weights are quantized"),
        }
    };
    let linear = |prefix: &str, bias: bool| -> Result<Linear> {
        let weight = take_weight(&format!("{prefix}.weight"));
        let bias = if bias {
            Some(take(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            lora: None,
        })
    };
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for layer in 0..config.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        let (ab, mb) = (config.attention_bias, config.mlp_bias);
        layers.push(DecoderLayer {
            input_layernorm: take(&format!("{p}.input_layernorm.weight"))?,
            self_attn: Attention {
                q_proj: linear(&format!("{p}.self_attn.q_proj"), ab)?,
                k_proj: linear(&format!("{p}.self_attn.k_proj"), ab)?,
                v_proj: linear(&format!("{p}.self_attn.v_proj"), ab)?,
                o_proj: linear(&format!("{p}.self_attn.o_proj"), ab)?,
                qkv: None,
            },
            post_attention_layernorm: take(&format!("{p}.post_attention_layernorm.weight"))?,
            mlp: Mlp {
                gate_proj: linear(&format!("{p}.mlp.gate_proj"), mb)?,
                up_proj: linear(&format!("{p}.mlp.up_proj"), mb)?,
                down_proj: linear(&format!("{p}.mlp.down_proj"), mb)?,
                gate_up: None,
            },
        });
    }
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(take("lm_head.weight")?)
    };
    Ok(Llama {
        embed_tokens: take("model.embed_tokens.weight")?,
        norm: take("model.norm.weight")?,
        layers,
        lm_head,
        rope: Rope::new(&config, options.device).with_matrices_in(options.kind),
        device: options.device,
        kind: options.kind,
        fused_norm: false,
        quantization: options.quantize,
        decode_folds: false,
        config,
    })
}
