//! LoRA adapters in PEFT's format, both ways.
//!
//! On disk (what `PeftModel.from_pretrained` reads and `save_pretrained` writes):
//! - adapter_config.json: peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
//!   lora_dropout, target_modules, bias "none", base_model_name_or_path,
//!   fan_in_fan_out false, use_rslora. Only keys that peft before 0.14 knows, so old
//!   versions load it too.
//! - adapter_model.safetensors: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
//!   [r, in] and `...lora_B.weight` [out, r]; with DoRA (`use_dora`: true, a key written
//!   only then, as peft >= 0.9 knows it) also `...lora_magnitude_vector` [out].
//!
//! Scaling is alpha / r (alpha / sqrt(r) with rslora). New adapters start as PEFT's:
//! A kaiming-uniform(a = sqrt(5)), B zeros, and DoRA's magnitudes the base weight's
//! row norms (so a new adapter changes nothing).

use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};
use tch::{Kind, Tensor};

use super::linear::{Lora, Weight, row_norms};
use super::llama::{Llama, PROJECTIONS};
use super::lora_init::{self, LoraInit};
use super::peft_patterns::{Patterns, check_target_regex};
use super::safetensors_source::SafetensorsSource;
use super::tensor_io::{WritableTensor, write_safetensors};
use crate::bail_input;
use crate::error::bad_input;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// A LoRA recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// Projection names ("q_proj", ...).
    pub targets: Vec<String>,
    pub rslora: bool,
    /// DoRA: a trainable magnitude per output row beside A and B (`linear::Lora`).
    pub use_dora: bool,
    /// How new adapters start (PEFT's init_lora_weights, `lora_init`).
    pub init: LoraInit,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            rslora: false,
            use_dora: false,
            init: LoraInit::Default,
        }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks the targets name Llama projections.
    pub fn validate(&self) -> Result<()> {
        if self.r <= 0 {
            bail_input!("LoRA r must be positive, got {}", self.r);
        }
        for target in &self.targets {
            if !PROJECTIONS.contains(&target.as_str()) {
                bail_input!(
                    "LoRA target '{target}' is not a Llama projection ({})",
                    PROJECTIONS.join(", ")
                );
            }
        }
        Ok(())
    }

    fn targets_module(&self, module_path: &str) -> bool {
        let last = module_path.rsplit('.').next().unwrap_or(module_path);
        self.targets.iter().any(|t| t == last)
    }
}

/// Folds every attached adapter into its projection's weight, `W + scaling * B A`
/// (computed in f32, stored in the weight's dtype), and detaches it: PEFT's
/// `merge_and_unload`, in memory. Generation then runs one matmul per projection
/// instead of three. Returns how many projections were folded. For generation only.
pub fn fold_adapters(model: &mut Llama) -> usize {
    let mut folded = 0;
    for layer in model.layers.iter_mut() {
        for (_, linear) in layer.linears_mut() {
            if linear.lora.is_some() && linear.weight.dense().is_some() {
                linear.weight = Weight::Dense(tch::no_grad(|| linear.merged_weight()));
                linear.lora = None;
                folded += 1;
            } else if let (Some(lora), Weight::Quantized(_)) = (&mut linear.lora, &linear.weight)
                && let Some(magnitude) = &lora.magnitude
            {
                // A quantized projection keeps its adapter beside it: the sum would not
                // fit its 4- or 8-bit storage without another rounding. DoRA's factor,
                // constant while generating, is taken once from the dequantized weight.
                let factor = lora.dora_factor(magnitude, &linear.weight.to_f32());
                lora.frozen_factor = Some(factor);
            }
        }
    }
    folded
}

/// Attaches fresh adapters (f32, trainable) to the target projections, started as
/// `config.init` says (`lora_init`; PEFT's default: A kaiming-uniform, B zeros). Draws
/// from torch's global generator: seed it for reproducibility.
pub fn attach_new(model: &mut Llama, config: &LoraConfig) -> Result<()> {
    attach(model, config, None)
}

/// Attaches the adapters of a resumed PiSSA / OLoRA run: the initial factors come
/// from the checkpoint's converted adapter in `dir` (its second halves), the residual
/// is taken from the original weights with them, and A and B are then restored from
/// the first halves with the rest of the checkpoint.
pub fn attach_resumed_residual(model: &mut Llama, config: &LoraConfig, dir: &Path) -> Result<()> {
    let path = dir.join(ADAPTER_WEIGHTS);
    let source = SafetensorsSource::open_files(std::slice::from_ref(&path))?;
    attach(model, config, Some(&source))
}

