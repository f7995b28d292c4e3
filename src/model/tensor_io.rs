//! tch tensors to and from safetensors bytes.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use safetensors::Dtype;
use tch::{Kind, Tensor};

/// A tensor's bytes, ready for safetensors.
pub struct TensorBytes {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl TensorBytes {
    /// Copies a tensor to host bytes in its own dtype (f32, bf16, f16 or u8; others as f32).
    pub fn from_tensor(tensor: &Tensor) -> TensorBytes {
        let tensor = tensor.detach().to_device(tch::Device::Cpu);
        let (tensor, dtype) = match tensor.kind() {
            Kind::BFloat16 => (tensor, Dtype::BF16),
            Kind::Half => (tensor, Dtype::F16),
            Kind::Uint8 => (tensor, Dtype::U8),
            _ => (tensor.to_kind(Kind::Float), Dtype::F32),
        };
        let tensor = tensor.contiguous();
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        let bytes = tensor.numel() * tensor.kind().elt_size_in_bytes();
        let mut data = vec![0u8; bytes];
        tensor.copy_data_u8(&mut data, tensor.numel());
        TensorBytes { dtype, shape, data }
    }
}

/// Writes named tensors as one safetensors file (through a temp file and a rename).
pub fn write_safetensors(path: &Path, tensors: &[(String, TensorBytes)]) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| anyhow::anyhow!("serializing {}: {e}", path.display()))?;
    crate::atomic::write_file(path, &bytes)
}
