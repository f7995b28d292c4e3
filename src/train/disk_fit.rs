//! Before training: will the run's checkpoints fit the disk under `--output-dir`?
//!
//! A full fine-tune of a 7B writes 14 GB of weights per checkpoint and 27-80 GB of
//! optimizer state besides, and the device machines have disks of 64 GB. Run out of
//! space and the checkpoint being written fails hours in (the temp folder is removed
//! and the last complete checkpoint stays usable, but the steps since are lost). So,
//! as for GPU memory (`device_fit.rs`), the run is refused before loading when its
//! checkpoints cannot fit, with the arithmetic and the setting that would; and each
//! save checks again, so a disk that filled up meanwhile is named as such.
//!
//! How many checkpoints exist at once: every one without `--save-total-limit`; with a
//! limit L, pruning after each save leaves L (and keeps the best checkpoint by eval
//! loss besides, if it is older), and the next one is written beside them. The final
//! and best models in OUT are hard links to a checkpoint's files: no extra space.
//! `AMTHAL_SKIP_DISK_CHECK=1` turns the check off (a filesystem whose free space
//! `statvfs` misreports).

use std::path::Path;

use anyhow::Result;

use crate::bail_input;

/// One checkpoint's size and how many a run can hold at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckpointPlan {
    /// Model files (the whole model, or the adapter).
    pub model_bytes: u64,
    /// Optimizer state (0 with `--save-only-model`).
    pub optimizer_bytes: u64,
    /// Checkpoints the run writes (at most).
    pub saves: usize,
    /// `--save-total-limit`.
    pub limit: Option<usize>,
    /// Whether the best checkpoint by eval loss is kept besides the limit.
    pub keeps_best: bool,
}

/// Config, tokenizer and trainer-state files beside the tensors (a Llama 3
/// tokenizer.json is 9 MB).
const SMALL_FILES_BYTES: u64 = 16 << 20;

impl CheckpointPlan {
    pub fn bytes_each(&self) -> u64 {
        self.model_bytes + self.optimizer_bytes + SMALL_FILES_BYTES
    }

    /// Checkpoints on disk at once while the next one is written, when the best one
    /// is (`with_best`) or is not an older one kept besides the limit.
    pub fn at_once(&self, with_best: bool) -> usize {
        match self.limit {
            None => self.saves,
            Some(limit) => {
                let kept = limit.max(1) + usize::from(with_best && self.keeps_best);
                self.saves.min(kept + 1)
            }
        }
    }
}

/// What the check says: fine, a warning to print, or a refusal (an error).
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Fits,
    /// Fits while each evaluation improves on the best; not if an older one stays best.
    FitsUnlessAnOlderBestIsKept(String),
}

/// A size as people read it: GB, MB or kB.
fn gb(bytes: u64) -> String {
    match bytes {
        1_000_000_000.. => format!("{:.1} GB", bytes as f64 / 1e9),
        1_000_000.. => format!("{:.0} MB", bytes as f64 / 1e6),
        _ => format!("{:.0} kB", bytes as f64 / 1e3),
    }
}

