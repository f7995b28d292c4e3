//! transformers' learning-rate schedules (linear, cosine, constant, with warmup), so
//! a run here and a run with HF Trainer use the same rate at every step.

/// transformers' learning-rate schedules.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

/// The learning rate for optimizer step `step` (0-based), as
/// get_{linear,cosine,constant}_schedule_with_warmup compute it.
pub fn learning_rate(schedule: Schedule, base: f64, step: i64, warmup: i64, total: i64) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    match schedule {
        Schedule::Linear => {
            base * ((total - step) as f64 / (total - warmup).max(1) as f64).max(0.0)
        }
        Schedule::Cosine => base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        Schedule::Constant => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        // get_linear_schedule_with_warmup(warmup=2, total=10) at steps 0..=10.
        let lrs: Vec<f64> = (0..=10)
            .map(|s| learning_rate(Schedule::Linear, 1.0, s, 2, 10))
            .collect();
        assert_eq!(
            lrs,
            vec![
                0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0
            ]
        );
        assert!((learning_rate(Schedule::Cosine, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Constant, 0.3, 7, 0, 10), 0.3);
    }
}