fn attach(
    model: &mut Llama,
    config: &LoraConfig,
    saved_initial: Option<&SafetensorsSource>,
) -> Result<()> {
    config.validate()?;
    let device = model.device;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (path, linear) in layer.linears_mut() {
            if !config.targets_module(path) {
                continue;
            }
            let size = linear.weight.size();
            let (out, inp) = (size[0], size[1]);
            if config.init.changes_the_base() {
                let Some(weight) = linear.weight.dense() else {
                    bail_input!(
                        "--init-lora-weights {} changes the base weights, which a quantized \
                         base cannot hold: leave out --quantize",
                        config.init
                    );
                };
                if config.r > out.min(inp) {
                    bail_input!(
                        "--init-lora-weights {} takes r directions of {path} ({out} x {inp}); \
                         r = {} is more than it has",
                        config.init,
                        config.r
                    );
                }
                let scaling = config.scaling();
                let (a0, b0) = match saved_initial {
                    None => lora_init::residual_factors(config.init, weight, config.r, scaling),
                    Some(source) => {
                        let prefix = format!("base_model.model.model.layers.{i}.{path}");
                        let load = |part: &str, shape: [i64; 2]| -> Result<Tensor> {
                            let name = format!("{prefix}.{part}.weight");
                            match source.shape(&name) {
                                Some(found) if found == shape => {
                                    Ok(source.load(&name, Kind::Float, device)?.expect("present"))
                                }
                                found => bail_input!(
                                    "checkpoint adapter: {name} has shape {found:?}, a converted \
                                     {} adapter of r = {} needs {shape:?}",
                                    config.init,
                                    config.r
                                ),
                            }
                        };
                        let a = load("lora_A", [2 * config.r, inp])?;
                        let b = load("lora_B", [out, 2 * config.r])?;
                        lora_init::split_converted(&a, &b, config.r).1
                    }
                };
                let residual = lora_init::residual_weight(weight, &a0, &b0, scaling, weight.kind());
                linear.weight = Weight::Dense(residual);
                linear.lora = Some(Lora {
                    a: a0.copy().set_requires_grad(true),
                    b: b0.copy().set_requires_grad(true),
                    scaling,
                    dropout: config.dropout,
                    magnitude: None,
                    frozen_factor: None,
                    residual_init: Some((a0, b0)),
                });
                continue;
            }
            let a = match config.init {
                LoraInit::Gaussian => {
                    Tensor::randn([config.r, inp], (Kind::Float, device)) / config.r as f64
                }
                _ => {
                    // kaiming_uniform(a=sqrt(5)) on [r, in] is U(-1/sqrt(in), 1/sqrt(in)).
                    let bound = 1.0 / (inp as f64).sqrt();
                    Tensor::empty([config.r, inp], (Kind::Float, device)).uniform_(-bound, bound)
                }
            }
            .set_requires_grad(true);
            let b = Tensor::zeros([out, config.r], (Kind::Float, device)).set_requires_grad(true);
            // DoRA starts at the base weight's row norms (B = 0: ||W + 0||), in f32.
            let magnitude = config
                .use_dora
                .then(|| row_norms(&linear.weight.to_f32()).set_requires_grad(true));
            linear.lora = Some(Lora {
                a,
                b,
                scaling: config.scaling(),
                dropout: config.dropout,
                magnitude,
                frozen_factor: None,
                residual_init: None,
            });
        }
    }
    Ok(())
}

/// The adapter tensors with their PEFT names.
pub fn named_adapter_tensors(model: &Llama) -> Vec<(String, &Tensor)> {
    let mut named = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for (path, linear) in layer.linears() {
            if let Some(lora) = &linear.lora {
                let prefix = format!("base_model.model.model.layers.{i}.{path}");
                named.push((format!("{prefix}.lora_A.weight"), &lora.a));
                named.push((format!("{prefix}.lora_B.weight"), &lora.b));
                if let Some(magnitude) = &lora.magnitude {
                    named.push((format!("{prefix}.lora_magnitude_vector"), magnitude));
                }
            }
        }
    }
    named
}

