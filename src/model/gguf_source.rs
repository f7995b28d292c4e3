//! Llama weights from a GGUF file: llama.cpp tensor names mapped to HF names,
//! dequantized to f32, and the q/k row permutation llama.cpp's converter applies
//! undone, as transformers does when it loads a GGUF.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use memmap2::Mmap;
use tch::{Device, Kind, Tensor};

use super::config::LlamaConfig;
use super::dequant::{dequantize, type_name};
use crate::error::bad_input;
use crate::gguf::{GgufFile, TensorInfo};

pub struct GgufSource {
    gguf: GgufFile,
    mmap: Mmap,
    /// HF name -> index into gguf.tensors.
    by_hf_name: BTreeMap<String, usize>,
    heads: i64,
    kv_heads: i64,
}

/// llama.cpp's name for a tensor -> transformers' name.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let top = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{kind}"))
}

impl GgufSource {
    pub fn open(gguf: GgufFile, config: &LlamaConfig) -> Result<GgufSource> {
        let file = std::fs::File::open(&gguf.path)
            .with_context(|| format!("opening {}", gguf.path.display()))?;
        // SAFETY: read-only map of a file we do not modify.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("mapping {}", gguf.path.display()))?;
        let mut by_hf_name = BTreeMap::new();
        for (index, info) in gguf.tensors.iter().enumerate() {
            match hf_name(&info.name) {
                Some(name) => {
                    by_hf_name.insert(name, index);
                }
                // rope_freqs and similar llama.cpp extras carry no weights of the HF model.
                None if info.name.starts_with("rope_freqs") => {}
                None => {
                    return Err(bad_input(format!(
                        "{}: unexpected tensor '{}' for a llama model",
                        gguf.path.display(),
                        info.name
                    )));
                }
            }
        }
        Ok(GgufSource {
            gguf,
            mmap,
            by_hf_name,
            heads: config.num_attention_heads as i64,
            kv_heads: config.num_key_value_heads as i64,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.by_hf_name.keys()
    }

    /// The tensor's shape in PyTorch order (ggml lists the fastest dimension first).
    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        let info = &self.gguf.tensors[*self.by_hf_name.get(name)?];
        Some(info.dims.iter().rev().map(|&d| d as i64).collect())
    }

    pub fn load(&self, name: &str, kind: Kind, device: Device) -> Result<Option<Tensor>> {
        let Some(&index) = self.by_hf_name.get(name) else {
            return Ok(None);
        };
        let info: &TensorInfo = &self.gguf.tensors[index];
        let count: usize = info.dims.iter().product::<u64>() as usize;
        let start = (self.gguf.data_offset + info.offset) as usize;
        let data = self.mmap.get(start..).ok_or_else(|| {
            bad_input(format!(
                "{}: tensor {} lies past the end of the file",
                self.gguf.path.display(),
                info.name
            ))
        })?;
        let values = dequantize(info.ggml_type, data, count).with_context(|| {
            format!(
                "{}: tensor {} ({})",
                self.gguf.path.display(),
                info.name,
                type_name(info.ggml_type)
            )
        })?;
        let shape = self.shape(name).expect("known tensor");
        let mut tensor = Tensor::from_slice(&values).view(shape.as_slice());
        if name.ends_with("self_attn.q_proj.weight") {
            tensor = reverse_permute(&tensor, self.heads);
        } else if name.ends_with("self_attn.k_proj.weight") {
            tensor = reverse_permute(&tensor, self.kv_heads);
        }
        Ok(Some(tensor.to_kind(kind).to_device(device)))
    }
}

/// Undoes llama.cpp's `permute` of q/k rows (interleaved -> rotate-half layout):
/// transformers' `reverse_permute_weights`.
fn reverse_permute(weights: &Tensor, heads: i64) -> Tensor {
    let size = weights.size();
    let rows = size[0];
    let half = rows / heads / 2;
    let mut shape = vec![heads, half, 2];
    shape.extend_from_slice(&size[1..]);
    weights
        .reshape(shape.as_slice())
        .transpose(1, 2)
        .reshape(size.as_slice())
}
