// TEMP STUB (lead)
pub fn resolve_encoder_folder(spec: &str) -> anyhow::Result<Option<std::path::PathBuf>> {
    let p = std::path::Path::new(spec);
    Ok(p.is_dir().then(|| p.to_path_buf()))
}
