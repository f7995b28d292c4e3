// TEMP STUB (lead)
pub const DEFAULT_BERTSCORE_MODEL: &str = "bert-base-multilingual-cased";
pub struct BertScoreOptions {
    pub layer: Option<usize>,
    pub idf: bool,
    pub baseline: Option<std::path::PathBuf>,
    pub batch_size: usize,
}
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Prf {
    pub p: f64,
    pub r: f64,
    pub f: f64,
}
pub struct BertScorer;
impl BertScorer {
    pub fn load(
        _f: &std::path::Path,
        _o: BertScoreOptions,
        _d: tch::Device,
    ) -> anyhow::Result<BertScorer> {
        Ok(BertScorer)
    }
    pub fn score(&self, h: &[&str], _r: &[&str]) -> anyhow::Result<Vec<Prf>> {
        Ok(h.iter()
            .map(|_| Prf {
                p: 0.5,
                r: 0.5,
                f: 0.5,
            })
            .collect())
    }
}
