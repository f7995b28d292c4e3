//! transformers' learning-rate schedules (linear, cosine, cosine with restarts,
//! polynomial, inverse square root, cosine with a minimum (and its variant with a
//! shifted warmup), warmup-stable-decay, constant, constant with warmup) and their `lr_scheduler_kwargs`, so a run here and a run with HF Trainer use
//! the same rate at every step. The two that follow the evaluations instead
//! (`reduce_lr_on_plateau`, `greedy`) keep state: `plateau.rs`, `greedy_lr.rs`.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// transformers' learning-rate schedules (`lr_scheduler_type`), with its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Linear,
    /// Half a cosine wave down to 0 (`num_cycles` waves: 0.5 by default).
    Cosine,
    /// `num_cycles` (default 1) cosine decays to 0, each restarting at the base rate.
    #[value(name = "cosine_with_restarts", alias = "cosine-with-restarts")]
    #[serde(alias = "cosine-with-restarts")]
    CosineWithRestarts,
    /// From the base rate down to `lr_end` (default 1e-7) as (1 - progress)^`power`.
    Polynomial,
    /// 1 / sqrt((step + timescale - warmup) / timescale) after the warmup (`timescale`:
    /// default the warmup steps, or 10000 without warmup).
    #[value(name = "inverse_sqrt", alias = "inverse-sqrt")]
    #[serde(alias = "inverse-sqrt")]
    InverseSqrt,
    /// Cosine down to `min_lr` or `min_lr_rate` x the base rate (one of them required).
    #[value(name = "cosine_with_min_lr", alias = "cosine-with-min-lr")]
    #[serde(alias = "cosine-with-min-lr")]
    CosineWithMinLr,
    /// As cosine_with_min_lr, counted one step ahead, with a warmup from
    /// `warmup_lr_rate` x the base rate (default 1 / warmup steps):
    /// get_cosine_with_min_lr_schedule_with_warmup_lr_rate.
    #[value(
        name = "cosine_warmup_with_min_lr",
        alias = "cosine-warmup-with-min-lr"
    )]
    #[serde(alias = "cosine-warmup-with-min-lr")]
    CosineWarmupWithMinLr,
    /// Warmup, stable, decay (get_wsd_schedule): `num_decay_steps` (required) at the
    /// end, `num_stable_steps` (default: the rest) at the base rate; `warmup_type` and
    /// `decay_type` linear, cosine or 1-sqrt (defaults linear and cosine), from and to
    /// `min_lr_ratio` x the base rate.
    #[value(name = "warmup_stable_decay", alias = "warmup-stable-decay")]
    #[serde(alias = "warmup-stable-decay")]
    WarmupStableDecay,
    /// torch's ReduceLROnPlateau, stepped with eval_loss at every evaluation (needs an
    /// --eval-strategy): the rate times `factor` (0.1) after more than `patience` (10)
    /// evaluations without improving by `threshold` (1e-4, `threshold_mode` rel or abs),
    /// then `cooldown` (0) evaluations' pause, never below `min_lr`; `mode` min or max.
    /// No warmup, as in transformers.
    #[value(name = "reduce_lr_on_plateau", alias = "reduce-lr-on-plateau")]
    #[serde(alias = "reduce-lr-on-plateau")]
    ReduceLrOnPlateau,
    /// transformers' GreedyLR, stepped with eval_loss at every evaluation (needs an
    /// --eval-strategy): the rate divided by `factor` (0.95) after more than `patience`
    /// (10) improving evaluations, times it after more than `patience` others, within
    /// [`min_lr` (1e-3!), `max_lr` (1)], `threshold` 1e-6 absolute; `warmup`,
    /// `cooldown`, `smooth` / `window_size`, `reset_start` as GreedyLR's. No warmup.
    Greedy,
    /// The base rate at every step: transformers' `constant` has no warmup (it ignores
    /// warmup_steps; `constant_with_warmup` is the one with it).
    Constant,
    #[value(name = "constant_with_warmup", alias = "constant-with-warmup")]
    #[serde(alias = "constant-with-warmup")]
    ConstantWithWarmup,
}

