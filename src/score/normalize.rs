//! `--normalize arabic`: the orthographic normalisation common in Arabic NLP
//! evaluation, applied to both texts before the string metrics (BLEU, ROUGE, chrF++).
//! Embedding metrics always see the texts as written (their tokenizers were trained
//! on unnormalised text).
//!
//! What it does, and nothing more (each is a spelling variation, not a change of word):
//! - removes the harakat and other diacritics (U+064B..U+065F, U+0670 superscript alef)
//!   and the tatweel (U+0640);
//! - writes every hamza-carrying or madda alef (أ إ آ ٱ) as a bare alef (ا);
//! - writes alef maqsura (ى) as yeh (ي).
//!
//! Teh marbuta (ة) is left alone: folding it into heh changes the word in MSA.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalization {
    /// Compare the texts exactly as written.
    None,
    /// Diacritics and tatweel removed, alef and alef-maqsura variants unified.
    Arabic,
}

impl Normalization {
    pub fn apply(self, text: &str) -> String {
        match self {
            Normalization::None => text.to_string(),
            Normalization::Arabic => normalize_arabic(text),
        }
    }
}

fn normalize_arabic(text: &str) -> String {
    text.chars()
        .filter(|&c| !matches!(c, '\u{064B}'..='\u{065F}' | '\u{0670}' | '\u{0640}'))
        .map(|c| match c {
            'أ' | 'إ' | 'آ' | 'ٱ' => 'ا',
            'ى' => 'ي',
            other => other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arabic_normalisation_folds_spelling_variants_only() {
        assert_eq!(Normalization::Arabic.apply("إِنَّ الأَمْرَ مُهِمّ"), "ان الامر مهم");
        assert_eq!(Normalization::Arabic.apply("مستشفـــى آمن"), "مستشفي امن");
        assert_eq!(Normalization::Arabic.apply("مدرسة"), "مدرسة");
        assert_eq!(Normalization::None.apply("إِنَّ"), "إِنَّ");
    }
}
