//! A BERT encoder in tch, computing what transformers' `BertModel` computes in eval mode
//! (no dropout): word + absolute position + token-type (all 0) embeddings, LayerNorm, then
//! post-LayerNorm encoder layers with erf GELU. `hidden_states` returns the embeddings
//! output followed by every layer's output, like `output_hidden_states=True`.
//! Weights come from safetensors only (names with or without the "bert." prefix), in f32.

use std::path::Path;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use super::safetensors_source::SafetensorsSource;
use crate::bail_input;
use crate::error::bad_input;

/// The config.json keys the encoder needs.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub layer_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
}

impl BertConfig {
    /// Reads `config.json` of an HF BERT folder, refusing what the encoder does not compute.
    pub fn from_folder(dir: &Path) -> Result<BertConfig> {
        let path = dir.join("config.json");
        if !path.is_file() {
            bail_input!("{}: no config.json (not an HF model folder)", dir.display());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad_input(format!("{}: invalid JSON: {e}", path.display())))?;
        let int = |key: &str, default: Option<usize>| -> Result<usize> {
            match json.get(key) {
                Some(v) => v.as_u64().map(|v| v as usize).ok_or_else(|| {
                    bad_input(format!("{}: {key} is not a whole number", path.display()))
                }),
                None => default
                    .ok_or_else(|| bad_input(format!("{}: missing key {key}", path.display()))),
            }
        };
        if let Some(model_type) = json.get("model_type").and_then(|v| v.as_str())
            && model_type != "bert"
        {
            bail_input!(
                "{}: model_type is {model_type:?}; amthal's encoder computes BERT only",
                path.display()
            );
        }
        let act = json
            .get("hidden_act")
            .and_then(|v| v.as_str())
            .unwrap_or("gelu");
        if act != "gelu" {
            bail_input!(
                "{}: hidden_act is {act:?}; amthal's BERT encoder supports only \"gelu\" (erf)",
                path.display()
            );
        }
        let position = json
            .get("position_embedding_type")
            .and_then(|v| v.as_str())
            .unwrap_or("absolute");
        if position != "absolute" {
            bail_input!(
                "{}: position_embedding_type is {position:?}; only \"absolute\" is supported",
                path.display()
            );
        }
        let config = BertConfig {
            vocab_size: int("vocab_size", None)?,
            hidden_size: int("hidden_size", None)?,
            num_hidden_layers: int("num_hidden_layers", None)?,
            num_attention_heads: int("num_attention_heads", None)?,
            intermediate_size: int("intermediate_size", None)?,
            layer_norm_eps: json
                .get("layer_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-12),
            max_position_embeddings: int("max_position_embeddings", Some(512))?,
            type_vocab_size: int("type_vocab_size", Some(2))?,
        };
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            bail_input!(
                "{}: hidden_size {} is not a multiple of num_attention_heads {}",
                path.display(),
                config.hidden_size,
                config.num_attention_heads
            );
        }
        Ok(config)
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

struct BertLayer {
    query: Dense,
    key: Dense,
    value: Dense,
    attention_output: Dense,
    attention_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: LayerNorm,
}

/// A BERT encoder (no pooler), f32, inference only.
pub struct BertModel {
    pub config: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<BertLayer>,
    pub device: Device,
}

/// Loads tensors by HF name, with or without the "bert." prefix, checking shapes.
struct Loader<'a> {
    source: &'a SafetensorsSource,
    dir: &'a Path,
    prefix: &'static str,
    device: Device,
}

impl Loader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let expected: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        match self.source.shape(&full) {
            None => bail_input!(
                "{}: tensor {full} is missing from the safetensors weights (expected shape {expected:?})",
                self.dir.display()
            ),
            Some(found) if found != expected.as_slice() => bail_input!(
                "{}: tensor {full} has shape {found:?}, config.json implies {expected:?}",
                self.dir.display()
            ),
            Some(_) => {}
        }
        let tensor = self
            .source
            .load(&full, Kind::Float, self.device)?
            .expect("tensor listed in the index");
        Ok(tensor.set_requires_grad(false))
    }

    fn dense(&self, name: &str, out: usize, input: usize) -> Result<Dense> {
        Ok(Dense {
            weight: self.tensor(&format!("{name}.weight"), &[out, input])?,
            bias: self.tensor(&format!("{name}.bias"), &[out])?,
        })
    }

    /// LayerNorm weights, also under TF-era names gamma/beta.
    fn layer_norm(&self, name: &str, size: usize) -> Result<LayerNorm> {
        let old = format!("{}{name}.gamma", self.prefix);
        let (w, b) = if self.source.shape(&old).is_some() {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        Ok(LayerNorm {
            weight: self.tensor(&format!("{name}.{w}"), &[size])?,
            bias: self.tensor(&format!("{name}.{b}"), &[size])?,
        })
    }
}

