//! BLEU as the Python reference packages compute it, equal to them within 1e-9 (checked
//! by tests/bleu_scores.rs against goldens from scripts/golden/make_bleu_golden.py,
//! made with sacrebleu 2.6.0, nltk 3.10.4, regex 2026.11.19 on CPython 3.11.7).
//!
//! * [`sentence_bleu`] / [`corpus_bleu`]: `sacrebleu.sentence_bleu(hyp, [ref],
//!   tokenize=...)` / `sacrebleu.corpus_bleu(hyps, [refs], tokenize=...)` with their
//!   defaults: no lowercasing, `exp` smoothing (mteval's: the k-th order without a match
//!   gets precision 100 / (2^k * total)), max order 4; effective order on for the
//!   sentence function (orders past the longest one the hypothesis has are left out of
//!   the geometric mean), off for the corpus one. Each segment is `rstrip`ped, then
//!   tokenized: `13a` (mteval-v13a: drop `<skipped>` and `-\n`, `\n` to space, unescape
//!   `&quot; &amp; &lt; &gt;` in that order, split off ASCII punctuation and symbols,
//!   and `.`/`,` unless between digits, `-` after a digit) or `intl` (mteval-v14
//!   international: split off Unicode punctuation \p{P} unless between digits \p{N},
//!   and every symbol \p{S}; Arabic ، ؛ ؟ are \p{P}). Tokens are Python `str.split()`
//!   words. A precision of 0 (an order with no n-grams when effective order is off)
//!   enters the log as -9999999999, as sacrebleu's `my_log` does, so the score is 0; no
//!   match at all, an empty hypothesis or an empty reference scores 0. BP is
//!   exp(1 - r/c) when c < r (0 when c = 0). Scores are 0..100.
//! * [`nltk_sentence_bleu`]: `nltk.translate.bleu_score.sentence_bleu([ref.split()],
//!   hyp.split(), smoothing_function=SmoothingFunction().method4)`, weights 0.25 x 4,
//!   0..1. Modified precisions are unreduced fractions m/max(1, c); no unigram match
//!   (including an empty hypothesis or reference) returns 0; method4 replaces the i-th
//!   zero-match precision (i = 1, 2, ...) by (1 / (2^i * 5 / ln(len(hyp)))) / denominator
//!   when len(hyp) > 1 (with one word the zero precisions stay 0 and are skipped); the
//!   score is BP * exp(math.fsum(0.25 * ln p) over p > 0), fsum ported exactly.
//!
//! Arithmetic follows Python's order of operations (sacrebleu's `sum()` of logs is
//! CPython 3.11's plain left-to-right addition; 3.12+ compensates, a last-bit change),
//! and on the goldens every per-pair score is bit-identical to Python's. The Unicode tables: the Python
//! `regex` module has Unicode 17 and the `regex` crate Unicode 16, so the intl classes
//! add the code points Unicode 17 assigned to N, P and S (among them the Saudi riyal
//! sign U+20C1 and Arabic ligature symbols U+FBC3.., U+FD90.., U+FDC8..); the tests
//! compare every code point with the Python module's classes.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;

use super::chrf::is_python_space;

const MAX_ORDER: usize = 4;

/// sacrebleu's tokenizer choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BleuTokenizer {
    /// `tokenize="13a"` (mteval-v13a, sacrebleu's default).
    Thirteen13a,
    /// `tokenize="intl"` (mteval-v14 international, Unicode classes).
    Intl,
}

impl BleuTokenizer {
    /// sacrebleu's name for it ("13a" / "intl").
    pub fn name(&self) -> &'static str {
        match self {
            BleuTokenizer::Thirteen13a => "13a",
            BleuTokenizer::Intl => "intl",
        }
    }

    /// `BLEU._preprocess_segment`: rstrip, tokenize, then `str.split()`.
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        let text = text.trim_end_matches(is_python_space);
        let tokenized = match self {
            BleuTokenizer::Thirteen13a => tokenize_13a(text),
            BleuTokenizer::Intl => tokenize_intl(text),
        };
        python_split(&tokenized)
            .into_iter()
            .map(str::to_string)
            .collect()
    }
}

fn python_split(text: &str) -> Vec<&str> {
    text.split(is_python_space)
        .filter(|w| !w.is_empty())
        .collect()
}

