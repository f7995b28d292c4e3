//! HF's sampling warpers on one row's logits, on the host: temperature, top-h, top-k,
//! top-p, min-p, typical-p, epsilon and eta cutoffs, in the order transformers'
//! `_get_logits_processor` chains them for `do_sample=True`. Each warper sets the
//! tokens it removes to -inf, so the next one sees only what the earlier ones kept
//! (its softmax renormalises over them), exactly as HF's chain does. Probabilities are
//! taken in f64 from the f32 logits; the goldens (`tests/golden/sampling_warpers.json`,
//! from `scripts/golden/make_warper_golden.py`) keep only cases that f32 and f64 decide
//! alike. Each warper keeps at least one token, HF's `min_tokens_to_keep = 1` outside
//! beam search.

use crate::generate::SamplingConfig;

/// Applies every warper `config` sets, in HF's order, to `logits` in place.
pub fn warp(logits: &mut [f32], config: &SamplingConfig) {
    if config.temperature != 1.0 {
        let temperature = config.temperature as f32;
        for value in logits.iter_mut() {
            *value /= temperature;
        }
    }
    if let Some(top_h) = config.top_h {
        top_h_filter(logits, top_h);
    }
    if config.top_k > 0 {
        top_k_filter(logits, config.top_k);
    }
    if config.top_p < 1.0 {
        top_p_filter(logits, config.top_p);
    }
    if let Some(min_p) = config.min_p {
        min_p_filter(logits, min_p);
    }
    if config.typical_p < 1.0 {
        typical_filter(logits, config.typical_p);
    }
    if config.epsilon_cutoff > 0.0 && config.epsilon_cutoff < 1.0 {
        let epsilon = config.epsilon_cutoff;
        cutoff_filter(logits, |_| epsilon);
    }
    if config.eta_cutoff > 0.0 && config.eta_cutoff < 1.0 {
        // Eta sampling: the cutoff shrinks as the distribution spreads out.
        let epsilon = config.eta_cutoff;
        cutoff_filter(logits, |entropy| {
            epsilon.min(epsilon.sqrt() * (-entropy).exp())
        });
    }
}

/// Softmax of the kept (finite) logits, in f64; removed tokens get 0.
fn probabilities(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = logits.iter().map(|&l| ((l as f64) - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    weights.into_iter().map(|w| w / total).collect()
}

/// Shannon entropy (nats) of a distribution; removed tokens add nothing.
fn entropy(probabilities: &[f64]) -> f64 {
    -probabilities
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| p * p.ln())
        .sum::<f64>()
}

/// Token ids by logit, lowest first; ties by id (torch's stable sort).
fn ascending(logits: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(a.cmp(&b)));
    order
}

fn remove(logits: &mut [f32], ids: impl IntoIterator<Item = usize>) {
    for id in ids {
        logits[id] = f32::NEG_INFINITY;
    }
}

/// The highest logit's value (what `min_tokens_to_keep = 1` protects).
fn highest(logits: &[f32]) -> f32 {
    logits.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Top-k: every token below the k-th highest logit goes; tokens equal to it stay
/// (HF's `scores < topk(scores, k)[-1]`).
fn top_k_filter(logits: &mut [f32], k: usize) {
    if k >= logits.len() {
        return;
    }
    let order = ascending(logits);
    let threshold = logits[order[logits.len() - k]];
    let below: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i] < threshold)
        .collect();
    remove(logits, below);
}

/// Top-p (nucleus): from the lowest logit up, tokens whose cumulative probability is
/// at most 1 - top_p go; the highest stays.
fn top_p_filter(logits: &mut [f32], top_p: f64) {
    let order = ascending(logits);
    let probabilities = probabilities(logits);
    let mut cumulative = 0.0;
    let mut removed = Vec::new();
    for &id in &order[..order.len() - 1] {
        cumulative += probabilities[id];
        if cumulative <= 1.0 - top_p {
            removed.push(id);
        }
    }
    remove(logits, removed);
}

/// Min-p: tokens less probable than min_p times the most probable go (min_p <= 1,
/// so the most probable always stays).
fn min_p_filter(logits: &mut [f32], min_p: f64) {
    let probabilities = probabilities(logits);
    let top = probabilities.iter().copied().fold(0.0, f64::max);
    let removed: Vec<usize> = (0..logits.len())
        .filter(|&i| probabilities[i] < min_p * top)
        .collect();
    remove(logits, removed);
}

