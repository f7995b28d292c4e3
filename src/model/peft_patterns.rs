//! PEFT's per-module LoRA settings in adapter_config.json: `rank_pattern` and
//! `alpha_pattern` (a module's r and lora_alpha, keyed by patterns), and
//! `target_modules` given as one regular expression instead of a list.
//!
//! PEFT picks a module's key with `get_pattern_key`: the first key, in the file's
//! order, for which `re.match(rf"(.*\.)?({key})$", module)` matches the module's name
//! (`model.layers.0.self_attn.q_proj`). serde_json's maps sort their keys, so the
//! patterns are read with their order kept (`OrderedPairs`). Python's and the regex
//! crate's syntaxes agree on what these keys use (names, dots, alternations, classes).

use anyhow::Result;
use regex::Regex;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

use crate::bail_input;

/// A JSON object's entries in the file's order.
#[derive(Debug, Clone, Default, PartialEq)]
struct OrderedPairs(Vec<(String, f64)>);

impl<'de> Deserialize<'de> for OrderedPairs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor;
        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = OrderedPairs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of numbers")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedPairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, f64>()? {
                    pairs.push((key, value));
                }
                Ok(OrderedPairs(pairs))
            }
        }
        deserializer.deserialize_map(PairsVisitor)
    }
}

/// The two pattern fields of an adapter_config.json, in file order.
#[derive(serde::Deserialize)]
struct PatternFields {
    #[serde(default)]
    rank_pattern: Option<OrderedPairs>,
    #[serde(default)]
    alpha_pattern: Option<OrderedPairs>,
}

/// One pattern key, compiled as PEFT matches it.
#[derive(Debug, Clone)]
struct Pattern {
    key: String,
    value: f64,
    matcher: Regex,
}

/// An adapter's rank and alpha patterns.
#[derive(Debug, Clone, Default)]
pub struct Patterns {
    rank: Vec<Pattern>,
    alpha: Vec<Pattern>,
}

impl Patterns {
    /// Reads the patterns of an adapter_config.json's text; an empty or missing
    /// pattern is none. `what`: the file, for errors.
    pub fn from_config_text(text: &str, what: &str) -> Result<Patterns> {
        let fields: PatternFields = serde_json::from_str(text).map_err(|e| {
            crate::error::bad_input(format!(
                "{what}: rank_pattern / alpha_pattern must map patterns to numbers: {e}"
            ))
        })?;
        let compile = |pairs: Option<OrderedPairs>| -> Result<Vec<Pattern>> {
            pairs
                .unwrap_or_default()
                .0
                .into_iter()
                .map(|(key, value)| {
                    let matcher = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
                        crate::error::bad_input(format!(
                            "{what}: pattern '{key}' is not a regular expression amthal reads: {e}"
                        ))
                    })?;
                    Ok(Pattern {
                        key,
                        value,
                        matcher,
                    })
                })
                .collect()
        };
        Ok(Patterns {
            rank: compile(fields.rank_pattern)?,
            alpha: compile(fields.alpha_pattern)?,
        })
    }

    /// Whether neither pattern has a key.
    pub fn is_empty(&self) -> bool {
        self.rank.is_empty() && self.alpha.is_empty()
    }

    /// The module's r: rank_pattern's first matching key, else `default`.
    pub fn rank(&self, module: &str, default: i64) -> i64 {
        first_match(&self.rank, module).map_or(default, |v| v as i64)
    }

    /// The module's lora_alpha: alpha_pattern's first matching key, else `default`.
    pub fn alpha(&self, module: &str, default: f64) -> f64 {
        first_match(&self.alpha, module).unwrap_or(default)
    }
}

fn first_match(patterns: &[Pattern], module: &str) -> Option<f64> {
    patterns
        .iter()
        .find(|p| p.matcher.is_match(module))
        .map(|p| {
            tracing::debug!("{module}: pattern '{}' = {}", p.key, p.value);
            p.value
        })
}

/// `target_modules` given as a regular expression: PEFT adapts the modules whose full
/// name it matches entirely (`re.fullmatch`). Checked to compile; which modules it
/// took is what the adapter file holds.
pub fn check_target_regex(pattern: &str, what: &str) -> Result<()> {
    if let Err(e) = Regex::new(&format!("^(?:{pattern})$")) {
        bail_input!(
            "{what}: target_modules '{pattern}' is not a regular expression amthal reads: {e}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PEFT's get_pattern_key: the first key in the file's order wins, a key matches a
    /// whole trailing part of the name (after a dot), and unmatched modules take the
    /// default.
    #[test]
    fn the_first_matching_key_in_file_order_wins() {
        let text = r#"{"rank_pattern": {"q_proj": 2, "layers.1.self_attn.q_proj": 6, "mlp\\..*": 3},
                       "alpha_pattern": {"model.layers.0.mlp.gate_proj": 20}}"#;
        let patterns = Patterns::from_config_text(text, "test").unwrap();
        assert_eq!(patterns.rank("model.layers.1.self_attn.q_proj", 8), 2);
        assert_eq!(patterns.rank("model.layers.1.mlp.up_proj", 8), 3);
        assert_eq!(patterns.rank("model.layers.1.self_attn.k_proj", 8), 8);
        // "q_proj" must match after a dot: "xq_proj" is another module.
        assert_eq!(patterns.rank("model.layers.1.self_attn.xq_proj", 8), 8);
        assert_eq!(patterns.alpha("model.layers.0.mlp.gate_proj", 16.0), 20.0);
        assert_eq!(patterns.alpha("model.layers.10.mlp.gate_proj", 16.0), 16.0);
        let reversed = r#"{"rank_pattern": {"layers.1.self_attn.q_proj": 6, "q_proj": 2}}"#;
        let patterns = Patterns::from_config_text(reversed, "test").unwrap();
        assert_eq!(patterns.rank("model.layers.1.self_attn.q_proj", 8), 6);
        assert_eq!(patterns.rank("model.layers.0.self_attn.q_proj", 8), 2);
        let bad = Patterns::from_config_text(r#"{"alpha_pattern": {"(": 1}}"#, "cfg");
        assert!(format!("{:#}", bad.unwrap_err()).contains("cfg: pattern '('"));
        assert!(check_target_regex(r".*\.(q_proj|v_proj)", "cfg").is_ok());
        assert!(check_target_regex(r"(q_proj", "cfg").is_err());
    }
}