/// The trainable adapter parameters.
pub fn adapter_parameters(model: &Llama) -> Vec<Tensor> {
    named_adapter_tensors(model)
        .into_iter()
        .map(|(_, t)| t.shallow_clone())
        .collect()
}

/// The tensors an adapter is saved as, by PEFT name, in f32; a PiSSA / OLoRA adapter
/// converted to a plain one on the original base (`lora_init`), with whether it was.
fn tensors_to_save(model: &Llama) -> (Vec<(String, Tensor)>, bool) {
    let mut converted = false;
    let mut tensors = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for (path, linear) in layer.linears() {
            let Some(lora) = &linear.lora else { continue };
            let prefix = format!("base_model.model.model.layers.{i}.{path}");
            let (a, b) = match &lora.residual_init {
                Some(initial) => {
                    converted = true;
                    lora_init::converted(&lora.a, &lora.b, initial)
                }
                None => (lora.a.to_kind(Kind::Float), lora.b.to_kind(Kind::Float)),
            };
            tensors.push((format!("{prefix}.lora_A.weight"), a));
            tensors.push((format!("{prefix}.lora_B.weight"), b));
            if let Some(magnitude) = &lora.magnitude {
                tensors.push((
                    format!("{prefix}.lora_magnitude_vector"),
                    magnitude.to_kind(Kind::Float),
                ));
            }
        }
    }
    (tensors, converted)
}

/// Writes adapter_config.json and adapter_model.safetensors into `dir` (each through a
/// temp file and a rename). A PiSSA / OLoRA adapter is written converted: rank 2r,
/// alpha doubled (sqrt(2) x alpha with rslora), PEFT's conversion.
pub fn save_adapter(
    model: &Llama,
    config: &LoraConfig,
    base_model: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| bad_input(format!("{}: cannot create: {e}", dir.display())))?;
    let (tensors, converted) = tensors_to_save(model);
    let tensors: Vec<(String, WritableTensor)> = tensors
        .into_iter()
        .map(|(name, t)| (name, WritableTensor::new(&t)))
        .collect();
    if tensors.is_empty() {
        bail_input!("the model has no LoRA adapter to save");
    }
    write_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors)?;
    let (r, alpha) = match (converted, config.rslora) {
        (false, _) => (config.r, config.alpha),
        (true, false) => (2 * config.r, 2.0 * config.alpha),
        (true, true) => (2 * config.r, std::f64::consts::SQRT_2 * config.alpha),
    };
    let mut json = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets,
        "bias": "none",
        "base_model_name_or_path": base_model,
        "fan_in_fan_out": false,
        "use_rslora": config.rslora,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    if config.use_dora {
        json["use_dora"] = Value::Bool(true);
    }
    crate::atomic::write_file(
        &dir.join(ADAPTER_CONFIG),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )
}

