//! Scoring generated explanations against references with the definitions of the
//! Python reference packages (see each metric's module).

pub mod bertscore;
pub mod chrf;
pub mod encoder_model;
pub mod rouge;
pub mod sentence_embedding;
