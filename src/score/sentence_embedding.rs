// TEMP STUB (lead)
pub struct SentenceEncoder;
impl SentenceEncoder {
    pub fn load(_f: &std::path::Path, _d: tch::Device) -> anyhow::Result<SentenceEncoder> {
        Ok(SentenceEncoder)
    }
    pub fn cosine_similarities(&self, h: &[&str], _r: &[&str]) -> anyhow::Result<Vec<f64>> {
        Ok(h.iter().map(|_| 0.5).collect())
    }
}
