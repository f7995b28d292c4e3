//! `amthal export --format gguf`: a model (an adapter folded in) as one GGUF file that
//! llama.cpp and Ollama load, with an Ollama Modelfile beside it.
//!
//! What llama.cpp's `convert_hf_to_gguf.py` + `llama-quantize` would write: `llama.*`
//! architecture metadata, the tokenizer (`vocab`), the chat template, llama.cpp's
//! tensor names, q/k rows permuted into llama.cpp's interleaved rotary layout, norms
//! in f32, and the other weights in the chosen type (`ExportQuant`).

pub mod ggml_quant;
pub mod gguf_writer;
pub mod imatrix;
pub mod lora_gguf;
pub mod modelfile;
pub mod vocab;
pub mod weighted_quant;

use std::path::Path;

use anyhow::Result;
use tch::{Kind, Tensor};

use self::ggml_quant::{QK_K, encode, ggml_type};
use self::gguf_writer::{TensorEntry, write_gguf};
use self::imatrix::ImportanceMatrix;
use self::weighted_quant::encode_with_importance;
use crate::bail_input;
use crate::gguf::{GgufFile, Value};
use crate::model::Llama;
use crate::model::config::RopeScaling;
use crate::model::rope::llama3_frequency_factors;
use crate::model_source::ModelSource;
use crate::tokenizer::ModelTokenizer;

/// The weights' type in the file (`--quant`), with llama.cpp's `general.file_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportQuant {
    /// No rounding (llama.cpp's ALL_F32): four bytes a weight.
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for output.weight and for attn_v and
    /// ffn_down in the layers `use_more_bits` picks.
    #[value(name = "q4_k_m")]
    Q4KM,
}

impl ExportQuant {
    fn file_type(self) -> u32 {
        match self {
            ExportQuant::F32 => 0,
            ExportQuant::F16 => 1,
            ExportQuant::Q8_0 => 7,
            ExportQuant::Q4KM => 15,
            ExportQuant::Bf16 => 32,
        }
    }
}

/// llama.cpp's tensor name for an HF one.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let module = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{module}.{kind}"))
}

/// llama.cpp's `use_more_bits`: the layers where Q4_K_M keeps attn_v and ffn_down in
/// Q6_K (the first and last eighth, and every third one between).
fn use_more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer as i64 - layers as i64 / 8) % 3 == 2
}

/// The type a tensor is written in. K-quants need rows of whole 256-value blocks and
/// Q8_0 / Q5_0 of 32-value blocks; a row that does not divide falls back as
/// llama-quantize's `llama_tensor_get_type` does: Q4_K to Q5_0, Q6_K to Q8_0, and a
/// row that the fallback's 32-value blocks do not divide either to F16. `tied`: the embedding is also the output
/// projection, so it gets the output's type (as llama-quantize does).
fn tensor_type(quant: ExportQuant, name: &str, row: usize, layers: usize, tied: bool) -> u32 {
    let layer: Option<usize> = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse().ok());
    let wanted = match quant {
        ExportQuant::F32 => ggml_type::F32,
        ExportQuant::F16 => ggml_type::F16,
        ExportQuant::Bf16 => ggml_type::BF16,
        ExportQuant::Q8_0 => ggml_type::Q8_0,
        ExportQuant::Q4KM => {
            let more_bits = (name.contains("attn_v") || name.contains("ffn_down"))
                && layer.is_some_and(|l| use_more_bits(l, layers));
            let output = name == "output.weight" || (tied && name == "token_embd.weight");
            if output || more_bits {
                ggml_type::Q6_K
            } else {
                ggml_type::Q4_K
            }
        }
    };
    let fitting = match wanted {
        ggml_type::Q4_K if !row.is_multiple_of(QK_K) => ggml_type::Q5_0,
        ggml_type::Q6_K if !row.is_multiple_of(QK_K) => ggml_type::Q8_0,
        other => other,
    };
    match fitting {
        ggml_type::Q8_0 | ggml_type::Q5_0 if !row.is_multiple_of(32) => ggml_type::F16,
        other => other,
    }
}