/// Reads a PEFT adapter_config.json, refusing options amthal cannot apply exactly:
/// the config, the base model's name, and the per-module rank and alpha patterns.
pub fn read_adapter_config(dir: &Path) -> Result<(LoraConfig, String, Patterns)> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        bad_input(format!(
            "{}: cannot read the adapter config: {e}",
            path.display()
        ))
    })?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| bad_input(format!("{}: invalid JSON: {e}", path.display())))?;
    let field = |key: &str| json.get(key).filter(|v| !v.is_null());
    let fail = |what: String| bad_input(format!("{}: {what}", path.display()));
    if let Some(kind) = field("peft_type").and_then(Value::as_str)
        && kind != "LORA"
    {
        return Err(fail(format!(
            "peft_type '{kind}' is not supported (LORA is)"
        )));
    }
    if let Some(bias) = field("bias").and_then(Value::as_str)
        && bias != "none"
    {
        return Err(fail(format!(
            "bias '{bias}' is not supported (\"none\" is)"
        )));
    }
    if let Some(value) = field("fan_in_fan_out")
        && value != &Value::Bool(false)
    {
        return Err(fail(format!("fan_in_fan_out = {value} is not supported")));
    }
    // An adapter PEFT saved right after a residual initialisation belongs to the residual
    // base it came with, not to the original one (a converted one says true here).
    if let Some(init) = field("init_lora_weights").and_then(Value::as_str) {
        let lowered = init.to_lowercase();
        if ["pissa", "olora", "corda", "loftq", "lora_ga"]
            .iter()
            .any(|method| lowered.starts_with(method))
        {
            return Err(fail(format!(
                "init_lora_weights '{init}': PEFT saved this adapter for the residual base its \
                 initialisation left, not for the original model; save it converted \
                 (save_pretrained(..., path_initial_model_for_weight_conversion=...)), as \
                 amthal saves its own"
            )));
        }
    }
    let use_dora = match field("use_dora") {
        None => false,
        Some(Value::Bool(on)) => *on,
        Some(other) => return Err(fail(format!("use_dora = {other} is not true or false"))),
    };
    // Newer PEFT options that change the computation: refused unless off.
    for key in ["lora_bias", "use_qalora", "use_bdlora"] {
        if field(key).is_some_and(|v| v != &Value::Bool(false)) {
            return Err(fail(format!("'{key}' is not supported")));
        }
    }
    for key in [
        "exclude_modules",
        "target_parameters",
        "trainable_token_indices",
    ] {
        if field(key).is_some() {
            return Err(fail(format!("'{key}' is not supported")));
        }
    }
    // layers_to_transform (and layers_pattern) only leave some layers without an
    // adapter: the file then holds no tensors for them, and loading follows the file.
    if field("layer_replication").is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(fail("'layer_replication' is not supported".into()));
    }
    // modules_to_save: full copies of embed_tokens / lm_head load (`load_saved_modules`);
    // of other modules (a norm, a projection) they do not.
    match field("modules_to_save") {
        None => {}
        Some(Value::Array(modules)) => {
            for module in modules {
                // PEFT matches by suffix: "model.embed_tokens" is embed_tokens.
                if !module
                    .as_str()
                    .and_then(|m| m.rsplit('.').next())
                    .is_some_and(|m| SAVED_MODULES.contains(&m))
                {
                    return Err(fail(format!(
                        "modules_to_save entry {module} is not supported: amthal loads full \
                         copies of {} only",
                        SAVED_MODULES.join(" and ")
                    )));
                }
            }
        }
        Some(other) => return Err(fail(format!("modules_to_save = {other} is not a list"))),
    }
    let patterns = Patterns::from_config_text(&text, &path.display().to_string())?;
    let r = field("r")
        .and_then(Value::as_i64)
        .ok_or_else(|| fail("missing 'r'".into()))?;
    let alpha = field("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let targets = match field("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) if s == "all-linear" => {
            PROJECTIONS.iter().map(|s| s.to_string()).collect()
        }
        Some(Value::String(pattern)) => {
            // A regular expression over full module names: the projections it took
            // are those the file holds tensors for (`load_adapter` lists them).
            check_target_regex(pattern, &path.display().to_string())?;
            Vec::new()
        }
        Some(other) => {
            return Err(fail(format!(
                "target_modules {other} is not supported (a list of names or a regular \
                 expression is)"
            )));
        }
        None => return Err(fail("missing 'target_modules'".into())),
    };
    let config = LoraConfig {
        r,
        alpha,
        dropout: field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        targets,
        rslora: field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        use_dora,
        // How it started no longer matters to a saved adapter (amthal saves PiSSA and
        // OLoRA ones converted, with init_lora_weights true).
        init: LoraInit::Default,
    };
    config.validate().map_err(|e| fail(format!("{e:#}")))?;
    let base = field("base_model_name_or_path")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Ok((config, base, patterns))
}

