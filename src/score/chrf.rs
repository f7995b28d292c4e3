//! chrF / chrF++ exactly as sacrebleu's `CHRF` computes it (defaults: char order 6,
//! beta 2, whitespace removed, no eps smoothing; chrF++ = word order 2), sentence- and
//! corpus-level. Strings are compared by Unicode code point, as Python does.

use std::collections::HashMap;

/// sacrebleu's punctuation set for splitting words (ASCII punctuation only).
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// The settings of sacrebleu's `CHRF(...)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChrfConfig {
    pub char_order: usize,
    pub word_order: usize,
    pub beta: f64,
}

impl ChrfConfig {
    /// `CHRF(word_order=2)`: chrF++.
    pub fn chrf_plus_plus() -> ChrfConfig {
        ChrfConfig {
            char_order: 6,
            word_order: 2,
            beta: 2.0,
        }
    }

    fn order(&self) -> usize {
        self.char_order + self.word_order
    }
}

/// Python's `str.split()` whitespace: Unicode White_Space plus the ASCII separators
/// \x1c-\x1f that `str.isspace()` also counts.
pub fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn python_split(text: &str) -> Vec<&str> {
    text.split(is_python_space)
        .filter(|w| !w.is_empty())
        .collect()
}

fn char_ngrams(text: &str, max_order: usize) -> Vec<HashMap<String, usize>> {
    let chars: Vec<char> = text.chars().filter(|c| !is_python_space(*c)).collect();
    (1..=max_order)
        .map(|n| {
            let mut counts = HashMap::new();
            if chars.len() >= n {
                for window in chars.windows(n) {
                    *counts.entry(window.iter().collect::<String>()).or_insert(0) += 1;
                }
            }
            counts
        })
        .collect()
}

/// sacrebleu's `_remove_punctuation`: one leading or trailing ASCII punctuation mark
/// is split off a word (trailing first).
fn words_for_chrf(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    for word in python_split(text) {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() == 1 {
            words.push(word.to_string());
        } else if PUNCTUATION.contains(chars[chars.len() - 1]) {
            words.push(chars[..chars.len() - 1].iter().collect());
            words.push(chars[chars.len() - 1].to_string());
        } else if PUNCTUATION.contains(chars[0]) {
            words.push(chars[0].to_string());
            words.push(chars[1..].iter().collect());
        } else {
            words.push(word.to_string());
        }
    }
    words
}

fn word_ngrams(words: &[String], n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    if words.len() >= n {
        for window in words.windows(n) {
            *counts.entry(window.join(" ")).or_insert(0) += 1;
        }
    }
    counts
}

fn all_ngrams(text: &str, config: &ChrfConfig) -> Vec<HashMap<String, usize>> {
    let mut ngrams = char_ngrams(text, config.char_order);
    if config.word_order > 0 {
        let words = words_for_chrf(text);
        for n in 1..=config.word_order {
            ngrams.push(word_ngrams(&words, n));
        }
    }
    ngrams
}

/// [hyp, ref, match] counts per order, flattened (sacrebleu's statistics).
pub fn statistics(hypothesis: &str, reference: &str, config: &ChrfConfig) -> Vec<u64> {
    let hyp = all_ngrams(hypothesis, config);
    let reference = all_ngrams(reference, config);
    let mut stats = Vec::with_capacity(3 * config.order());
    for (h, r) in hyp.iter().zip(&reference) {
        let mut matched = 0;
        let mut hyp_count = 0;
        for (ngram, &count) in h {
            hyp_count += count;
            if let Some(&in_ref) = r.get(ngram) {
                matched += count.min(in_ref);
            }
        }
        let ref_count: usize = r.values().sum();
        stats.push(if r.is_empty() { 0 } else { hyp_count as u64 });
        stats.push(ref_count as u64);
        stats.push(matched as u64);
    }
    stats
}

/// sacrebleu's `_compute_f_score` (effective-order averaging, no eps smoothing).
pub fn f_score(stats: &[u64], config: &ChrfConfig) -> f64 {
    let factor = config.beta * config.beta;
    let (mut avg_prec, mut avg_rec, mut effective) = (0.0f64, 0.0f64, 0usize);
    for i in 0..config.order() {
        let (n_hyp, n_ref, n_match) = (stats[3 * i], stats[3 * i + 1], stats[3 * i + 2]);
        if n_hyp > 0 && n_ref > 0 {
            avg_prec += n_match as f64 / n_hyp as f64;
            avg_rec += n_match as f64 / n_ref as f64;
            effective += 1;
        }
    }
    if effective == 0 {
        return 0.0;
    }
    avg_prec /= effective as f64;
    avg_rec /= effective as f64;
    if avg_prec + avg_rec != 0.0 {
        let mut score = (1.0 + factor) * avg_prec * avg_rec;
        score /= (factor * avg_prec) + avg_rec;
        100.0 * score
    } else {
        0.0
    }
}

/// Sentence-level chrF(++) of one hypothesis against one reference.
pub fn sentence_chrf(hypothesis: &str, reference: &str, config: &ChrfConfig) -> f64 {
    f_score(&statistics(hypothesis, reference, config), config)
}

/// Corpus-level chrF(++): statistics summed over segments, then one f-score.
pub fn corpus_chrf(pairs: &[(&str, &str)], config: &ChrfConfig) -> f64 {
    let mut total = vec![0u64; 3 * config.order()];
    for (hypothesis, reference) in pairs {
        for (t, s) in total
            .iter_mut()
            .zip(statistics(hypothesis, reference, config))
        {
            *t += s;
        }
    }
    f_score(&total, config)
}
