//! amthal (أمثال, "proverbs"): fine-tune Llama-architecture language models to explain
//! Yemeni proverbs in Modern Standard Arabic, generate explanations, and score them.
//!
//! Data flows one way: file -> `data::Example` -> `encode::Encoded` -> model ->
//! checkpoint -> generation -> predictions CSV -> scores. See README.md and DESIGN notes.

pub mod atomic;
pub mod batch;
pub mod beam_search;
pub mod cli;
pub mod commands;
pub mod cuda;
pub mod data;
pub mod decode_step;
pub mod device;
pub mod distributed;
pub mod encode;
pub mod error;
pub mod export;
pub mod generate;
pub mod generation_settings;
pub mod gguf;
pub mod hub;
pub mod logits_warpers;
pub mod loss;
pub mod memory;
pub mod model;
pub mod model_source;
pub mod predictions;
pub mod profile;
pub mod prompt;
pub mod report;
pub mod runtime;
pub mod sample_data;
pub mod score;
pub mod tokenizer;
pub mod torch_ops;
pub mod train;
