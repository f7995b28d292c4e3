//! Scoring generated explanations against references with the definitions of the
//! Python reference packages (see each metric's module).

pub mod bleu;
pub mod chrf;
pub mod rouge;