/// Locally typical sampling: tokens ordered by how far their surprisal (-log p) is from
/// the entropy; the closest ones are kept until their probability reaches `mass`
/// (HF's `TypicalLogitsWarper`, ties at the last kept distance kept too).
fn typical_filter(logits: &mut [f32], mass: f64) {
    let probabilities = probabilities(logits);
    let entropy = entropy(&probabilities);
    let distance: Vec<f64> = probabilities
        .iter()
        .map(|&p| {
            if p > 0.0 {
                (-p.ln() - entropy).abs()
            } else {
                f64::INFINITY
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| distance[a].total_cmp(&distance[b]).then(a.cmp(&b)));
    let mut cumulative = 0.0;
    let mut below = 0;
    for &id in &order {
        cumulative += probabilities[id];
        if cumulative < mass {
            below += 1;
        }
    }
    let last = below.min(order.len() - 1);
    let limit = distance[order[last]];
    let removed: Vec<usize> = order[1..]
        .iter()
        .copied()
        .filter(|&id| distance[id] > limit)
        .collect();
    remove(logits, removed);
}

/// Epsilon and eta sampling: tokens below a probability cutoff (a function of the
/// distribution's entropy) go, except those tied with the highest logit.
fn cutoff_filter(logits: &mut [f32], cutoff: impl Fn(f64) -> f64) {
    let probabilities = probabilities(logits);
    let threshold = cutoff(entropy(&probabilities));
    let top = highest(logits);
    let removed: Vec<usize> = (0..logits.len())
        .filter(|&i| probabilities[i] < threshold && logits[i] < top)
        .collect();
    remove(logits, removed);
}

/// The number of highest tokens top-h looks at (HF's fixed `top_n`).
const TOP_H_CANDIDATES: usize = 100;

/// Top-h: among the 100 highest tokens (renormalised), the highest ones are kept while
/// their summed entropy terms -p log p stay within top_h times that distribution's
/// entropy; the highest always stays.
fn top_h_filter(logits: &mut [f32], top_h: f64) {
    // Highest first (ties by id).
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let candidates = &order[..TOP_H_CANDIDATES.min(order.len())];
    let candidate_logits: Vec<f32> = candidates.iter().map(|&i| logits[i]).collect();
    let probabilities = probabilities(&candidate_logits);
    let budget = entropy(&probabilities) * top_h;
    let mut keep = vec![false; logits.len()];
    keep[candidates[0]] = true;
    let mut cumulative = 0.0;
    for (&id, &p) in candidates.iter().zip(&probabilities) {
        if p <= 0.0 {
            // A removed token's term is 0 x log 0: NaN in HF's sum, which keeps nothing
            // after it (they are all removed tokens, the order being by logit).
            break;
        }
        cumulative -= p * p.ln();
        if cumulative <= budget {
            keep[id] = true;
        }
    }
    let removed: Vec<usize> = (0..logits.len()).filter(|&i| !keep[i]).collect();
    remove(logits, removed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_of(settings: &serde_json::Value) -> SamplingConfig {
        let mut config = SamplingConfig {
            temperature: 1.0,
            ..Default::default()
        };
        for (key, value) in settings.as_object().unwrap() {
            let number = value.as_f64().unwrap();
            match key.as_str() {
                "temperature" => config.temperature = number,
                "top_k" => config.top_k = number as usize,
                "top_p" => config.top_p = number,
                "min_p" => config.min_p = Some(number),
                "typical_p" => config.typical_p = number,
                "epsilon_cutoff" => config.epsilon_cutoff = number,
                "eta_cutoff" => config.eta_cutoff = number,
                "top_h" => config.top_h = Some(number),
                other => panic!("unknown golden setting {other}"),
            }
        }
        config
    }

    /// Every warper alone and chained leaves the tokens transformers'
    /// `_get_logits_processor(do_sample=True)` leaves (goldens from
    /// scripts/golden/make_warper_golden.py: rows with banned tokens, a tie at the
    /// top-k threshold, distributions from flat to peaked).
    #[test]
    fn every_warper_keeps_the_tokens_transformers_keeps() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/sampling_warpers.json"
        );
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let rows: Vec<Vec<f32>> = golden["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().map_or(f32::NEG_INFINITY, |v| v as f32))
                    .collect()
            })
            .collect();
        let cases = golden["cases"].as_array().unwrap();
        assert!(cases.len() >= 200, "{} cases", cases.len());
        let mut filtering = 0;
        for case in cases {
            let row = &rows[case["row"].as_u64().unwrap() as usize];
            let config = config_of(&case["settings"]);
            let mut logits = row.clone();
            warp(&mut logits, &config);
            let kept: Vec<u64> = (0..logits.len())
                .filter(|&i| logits[i] > f32::NEG_INFINITY)
                .map(|i| i as u64)
                .collect();
            let expected: Vec<u64> = case["kept"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(
                kept, expected,
                "{} on row {}",
                case["settings"], case["row"]
            );
            filtering += usize::from(kept.len() < row.iter().filter(|v| v.is_finite()).count());
        }
        assert!(filtering >= 150, "only {filtering} cases remove a token");
    }

    /// The kept tokens' logits are the tempered ones, untouched by the filters.
    #[test]
    fn the_kept_logits_are_only_divided_by_the_temperature() {
        let row: Vec<f32> = (0..20).map(|i| ((i * 7) % 20) as f32 / 3.0).collect();
        let config = SamplingConfig {
            temperature: 0.5,
            top_k: 8,
            min_p: Some(0.001),
            ..Default::default()
        };
        let mut logits = row.clone();
        warp(&mut logits, &config);
        let kept: Vec<usize> = (0..20).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(kept.len(), 8);
        for i in kept {
            assert_eq!(logits[i], row[i] / 0.5);
        }
    }
}
