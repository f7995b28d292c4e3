//! Which generation settings an `evaluate` run uses. Each setting comes from its flag
//! if given, else from the model's generation_config.json, else from HF's defaults:
//! transformers' `generate` merges its keyword arguments over `model.generation_config`
//! the same way, one setting at a time (checked against `_prepare_generation_config`
//! in `tests/golden/generation_config.json`).
//!
//! One rule is amthal's own and wins over the file: a `--temperature` given without
//! `--do-sample` decides alone whether to sample (above 0) or not (0), where HF would
//! look at `do_sample`. A file's `max_length` is not used (HF's fallback of 20 tokens in
//! all is rarely what a run wants): `--max-new-tokens`, the file's `max_new_tokens`,
//! else 256.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Deserialize;

use crate::bail_input;
use crate::cli::GenerationArgs;
use crate::error::bad_input;
use crate::generate::{EarlyStopping, SamplingConfig};

/// `--generation-config auto|none|FILE`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GenerationConfigSource {
    /// The model folder's generation_config.json, if it has one (GGUF files have none).
    #[default]
    Auto,
    /// HF's defaults only.
    None,
    File(PathBuf),
}

impl std::str::FromStr for GenerationConfigSource {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match text {
            "auto" => GenerationConfigSource::Auto,
            "none" => GenerationConfigSource::None,
            "" => return Err("give auto, none or a generation_config.json file".into()),
            path => GenerationConfigSource::File(PathBuf::from(path)),
        })
    }
}

impl GenerationConfigSource {
    /// The file to read, if any: for `auto` the model folder's (None for GGUF files).
    pub fn file(&self, model_dir: Option<&Path>) -> Result<Option<GenerationConfigFile>> {
        match self {
            GenerationConfigSource::None => Ok(None),
            GenerationConfigSource::File(path) => GenerationConfigFile::read(path).map(Some),
            GenerationConfigSource::Auto => match model_dir {
                Some(dir) if dir.join("generation_config.json").is_file() => {
                    GenerationConfigFile::read(&dir.join("generation_config.json")).map(Some)
                }
                _ => Ok(None),
            },
        }
    }
}

/// The keys of HF's GenerationConfig that `evaluate` uses; others are ignored, and a
/// `null` counts as absent (HF's `None`: its default applies).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfigValues {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub typical_p: Option<f64>,
    pub epsilon_cutoff: Option<f64>,
    pub eta_cutoff: Option<f64>,
    pub top_h: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub no_repeat_ngram_size: Option<usize>,
    pub num_beams: Option<usize>,
    pub length_penalty: Option<f64>,
    pub early_stopping: Option<EarlyStoppingValue>,
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
}

/// HF's `early_stopping`: a bool or the string "never".
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum EarlyStoppingValue {
    Flag(bool),
    Word(String),
}

/// A generation_config.json and where it was read from (for messages and the sidecar).
#[derive(Debug, Clone)]
pub struct GenerationConfigFile {
    pub path: PathBuf,
    pub values: GenerationConfigValues,
    /// The whole file (its stop ids, and what amthal does not use).
    pub raw: serde_json::Value,
}

impl GenerationConfigFile {
    pub fn read(path: &Path) -> Result<GenerationConfigFile> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            bad_input(format!(
                "{}: cannot read the generation config: {e}",
                path.display()
            ))
        })?;
        let refuse = |what: String| {
            bad_input(format!(
                "{}: not a generation config HF could read: {what}",
                path.display()
            ))
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| refuse(e.to_string()))?;
        let values = serde_json::from_value(json.clone()).map_err(|e| {
            // serde's message does not say which key; find it, one key at a time.
            let key = json.as_object().and_then(|object| {
                object.iter().find(|(key, value)| {
                    let alone = serde_json::json!({ key.as_str(): value });
                    serde_json::from_value::<GenerationConfigValues>(alone).is_err()
                })
            });
            match key {
                Some((key, value)) => refuse(format!("{key} is {value}: {e}")),
                None => refuse(e.to_string()),
            }
        })?;
        Ok(GenerationConfigFile {
            path: path.to_path_buf(),
            values,
            raw: json,
        })
    }
}

/// The settings a run uses, which of them came from the file, and the warnings to show.
#[derive(Debug, Clone)]
pub struct ResolvedGeneration {
    pub sampling: SamplingConfig,
    /// generation_config.json keys that set a value (in the sidecar, and said on stderr).
    pub from_file: Vec<&'static str>,
    pub warnings: Vec<String>,
}