/// `TokenizerRegexp`'s first rule: `[\{-\~\[-\` -\&\(-\+\:-\@\/]` (one character each).
fn is_13a_split_char(c: char) -> bool {
    matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/')
}

static RE_13A: LazyLock<[(Regex, &'static str); 3]> = LazyLock::new(|| {
    [
        (Regex::new(r"([^0-9])([\.,])").unwrap(), "${1} ${2} "),
        (Regex::new(r"([\.,])([^0-9])").unwrap(), " ${1} ${2}"),
        (Regex::new(r"([0-9])(-)").unwrap(), "${1} ${2} "),
    ]
});

/// `Tokenizer13a.__call__` and `TokenizerRegexp.__call__` up to the final split.
fn tokenize_13a(line: &str) -> String {
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut out = String::with_capacity(line.len() * 2 + 2);
    for c in format!(" {line} ").chars() {
        if is_13a_split_char(c) {
            out.push(' ');
            out.push(c);
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    for (re, replacement) in RE_13A.iter() {
        out = re.replace_all(&out, *replacement).into_owned();
    }
    out
}

/// Code points Unicode 17 put in N, P and S that the `regex` crate's Unicode 16 tables
/// lack (the difference to the Python `regex` module's tables; nothing the other way).
const N_EXTRA: &str =
    r"\x{11DE0}-\x{11DE9}\x{1246F}\x{12475}-\x{1247F}\x{12550}-\x{12686}\x{16FF4}-\x{16FF6}";
const P_EXTRA: &str = r"\x{2E60}-\x{2E63}\x{10ED0}";
const S_EXTRA: &str = concat!(
    r"\x{20C1}-\x{20C4}\x{2B96}\x{FBC3}-\x{FBD2}\x{FD90}-\x{FD91}\x{FDC8}-\x{FDCE}",
    r"\x{10EC9}-\x{10ECA}\x{10ED1}-\x{10ED8}\x{1CCFA}-\x{1CCFC}\x{1CEBA}-\x{1CED0}",
    r"\x{1CED2}-\x{1CED4}\x{1CEDD}-\x{1CEFD}\x{1D1EB}-\x{1D1FF}\x{1D253}-\x{1D25A}",
    r"\x{1D25D}-\x{1D25E}\x{1D260}-\x{1D27F}\x{1DB00}-\x{1DB1C}\x{1F1AE}\x{1F6D8}-\x{1F6D9}",
    r"\x{1F777}-\x{1F77A}\x{1F7DA}-\x{1F7DB}\x{1F7F1}-\x{1F7FF}\x{1F8D0}-\x{1F8D8}",
    r"\x{1FA54}-\x{1FA57}\x{1FA8A}-\x{1FA8E}\x{1FAC8}\x{1FACC}-\x{1FACD}\x{1FADD}",
    r"\x{1FAEA}-\x{1FAEB}\x{1FAEF}\x{1FAF9}-\x{1FAFA}\x{1FBFA}",
);

fn class_n() -> String {
    format!(r"[\p{{N}}{N_EXTRA}]")
}
fn class_not_n() -> String {
    format!(r"[^\p{{N}}{N_EXTRA}]")
}
fn class_p() -> String {
    format!(r"[\p{{P}}{P_EXTRA}]")
}
fn class_s() -> String {
    format!(r"[\p{{S}}{S_EXTRA}]")
}

static RE_INTL: LazyLock<[(Regex, &'static str); 3]> = LazyLock::new(|| {
    let (not_n, p, s) = (class_not_n(), class_p(), class_s());
    [
        // Separate out punctuation preceded by a non-digit.
        (
            Regex::new(&format!("({not_n})({p})")).unwrap(),
            "${1} ${2} ",
        ),
        // Separate out punctuation followed by a non-digit.
        (
            Regex::new(&format!("({p})({not_n})")).unwrap(),
            " ${1} ${2}",
        ),
        // Separate out symbols.
        (Regex::new(&format!("({s})")).unwrap(), " ${1} "),
    ]
});

/// `TokenizerV14International.__call__` up to the final split.
fn tokenize_intl(line: &str) -> String {
    let mut line = line.to_string();
    for (re, replacement) in RE_INTL.iter() {
        line = re.replace_all(&line, *replacement).into_owned();
    }
    line
}

static RE_CLASSES: LazyLock<[Regex; 3]> = LazyLock::new(|| {
    [class_n(), class_p(), class_s()].map(|class| Regex::new(&format!("^{class}$")).unwrap())
});

/// Whether the intl tokenizer counts `c` as \p{N}, \p{P}, \p{S} (for the tests, which
/// compare every code point with the Python `regex` module).
pub fn intl_classes(c: char) -> [bool; 3] {
    let mut buf = [0u8; 4];
    let s = c.encode_utf8(&mut buf);
    [0, 1, 2].map(|i| RE_CLASSES[i].is_match(s))
}

/// Counts of every n-gram of order 1..=max_order, keyed by the token slice.
fn ngram_counts(tokens: &[String], max_order: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    for n in 1..=max_order {
        if tokens.len() >= n {
            for window in tokens.windows(n) {
                *counts.entry(window).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// sacrebleu's segment statistics: [hyp_len, ref_len, correct x4, total x4].
fn segment_statistics(hypothesis: &str, reference: &str, tokenizer: BleuTokenizer) -> [u64; 10] {
    let hyp = tokenizer.tokenize(hypothesis);
    let reference = tokenizer.tokenize(reference);
    let ref_counts = ngram_counts(&reference, MAX_ORDER);
    let mut stats = [0u64; 10];
    stats[0] = hyp.len() as u64;
    stats[1] = reference.len() as u64;
    for (ngram, count) in ngram_counts(&hyp, MAX_ORDER) {
        let n = ngram.len() - 1;
        stats[2 + MAX_ORDER + n] += count as u64;
        if let Some(&in_ref) = ref_counts.get(ngram) {
            stats[2 + n] += count.min(in_ref) as u64;
        }
    }
    stats
}

/// sacrebleu's `my_log`: log floored at -9999999999 for 0.
fn my_log(x: f64) -> f64 {
    if x == 0.0 { -9999999999.0 } else { x.ln() }
}

/// `BLEU.compute_bleu` with exp smoothing.
fn compute_bleu(stats: &[u64; 10], effective_order: bool) -> f64 {
    let (sys_len, ref_len) = (stats[0], stats[1]);
    let correct = &stats[2..2 + MAX_ORDER];
    let total = &stats[2 + MAX_ORDER..];
    let mut bp = 1.0;
    if sys_len < ref_len {
        bp = if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        };
    }
    if correct.iter().all(|&c| c == 0) {
        return 0.0;
    }
    let mut precisions = [0.0f64; MAX_ORDER];
    let mut smooth_mteval = 1.0f64;
    let mut eff_order = MAX_ORDER;
    for n in 1..=MAX_ORDER {
        if total[n - 1] == 0 {
            break;
        }
        if effective_order {
            eff_order = n;
        }
        precisions[n - 1] = if correct[n - 1] == 0 {
            smooth_mteval *= 2.0;
            100.0 / (smooth_mteval * total[n - 1] as f64)
        } else {
            100.0 * correct[n - 1] as f64 / total[n - 1] as f64
        };
    }
    // Python 3.11's sum(): plain left-to-right addition.
    let sum = precisions[..eff_order]
        .iter()
        .fold(0.0f64, |acc, &p| acc + my_log(p));
    bp * (sum / eff_order as f64).exp()
}

/// `sacrebleu.sentence_bleu(hypothesis, [reference], tokenize=...).score`.
pub fn sentence_bleu(hypothesis: &str, reference: &str, tokenizer: BleuTokenizer) -> f64 {
    compute_bleu(&segment_statistics(hypothesis, reference, tokenizer), true)
}

/// `sacrebleu.corpus_bleu(hypotheses, [references], tokenize=...).score` over
/// (hypothesis, reference) pairs.
pub fn corpus_bleu(pairs: &[(&str, &str)], tokenizer: BleuTokenizer) -> f64 {
    let mut stats = [0u64; 10];
    for (hypothesis, reference) in pairs {
        for (sum, value) in stats
            .iter_mut()
            .zip(segment_statistics(hypothesis, reference, tokenizer))
        {
            *sum += value;
        }
    }
    compute_bleu(&stats, false)
}

fn word_ngram_counts<'a>(tokens: &[&'a str], n: usize) -> HashMap<Vec<&'a str>, u64> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for window in tokens.windows(n) {
            *counts.entry(window.to_vec()).or_insert(0) += 1;
        }
    }
    counts
}

