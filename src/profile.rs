//! Where a training or decoding step's time goes, for the GPU benchmark
//! (`AMTHAL_PROFILE_STEP=1`; `train` and `evaluate` print the table at the end).
//!
//! At each phase boundary (forward, backward, optimizer; prefill, decode, sampling)
//! the host time spent issuing the phase's work is recorded, then the device is
//! synchronized and the time waited for it is recorded too. A phase whose *issue* time dominates is bound by the host
//! (kernel launches, dispatcher overhead); one whose *wait* dominates is bound by the
//! device (math or memory). The synchronizations cost some overlap, so this is off by
//! default and the benchmark runs it separately from its timed rows.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Default)]
struct Totals {
    /// phase -> (issue seconds, wait seconds, times, kernels)
    phases: BTreeMap<&'static str, (f64, f64, u64, u64)>,
    last: Option<Instant>,
    device: Option<usize>,
    /// Steps started (`start` calls).
    steps: u64,
    /// Kernels by phase and operator name.
    kernels: BTreeMap<&'static str, BTreeMap<String, u64>>,
    /// Whether operators are counted (the ops library loaded).
    counting: bool,
}

/// The kernels counted since the last call, by operator name.
fn take_kernels() -> Vec<(String, u64)> {
    crate::torch_ops::ops()
        .and_then(|ops| ops.take_op_counts().ok())
        .unwrap_or_default()
}

thread_local! {
    static PROFILE: RefCell<Option<Totals>> = const { RefCell::new(None) };
}

/// Turns profiling on for this thread when `AMTHAL_PROFILE_STEP` is set.
pub fn enable_from_env(device: tch::Device) {
    if std::env::var_os("AMTHAL_PROFILE_STEP").is_none() {
        return;
    }
    let device = match device {
        tch::Device::Cuda(index) => Some(index),
        _ => None,
    };
    let counting = crate::torch_ops::ops().is_some_and(|ops| ops.start_counting_ops().is_ok());
    PROFILE.with(|p| {
        *p.borrow_mut() = Some(Totals {
            device,
            counting,
            ..Totals::default()
        })
    });
}

/// Marks the start of a step's first phase.
pub fn start() {
    begin(true);
}

/// Marks the start of a later phase of the same step after host work that belongs to
/// no phase (evaluate's decode step, after the admission of new prompts and the
/// bookkeeping): the step count, which "kernels per step" divides by, stays.
pub fn resume() {
    begin(false);
}

fn begin(new_step: bool) {
    PROFILE.with(|p| {
        if let Some(totals) = p.borrow_mut().as_mut() {
            if let Some(device) = totals.device {
                crate::cuda::synchronize(device);
            }
            if totals.counting {
                // What ran between phases (data, logs) is not a phase's.
                let _ = take_kernels();
            }
            if new_step {
                totals.steps += 1;
            }
            totals.last = Some(Instant::now());
        }
    });
}

/// Ends phase `name`: host time since the previous mark, then the wait for the device.
pub fn mark(name: &'static str) {
    PROFILE.with(|p| {
        if let Some(totals) = p.borrow_mut().as_mut() {
            let Some(last) = totals.last else { return };
            let issued = last.elapsed().as_secs_f64();
            let waiting = Instant::now();
            if let Some(device) = totals.device {
                crate::cuda::synchronize(device);
            }
            let waited = waiting.elapsed().as_secs_f64();
            let mut launched = 0;
            if totals.counting {
                for (op, count) in take_kernels() {
                    launched += count;
                    *totals
                        .kernels
                        .entry(name)
                        .or_default()
                        .entry(op)
                        .or_default() += count;
                }
            }
            let entry = totals.phases.entry(name).or_default();
            entry.0 += issued;
            entry.1 += waited;
            entry.2 += 1;
            entry.3 += launched;
            totals.last = Some(Instant::now());
        }
    });
}

/// The per-phase table (milliseconds per occurrence), or None when profiling is off.
pub fn report() -> Option<String> {
    PROFILE.with(|p| {
        let totals = p.borrow();
        let totals = totals.as_ref()?;
        let mut lines = vec![
            "step profile (ms per occurrence): phase, issue, wait, count, kernels".to_string(),
        ];
        for (name, (issued, waited, count, kernels)) in &totals.phases {
            let n = (*count).max(1) as f64;
            lines.push(format!(
                "  {name}: issue {:.1} ms, wait {:.1} ms, x{count}, {:.0} kernels",
                issued * 1e3 / n,
                waited * 1e3 / n,
                *kernels as f64 / n
            ));
        }
        if totals.counting && totals.steps > 0 {
            let steps = totals.steps as f64;
            let all: u64 = totals.kernels.values().flat_map(|ops| ops.values()).sum();
            lines.push(format!(
                "kernels per step: {:.0}; the most frequent per phase (per occurrence):",
                all as f64 / steps
            ));
            for (phase, ops) in &totals.kernels {
                let mut top: Vec<(&String, &u64)> = ops.iter().collect();
                top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                // Per occurrence of this phase (a decode step, one sampling), so that the
                // counts add up to the phase's kernels above.
                let occurrences = totals.phases.get(phase).map_or(1, |p| p.2.max(1)) as f64;
                lines.push(format!(
                    "  {phase}: {}",
                    top.iter()
                        .take(24)
                        .map(|(name, count)| format!(
                            "{} {:.1}",
                            name.trim_start_matches("aten::"),
                            **count as f64 / occurrences
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        Some(lines.join("\n"))
    })
}
