//! ROUGE-1/2/L (F, P, R) with the semantics of the PyPI package `rouge` 1.0.1 (what
//! the dataset's scripts use): sentences are the text split on ".", words the
//! whitespace-normalised sentence split on single spaces (Arabic kept), n-grams counted
//! as sets, ROUGE-L the summary-level union LCS over distinct words. Google's
//! `rouge-score` instead drops non-Latin characters and scores Arabic 0.
//!
//! Where the Python package raises (an empty hypothesis or reference: no sentence
//! left after splitting on "."), amthal scores 0 and says so in `RougeScores::empty`.

use std::collections::HashSet;

/// F, P and R of one ROUGE variant.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Fpr {
    pub f: f64,
    pub p: f64,
    pub r: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct RougeScores {
    pub rouge_1: Fpr,
    pub rouge_2: Fpr,
    pub rouge_l: Fpr,
    /// True when the hypothesis or reference has no sentence (Python raises there).
    pub empty: bool,
}

impl RougeScores {
    /// ROUGE-1, ROUGE-2 and ROUGE-L, in that order.
    pub fn variants(&self) -> [Fpr; 3] {
        [self.rouge_1, self.rouge_2, self.rouge_l]
    }
}

/// `[" ".join(s.split()) for s in text.split(".") if len(s) > 0]`.
fn sentences(text: &str) -> Vec<String> {
    text.split('.')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.split(super::chrf::is_python_space)
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// `itertools.chain(*[s.split(" ") for s in sentences])` (an empty sentence gives "").
fn words(sentences: &[String]) -> Vec<&str> {
    sentences.iter().flat_map(|s| s.split(' ')).collect()
}

fn ngram_set<'a>(words: &[&'a str], n: usize) -> HashSet<Vec<&'a str>> {
    if words.len() < n {
        return HashSet::new();
    }
    words.windows(n).map(|w| w.to_vec()).collect()
}

fn f_r_p(evaluated: usize, reference: usize, overlap: usize) -> Fpr {
    let p = if evaluated == 0 {
        0.0
    } else {
        overlap as f64 / evaluated as f64
    };
    let r = if reference == 0 {
        0.0
    } else {
        overlap as f64 / reference as f64
    };
    Fpr {
        f: 2.0 * ((p * r) / (p + r + 1e-8)),
        p,
        r,
    }
}

fn rouge_n(hyp: &[&str], reference: &[&str], n: usize) -> Fpr {
    let (h, r) = (ngram_set(hyp, n), ngram_set(reference, n));
    f_r_p(h.len(), r.len(), h.intersection(&r).count())
}

/// The words of one LCS of x and y, recovered as the package's `_recon_lcs` does
/// (on a tie it moves along y).
fn lcs_words<'a>(x: &[&'a str], y: &[&str]) -> Vec<&'a str> {
    let (n, m) = (x.len(), y.len());
    let mut table = vec![vec![0u32; m + 1]; n + 1];
    for i in 1..=n {
        for j in 1..=m {
            table[i][j] = if x[i - 1] == y[j - 1] {
                table[i - 1][j - 1] + 1
            } else {
                table[i - 1][j].max(table[i][j - 1])
            };
        }
    }
    let (mut i, mut j) = (n, m);
    let mut out = Vec::new();
    while i > 0 && j > 0 {
        if x[i - 1] == y[j - 1] {
            out.push(x[i - 1]);
            i -= 1;
            j -= 1;
        } else if table[i - 1][j] > table[i][j - 1] {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    out.reverse();
    out
}

fn rouge_l(hyp_sentences: &[String], ref_sentences: &[String]) -> Fpr {
    let m = words(ref_sentences)
        .into_iter()
        .collect::<HashSet<_>>()
        .len();
    let n = words(hyp_sentences)
        .into_iter()
        .collect::<HashSet<_>>()
        .len();
    let mut union: HashSet<&str> = HashSet::new();
    for reference in ref_sentences {
        let reference_words: Vec<&str> = reference.split(' ').collect();
        for hypothesis in hyp_sentences {
            let hypothesis_words: Vec<&str> = hypothesis.split(' ').collect();
            union.extend(lcs_words(&reference_words, &hypothesis_words));
        }
    }
    let llcs = union.len() as f64;
    let (r, p) = (llcs / m as f64, llcs / n as f64);
    Fpr {
        f: 2.0 * ((p * r) / (p + r + 1e-8)),
        p,
        r,
    }
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of one hypothesis against one reference.
pub fn rouge(hypothesis: &str, reference: &str) -> RougeScores {
    let (hyp_sentences, ref_sentences) = (sentences(hypothesis), sentences(reference));
    if hyp_sentences.is_empty() || ref_sentences.is_empty() {
        return RougeScores {
            empty: true,
            ..RougeScores::default()
        };
    }
    let (hyp, reference_words) = (words(&hyp_sentences), words(&ref_sentences));
    RougeScores {
        rouge_1: rouge_n(&hyp, &reference_words, 1),
        rouge_2: rouge_n(&hyp, &reference_words, 2),
        rouge_l: rouge_l(&hyp_sentences, &ref_sentences),
        empty: false,
    }
}