/// llama.cpp's `permute` of q/k rows: transformers' rotate-half layout to llama.cpp's
/// interleaved pairs (the inverse of `gguf_source::reverse_permute`).
pub(crate) fn permute(weights: &Tensor, heads: i64) -> Tensor {
    let size = weights.size();
    let half = size[0] / heads / 2;
    let mut shape = vec![heads, 2, half];
    shape.extend_from_slice(&size[1..]);
    weights
        .reshape(shape.as_slice())
        .transpose(1, 2)
        .reshape(size.as_slice())
}

/// What was written, for the summary line.
pub struct ExportReport {
    /// (ggml type name, tensor count) in first-seen order.
    pub types: Vec<(String, usize)>,
    pub bytes: u64,
}

/// Writes `model` (dense; fold adapters first) and its tokenizer to `path` as GGUF.
/// With `importance`, the projections it measured are quantized with their blocks
/// weighted by it (llama-quantize's `--imatrix`; Q8_0, F16 and BF16 have no weighted
/// route and are written as without it).
pub fn export_gguf(
    model: &Llama,
    tokenizer: &ModelTokenizer,
    source: &ModelSource,
    name: &str,
    quant: ExportQuant,
    importance: Option<&ImportanceMatrix>,
    path: &Path,
) -> Result<ExportReport> {
    let config = &model.config;
    let mut metadata = architecture_metadata(model, name, quant)?;
    if let Some(matrix) = importance {
        // The keys llama-quantize writes for an importance matrix (counts as UINT32).
        let count = |n: usize| Value::U32(u32::try_from(n).unwrap_or(u32::MAX));
        metadata.extend([
            (
                "quantize.imatrix.dataset".to_string(),
                Value::String(matrix.dataset.clone()),
            ),
            (
                "quantize.imatrix.entries_count".to_string(),
                count(matrix.entries()),
            ),
            (
                "quantize.imatrix.chunks_count".to_string(),
                count(matrix.sequences),
            ),
        ]);
    }
    match source {
        // A GGUF model keeps its tokenizer keys exactly (llama.cpp wrote them).
        ModelSource::Gguf(file) => {
            let gguf = GgufFile::open(file)?;
            metadata.extend(
                gguf.metadata
                    .iter()
                    .filter(|(key, _)| key.starts_with("tokenizer."))
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        ModelSource::HfFolder(_) => {
            metadata.extend(vocab::tokenizer_metadata(tokenizer, config.vocab_size)?)
        }
    }
    let layers = config.num_hidden_layers;
    let mut tensors = Vec::new();
    let mut types: Vec<(String, usize)> = Vec::new();
    if let Some(factors) = llama3_frequency_factors(config) {
        tensors.push(TensorEntry {
            name: "rope_freqs.weight".into(),
            dims: vec![factors.len() as u64],
            ggml_type: ggml_type::F32,
            data: encode(ggml_type::F32, &factors),
        });
    }
    for (hf, tensor) in model.named_tensors() {
        let name = gguf_name(&hf)
            .ok_or_else(|| anyhow::anyhow!("export: no GGUF name for tensor {hf}"))?;
        let mut weights = tensor.to_kind(Kind::Float);
        if hf.ends_with("self_attn.q_proj.weight") {
            weights = permute(&weights, config.num_attention_heads as i64);
        } else if hf.ends_with("self_attn.k_proj.weight") {
            weights = permute(&weights, config.num_key_value_heads as i64);
        }
        let size = weights.size();
        let row = *size.last().expect("a tensor has a shape") as usize;
        let ggml = if size.len() == 1 {
            ggml_type::F32
        } else {
            tensor_type(quant, &name, row, layers, model.lm_head.is_none())
        };
        let values = Vec::<f32>::try_from(weights.contiguous().view([-1]))?;
        let type_name = crate::model::dequant::type_name(ggml);
        match types.iter_mut().find(|(t, _)| *t == type_name) {
            Some((_, count)) => *count += 1,
            None => types.push((type_name, 1)),
        }
        tensors.push(TensorEntry {
            name,
            dims: size.iter().rev().map(|&d| d as u64).collect(),
            ggml_type: ggml,
            data: match importance.and_then(|m| m.for_tensor(&hf)) {
                Some(columns) => encode_with_importance(ggml, &values, row, columns),
                None => encode(ggml, &values),
            },
        });
    }
    write_gguf(path, &metadata, &tensors)?;
    Ok(ExportReport {
        types,
        bytes: std::fs::metadata(path)?.len(),
    })
}

/// `general.*` and `llama.*` keys, as llama.cpp's converter writes them.
fn architecture_metadata(
    model: &Llama,
    name: &str,
    quant: ExportQuant,
) -> Result<Vec<(String, Value)>> {
    let c = &model.config;
    let u32_of = |v: usize| Value::U32(v as u32);
    let mut out: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("llama.vocab_size".into(), u32_of(c.vocab_size)),
        (
            "llama.context_length".into(),
            u32_of(c.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u32_of(c.hidden_size)),
        ("llama.block_count".into(), u32_of(c.num_hidden_layers)),
        (
            "llama.feed_forward_length".into(),
            u32_of(c.intermediate_size),
        ),
        ("llama.rope.dimension_count".into(), u32_of(c.head_dim)),
        (
            "llama.attention.head_count".into(),
            u32_of(c.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32_of(c.num_key_value_heads),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
    ];
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        out.push(("llama.attention.key_length".into(), u32_of(c.head_dim)));
        out.push(("llama.attention.value_length".into(), u32_of(c.head_dim)));
    }
    match &c.rope_scaling {
        RopeScaling::Default | RopeScaling::Llama3 { .. } => {}
        RopeScaling::Linear { factor } => {
            out.push((
                "llama.rope.scaling.type".into(),
                Value::String("linear".into()),
            ));
            out.push((
                "llama.rope.scaling.factor".into(),
                Value::F32(*factor as f32),
            ));
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            ..
        } => {
            out.push((
                "llama.rope.scaling.type".into(),
                Value::String("yarn".into()),
            ));
            out.push((
                "llama.rope.scaling.factor".into(),
                Value::F32(*factor as f32),
            ));
            out.push((
                "llama.rope.scaling.original_context_length".into(),
                Value::U32(*original_max_position_embeddings as u32),
            ));
        }
        RopeScaling::Dynamic { .. } => {
            bail_input!("export: dynamic NTK rope scaling has no GGUF equivalent in llama.cpp")
        }
    }
    if c.attention_bias || c.mlp_bias {
        bail_input!("export: projections with biases are not part of llama.cpp's llama layout");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_q4_k_m_mix_follow_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.weight").as_deref(),
            Some("blk.3.attn_q.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        // 32 layers: 0-3 and 28-31 plus every third between keep more bits.
        let more: Vec<usize> = (0..32).filter(|&l| use_more_bits(l, 32)).collect();
        assert_eq!(
            more,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        let q = ExportQuant::Q4KM;
        assert_eq!(
            tensor_type(q, "blk.0.attn_v.weight", 4096, 32, false),
            ggml_type::Q6_K
        );
        assert_eq!(
            tensor_type(q, "blk.4.attn_v.weight", 4096, 32, false),
            ggml_type::Q4_K
        );
        assert_eq!(
            tensor_type(q, "blk.4.attn_q.weight", 4096, 32, false),
            ggml_type::Q4_K
        );
        assert_eq!(
            tensor_type(q, "output.weight", 4096, 32, false),
            ggml_type::Q6_K
        );
        assert_eq!(
            tensor_type(q, "token_embd.weight", 4096, 32, false),
            ggml_type::Q4_K
        );
        assert_eq!(
            tensor_type(q, "token_embd.weight", 4096, 32, true),
            ggml_type::Q6_K
        );
        // Rows that are not whole K blocks fall back as llama-quantize's do: Q4_K to
        // Q5_0, Q6_K to Q8_0.
        assert_eq!(
            tensor_type(q, "blk.4.attn_q.weight", 576, 32, false),
            ggml_type::Q5_0
        );
        assert_eq!(
            tensor_type(q, "output.weight", 576, 32, false),
            ggml_type::Q8_0
        );
        assert_eq!(
            tensor_type(q, "blk.4.attn_q.weight", 100, 32, false),
            ggml_type::F16
        );
    }
}
