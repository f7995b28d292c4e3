//! Scoring generated explanations against references with the definitions of the
//! Python reference packages (see each metric's module), and the task checks.

pub mod bertscore;
pub mod bleu;
pub mod checks;
pub mod chrf;
pub mod encoder_model;
pub mod metric;
pub mod normalize;
pub mod rouge;
pub mod scorer;
pub mod sentence_embedding;
pub mod table;
