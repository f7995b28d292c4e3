//! The model layer: configuration, the Llama forward pass, weights from safetensors
//! and GGUF, LoRA adapters in PEFT format, and HF-folder checkpoints.

pub mod bert;
pub mod bnb4;
pub mod checkpoint;
pub mod config;
pub mod dequant;
pub mod fuse;
pub mod gguf_source;
pub mod int8;
pub mod linear;
pub mod llama;
pub mod load;
pub mod lora;
pub mod lora_init;
pub mod peft_patterns;
pub mod quantized;
pub mod rope;
pub mod safetensors_source;
pub mod tensor_io;

pub use config::LlamaConfig;
pub use llama::{KvCache, Llama};
pub use load::{LoadOptions, load_llama};