/// transformers' `lr_scheduler_kwargs`: the settings some schedules take (a TOML table
/// in `--config`, a JSON object on the command line, as HF's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerKwargs {
    pub num_cycles: Option<f64>,
    pub min_lr: Option<f64>,
    pub min_lr_rate: Option<f64>,
    pub lr_end: Option<f64>,
    pub power: Option<f64>,
    pub timescale: Option<f64>,
    pub num_decay_steps: Option<u64>,
    pub num_stable_steps: Option<u64>,
    pub warmup_type: Option<Shape>,
    pub decay_type: Option<Shape>,
    pub min_lr_ratio: Option<f64>,
    pub warmup_lr_rate: Option<f64>,
    /// reduce_lr_on_plateau's (torch's ReduceLROnPlateau arguments; `min_lr` above too).
    pub mode: Option<super::plateau::PlateauMode>,
    pub factor: Option<f64>,
    pub patience: Option<u64>,
    pub threshold: Option<f64>,
    pub threshold_mode: Option<super::plateau::ThresholdMode>,
    pub cooldown: Option<u64>,
    pub eps: Option<f64>,
    /// greedy's (transformers' GreedyLR arguments; the plateau ones above too).
    pub warmup: Option<u64>,
    pub max_lr: Option<f64>,
    pub smooth: Option<bool>,
    pub window_size: Option<u64>,
    pub reset_start: Option<u64>,
}

/// warmup_stable_decay's curve for its warmup and its decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shape {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "cosine")]
    Cosine,
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

impl Shape {
    /// The warmup's factor at `progress` in [0, 1) (rising).
    fn rising(self, progress: f64) -> f64 {
        match self {
            Shape::Linear => progress,
            Shape::Cosine => 0.5 * (1.0 - (std::f64::consts::PI * progress).cos()),
            Shape::OneMinusSqrt => 1.0 - (1.0 - progress).sqrt(),
        }
    }

    /// The decay's factor at `progress` in [0, 1) (falling; `cycles` for cosine).
    fn falling(self, progress: f64, cycles: f64) -> f64 {
        match self {
            Shape::Linear => 1.0 - progress,
            Shape::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos()),
            Shape::OneMinusSqrt => 1.0 - progress.sqrt(),
        }
    }
}

