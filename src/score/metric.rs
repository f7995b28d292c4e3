//! The metrics `amthal score --metrics` can name, and how each is spelled.

use std::fmt;

use crate::bail_input;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// sacrebleu BLEU, tokenize 13a (sentence and corpus), 0..100.
    Bleu,
    /// sacrebleu BLEU, tokenize intl (Unicode punctuation and symbols split off), 0..100.
    BleuIntl,
    /// NLTK sentence_bleu with SmoothingFunction().method4 on whitespace tokens, 0..1.
    NltkBleu,
    /// ROUGE-1/2/L F, P, R (`rouge` 1.0.1 semantics), 0..1.
    Rouge,
    /// sacrebleu CHRF(word_order=2) (sentence and corpus), 0..100.
    ChrfPlusPlus,
    /// BERTScore P, R, F, 0..1 (or rescaled).
    BertScore,
    /// Cosine similarity of sentence embeddings (SAS), one column per model, -1..1.
    Cosine,
    /// Latin letters, empty outputs, lengths.
    Checks,
}

impl Metric {
    /// Every metric, in table order; the default for `amthal score`.
    pub const ALL: [Metric; 8] = [
        Metric::Bleu,
        Metric::BleuIntl,
        Metric::NltkBleu,
        Metric::Rouge,
        Metric::ChrfPlusPlus,
        Metric::BertScore,
        Metric::Cosine,
        Metric::Checks,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Bleu => "bleu",
            Metric::BleuIntl => "bleu-intl",
            Metric::NltkBleu => "nltk-bleu",
            Metric::Rouge => "rouge",
            Metric::ChrfPlusPlus => "chrf++",
            Metric::BertScore => "bertscore",
            Metric::Cosine => "cosine",
            Metric::Checks => "checks",
        }
    }

    /// Parses one name of `--metrics` (case-insensitive; a few common aliases).
    pub fn parse(text: &str) -> anyhow::Result<Metric> {
        let lower = text.trim().to_lowercase();
        let metric = match lower.as_str() {
            "bleu" | "sacrebleu" | "bleu-13a" => Metric::Bleu,
            "bleu-intl" | "bleu_intl" => Metric::BleuIntl,
            "nltk-bleu" | "nltk_bleu" | "nltk" => Metric::NltkBleu,
            "rouge" | "rouge-1" | "rouge-2" | "rouge-l" => Metric::Rouge,
            "chrf++" | "chrf" | "chrfpp" => Metric::ChrfPlusPlus,
            "bertscore" | "bert-score" | "bert_score" => Metric::BertScore,
            "cosine" | "sas" | "embedding" | "embeddings" => Metric::Cosine,
            "checks" | "task-checks" => Metric::Checks,
            _ => bail_input!(
                "--metrics: unknown metric {text:?}; known: {}",
                Metric::ALL.map(Metric::name).join(", ")
            ),
        };
        Ok(metric)
    }

    /// Parses a comma-separated `--metrics` list (duplicates folded, order kept as ALL).
    pub fn parse_list(items: &[String]) -> anyhow::Result<Vec<Metric>> {
        let mut metrics = Vec::new();
        for item in items.iter().flat_map(|i| i.split(',')) {
            if item.trim().is_empty() {
                continue;
            }
            metrics.push(Metric::parse(item)?);
        }
        if metrics.is_empty() {
            bail_input!("--metrics: no metric named");
        }
        metrics.sort();
        metrics.dedup();
        Ok(metrics)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_lists_parse_with_aliases_and_reject_unknown_names() {
        let list =
            Metric::parse_list(&["chrF,sas".into(), "BLEU".into(), "chrf++".into()]).unwrap();
        assert_eq!(list, [Metric::Bleu, Metric::ChrfPlusPlus, Metric::Cosine]);
        let error = Metric::parse_list(&["bleurt".into()])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("bleurt") && error.contains("chrf++"),
            "{error}"
        );
    }
}