/// Loads a PEFT adapter folder onto `model`. Every tensor must match a projection of
/// the model with the right shape; the adapter for another base model fails here.
pub fn load_adapter(model: &mut Llama, dir: &Path) -> Result<LoraConfig> {
    if !dir.is_dir() {
        bail_input!("adapter {}: not a folder", dir.display());
    }
    let (mut config, _, patterns) = read_adapter_config(dir)?;
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    if !weights_path.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            bail_input!(
                "{}: only adapter_model.bin (pickle), which amthal never loads; save the adapter with safetensors",
                dir.display()
            );
        }
        bail_input!("{}: no {ADAPTER_WEIGHTS}", dir.display());
    }
    let source = SafetensorsSource::open_files(std::slice::from_ref(&weights_path))?;
    let device = model.device;
    let mut used = 0usize;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (path, linear) in layer.linears_mut() {
            // PEFT writes keys with or without the adapter name ("default") inside.
            let prefix = format!("base_model.model.model.layers.{i}.{path}");
            let find = |part: &str| -> Option<String> {
                [
                    format!("{prefix}.{part}.weight"),
                    format!("{prefix}.{part}.default.weight"),
                ]
                .into_iter()
                .find(|name| source.shape(name).is_some())
            };
            let (Some(a_name), Some(b_name)) = (find("lora_A"), find("lora_B")) else {
                continue;
            };
            let size = linear.weight.size();
            // PEFT's per-module settings (rank_pattern / alpha_pattern).
            let module = format!("model.layers.{i}.{path}");
            let r = patterns.rank(&module, config.r);
            let alpha = patterns.alpha(&module, config.alpha);
            let expected_a = [r, size[1]];
            let expected_b = [size[0], r];
            for (name, expected) in [(&a_name, &expected_a), (&b_name, &expected_b)] {
                let found = source.shape(name).unwrap_or_default();
                if found != expected {
                    bail_input!(
                        "{}: tensor {name} has shape {found:?} but this base model needs {expected:?} \
                         (an adapter for another base model?)",
                        weights_path.display()
                    );
                }
            }
            let load = |name: &str| -> Result<Tensor> {
                Ok(source
                    .load(name, Kind::Float, device)?
                    .expect("present")
                    .set_requires_grad(true))
            };
            // DoRA's magnitudes: PEFT saves them without ".weight".
            let magnitude_name = [
                format!("{prefix}.lora_magnitude_vector"),
                format!("{prefix}.lora_magnitude_vector.weight"),
                format!("{prefix}.lora_magnitude_vector.default.weight"),
            ]
            .into_iter()
            .find(|name| source.shape(name).is_some());
            let magnitude = match (config.use_dora, magnitude_name) {
                (false, None) => None,
                (false, Some(name)) => bail_input!(
                    "{}: {name} is a DoRA magnitude, but the adapter config does not set use_dora",
                    weights_path.display()
                ),
                (true, None) => bail_input!(
                    "{}: use_dora is set but {prefix}.lora_magnitude_vector is missing",
                    weights_path.display()
                ),
                (true, Some(name)) => {
                    let found = source.shape(&name).unwrap_or_default();
                    if found != [size[0]] {
                        bail_input!(
                            "{}: tensor {name} has shape {found:?} but this base model needs [{}] \
                             (an adapter for another base model?)",
                            weights_path.display(),
                            size[0]
                        );
                    }
                    used += 1;
                    Some(load(&name)?)
                }
            };
            let projection = path.rsplit('.').next().unwrap_or(path).to_string();
            if !config.targets.contains(&projection) {
                config.targets.push(projection);
            }
            linear.lora = Some(Lora {
                a: load(&a_name)?,
                b: load(&b_name)?,
                scaling: LoraConfig {
                    r,
                    alpha,
                    ..config.clone()
                }
                .scaling(),
                dropout: config.dropout,
                magnitude,
                frozen_factor: None,
                residual_init: None,
            });
            used += 2;
        }
    }
    let (listed, ensure_weight_tying) = saved_module_settings(dir)?;
    used += load_saved_modules(model, &source, &weights_path, &listed, ensure_weight_tying)?;
    let total = source.names().count();
    if used != total {
        let layer_count = model.layers.len();
        let extra: Vec<&String> = source
            .names()
            .filter(|n| {
                let inside = n
                    .strip_prefix("base_model.model.model.layers.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| i < layer_count);
                !inside
                    || !(n.contains(".lora_A.")
                        || n.contains(".lora_B.")
                        || n.contains(".lora_magnitude_vector"))
            })
            .take(3)
            .collect();
        bail_input!(
            "{}: {} of {total} tensors do not match this model's projections (e.g. {:?}); \
             an adapter for another base model?",
            weights_path.display(),
            total - used,
            extra
        );
    }
    if used == 0 {
        bail_input!("{}: no LoRA tensors found", weights_path.display());
    }
    Ok(config)
}

/// The modules whose full trained copies an adapter may carry (PEFT's
/// `modules_to_save`; axolotl's `lora_modules_to_save`, used when tokens were added or
/// the head retrained).
pub const SAVED_MODULES: [&str; 2] = ["embed_tokens", "lm_head"];