/// NLTK's `modified_precision` as (numerator, denominator), unreduced.
fn modified_precision(reference: &[&str], hypothesis: &[&str], n: usize) -> (u64, u64) {
    let hyp_counts = word_ngram_counts(hypothesis, n);
    let ref_counts = word_ngram_counts(reference, n);
    let mut numerator = 0;
    let mut total = 0;
    for (ngram, &c) in &hyp_counts {
        total += c;
        numerator += c.min(ref_counts.get(ngram).copied().unwrap_or(0));
    }
    (numerator, total.max(1))
}

/// `nltk.translate.bleu_score.sentence_bleu([reference.split()], hypothesis.split(),
/// smoothing_function=SmoothingFunction().method4)`.
pub fn nltk_sentence_bleu(hypothesis: &str, reference: &str) -> f64 {
    let hyp = python_split(hypothesis);
    let reference = python_split(reference);
    let fractions: Vec<(u64, u64)> = (1..=MAX_ORDER)
        .map(|n| modified_precision(&reference, &hyp, n))
        .collect();
    let (hyp_len, ref_len) = (hyp.len(), reference.len());
    // brevity_penalty(closest_ref_len, hyp_len)
    let bp = if hyp_len > ref_len {
        1.0
    } else if hyp_len == 0 {
        0.0
    } else {
        (1.0 - ref_len as f64 / hyp_len as f64).exp()
    };
    if fractions[0].0 == 0 {
        return 0.0;
    }
    // method4 (k = 5); unsmoothed precisions stay fractions, floated as num / den.
    let mut incvnt = 1u32;
    let mut p_n = Vec::with_capacity(MAX_ORDER);
    for &(numerator, denominator) in &fractions {
        if numerator == 0 && hyp_len > 1 {
            let smoothed = 1.0 / ((2u64.pow(incvnt) * 5) as f64 / (hyp_len as f64).ln());
            p_n.push(smoothed / denominator as f64);
            incvnt += 1;
        } else {
            p_n.push(numerator as f64 / denominator as f64);
        }
    }
    let terms: Vec<f64> = p_n
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| 0.25 * p.ln())
        .collect();
    bp * fsum(&terms).exp()
}