impl BertModel {
    /// Loads config.json and the safetensors weights of an HF BERT folder.
    pub fn load(dir: &Path, device: Device) -> Result<BertModel> {
        let config = BertConfig::from_folder(dir)?;
        let source = SafetensorsSource::open_folder(dir)?;
        let prefix = if source.shape("embeddings.word_embeddings.weight").is_some() {
            ""
        } else if source
            .shape("bert.embeddings.word_embeddings.weight")
            .is_some()
        {
            "bert."
        } else {
            bail_input!(
                "{}: tensor embeddings.word_embeddings.weight (or bert.embeddings.word_embeddings.weight) \
                 is missing from the safetensors weights; is this a BERT model?",
                dir.display()
            );
        };
        let loader = Loader {
            source: &source,
            dir,
            prefix,
            device,
        };
        let h = config.hidden_size;
        let word_embeddings =
            loader.tensor("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let position_embeddings = loader.tensor(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        )?;
        let token_type_embeddings = loader.tensor(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        let embeddings_norm = loader.layer_norm("embeddings.LayerNorm", h)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(BertLayer {
                query: loader.dense(&format!("{p}.attention.self.query"), h, h)?,
                key: loader.dense(&format!("{p}.attention.self.key"), h, h)?,
                value: loader.dense(&format!("{p}.attention.self.value"), h, h)?,
                attention_output: loader.dense(&format!("{p}.attention.output.dense"), h, h)?,
                attention_norm: loader.layer_norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                intermediate: loader.dense(
                    &format!("{p}.intermediate.dense"),
                    config.intermediate_size,
                    h,
                )?,
                output: loader.dense(&format!("{p}.output.dense"), h, config.intermediate_size)?,
                output_norm: loader.layer_norm(&format!("{p}.output.LayerNorm"), h)?,
            });
        }
        Ok(BertModel {
            config,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
            device,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer_norm(&self, x: &Tensor, norm: &LayerNorm) -> Tensor {
        x.layer_norm(
            [self.config.hidden_size as i64],
            Some(&norm.weight),
            Some(&norm.bias),
            self.config.layer_norm_eps,
            false,
        )
    }

    /// The embeddings output and each layer's output, every one [B, T, hidden] f32.
    ///
    /// - `input_ids`: [B, T] int64, T at most `max_position_embeddings`.
    /// - `attention_mask`: [B, T], 1 (or true) on real tokens, 0 on padding.
    ///
    /// Token type ids are all 0. Hidden states at padded positions are computed but
    /// meaningless (as in transformers).
    pub fn hidden_states(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Vec<Tensor> {
        self.forward(input_ids, attention_mask, self.layers.len())
    }

    /// Hidden state `index` only (0 = embeddings output), running just the layers it needs.
    pub fn hidden_states_upto(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        index: usize,
    ) -> Tensor {
        assert!(
            index <= self.layers.len(),
            "hidden state {index} out of range"
        );
        self.forward(input_ids, attention_mask, index)
            .pop()
            .expect("at least the embeddings output")
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, layers: usize) -> Vec<Tensor> {
        let _guard = tch::no_grad_guard();
        let (batch, steps) = input_ids.size2().expect("input_ids is [B, T]");
        assert!(
            steps as usize <= self.config.max_position_embeddings,
            "sequence of {steps} tokens exceeds max_position_embeddings {}",
            self.config.max_position_embeddings
        );
        let input_ids = input_ids.to_device(self.device);
        let positions = Tensor::arange(steps, (Kind::Int64, self.device));
        let embedded = Tensor::embedding(&self.word_embeddings, &input_ids, -1, false, false)
            + self.token_type_embeddings.get(0)
            + Tensor::embedding(&self.position_embeddings, &positions, -1, false, false)
                .unsqueeze(0);
        let mut hidden = self.layer_norm(&embedded, &self.embeddings_norm);
        // [B, 1, 1, T] boolean: which keys each query may attend to.
        let mask = attention_mask
            .to_device(self.device)
            .to_kind(Kind::Bool)
            .view([batch, 1, 1, steps]);
        let heads = self.config.num_attention_heads as i64;
        let head_dim = (self.config.hidden_size / self.config.num_attention_heads) as i64;
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        states.push(hidden.shallow_clone());
        for layer in &self.layers[..layers] {
            let split = |x: Tensor| x.view([batch, steps, heads, head_dim]).transpose(1, 2);
            let q = split(layer.query.forward(&hidden));
            let k = split(layer.key.forward(&hidden));
            let v = split(layer.value.forward(&hidden));
            let context = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(&mask),
                0.0,
                false,
                None::<f64>,
                false,
            )
            .transpose(1, 2)
            .contiguous()
            .view([batch, steps, -1]);
            let attention = self.layer_norm(
                &(layer.attention_output.forward(&context) + &hidden),
                &layer.attention_norm,
            );
            let inner = layer.intermediate.forward(&attention).gelu("none");
            hidden = self.layer_norm(
                &(layer.output.forward(&inner) + &attention),
                &layer.output_norm,
            );
            states.push(hidden.shallow_clone());
        }
        states
    }
}
