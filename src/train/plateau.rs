//! `--lr-scheduler reduce_lr_on_plateau`: torch's `ReduceLROnPlateau`, which HF Trainer
//! steps with eval_loss after every evaluation (and never per optimizer step, and
//! without a warmup). Unlike the other schedules the rate depends on the run's past
//! evaluations, so it is state: kept in `TrainerState` and restored by a resume.

use serde::{Deserialize, Serialize};

use super::lr_schedule::SchedulerKwargs;

/// Whether a lower (`min`, for a loss) or a higher metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PlateauMode {
    #[default]
    Min,
    Max,
}

/// Whether `threshold` is relative to the best metric or absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ThresholdMode {
    #[default]
    Rel,
    Abs,
}

/// ReduceLROnPlateau's settings (`lr_scheduler_kwargs`), with torch's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Settings {
    mode: PlateauMode,
    factor: f64,
    patience: u64,
    threshold: f64,
    threshold_mode: ThresholdMode,
    cooldown: u64,
    min_lr: f64,
    eps: f64,
}

impl Settings {
    fn from_kwargs(kwargs: &SchedulerKwargs) -> Settings {
        Settings {
            mode: kwargs.mode.unwrap_or_default(),
            factor: kwargs.factor.unwrap_or(0.1),
            patience: kwargs.patience.unwrap_or(10),
            threshold: kwargs.threshold.unwrap_or(1e-4),
            threshold_mode: kwargs.threshold_mode.unwrap_or_default(),
            cooldown: kwargs.cooldown.unwrap_or(0),
            min_lr: kwargs.min_lr.unwrap_or(0.0),
            eps: kwargs.eps.unwrap_or(1e-8),
        }
    }

    /// torch's `_is_better`, with its initial best (`mode_worse`: inf, or -inf for
    /// max) where there is none yet, in the same float arithmetic (an infinite or NaN
    /// first metric is no improvement, as in torch).
    fn improves(&self, metric: f64, best: Option<f64>) -> bool {
        improves(self.mode, self.threshold_mode, self.threshold, metric, best)
    }
}

/// Whether `metric` beats `best` by `threshold` (torch's `_is_better`, which
/// transformers' GreedyLR copies), with their initial best where there is none yet:
/// inf, or -inf for `max`.
pub fn improves(
    mode: PlateauMode,
    threshold_mode: ThresholdMode,
    threshold: f64,
    metric: f64,
    best: Option<f64>,
) -> bool {
    let best = best.unwrap_or(match mode {
        PlateauMode::Min => f64::INFINITY,
        PlateauMode::Max => f64::NEG_INFINITY,
    });
    match (mode, threshold_mode) {
        (PlateauMode::Min, ThresholdMode::Rel) => metric < best * (1.0 - threshold),
        (PlateauMode::Min, ThresholdMode::Abs) => metric < best - threshold,
        (PlateauMode::Max, ThresholdMode::Rel) => metric > best * (threshold + 1.0),
        (PlateauMode::Max, ThresholdMode::Abs) => metric > best + threshold,
    }
}

/// The scheduler's state between evaluations (torch's state_dict, the parts that change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plateau {
    /// The rate of the next optimizer steps.
    pub lr: f64,
    /// The best metric so far (None before the first evaluation: torch's inf).
    pub best: Option<f64>,
    /// Evaluations since the last improvement.
    pub bad_evaluations: u64,
    /// Evaluations of cooldown left after a reduction.
    pub cooldown_left: u64,
}

impl Plateau {
    pub fn new(base_lr: f64) -> Plateau {
        Plateau {
            lr: base_lr,
            best: None,
            bad_evaluations: 0,
            cooldown_left: 0,
        }
    }

    /// torch's `ReduceLROnPlateau.step(metric)`, with the run's `lr_scheduler_kwargs`.
    pub fn step(&mut self, metric: f64, kwargs: &SchedulerKwargs) {
        let settings = Settings::from_kwargs(kwargs);
        if settings.improves(metric, self.best) {
            // Only a finite metric can improve on a finite best or torch's infinite
            // start with a threshold below 1, so what is saved stays a JSON number.
            self.best = Some(metric);
            self.bad_evaluations = 0;
        } else {
            self.bad_evaluations += 1;
        }
        if self.cooldown_left > 0 {
            self.cooldown_left -= 1;
            self.bad_evaluations = 0;
        }
        if self.bad_evaluations > settings.patience {
            let lower = (self.lr * settings.factor).max(settings.min_lr);
            if self.lr - lower > settings.eps {
                self.lr = lower;
            }
            self.cooldown_left = settings.cooldown;
            self.bad_evaluations = 0;
        }
    }
}

/// The settings torch refuses (factor of 1 or more), refused before the run.
pub fn check(kwargs: &SchedulerKwargs) -> Result<(), String> {
    let settings = Settings::from_kwargs(kwargs);
    if !(settings.factor < 1.0 && settings.factor >= 0.0) {
        return Err(format!(
            "lr_scheduler_kwargs: reduce_lr_on_plateau's factor must be in [0, 1), not {}",
            settings.factor
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every setting against torch's ReduceLROnPlateau as get_scheduler builds it, on a
    /// metric sequence that improves, stalls and wobbles (goldens from
    /// scripts/golden/make_schedule_golden.py): the rate after each evaluation.
    #[test]
    fn plateau_matches_torch_reduce_lr_on_plateau() {
        let golden = crate::train::lr_schedule::tests::schedule_goldens();
        let base = golden["base_lr"].as_f64().unwrap();
        let metrics: Vec<f64> = serde_json::from_value(golden["plateau_metrics"].clone()).unwrap();
        let cases = golden["plateau_cases"].as_array().unwrap();
        assert!(cases.len() >= 9);
        let mut reductions = 0;
        for case in cases {
            let kwargs: SchedulerKwargs = serde_json::from_value(case["kwargs"].clone()).unwrap();
            kwargs
                .check(super::super::lr_schedule::Schedule::ReduceLrOnPlateau, base)
                .unwrap();
            let expected: Vec<f64> = serde_json::from_value(case["rates"].clone()).unwrap();
            let mut plateau = Plateau::new(base);
            for (i, (&metric, &rate)) in metrics.iter().zip(&expected).enumerate() {
                plateau.step(metric, &kwargs);
                // serde_json reads floats to within an ulp.
                assert!(
                    (plateau.lr - rate).abs() <= 1e-15 * rate,
                    "{}: evaluation {i}: {} vs {rate}",
                    case["kwargs"],
                    plateau.lr
                );
            }
            reductions += usize::from(plateau.lr < base);
        }
        assert!(reductions >= 7, "only {reductions} cases lower the rate");
    }

    /// An infinite first eval loss (an f16 overflow) is a bad evaluation, as in torch,
    /// not a new best.
    #[test]
    fn an_infinite_first_metric_is_no_improvement() {
        let kwargs = SchedulerKwargs {
            patience: Some(0),
            ..Default::default()
        };
        let mut plateau = Plateau::new(1.0);
        plateau.step(f64::INFINITY, &kwargs);
        assert_eq!((plateau.best, plateau.lr), (None, 0.1));
        plateau.step(3.0, &kwargs);
        assert_eq!(plateau.best, Some(3.0));
    }

    #[test]
    fn a_factor_of_one_is_refused() {
        let kwargs = SchedulerKwargs {
            factor: Some(1.0),
            ..Default::default()
        };
        assert!(check(&kwargs).unwrap_err().contains("factor"));
    }
}