/// Judges `plan` against `free` bytes on the output directory's disk.
pub fn judge(plan: &CheckpointPlan, free: u64, output_dir: &Path) -> Result<Verdict> {
    let each = plan.bytes_each();
    let least = each * plan.at_once(false) as u64;
    let most = each * plan.at_once(true) as u64;
    let what = format!(
        "each checkpoint is ~{} (model {}, optimizer state {})",
        gb(each),
        gb(plan.model_bytes),
        gb(plan.optimizer_bytes)
    );
    let count = match plan.limit {
        None => format!(
            "all {} of the run's checkpoints are kept (no --save-total-limit)",
            plan.saves
        ),
        Some(limit) => format!(
            "up to {} exist at once (--save-total-limit {limit}, and the one being written)",
            plan.at_once(false)
        ),
    };
    if least > free {
        let fits = |alternative: &CheckpointPlan| {
            alternative.bytes_each() * alternative.at_once(false) as u64 <= free
        };
        let alternatives = [
            (
                "--save-total-limit 1",
                CheckpointPlan {
                    limit: Some(1),
                    ..*plan
                },
            ),
            (
                "--save-only-model",
                CheckpointPlan {
                    optimizer_bytes: 0,
                    ..*plan
                },
            ),
            (
                "--save-only-model --save-total-limit 1",
                CheckpointPlan {
                    optimizer_bytes: 0,
                    limit: Some(1),
                    ..*plan
                },
            ),
        ];
        let hint = alternatives
            .iter()
            .find(|(_, alternative)| alternative != plan && fits(alternative))
            .map_or(
                format!(
                    "an --output-dir on a disk with at least {} free",
                    gb(each * plan.at_once(false).min(2) as u64)
                ),
                |(flags, alternative)| {
                    format!(
                        "{flags} (~{} at once)",
                        gb(alternative.bytes_each() * alternative.at_once(false) as u64)
                    )
                },
            );
        bail_input!(
            "the checkpoints will not fit the disk of {}: {what}, {count}: ~{}, but it has {} free; \
             what would fit: {hint} (AMTHAL_SKIP_DISK_CHECK=1 skips this check)",
            output_dir.display(),
            gb(least),
            gb(free)
        );
    }
    if most > free {
        return Ok(Verdict::FitsUnlessAnOlderBestIsKept(format!(
            "warning: {what}; the disk of {} has {} free: enough for {} at once, not for {} \
             if an older checkpoint stays the best by eval loss (it is kept besides --save-total-limit); \
             --save-only-model would make each ~{}",
            output_dir.display(),
            gb(free),
            plan.at_once(false),
            plan.at_once(true),
            gb(plan.model_bytes + SMALL_FILES_BYTES)
        )));
    }
    Ok(Verdict::Fits)
}

/// Whether the check is turned off (`AMTHAL_SKIP_DISK_CHECK=1`).
fn skipped() -> bool {
    std::env::var("AMTHAL_SKIP_DISK_CHECK").is_ok_and(|v| v == "1")
}

/// Before training: refuses a run whose checkpoints cannot fit the disk, warns when
/// they fit only if the best checkpoint is the latest.
pub fn check_checkpoints_fit_the_disk(plan: &CheckpointPlan, output_dir: &Path) -> Result<()> {
    if skipped() {
        return Ok(());
    }
    let Some(free) = free_bytes(output_dir) else {
        return Ok(());
    };
    match judge(plan, free, output_dir)? {
        Verdict::FitsUnlessAnOlderBestIsKept(warning) => eprintln!("{warning}"),
        Verdict::Fits => eprintln!(
            "checkpoints: ~{} each, up to {} at once; {} free on the disk of {}",
            gb(plan.bytes_each()),
            plan.at_once(true),
            gb(free),
            output_dir.display()
        ),
    }
    Ok(())
}

/// Before each save: is there room for one more checkpoint? (Something else may have
/// filled the disk since the run started.)
pub fn check_room_for_checkpoint(
    plan: &CheckpointPlan,
    output_dir: &Path,
    step: i64,
    last_checkpoint: Option<i64>,
) -> Result<()> {
    if skipped() {
        return Ok(());
    }
    let Some(free) = free_bytes(output_dir) else {
        return Ok(());
    };
    if plan.bytes_each() > free {
        let last = last_checkpoint.map_or(
            "no checkpoint has been written yet".to_string(),
            |s| format!("checkpoint-{s} is the last complete one (resume from it with --resume once there is room)"),
        );
        bail_input!(
            "checkpoint-{step} needs ~{} but the disk of {} has {} free; {last}",
            gb(plan.bytes_each()),
            output_dir.display(),
            gb(free)
        );
    }
    Ok(())
}

