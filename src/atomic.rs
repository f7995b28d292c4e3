//! Writing files and folders so a crash never leaves a half-written one: write to a
//! temp name beside the target, then rename (atomic on one filesystem).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A temp path in the same folder as `target`, unique to this process.
pub fn temp_path_for(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_string());
    target.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Gives `path` the mode a file made by `File::create` gets (0666 less the process's
/// umask), for files another library created private.
pub fn set_created_file_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask()))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// The process's umask, from /proc/self/status (`umask(2)` can only be read by
/// changing it); 022 if that is not there.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Umask:"))?;
            u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
        })
        .unwrap_or(0o022)
}

/// Writes `bytes` to `path` through a temp file and a rename.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_with(path, |file| file.write_all(bytes).map_err(Into::into))
}

/// Creates `path` through a temp file that `fill` writes; renamed only if `fill` succeeds.
pub fn write_file_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    let temp = temp_path_for(path);
    let result = (|| {
        let mut file = std::fs::File::create(&temp).map_err(|e| {
            crate::error::bad_input(format!("{}: cannot write: {e}", path.display()))
        })?;
        fill(&mut file)?;
        file.sync_all()?;
        std::fs::rename(&temp, path).with_context(|| format!("renaming to {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Puts a copy of `from` at `to` (atomically, through a temp name): a hard link when
/// both are on one filesystem, else a byte copy. A 7B model's 13.5 GB published as the
/// final and the best model then costs no disk and no time; it is safe because
/// amthal never rewrites a file in place (every write goes to a new inode, renamed).
pub fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    let temp = temp_path_for(to);
    let _ = std::fs::remove_file(&temp);
    let result = std::fs::hard_link(from, &temp)
        .or_else(|_| std::fs::copy(from, &temp).map(|_| ()))
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
        .and_then(|()| {
            std::fs::rename(&temp, to).with_context(|| format!("renaming to {}", to.display()))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Builds a whole folder in a temp folder beside `target`, then puts it in place
/// (replacing an existing `target` only once the new one is complete).
pub fn write_dir_with(target: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let ((), temp) = fill_temp_dir(target, fill)?;
    publish_dir(&temp, target)
}

/// The first half of `write_dir_with`: a fresh temp folder beside `target`, filled by
/// `fill` (removed again if `fill` fails). Returns `fill`'s result and the folder, for
/// `publish_dir` once whatever else it needs is written.
pub fn fill_temp_dir<T>(
    target: &Path,
    fill: impl FnOnce(&Path) -> Result<T>,
) -> Result<(T, PathBuf)> {
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| {
        crate::error::bad_input(format!("{}: cannot create: {e}", parent.display()))
    })?;
    let temp = temp_path_for(target);
    let _ = std::fs::remove_dir_all(&temp);
    std::fs::create_dir(&temp).map_err(|e| {
        crate::error::bad_input(format!("{}: cannot write here: {e}", parent.display()))
    })?;
    match fill(&temp) {
        Ok(value) => Ok((value, temp)),
        Err(error) => {
            let _ = std::fs::remove_dir_all(&temp);
            Err(error)
        }
    }
}

/// Renames the complete folder `temp` to `target`, replacing a `target` already there
/// (moved aside first, removed after).
pub fn publish_dir(temp: &Path, target: &Path) -> Result<()> {
    if target.exists() {
        let old = target.with_file_name(format!(
            ".{}.old-{}",
            target.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        std::fs::rename(target, &old)
            .with_context(|| format!("moving aside {}", target.display()))?;
        std::fs::rename(temp, target)
            .with_context(|| format!("renaming to {}", target.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(temp, target)
            .with_context(|| format!("renaming to {}", target.display()))?;
    }
    Ok(())
}
