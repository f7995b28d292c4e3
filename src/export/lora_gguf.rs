//! `amthal export --format gguf-lora`: a LoRA adapter alone as a GGUF adapter file,
//! what llama.cpp's `convert_lora_to_gguf.py` writes and `llama-cli --lora`, the C
//! API's `llama_adapter_lora_init` and Ollama's `ADAPTER` read: `general.type`
//! "adapter", `adapter.type` "lora", `adapter.lora.alpha`, and for each adapted weight
//! `blk.N.attn_q.weight.lora_a` [r, in] and `.lora_b` [out, r] (shapes in torch's order;
//! GGUF lists them reversed). B's rows of q and k are permuted into llama.cpp's rotary
//! layout as the weights' rows are (`permute`).
//!
//! llama.cpp scales every adapted weight by alpha / r with the file's one alpha and the
//! weight's own r. A PEFT adapter with rsLoRA (alpha / sqrt(r)) or per-module patterns
//! scales otherwise, so the file's alpha is the first module's scaling x its r, and a
//! module whose scaling differs has its B multiplied by the difference (exactly 1 for a
//! plain or a uniform adapter: B is written as it is). DoRA has no llama.cpp form and
//! is refused.

use std::path::Path;

use anyhow::Result;
use tch::Kind;

use super::ggml_quant::{encode, ggml_type};
use super::gguf_writer::{TensorEntry, write_gguf};
use super::{ExportQuant, ExportReport, gguf_name, permute};
use crate::bail_input;
use crate::gguf::Value;
use crate::model::Llama;

/// Writes the adapters attached to `model` (not folded) to `path`.
pub fn export_lora_gguf(
    model: &Llama,
    name: &str,
    quant: ExportQuant,
    path: &Path,
) -> Result<ExportReport> {
    let ggml = match quant {
        ExportQuant::F16 => ggml_type::F16,
        ExportQuant::Bf16 => ggml_type::BF16,
        ExportQuant::F32 => ggml_type::F32,
        other => bail_input!(
            "--format gguf-lora writes f32, f16 or bf16 (an adapter is small, and B's rows are \
             r long, shorter than a quantized block), not {other:?}"
        ),
    };
    let config = &model.config;
    let mut alpha: Option<f64> = None;
    let mut tensors = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for (path_in_layer, linear) in layer.linears() {
            let Some(lora) = &linear.lora else { continue };
            let hf = format!("model.layers.{i}.{path_in_layer}.weight");
            if lora.magnitude.is_some() {
                bail_input!(
                    "{hf}: a DoRA adapter has no llama.cpp form; export the model with it folded \
                     in (--format gguf --adapter DIR)"
                );
            }
            let base = gguf_name(&hf)
                .ok_or_else(|| anyhow::anyhow!("export: no GGUF name for tensor {hf}"))?;
            // Detached copies: the adapter's own tensors are trainable leaves.
            let a = lora.a.detach().to_kind(Kind::Float);
            let rank = a.size()[0] as f64;
            let file_alpha = *alpha.get_or_insert(lora.scaling * rank);
            let factor = lora.scaling * rank / file_alpha;
            let mut b = lora.b.detach().to_kind(Kind::Float) * factor;
            if hf.ends_with("self_attn.q_proj.weight") {
                b = permute(&b, config.num_attention_heads as i64);
            } else if hf.ends_with("self_attn.k_proj.weight") {
                b = permute(&b, config.num_key_value_heads as i64);
            }
            for (suffix, tensor) in [("lora_a", a), ("lora_b", b)] {
                let values = Vec::<f32>::try_from(tensor.contiguous().view([-1]))?;
                tensors.push(TensorEntry {
                    name: format!("{base}.{suffix}"),
                    dims: tensor.size().iter().rev().map(|&d| d as u64).collect(),
                    ggml_type: ggml,
                    data: encode(ggml, &values),
                });
            }
        }
    }
    let Some(alpha) = alpha else {
        bail_input!("--format gguf-lora: the model has no adapter to write (give --adapter DIR)");
    };
    let metadata = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.type".into(), Value::String("adapter".into())),
        ("general.name".into(), Value::String(name.into())),
        ("adapter.type".into(), Value::String("lora".into())),
        ("adapter.lora.alpha".into(), Value::F32(alpha as f32)),
    ];
    write_gguf(path, &metadata, &tensors)?;
    let type_name = crate::model::dequant::type_name(ggml);
    Ok(ExportReport {
        types: vec![(type_name, tensors.len())],
        bytes: std::fs::metadata(path)?.len(),
    })
}