/// CPython's `math.fsum` (Shewchuk's exact partials, correctly rounded), for finite
/// inputs.
fn fsum(values: &[f64]) -> f64 {
    let mut partials: Vec<f64> = Vec::new();
    for &value in values {
        let mut x = value;
        let mut i = 0;
        for j in 0..partials.len() {
            let mut y = partials[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                partials[i] = lo;
                i += 1;
            }
            x = hi;
        }
        partials.truncate(i);
        if x != 0.0 {
            partials.push(x);
        }
    }
    let mut n = partials.len();
    let mut hi = 0.0;
    if n > 0 {
        n -= 1;
        hi = partials[n];
        let mut lo = 0.0;
        while n > 0 {
            let x = hi;
            n -= 1;
            let y = partials[n];
            hi = x + y;
            lo = y - (hi - x);
            if lo != 0.0 {
                break;
            }
        }
        if n > 0 && ((lo < 0.0 && partials[n - 1] < 0.0) || (lo > 0.0 && partials[n - 1] > 0.0)) {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsum_rounds_exactly() {
        assert_eq!(fsum(&[0.1; 10]), 1.0);
        assert_eq!(fsum(&[1e100, 1.0, -1e100, 1e-100]), 1.0);
        assert_eq!(fsum(&[]), 0.0);
    }

    #[test]
    fn tokenizers_split_as_sacrebleu() {
        assert_eq!(
            BleuTokenizer::Thirteen13a.tokenize("&quot;x&quot; 1,000.5 3-4 a."),
            ["\"", "x", "\"", "1,000.5", "3", "-", "4", "a", "."]
        );
        assert_eq!(
            BleuTokenizer::Intl.tokenize("قال، ماذا؟"),
            ["قال", "،", "ماذا", "؟"]
        );
        // A Unicode 17 addition the regex crate's tables lack: the Saudi riyal sign (S).
        assert_eq!(intl_classes('\u{20C1}'), [false, false, true]);
        assert_eq!(intl_classes('؛'), [false, true, false]);
        assert_eq!(intl_classes('٣'), [true, false, false]);
    }
}