/// Bytes free to this user on the filesystem holding `path` (or its nearest existing
/// ancestor: the output directory may not exist yet); None if it cannot be read.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let mut here = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    while !here.exists() {
        here = match here.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
    }
    let name = std::ffi::CString::new(here.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `name` is a valid C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(name.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;

    /// The seed's full fine-tune of a 7B with 8-bit AdamW: 13.5 GB of bf16 weights and
    /// ~27 GB of state, on the device machine's 64 GiB disk.
    fn seven_b(limit: Option<usize>, keeps_best: bool) -> CheckpointPlan {
        CheckpointPlan {
            model_bytes: 13_500_000_000,
            optimizer_bytes: 27_000_000_000,
            saves: 3,
            limit,
            keeps_best,
        }
    }

    #[test]
    fn counts_the_checkpoints_that_exist_at_once() {
        let plan = seven_b(None, true);
        assert_eq!(plan.at_once(true), 3);
        let plan = seven_b(Some(1), true);
        assert_eq!((plan.at_once(false), plan.at_once(true)), (2, 3));
        let plan = seven_b(Some(1), false);
        assert_eq!((plan.at_once(false), plan.at_once(true)), (2, 2));
        // A limit above the run's checkpoints: all of them.
        let plan = seven_b(Some(5), true);
        assert_eq!(plan.at_once(true), 3);
        // --save-total-limit 0 keeps the latest, as 1 does.
        assert_eq!(seven_b(Some(0), false).at_once(false), 2);
    }

    #[test]
    fn refuses_what_cannot_fit_and_names_what_would() {
        let out = Path::new("/out");
        let disk = 68 * GB;
        // Three full checkpoints (121 GB) cannot fit 68 GB, nor two at a time (81 GB);
        // weights only, two at a time (27 GB) do.
        let error = judge(&seven_b(None, true), disk, out)
            .unwrap_err()
            .to_string();
        assert!(error.contains("will not fit the disk of /out"), "{error}");
        assert!(error.contains("each checkpoint is ~40.5 GB"), "{error}");
        assert!(error.contains("all 3 of the run's checkpoints"), "{error}");
        assert!(
            error.contains("what would fit: --save-only-model ("),
            "{error}"
        );
        // With room for two checkpoints: --save-total-limit 1 is the advice.
        let error = judge(&seven_b(None, false), 90 * GB, out)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("what would fit: --save-total-limit 1 ("),
            "{error}"
        );
        // Nothing fits: a bigger disk, with the size.
        let error = judge(&seven_b(Some(1), false), 10 * GB, out)
            .unwrap_err()
            .to_string();
        assert!(error.contains("a disk with at least"), "{error}");
        // A LoRA adapter's checkpoints fit anywhere.
        let lora = CheckpointPlan {
            model_bytes: 160_000_000,
            optimizer_bytes: 320_000_000,
            saves: 10,
            limit: None,
            keeps_best: true,
        };
        assert_eq!(judge(&lora, disk, out).unwrap(), Verdict::Fits);
    }

    #[test]
    fn warns_when_only_a_kept_older_best_would_overflow() {
        let out = Path::new("/out");
        // Two 40.5 GB checkpoints fit 90 GB; a third (an older best kept) does not.
        match judge(&seven_b(Some(1), true), 90 * GB, out).unwrap() {
            Verdict::FitsUnlessAnOlderBestIsKept(warning) => {
                assert!(
                    warning.contains("enough for 2 at once, not for 3"),
                    "{warning}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            judge(&seven_b(Some(1), true), 130 * GB, out).unwrap(),
            Verdict::Fits
        );
    }

    /// The checks on a real folder: a plan no disk holds is refused (before the run,
    /// and before a save, naming the last complete checkpoint), a small one passes.
    #[test]
    fn the_checks_read_the_real_disk() {
        let out = std::env::temp_dir().join("amthal-disk-fit-not-made");
        let huge = CheckpointPlan {
            model_bytes: u64::MAX / 8,
            optimizer_bytes: 0,
            saves: 2,
            limit: None,
            keeps_best: false,
        };
        let error = check_checkpoints_fit_the_disk(&huge, &out)
            .unwrap_err()
            .to_string();
        assert!(error.contains("will not fit the disk"), "{error}");
        let error = check_room_for_checkpoint(&huge, &out, 8, Some(4))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("checkpoint-8 needs")
                && error.contains("checkpoint-4 is the last complete one"),
            "{error}"
        );
        let small = CheckpointPlan {
            model_bytes: 1000,
            ..huge
        };
        check_checkpoints_fit_the_disk(&small, &out).unwrap();
        check_room_for_checkpoint(&small, &out, 8, None).unwrap();
    }

    #[test]
    fn reads_the_free_space_of_a_folder_not_made_yet() {
        let dir = std::env::temp_dir();
        let here = free_bytes(&dir).expect("statvfs of the temp dir");
        let below = free_bytes(&dir.join("not/made/yet")).expect("its nearest ancestor");
        // Same filesystem; another process may write between the two calls.
        let difference = here.abs_diff(below);
        assert!(difference < 1 << 30, "{here} vs {below}");
        assert!(free_bytes(Path::new("relative-not-made")).is_some());
    }
}
