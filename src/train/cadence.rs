//! When a step evaluates and when it writes a checkpoint (HF's eval_strategy and
//! save_strategy), as pure functions of the step's place in the run, so the loop
//! (`after_step`), the disk check's count of checkpoints (`disk_fit.rs`) and the tests
//! share one rule.
//!
//! One deviation from HF: a strategy that saves on a schedule (`steps`, `epoch`) also
//! saves at every evaluation that improves the best eval loss. amthal publishes the
//! best model at the end of every run (HF's load_best_model_at_end), and HF, which
//! publishes the best *saved* checkpoint, insists on saves that coincide with
//! evaluations for that; saving the new best instead lets the two schedules differ
//! (evaluate every 50 steps, save every 500) and still publish the true best. With
//! `--load-best-model-at-end false` OUT holds the last model, and the schedules save
//! only on their schedule, as HF's.

use super::config::{EvalStrategy, SaveStrategy, TrainConfig};

/// Where a just-finished optimizer step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlace {
    /// 1-based optimizer step.
    pub step: i64,
    pub epoch_end: bool,
    pub last_step: bool,
}

/// What the step's evaluation (if any) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EvaluationOutcome {
    pub evaluated: bool,
    /// The eval loss is the best so far.
    pub new_best: bool,
    /// Early stopping ends the run here.
    pub stopping_early: bool,
}

/// Whether this step evaluates on the validation split.
pub fn evaluation_due(config: &TrainConfig, place: StepPlace) -> bool {
    match config.eval_strategy {
        EvalStrategy::Epoch => place.epoch_end || place.last_step,
        EvalStrategy::Steps => every(place.step, config.eval_steps) || place.last_step,
        EvalStrategy::No => false,
    }
}

/// Whether this step writes a checkpoint. The last step always does (the final model is
/// published from it), as does a stop by early stopping.
pub fn save_due(config: &TrainConfig, place: StepPlace, outcome: EvaluationOutcome) -> bool {
    if place.last_step || outcome.stopping_early {
        return true;
    }
    // A new best goes to disk when OUT is to hold the best model at the end.
    let best_for_out = outcome.new_best && config.load_best_model_at_end;
    match config.save_strategy {
        SaveStrategy::Auto => match config.eval_strategy {
            EvalStrategy::No => place.epoch_end,
            _ => outcome.evaluated,
        },
        SaveStrategy::Steps => every(place.step, config.save_steps) || best_for_out,
        SaveStrategy::Epoch => place.epoch_end || best_for_out,
        SaveStrategy::Best => outcome.new_best,
        SaveStrategy::No => false,
    }
}

fn every(step: i64, interval: usize) -> bool {
    interval > 0 && step > 0 && (step as usize).is_multiple_of(interval)
}

