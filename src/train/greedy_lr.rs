//! `--lr-scheduler greedy`: transformers' `GreedyLR` (Subramanian et al. 2025), which HF
//! Trainer steps with eval_loss after every evaluation, as it steps ReduceLROnPlateau.
//! The rate rises (divided by `factor`) after more than `patience` evaluations that
//! improved, falls (times `factor`) after more than `patience` that did not, each
//! followed by `warmup` / `cooldown` evaluations' pause, within [`min_lr`, `max_lr`];
//! after `reset_start` falls at the floor everything starts over. Its defaults are
//! transformers': factor 0.95, patience 10, an absolute threshold of 1e-6, min_lr 1e-3
//! and max_lr 1 (so from a fine-tuning rate below 1e-3 it can only rise: give min_lr).
//! State, as plateau's: kept in `TrainerState` and restored by a resume.

use serde::{Deserialize, Serialize};

use super::lr_schedule::SchedulerKwargs;
use super::plateau::{PlateauMode, ThresholdMode};

/// GreedyLR's settings (`lr_scheduler_kwargs`), with transformers' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Settings {
    mode: PlateauMode,
    factor: f64,
    patience: u64,
    threshold: f64,
    threshold_mode: ThresholdMode,
    cooldown: u64,
    warmup: u64,
    min_lr: f64,
    max_lr: f64,
    eps: f64,
    smooth: bool,
    window_size: u64,
    reset_start: u64,
}

impl Settings {
    fn from_kwargs(kwargs: &SchedulerKwargs) -> Settings {
        Settings {
            mode: kwargs.mode.unwrap_or_default(),
            factor: kwargs.factor.unwrap_or(0.95),
            patience: kwargs.patience.unwrap_or(10),
            threshold: kwargs.threshold.unwrap_or(1e-6),
            threshold_mode: kwargs.threshold_mode.unwrap_or(ThresholdMode::Abs),
            cooldown: kwargs.cooldown.unwrap_or(0),
            warmup: kwargs.warmup.unwrap_or(0),
            min_lr: kwargs.min_lr.unwrap_or(1e-3),
            max_lr: kwargs.max_lr.unwrap_or(1.0),
            eps: kwargs.eps.unwrap_or(1e-8),
            smooth: kwargs.smooth.unwrap_or(false),
            window_size: kwargs.window_size.unwrap_or(50),
            reset_start: kwargs.reset_start.unwrap_or(500),
        }
    }

    /// GreedyLR's `is_better`: torch's plateau comparison (`plateau::improves`).
    fn improves(&self, metric: f64, best: Option<f64>) -> bool {
        super::plateau::improves(self.mode, self.threshold_mode, self.threshold, metric, best)
    }
}

/// The scheduler's state between evaluations (GreedyLR's state_dict, the parts that
/// change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GreedyLr {
    /// The rate of the next optimizer steps.
    pub lr: f64,
    /// The rate the run started at (what a reset returns to).
    pub initial_lr: f64,
    /// The best metric so far (None: GreedyLR's infinite start, which JSON cannot hold).
    pub best: Option<f64>,
    pub bad_evaluations: u64,
    pub good_evaluations: u64,
    pub cooldown_left: u64,
    pub warmup_left: u64,
    /// Falls at the floor left before a reset (None: the setting's full count).
    pub reset_left: Option<u64>,
    /// `smooth`: the metrics in the averaging window, oldest first, and their running
    /// sum as transformers' StreamingAverage keeps it (added to, the oldest subtracted:
    /// a fresh sum of the window could round otherwise).
    #[serde(default)]
    pub window: Vec<f64>,
    #[serde(default)]
    pub window_sum: f64,
}

impl GreedyLr {
    pub fn new(base_lr: f64) -> GreedyLr {
        GreedyLr {
            lr: base_lr,
            initial_lr: base_lr,
            best: None,
            bad_evaluations: 0,
            good_evaluations: 0,
            cooldown_left: 0,
            warmup_left: 0,
            reset_left: None,
            window: Vec::new(),
            window_sum: 0.0,
        }
    }

