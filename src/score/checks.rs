//! Task checks: properties of the generated explanations themselves, independent of
//! the references. The instruction asks for Modern Standard Arabic, so any Latin
//! letter in an output is a failure to follow it; empty outputs and lengths show
//! rambling or truncated generations.

use serde::Serialize;

use super::chrf::is_python_space;

/// A Latin letter: ASCII letters and the Latin-1/Latin Extended-A/B letters.
pub fn is_latin_letter(c: char) -> bool {
    c.is_ascii_alphabetic() || (('\u{00C0}'..='\u{024F}').contains(&c) && c.is_alphabetic())
}

pub fn has_latin(text: &str) -> bool {
    text.chars().any(is_latin_letter)
}

pub fn is_empty_output(text: &str) -> bool {
    text.trim().is_empty()
}

/// Whitespace-separated words (Python's `str.split()`).
pub fn word_count(text: &str) -> usize {
    text.split(is_python_space)
        .filter(|w| !w.is_empty())
        .count()
}

/// Minimum, median, mean and maximum of a list of lengths.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LengthStats {
    pub min: f64,
    pub median: f64,
    pub mean: f64,
    pub max: f64,
}

impl LengthStats {
    pub fn of(values: &[usize]) -> Option<LengthStats> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2] as f64
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) as f64 / 2.0
        };
        Some(LengthStats {
            min: sorted[0] as f64,
            median,
            mean: sorted.iter().sum::<usize>() as f64 / n as f64,
            max: sorted[n - 1] as f64,
        })
    }
}

/// The task checks over a whole file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskChecks {
    pub outputs: usize,
    /// Share of outputs (0..1) containing at least one Latin letter.
    pub latin_share: f64,
    pub with_latin: usize,
    pub empty: usize,
    /// Words per generated explanation.
    pub generated_words: Option<LengthStats>,
    /// Words per reference explanation (rows that have one).
    pub reference_words: Option<LengthStats>,
}

pub fn task_checks(generated: &[&str], references: &[&str]) -> TaskChecks {
    let with_latin = generated.iter().filter(|t| has_latin(t)).count();
    let generated_words: Vec<usize> = generated.iter().map(|t| word_count(t)).collect();
    let reference_words: Vec<usize> = references
        .iter()
        .filter(|t| !t.trim().is_empty())
        .map(|t| word_count(t))
        .collect();
    TaskChecks {
        outputs: generated.len(),
        latin_share: if generated.is_empty() {
            0.0
        } else {
            with_latin as f64 / generated.len() as f64
        },
        with_latin,
        empty: generated.iter().filter(|t| is_empty_output(t)).count(),
        generated_words: LengthStats::of(&generated_words),
        reference_words: LengthStats::of(&reference_words),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin_letters_are_found_in_mixed_text_only() {
        assert!(has_latin("المثل يعني patience"));
        assert!(has_latin("café"));
        assert!(!has_latin("المثل يعني الصبر، ١٢٣ 123 ...!"));
    }

    #[test]
    fn checks_count_empty_latin_and_lengths() {
        let checks = task_checks(&["a b", "  ", "كلمة واحدة ثالثة"], &["x y z", "", "ا ب"]);
        assert_eq!(checks.outputs, 3);
        assert_eq!(checks.with_latin, 1);
        assert_eq!(checks.empty, 1);
        let words = checks.generated_words.unwrap();
        assert_eq!((words.min, words.median, words.max), (0.0, 2.0, 3.0));
        assert!((words.mean - 5.0 / 3.0).abs() < 1e-12);
        let refs = checks.reference_words.unwrap();
        assert_eq!((refs.min, refs.median, refs.max), (2.0, 2.5, 3.0));
    }
}