/// The most checkpoints a run of `total_steps` optimizer steps writes (every
/// evaluation counted as a possible new best), for the disk check.
pub fn planned_saves(config: &TrainConfig, total_steps: i64, windows_per_epoch: usize) -> usize {
    let windows_per_epoch = windows_per_epoch.max(1) as i64;
    (1..=total_steps.max(0))
        .filter(|&step| {
            let place = StepPlace {
                step,
                epoch_end: step % windows_per_epoch == 0,
                last_step: step == total_steps,
            };
            let evaluated = evaluation_due(config, place);
            let outcome = EvaluationOutcome {
                evaluated,
                new_best: evaluated,
                stopping_early: false,
            };
            save_due(config, place, outcome)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(eval: EvalStrategy, save: SaveStrategy) -> TrainConfig {
        TrainConfig {
            eval_strategy: eval,
            eval_steps: 5,
            save_strategy: save,
            save_steps: 4,
            ..TrainConfig::default()
        }
    }

    /// The steps of a 12-step run (epochs of 6 steps) that save, when the evaluations
    /// at `best_at` are new bests and the others are not.
    fn saved_steps(config: &TrainConfig, best_at: &[i64]) -> Vec<i64> {
        (1..=12)
            .filter(|&step| {
                let place = StepPlace {
                    step,
                    epoch_end: step % 6 == 0,
                    last_step: step == 12,
                };
                let evaluated = evaluation_due(config, place);
                let outcome = EvaluationOutcome {
                    evaluated,
                    new_best: evaluated && best_at.contains(&step),
                    stopping_early: false,
                };
                save_due(config, place, outcome)
            })
            .collect()
    }

    #[test]
    fn evaluations_follow_the_eval_strategy_and_always_end_the_run() {
        let evaluated = |eval| {
            let config = config(eval, SaveStrategy::Auto);
            (1..=12)
                .filter(|&step| {
                    evaluation_due(
                        &config,
                        StepPlace {
                            step,
                            epoch_end: step % 6 == 0,
                            last_step: step == 12,
                        },
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(evaluated(EvalStrategy::Steps), [5, 10, 12]);
        assert_eq!(evaluated(EvalStrategy::Epoch), [6, 12]);
        assert!(evaluated(EvalStrategy::No).is_empty());
    }

    #[test]
    fn auto_saves_at_every_evaluation_or_each_epoch_without_one() {
        let steps = config(EvalStrategy::Steps, SaveStrategy::Auto);
        assert_eq!(saved_steps(&steps, &[]), [5, 10, 12]);
        let none = config(EvalStrategy::No, SaveStrategy::Auto);
        assert_eq!(saved_steps(&none, &[]), [6, 12]);
    }

    #[test]
    fn scheduled_strategies_add_the_new_bests() {
        let steps = config(EvalStrategy::Steps, SaveStrategy::Steps);
        assert_eq!(saved_steps(&steps, &[]), [4, 8, 12]);
        assert_eq!(saved_steps(&steps, &[5]), [4, 5, 8, 12]);
        let epoch = config(EvalStrategy::Steps, SaveStrategy::Epoch);
        assert_eq!(saved_steps(&epoch, &[10]), [6, 10, 12]);
        // Not when OUT is to hold the last model.
        let last_in_out = TrainConfig {
            load_best_model_at_end: false,
            ..steps
        };
        assert_eq!(saved_steps(&last_in_out, &[5]), [4, 8, 12]);
    }

    #[test]
    fn best_saves_only_new_bests_and_no_only_the_last_step() {
        let best = config(EvalStrategy::Steps, SaveStrategy::Best);
        assert_eq!(saved_steps(&best, &[5]), [5, 12]);
        assert_eq!(saved_steps(&best, &[5, 10]), [5, 10, 12]);
        let no = config(EvalStrategy::Steps, SaveStrategy::No);
        assert_eq!(saved_steps(&no, &[5, 10]), [12]);
    }

    #[test]
    fn early_stopping_saves_whatever_the_strategy() {
        let no = config(EvalStrategy::Steps, SaveStrategy::No);
        let place = StepPlace {
            step: 5,
            epoch_end: false,
            last_step: false,
        };
        let stop = EvaluationOutcome {
            evaluated: true,
            new_best: false,
            stopping_early: true,
        };
        assert!(save_due(&no, place, stop));
        assert!(!save_due(&no, place, EvaluationOutcome::default()));
    }

    #[test]
    fn planned_saves_count_every_evaluation_as_a_possible_best() {
        let run = |eval, save| planned_saves(&config(eval, save), 12, 6);
        assert_eq!(run(EvalStrategy::Steps, SaveStrategy::Auto), 3);
        assert_eq!(run(EvalStrategy::No, SaveStrategy::Auto), 2);
        // saves at 4, 8, 12 and the evaluations at 5 and 10
        assert_eq!(run(EvalStrategy::Steps, SaveStrategy::Steps), 5);
        assert_eq!(run(EvalStrategy::Steps, SaveStrategy::Best), 3);
        assert_eq!(run(EvalStrategy::Steps, SaveStrategy::No), 1);
        assert_eq!(run(EvalStrategy::Epoch, SaveStrategy::Epoch), 2);
    }

    #[test]
    fn counts_the_saves_of_a_run() {
        let mut config = TrainConfig {
            eval_strategy: EvalStrategy::Steps,
            eval_steps: 50,
            ..TrainConfig::default()
        };
        // Steps 50, 100 and the last (120).
        assert_eq!(planned_saves(&config, 120, 7), 3);
        assert_eq!(planned_saves(&config, 100, 7), 2);
        config.eval_strategy = EvalStrategy::Epoch;
        // 3 epochs of 21 windows: one per epoch.
        assert_eq!(planned_saves(&config, 63, 21), 3);
        // --max-steps ending inside the second epoch: the first epoch and the last step.
        assert_eq!(planned_saves(&config, 30, 21), 2);
        config.eval_strategy = EvalStrategy::No;
        assert_eq!(planned_saves(&config, 63, 21), 3);
    }
}