    /// GreedyLR's `step(metric)` with the run's `lr_scheduler_kwargs`.
    pub fn step(&mut self, metric: f64, kwargs: &SchedulerKwargs) {
        let settings = Settings::from_kwargs(kwargs);
        let current = if settings.smooth {
            // StreamingAverage.streamavg.
            self.window.push(metric);
            self.window_sum += metric;
            if self.window.len() as u64 > settings.window_size {
                self.window_sum -= self.window.remove(0);
            }
            self.window_sum / self.window.len() as f64
        } else {
            metric
        };
        if self.cooldown_left > 0 {
            self.cooldown_left -= 1;
            self.bad_evaluations = 0;
            self.good_evaluations = 0;
        } else if self.warmup_left > 0 {
            self.warmup_left -= 1;
            self.bad_evaluations = 0;
            self.good_evaluations = 0;
        } else {
            if settings.improves(current, self.best) {
                self.best = Some(current);
                self.bad_evaluations = 0;
                self.good_evaluations += 1;
            } else {
                self.bad_evaluations += 1;
                self.good_evaluations = 0;
            }
            if self.good_evaluations > settings.patience {
                let higher = (self.lr / settings.factor).min(settings.max_lr);
                if higher - self.lr > settings.eps {
                    self.lr = higher;
                }
                self.reset_left = None;
                self.warmup_left = settings.warmup;
                self.good_evaluations = 0;
            } else if self.bad_evaluations > settings.patience {
                let lower = (self.lr * settings.factor).max(settings.min_lr);
                if self.lr - lower > settings.eps {
                    self.lr = lower;
                }
                if self.lr <= settings.min_lr {
                    let left = self.reset_left.unwrap_or(settings.reset_start) as i64 - 1;
                    if left <= 0 {
                        // GreedyLR's `_reset`: the initial rate and a fresh start.
                        *self = GreedyLr::new(self.initial_lr);
                    } else {
                        self.reset_left = Some(left as u64);
                    }
                }
                self.cooldown_left = settings.cooldown;
                self.bad_evaluations = 0;
            }
        }
    }
}

/// The settings transformers refuses (a factor of 1 or more), refused before the run.
pub fn check(kwargs: &SchedulerKwargs) -> Result<(), String> {
    let settings = Settings::from_kwargs(kwargs);
    if !(settings.factor < 1.0 && settings.factor > 0.0) {
        return Err(format!(
            "lr_scheduler_kwargs: greedy's factor must be in (0, 1), not {}",
            settings.factor
        ));
    }
    if settings.smooth && settings.window_size == 0 {
        return Err("lr_scheduler_kwargs: greedy's window_size must be at least 1".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::lr_schedule::Schedule;

    /// Every setting against transformers' GreedyLR as get_scheduler builds it, on a
    /// metric sequence that improves, stalls and wobbles (goldens from
    /// scripts/golden/make_schedule_golden.py): the rate after each evaluation. Halfway
    /// the state goes through JSON (what a checkpoint's trainer_state.json keeps), as a
    /// resumed run's does.
    #[test]
    fn greedy_matches_transformers_greedy_lr_and_survives_a_resume() {
        let golden = crate::train::lr_schedule::tests::schedule_goldens();
        let base = golden["base_lr"].as_f64().unwrap();
        let metrics: Vec<f64> = serde_json::from_value(golden["greedy_metrics"].clone()).unwrap();
        let cases = golden["greedy_cases"].as_array().unwrap();
        assert!(cases.len() >= 10);
        let (mut rises, mut falls, mut resets) = (0, 0, 0);
        for case in cases {
            let kwargs: SchedulerKwargs = serde_json::from_value(case["kwargs"].clone()).unwrap();
            kwargs.check(Schedule::Greedy, base).unwrap();
            let expected: Vec<f64> = serde_json::from_value(case["rates"].clone()).unwrap();
            let mut greedy = GreedyLr::new(base);
            let mut previous = base;
            for (i, (&metric, &rate)) in metrics.iter().zip(&expected).enumerate() {
                if i == metrics.len() / 2 {
                    let saved = serde_json::to_string(&greedy).unwrap();
                    greedy = serde_json::from_str(&saved).unwrap();
                }
                greedy.step(metric, &kwargs);
                // serde_json reads floats to within an ulp.
                assert!(
                    (greedy.lr - rate).abs() <= 1e-15 * rate,
                    "{}: evaluation {i}: {} vs {rate}",
                    case["kwargs"],
                    greedy.lr
                );
                rises += usize::from(greedy.lr > previous);
                falls += usize::from(greedy.lr < previous);
                resets += usize::from(greedy.lr == base && previous < base * 0.5);
                previous = greedy.lr;
            }
        }
        assert!(
            rises >= 10 && falls >= 10 && resets >= 1,
            "{rises} {falls} {resets}"
        );
    }

    #[test]
    fn greedy_refuses_a_factor_of_one_and_other_schedules_keys() {
        let kwargs = SchedulerKwargs {
            factor: Some(1.0),
            ..Default::default()
        };
        assert!(check(&kwargs).unwrap_err().contains("factor"));
        let kwargs = SchedulerKwargs {
            num_cycles: Some(1.0),
            ..Default::default()
        };
        assert!(kwargs.check(Schedule::Greedy, 1e-4).is_err());
        let kwargs = SchedulerKwargs {
            max_lr: Some(1e-3),
            ..Default::default()
        };
        assert!(kwargs.check(Schedule::ReduceLrOnPlateau, 1e-4).is_err());
    }
}