/// The config's `modules_to_save` (last name components) and `ensure_weight_tying`.
fn saved_module_settings(dir: &Path) -> Result<(Vec<String>, bool)> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| bad_input(format!("{}: {e}", path.display())))?;
    let raw: Value = serde_json::from_str(&text)
        .map_err(|e| bad_input(format!("{}: invalid JSON: {e}", path.display())))?;
    let listed = raw["modules_to_save"]
        .as_array()
        .map(|modules| {
            modules
                .iter()
                .filter_map(|m| m.as_str()?.rsplit('.').next().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok((
        listed,
        raw["ensure_weight_tying"].as_bool().unwrap_or(false),
    ))
}

/// The saved-module copies an adapter folder holds: those its weights file has tensors
/// for ("embed_tokens", "lm_head"), whether or not its config lists them (PEFT's
/// `save_embedding_layers` saves an embedding without `modules_to_save`).
pub fn saved_modules(dir: &Path) -> Result<Vec<&'static str>> {
    let weights = dir.join(ADAPTER_WEIGHTS);
    if !weights.is_file() {
        return Ok(Vec::new()); // `load_adapter` says what is missing
    }
    let source = SafetensorsSource::open_files(&[weights])?;
    Ok(SAVED_MODULES
        .into_iter()
        .filter(|module| saved_module_key(&source, module).is_some())
        .collect())
}

/// The key of a saved copy of `module` ("embed_tokens" or "lm_head") in an adapter's
/// weights, with or without PEFT's adapter name inside.
fn saved_module_key(source: &SafetensorsSource, module: &str) -> Option<String> {
    let path = if module == "embed_tokens" {
        "model.embed_tokens"
    } else {
        module
    };
    [
        format!("base_model.model.{path}.weight"),
        format!("base_model.model.{path}.modules_to_save.default.weight"),
    ]
    .into_iter()
    .find(|name| source.shape(name).is_some())
}

/// PEFT's `modules_to_save`: the adapter's copies of embed_tokens and lm_head replace
/// the base's (frozen, in the model's dtype). Returns how many tensors it took.
/// `listed`: the config's modules_to_save (by last name component); a listed module
/// without a tensor is an error. With tied embeddings PEFT (0.21) without
/// `ensure_weight_tying` gives each copy its own weight: the head keeps reading the
/// original matrix when only embed_tokens was saved, so the model is untied (checked
/// against PEFT's logits in tests/model_layer.rs). With `ensure_weight_tying` PEFT
/// trains one matrix for both and saves it under both names; one found alone then
/// serves both.
fn load_saved_modules(
    model: &mut Llama,
    source: &SafetensorsSource,
    path: &Path,
    listed: &[String],
    ensure_weight_tying: bool,
) -> Result<usize> {
    for module in listed {
        if saved_module_key(source, module).is_none() {
            bail_input!(
                "{}: modules_to_save lists {module} but the file has no tensor for it",
                path.display()
            );
        }
    }
    let (embed, head) = (
        saved_module_key(source, "embed_tokens"),
        saved_module_key(source, "lm_head"),
    );
    if embed.is_none() && head.is_none() {
        return Ok(0);
    }
    let expected = model.embed_tokens.size();
    let load = |name: &str| -> Result<Tensor> {
        let found = source.shape(name).unwrap_or_default();
        if found != expected {
            bail_input!(
                "{}: {name} has shape {found:?} but this base model's is {expected:?} (an \
                 adapter for a resized vocabulary, or for another base model?)",
                path.display()
            );
        }
        Ok(source
            .load(name, model.kind, model.device)?
            .expect("present"))
    };
    let tied = model.lm_head.is_none();
    let original_embed = model.embed_tokens.shallow_clone();
    match (&embed, &head) {
        (Some(name), None) | (None, Some(name)) if tied && ensure_weight_tying => {
            model.embed_tokens = load(name)?;
        }
        _ => {
            if let Some(name) = &embed {
                model.embed_tokens = load(name)?;
            }
            match &head {
                Some(name) => model.lm_head = Some(load(name)?),
                None if tied => model.lm_head = Some(original_embed),
                None => {}
            }
        }
    }
    model.config.tie_word_embeddings = model.lm_head.is_none();
    Ok(usize::from(embed.is_some()) + usize::from(head.is_some()))
}

/// Folds every adapter into its base weight (W + scaling B A) and removes the adapters.
pub fn merge_adapters(model: &mut Llama) {
    tch::no_grad(|| {
        for layer in model.layers.iter_mut() {
            for (_, linear) in layer.linears_mut() {
                if linear.lora.is_some() {
                    linear.weight = Weight::Dense(linear.merged_weight());
                    linear.lora = None;
                }
            }
        }
    });
}