impl SchedulerKwargs {
    /// The keys given, by name.
    fn given(&self) -> Vec<&'static str> {
        [
            ("num_cycles", self.num_cycles.is_some()),
            ("min_lr", self.min_lr.is_some()),
            ("min_lr_rate", self.min_lr_rate.is_some()),
            ("lr_end", self.lr_end.is_some()),
            ("power", self.power.is_some()),
            ("timescale", self.timescale.is_some()),
            ("num_decay_steps", self.num_decay_steps.is_some()),
            ("num_stable_steps", self.num_stable_steps.is_some()),
            ("warmup_type", self.warmup_type.is_some()),
            ("decay_type", self.decay_type.is_some()),
            ("min_lr_ratio", self.min_lr_ratio.is_some()),
            ("warmup_lr_rate", self.warmup_lr_rate.is_some()),
            ("mode", self.mode.is_some()),
            ("factor", self.factor.is_some()),
            ("patience", self.patience.is_some()),
            ("threshold", self.threshold.is_some()),
            ("threshold_mode", self.threshold_mode.is_some()),
            ("cooldown", self.cooldown.is_some()),
            ("eps", self.eps.is_some()),
            ("warmup", self.warmup.is_some()),
            ("max_lr", self.max_lr.is_some()),
            ("smooth", self.smooth.is_some()),
            ("window_size", self.window_size.is_some()),
            ("reset_start", self.reset_start.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }

    /// Refuses keys the schedule does not take (transformers passes them to the
    /// schedule's function, which raises on an unknown one; for `constant` and
    /// `constant_with_warmup` it drops them silently, which amthal refuses too) and
    /// the settings transformers refuses.
    pub fn check(&self, schedule: Schedule, base_lr: f64) -> Result<(), String> {
        let takes: &[&str] = match schedule {
            Schedule::Linear | Schedule::Constant | Schedule::ConstantWithWarmup => &[],
            Schedule::Cosine | Schedule::CosineWithRestarts => &["num_cycles"],
            Schedule::Polynomial => &["lr_end", "power"],
            Schedule::InverseSqrt => &["timescale"],
            Schedule::CosineWithMinLr => &["num_cycles", "min_lr", "min_lr_rate"],
            Schedule::CosineWarmupWithMinLr => {
                &["num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"]
            }
            Schedule::ReduceLrOnPlateau => &[
                "mode",
                "factor",
                "patience",
                "threshold",
                "threshold_mode",
                "cooldown",
                "min_lr",
                "eps",
            ],
            Schedule::Greedy => &[
                "mode",
                "factor",
                "patience",
                "threshold",
                "threshold_mode",
                "cooldown",
                "warmup",
                "min_lr",
                "max_lr",
                "eps",
                "smooth",
                "window_size",
                "reset_start",
            ],
            Schedule::WarmupStableDecay => &[
                "num_decay_steps",
                "num_stable_steps",
                "warmup_type",
                "decay_type",
                "min_lr_ratio",
                "num_cycles",
            ],
        };
        if let Some(key) = self.given().into_iter().find(|key| !takes.contains(key)) {
            let name = schedule_name(schedule);
            return Err(format!(
                "lr_scheduler_kwargs: {name} takes {}, not {key}",
                if takes.is_empty() {
                    "no settings".to_string()
                } else {
                    takes.join(", ")
                }
            ));
        }
        if matches!(
            schedule,
            Schedule::CosineWithMinLr | Schedule::CosineWarmupWithMinLr
        ) {
            match (self.min_lr, self.min_lr_rate) {
                (Some(_), Some(_)) => {
                    return Err("lr_scheduler_kwargs: give min_lr or min_lr_rate, not both".into());
                }
                (None, None) => {
                    return Err(format!(
                        "{} needs min_lr or min_lr_rate in lr_scheduler_kwargs (for example \
                         --lr-scheduler-kwargs '{{\"min_lr_rate\": 0.1}}')",
                        schedule_name(schedule)
                    ));
                }
                _ => {}
            }
        }
        if schedule == Schedule::WarmupStableDecay && self.num_decay_steps.is_none() {
            return Err(
                "warmup_stable_decay needs num_decay_steps in lr_scheduler_kwargs (for example \
                 --lr-scheduler-kwargs '{\"num_decay_steps\": 100}')"
                    .into(),
            );
        }
        if schedule == Schedule::Polynomial {
            let end = self.lr_end.unwrap_or(POLYNOMIAL_LR_END);
            if base_lr <= end || base_lr.is_nan() {
                return Err(format!(
                    "lr_scheduler_kwargs: lr_end ({end}) must be smaller than the learning rate ({base_lr})"
                ));
            }
        }
        if schedule == Schedule::ReduceLrOnPlateau {
            super::plateau::check(self)?;
        }
        if schedule == Schedule::Greedy {
            super::greedy_lr::check(self)?;
        }
        if self.timescale.is_some_and(|t| t <= 0.0 || t.is_nan()) {
            return Err("lr_scheduler_kwargs: timescale must be positive".into());
        }
        Ok(())
    }
}

/// The schedule's name as transformers spells it.
fn schedule_name(schedule: Schedule) -> String {
    schedule
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// get_polynomial_decay_schedule_with_warmup's default lr_end.
const POLYNOMIAL_LR_END: f64 = 1e-7;

impl Schedule {
    /// Whether the rate follows the evaluations (state) rather than the step.
    pub fn follows_evaluations(self) -> bool {
        matches!(self, Schedule::ReduceLrOnPlateau | Schedule::Greedy)
    }

    /// Whether the schedule has a warmup phase (all but `constant`,
    /// `reduce_lr_on_plateau` and `greedy`, as in transformers).
    pub fn warms_up(self) -> bool {
        !matches!(
            self,
            Schedule::Constant | Schedule::ReduceLrOnPlateau | Schedule::Greedy
        )
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

/// The learning rate for optimizer step `step` (0-based): the base rate times the
/// factor transformers' schedule function (get_*_schedule_with_warmup) gives, computed
/// in the same order (LambdaLR multiplies the base rate by it). `constant` never warms
/// up, as in transformers. `reduce_lr_on_plateau` gives the base rate here: its rate
/// after evaluations is the run's state (`plateau::Plateau`).
pub fn learning_rate(
    schedule: Schedule,
    kwargs: &SchedulerKwargs,
    base: f64,
    step: i64,
    warmup: i64,
    total: i64,
) -> f64 {
    use std::f64::consts::PI;
    if schedule == Schedule::WarmupStableDecay {
        return base * warmup_stable_decay(kwargs, step, warmup, total);
    }
    if schedule == Schedule::CosineWarmupWithMinLr {
        return base * cosine_warmup_with_min_lr(kwargs, base, step, warmup, total);
    }
    let warmup = if schedule.warms_up() { warmup } else { 0 };
    if step < warmup {
        return base * (step as f64 / warmup.max(1) as f64);
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    let factor = match schedule {
        Schedule::Linear => ((total - step) as f64 / (total - warmup).max(1) as f64).max(0.0),
        Schedule::Cosine => {
            let cycles = kwargs.num_cycles.unwrap_or(0.5);
            (0.5 * (1.0 + (PI * cycles * 2.0 * progress).cos())).max(0.0)
        }
        Schedule::CosineWithRestarts => {
            let cycles = kwargs.num_cycles.unwrap_or(1.0);
            if progress >= 1.0 {
                0.0
            } else {
                (0.5 * (1.0 + (PI * ((cycles * progress) % 1.0)).cos())).max(0.0)
            }
        }
        Schedule::Polynomial => {
            let end = kwargs.lr_end.unwrap_or(POLYNOMIAL_LR_END);
            if step > total {
                end / base
            } else {
                let power = kwargs.power.unwrap_or(1.0);
                let remaining = 1.0 - (step - warmup) as f64 / (total - warmup).max(1) as f64;
                ((base - end) * remaining.powf(power) + end) / base
            }
        }
        Schedule::InverseSqrt => {
            let timescale =
                kwargs
                    .timescale
                    .unwrap_or(if warmup > 0 { warmup as f64 } else { 10_000.0 });
            let shift = timescale - warmup as f64;
            1.0 / ((step as f64 + shift) / timescale).sqrt()
        }
        Schedule::CosineWithMinLr => cosine_towards_min(kwargs, base, progress),
        Schedule::Constant
        | Schedule::ConstantWithWarmup
        | Schedule::ReduceLrOnPlateau
        | Schedule::Greedy => 1.0,
        Schedule::WarmupStableDecay | Schedule::CosineWarmupWithMinLr => {
            unreachable!("computed above")
        }
    };
    base * factor
}

/// The cosine_with_min_lr factors' decay: `num_cycles` cosine waves from 1 down
/// towards `min_lr_rate` (or `min_lr` / the base rate).
fn cosine_towards_min(kwargs: &SchedulerKwargs, base: f64, progress: f64) -> f64 {
    let cycles = kwargs.num_cycles.unwrap_or(0.5);
    let rate = kwargs
        .min_lr_rate
        .unwrap_or_else(|| kwargs.min_lr.unwrap_or(0.0) / base);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos());
    (cosine * (1.0 - rate) + rate).max(0.0)
}

/// _get_cosine_with_min_lr_schedule_with_warmup_lr_rate_lambda's factor: its warmup
/// starts at 1 / warmup (or at `warmup_lr_rate`) and reaches the base rate at the
/// warmup's last step, and its decay counts one step ahead of cosine_with_min_lr's.
fn cosine_warmup_with_min_lr(
    kwargs: &SchedulerKwargs,
    base: f64,
    step: i64,
    warmup: i64,
    total: i64,
) -> f64 {
    let (step, warmup, total) = (step as f64, warmup as f64, total as f64);
    if step < warmup {
        return match kwargs.warmup_lr_rate {
            None => (step + 1.0) / warmup.max(1.0),
            Some(start) => start + (1.0 - start) * step / (warmup - 1.0).max(1.0),
        };
    }
    let progress = (step - warmup + 1.0) / (total - warmup).max(1.0);
    cosine_towards_min(kwargs, base, progress)
}

/// _get_wsd_scheduler_lambda's factor: its warmup has a shape of its own and starts
/// from min_lr_ratio, so it is not the other schedules' linear warmup.
fn warmup_stable_decay(kwargs: &SchedulerKwargs, step: i64, warmup: i64, total: i64) -> f64 {
    let floor = kwargs.min_lr_ratio.unwrap_or(0.0);
    let decay = kwargs.num_decay_steps.unwrap_or(0) as i64;
    // As Trainer calls get_wsd_schedule: the stable phase is the rest of the run unless given.
    let stable = kwargs
        .num_stable_steps
        .map_or(total - warmup - decay, |steps| steps as i64);
    let towards_floor = |factor: f64| (factor * (1.0 - floor) + floor).max(0.0);
    if step < warmup {
        let progress = step as f64 / warmup.max(1) as f64;
        return towards_floor(kwargs.warmup_type.unwrap_or(Shape::Linear).rising(progress));
    }
    if step < warmup + stable {
        return 1.0;
    }
    if step < warmup + stable + decay {
        let progress = (step - warmup - stable) as f64 / decay.max(1) as f64;
        let cycles = kwargs.num_cycles.unwrap_or(0.5);
        return towards_floor(
            kwargs
                .decay_type
                .unwrap_or(Shape::Cosine)
                .falling(progress, cycles),
        );
    }
    floor
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        let none = SchedulerKwargs::default();
        // get_linear_schedule_with_warmup(warmup=2, total=10) at steps 0..=10.
        let lrs: Vec<f64> = (0..=10)
            .map(|s| learning_rate(Schedule::Linear, &none, 1.0, s, 2, 10))
            .collect();
        assert_eq!(
            lrs,
            vec![
                0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0
            ]
        );
        assert!((learning_rate(Schedule::Cosine, &none, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Constant, &none, 0.3, 7, 0, 10), 0.3);
        // get_scheduler("constant", num_warmup_steps=4) ignores the warmup;
        // get_constant_schedule_with_warmup(warmup=4) at steps 0..=5.
        assert_eq!(learning_rate(Schedule::Constant, &none, 0.3, 1, 4, 10), 0.3);
        let lrs: Vec<f64> = (0..=5)
            .map(|s| learning_rate(Schedule::ConstantWithWarmup, &none, 1.0, s, 4, 10))
            .collect();
        assert_eq!(lrs, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
    }

    /// The schedules' goldens (scripts/golden/make_schedule_golden.py), which the
    /// plateau and greedy tests read too.
    pub(crate) fn schedule_goldens() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/lr_schedules.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// Every schedule and setting against transformers' get_scheduler (goldens from
    /// scripts/golden/make_schedule_golden.py), at every step and one past the end,
    /// within a few units in the last place (torch's scheduler rounds some steps'
    /// products differently: 0.00024 where 3e-4 x 0.8 is 0.00023999999999999998; and
    /// serde_json reads floats to within an ulp).
    #[test]
    fn every_schedule_matches_get_scheduler() {
        let golden = schedule_goldens();
        let base = golden["base_lr"].as_f64().unwrap();
        let cases = golden["cases"].as_array().unwrap();
        assert!(cases.len() >= 54);
        for case in cases {
            let schedule: Schedule = serde_json::from_value(case["schedule"].clone()).unwrap();
            let kwargs: SchedulerKwargs = serde_json::from_value(case["kwargs"].clone()).unwrap();
            kwargs.check(schedule, base).unwrap();
            let (warmup, total) = (
                case["warmup"].as_i64().unwrap(),
                case["total"].as_i64().unwrap(),
            );
            for (step, expected) in case["rates"].as_array().unwrap().iter().enumerate() {
                let expected = expected.as_f64().unwrap();
                let ours = learning_rate(schedule, &kwargs, base, step as i64, warmup, total);
                assert!(
                    (ours - expected).abs() <= 1e-15 * expected.abs().max(1e-12),
                    "{case}: step {step}: {ours} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn kwargs_a_schedule_does_not_take_are_refused() {
        let kwargs = |json: &str| serde_json::from_str::<SchedulerKwargs>(json).unwrap();
        let error = kwargs(r#"{"num_cycles": 2}"#)
            .check(Schedule::Linear, 1e-3)
            .unwrap_err();
        assert!(
            error.contains("linear takes no settings, not num_cycles"),
            "{error}"
        );
        let error = kwargs("{}")
            .check(Schedule::CosineWithMinLr, 1e-3)
            .unwrap_err();
        assert!(error.contains("needs min_lr or min_lr_rate"), "{error}");
        let error = kwargs(r#"{"min_lr": 1e-5, "min_lr_rate": 0.1}"#)
            .check(Schedule::CosineWithMinLr, 1e-3)
            .unwrap_err();
        assert!(error.contains("not both"), "{error}");
        let error = kwargs(r#"{"lr_end": 1e-2}"#)
            .check(Schedule::Polynomial, 1e-3)
            .unwrap_err();
        assert!(error.contains("must be smaller"), "{error}");
        assert!(serde_json::from_str::<SchedulerKwargs>(r#"{"cycles": 2}"#).is_err());
        let error = kwargs("{}")
            .check(Schedule::WarmupStableDecay, 1e-3)
            .unwrap_err();
        assert!(error.contains("needs num_decay_steps"), "{error}");
        assert!(serde_json::from_str::<SchedulerKwargs>(r#"{"decay_type": "exp"}"#).is_err());
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