/// Where a value came from, for the messages that refuse it.
#[derive(Clone, Copy)]
enum Origin<'a> {
    Flag(&'static str),
    File(&'a Path, &'static str),
    Default,
}

impl Origin<'_> {
    fn name(&self) -> String {
        match self {
            Origin::Flag(flag) => flag.to_string(),
            Origin::File(path, key) => format!("{}: {key}", path.display()),
            Origin::Default => "the default".to_string(),
        }
    }
}

/// Picks flag > file > default for each setting and records which file keys were used.
struct Picker<'a> {
    file: Option<&'a GenerationConfigFile>,
    from_file: Vec<&'static str>,
}

impl<'a> Picker<'a> {
    fn pick<T: Copy>(
        &mut self,
        flag: (Option<T>, &'static str),
        file: impl Fn(&GenerationConfigValues) -> Option<T>,
        key: &'static str,
        default: T,
    ) -> (T, Origin<'a>) {
        if let Some(value) = flag.0 {
            return (value, Origin::Flag(flag.1));
        }
        if let Some(found) = self.file
            && let Some(value) = file(&found.values)
        {
            self.from_file.push(key);
            return (value, Origin::File(&found.path, key));
        }
        (default, Origin::Default)
    }
}

fn check_range(value: f64, origin: Origin, valid: bool, range: &str) -> Result<()> {
    if !valid {
        bail_input!("{} must be {range}, not {value}", origin.name());
    }
    Ok(())
}

/// The run's settings from the flags and (if any) a generation_config.json; refuses
/// what HF refuses (naming the flag or the file's key) and what amthal does not build.
/// Called once before loading with no file (flags fail fast) and once after.
pub fn resolve(
    flags: &GenerationArgs,
    file: Option<&GenerationConfigFile>,
    seed: u64,
) -> Result<ResolvedGeneration> {
    let mut picker = Picker {
        file,
        from_file: Vec::new(),
    };
    let mut warnings = Vec::new();
    if let Some(given) = flags.temperature
        && !(given >= 0.0 && given.is_finite())
    {
        bail_input!("--temperature must be 0 (greedy) or positive, not {given}");
    }
    // Whether to sample: --do-sample, else amthal's rule for a lone --temperature,
    // else the file's do_sample. HF's defaults (temperature 1, top-k 50) apply when
    // do_sample said so, from the flag or the file.
    let file_do_sample = file.and_then(|f| f.values.do_sample);
    let (sampling, hf_do_sample) = match (flags.do_sample, flags.temperature) {
        (Some(do_sample), _) => (do_sample, do_sample),
        (None, Some(t)) => {
            let hf_do_sample = t > 0.0 && file_do_sample == Some(true);
            if hf_do_sample {
                picker.from_file.push("do_sample");
            }
            (t > 0.0, hf_do_sample)
        }
        (None, None) => {
            let do_sample = picker
                .pick((None, ""), |v| v.do_sample, "do_sample", false)
                .0;
            (do_sample, do_sample)
        }
    };
    let temperature = if sampling {
        let (t, origin) = picker.pick(
            (flags.temperature, "--temperature"),
            |v| v.temperature,
            "temperature",
            1.0,
        );
        if !(t > 0.0 && t.is_finite()) {
            let hint = match (origin, flags.do_sample) {
                (Origin::Flag(_), _) => "leave out --do-sample to decode greedily",
                (_, Some(true)) => "give --temperature T above 0 to sample",
                _ => "give --do-sample false to decode greedily, or --temperature T above 0",
            };
            bail_input!(
                "{} is {t} while sampling: sampling needs a positive temperature (HF refuses \
                 it too); {hint}",
                origin.name()
            );
        }
        t
    } else {
        if flags.do_sample == Some(false)
            && let Some(t) = flags.temperature.filter(|t| *t > 0.0)
        {
            warnings.push(format!(
                "--do-sample false: decoding greedily, --temperature {t} is not used"
            ));
        }
        0.0
    };
    // The file's sampling settings only matter when sampling (HF ignores them too).
    let whole_file = picker.file;
    if !sampling {
        picker.file = None;
    }
    let top_k_default = if hf_do_sample { 50 } else { 0 };
    let (top_k, _) = picker.pick(
        (flags.top_k, "--top-k"),
        |v| v.top_k,
        "top_k",
        top_k_default,
    );
    let (top_p, top_p_from) = picker.pick((flags.top_p, "--top-p"), |v| v.top_p, "top_p", 1.0);
    check_range(top_p, top_p_from, (0.0..=1.0).contains(&top_p), "in [0, 1]")?;
    let (min_p, min_p_from) = picker.pick(
        (flags.min_p.map(Some), "--min-p"),
        |v| v.min_p.map(Some),
        "min_p",
        None,
    );
    if let Some(p) = min_p {
        check_range(p, min_p_from, (0.0..=1.0).contains(&p), "in [0, 1]")?;
    }
    let (typical_p, typical_from) = picker.pick(
        (flags.typical_p, "--typical-p"),
        |v| v.typical_p,
        "typical_p",
        1.0,
    );
    check_range(
        typical_p,
        typical_from,
        typical_p > 0.0 && typical_p <= 1.0,
        "in (0, 1]",
    )?;
    let (epsilon_cutoff, epsilon_from) = picker.pick(
        (flags.epsilon_cutoff, "--epsilon-cutoff"),
        |v| v.epsilon_cutoff,
        "epsilon_cutoff",
        0.0,
    );
    check_range(
        epsilon_cutoff,
        epsilon_from,
        (0.0..1.0).contains(&epsilon_cutoff),
        "in [0, 1)",
    )?;
    let (eta_cutoff, eta_from) = picker.pick(
        (flags.eta_cutoff, "--eta-cutoff"),
        |v| v.eta_cutoff,
        "eta_cutoff",
        0.0,
    );
    check_range(
        eta_cutoff,
        eta_from,
        (0.0..1.0).contains(&eta_cutoff),
        "in [0, 1)",
    )?;
    let (top_h, top_h_from) = picker.pick(
        (flags.top_h.map(Some), "--top-h"),
        |v| v.top_h.map(Some),
        "top_h",
        None,
    );
    if let Some(h) = top_h {
        check_range(h, top_h_from, h > 0.0 && h <= 1.0, "in (0, 1]")?;
    }
    picker.file = whole_file;
    if !sampling {
        // HF warns when sampling settings are set but not used; amthal warns for the
        // flags only (a model's file often carries them for callers that sample).
        let unused: Vec<&str> = [
            ("--top-p", flags.top_p.is_some_and(|p| p != 1.0)),
            ("--top-k", flags.top_k.is_some_and(|k| k != 0)),
            ("--min-p", flags.min_p.is_some()),
            ("--typical-p", flags.typical_p.is_some_and(|p| p != 1.0)),
            (
                "--epsilon-cutoff",
                flags.epsilon_cutoff.is_some_and(|e| e != 0.0),
            ),
            ("--eta-cutoff", flags.eta_cutoff.is_some_and(|e| e != 0.0)),
            ("--top-h", flags.top_h.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect();
        if !unused.is_empty() {
            warnings.push(format!(
                "{} only apply when sampling (--temperature above 0 or --do-sample); decoding \
                 greedily without them",
                unused.join(", ")
            ));
        }
    }
    let (repetition_penalty, penalty_from) = picker.pick(
        (flags.repetition_penalty, "--repetition-penalty"),
        |v| v.repetition_penalty,
        "repetition_penalty",
        1.0,
    );
    check_range(
        repetition_penalty,
        penalty_from,
        repetition_penalty > 0.0 && repetition_penalty.is_finite(),
        "positive",
    )?;
    let (no_repeat_ngram_size, _) = picker.pick(
        (flags.no_repeat_ngram_size, "--no-repeat-ngram-size"),
        |v| v.no_repeat_ngram_size,
        "no_repeat_ngram_size",
        0,
    );
    let (num_beams, beams_from) = picker.pick(
        (flags.num_beams, "--num-beams"),
        |v| v.num_beams,
        "num_beams",
        1,
    );
    if num_beams == 0 {
        bail_input!(
            "{} must be at least 1 (1: no beam search)",
            beams_from.name()
        );
    }
    if num_beams > 1 && sampling {
        bail_input!(
            "{} is {num_beams} while sampling (temperature {temperature}): beam sampling (HF's \
             do_sample with num_beams) is not built; beam search is greedy, so give \
             --do-sample false or --num-beams 1",
            beams_from.name()
        );
    }
    let (length_penalty, length_from) = picker.pick(
        (flags.length_penalty, "--length-penalty"),
        |v| v.length_penalty,
        "length_penalty",
        1.0,
    );
    check_range(
        length_penalty,
        length_from,
        length_penalty.is_finite(),
        "a number",
    )?;
    let file_early_stopping = match file.and_then(|f| f.values.early_stopping.clone()) {
        None => None,
        Some(EarlyStoppingValue::Flag(false)) => Some(EarlyStopping::Heuristic),
        Some(EarlyStoppingValue::Flag(true)) => Some(EarlyStopping::WhenFull),
        Some(EarlyStoppingValue::Word(word)) if word == "never" => Some(EarlyStopping::Never),
        Some(EarlyStoppingValue::Word(word)) => bail_input!(
            "{}: early_stopping must be true, false or \"never\", not \"{word}\"",
            file.map(|f| f.path.display().to_string())
                .unwrap_or_default()
        ),
    };
    let (early_stopping, _) = picker.pick(
        (flags.early_stopping, "--early-stopping"),
        |_| file_early_stopping,
        "early_stopping",
        EarlyStopping::Heuristic,
    );
    let (max_new_tokens, _) = picker.pick(
        (flags.max_new_tokens, "--max-new-tokens"),
        |v| v.max_new_tokens,
        "max_new_tokens",
        256,
    );
    let (min_new_tokens, _) = picker.pick(
        (flags.min_new_tokens, "--min-new-tokens"),
        |v| v.min_new_tokens,
        "min_new_tokens",
        0,
    );
    if let Some(file) = file {
        let unused = unused_keys(&file.raw);
        if !unused.is_empty() {
            warnings.push(format!(
                "{}: {} set, which HF's generate would apply and amthal does not",
                file.path.display(),
                unused.join(", ")
            ));
        }
    }
    Ok(ResolvedGeneration {
        sampling: SamplingConfig {
            max_new_tokens,
            min_new_tokens,
            temperature,
            top_p,
            top_k,
            min_p,
            typical_p,
            epsilon_cutoff,
            eta_cutoff,
            top_h,
            repetition_penalty,
            no_repeat_ngram_size,
            seed,
            num_beams,
            length_penalty,
            early_stopping,
        },
        from_file: picker.from_file,
        warnings,
    })
}

/// Keys of a generation_config.json that change HF's output, set to other than their
/// default, which amthal does not implement (`max_length` is left out on purpose: see
/// the module's comment).
pub fn unused_keys(raw: &serde_json::Value) -> Vec<&'static str> {
    use serde_json::Value;
    let set = |key: &str, default: &dyn Fn(&Value) -> bool| {
        raw.get(key).is_some_and(|v| !v.is_null() && !default(v))
    };
    let number = |n: f64| move |v: &Value| v.as_f64() == Some(n);
    let empty = |v: &Value| v.as_array().is_some_and(Vec::is_empty);
    [
        ("min_length", set("min_length", &number(0.0))),
        ("bad_words_ids", set("bad_words_ids", &empty)),
        ("suppress_tokens", set("suppress_tokens", &empty)),
        (
            "begin_suppress_tokens",
            set("begin_suppress_tokens", &empty),
        ),
        (
            "forced_bos_token_id",
            set("forced_bos_token_id", &|_| false),
        ),
        (
            "forced_eos_token_id",
            set("forced_eos_token_id", &|_| false),
        ),
        ("sequence_bias", set("sequence_bias", &|_| false)),
        (
            "exponential_decay_length_penalty",
            set("exponential_decay_length_penalty", &|_| false),
        ),
        (
            "renormalize_logits",
            set("renormalize_logits", &|v| v == &Value::Bool(false)),
        ),
        ("penalty_alpha", set("penalty_alpha", &number(0.0))),
        ("num_beam_groups", set("num_beam_groups", &number(1.0))),
        ("diversity_penalty", set("diversity_penalty", &number(0.0))),
        ("stop_strings", set("stop_strings", &empty)),
        ("guidance_scale", set("guidance_scale", &number(1.0))),
        (
            "num_return_sequences",
            set("num_return_sequences", &number(1.0)),
        ),
    ]
    .into_iter()
    .filter_map(|(key, differs)| differs.then_some(key))
    .collect()
}
