//! transformers' learning-rate schedules (linear, cosine, constant, constant with
//! warmup), so a run here and a run with HF Trainer use the same rate at every step.

/// transformers' learning-rate schedules (`lr_scheduler_type`), with its names.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Linear,
    Cosine,
    /// The base rate at every step: transformers' `constant` has no warmup (it ignores
    /// warmup_steps; `constant_with_warmup` is the one with it).
    Constant,
    #[value(name = "constant_with_warmup", alias = "constant-with-warmup")]
    #[serde(alias = "constant-with-warmup")]
    ConstantWithWarmup,
}

impl Schedule {
    /// Whether the schedule has a warmup phase (all but `constant`, as in transformers).
    pub fn warms_up(self) -> bool {
        self != Schedule::Constant
    }
}

/// Warmup steps as transformers 5 counts them (`TrainingArguments.get_warmup_steps`):
/// `warmup_steps` >= 1 is a number of steps, below 1 a share of `total` (rounded up);
/// amthal's `--warmup-ratio` (transformers 4's warmup_ratio) is that share, and decides
/// when `warmup_steps` is 0 or unset (as in transformers 4).
pub fn warmup_steps(warmup_steps: Option<f64>, warmup_ratio: f64, total: i64) -> i64 {
    let share = |ratio: f64| (ratio * total as f64).ceil() as i64;
    match warmup_steps {
        Some(steps) if steps >= 1.0 => steps as i64,
        Some(ratio) if ratio > 0.0 => share(ratio),
        _ => share(warmup_ratio),
    }
}

/// The learning rate for optimizer step `step` (0-based), as
/// get_{linear,cosine,constant}_schedule_with_warmup compute it (and transformers'
/// `constant`, which never warms up).
pub fn learning_rate(schedule: Schedule, base: f64, step: i64, warmup: i64, total: i64) -> f64 {
    let warmup = if schedule.warms_up() { warmup } else { 0 };
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    match schedule {
        Schedule::Linear => {
            base * ((total - step) as f64 / (total - warmup).max(1) as f64).max(0.0)
        }
        Schedule::Cosine => base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        Schedule::Constant | Schedule::ConstantWithWarmup => base,
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
        // get_scheduler("constant", num_warmup_steps=4) ignores the warmup;
        // get_constant_schedule_with_warmup(warmup=4) at steps 0..=5.
        assert_eq!(learning_rate(Schedule::Constant, 0.3, 1, 4, 10), 0.3);
        let lrs: Vec<f64> = (0..=5)
            .map(|s| learning_rate(Schedule::ConstantWithWarmup, 1.0, s, 4, 10))
            .collect();
        assert_eq!(lrs, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
    }

    #[test]
    fn warmup_steps_count_as_transformers_5() {
        // TrainingArguments(warmup_steps=x).get_warmup_steps(total): int(x) when
        // x >= 1, else ceil(total * x).
        assert_eq!(warmup_steps(Some(3.0), 0.0, 100), 3);
        assert_eq!(warmup_steps(Some(3.7), 0.0, 100), 3);
        assert_eq!(warmup_steps(Some(0.05), 0.0, 90), 5);
        assert_eq!(warmup_steps(Some(0.0), 0.0, 90), 0);
        // transformers 4's warmup_ratio: the same share, also beside warmup_steps = 0.
        assert_eq!(warmup_steps(None, 0.05, 90), 5);
        assert_eq!(warmup_steps(Some(0.0), 0.05, 90), 5);
        assert_eq!(warmup_steps(None, 0.0, 90), 0);
    }
}
