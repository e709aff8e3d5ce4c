//! Files that hold tenants' data, keys or secrets (stores, exports,
//! backups, the bootstrap password): created 0600 in 0700 directories,
//! whatever existed before, so no other user of the machine reads them.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and its missing parents) readable by its owner only, or
/// makes an existing one so.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    restrict(dir, 0o700)
}

/// Makes the existing file at `path` readable by its owner only.
pub fn private(path: &Path) -> std::io::Result<()> {
    restrict(path, 0o600)
}

fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Creates (or truncates) the file at `path`, readable by its owner only,
/// in a private directory.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        private_dir(dir)?;
    }
    let file = File::options().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    // An existing file keeps its mode through `open`: set it.
    private(path)?;
    Ok(file)
}

/// Writes `bytes` to a private file at `path` and syncs it.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = create_private(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_and_directories_are_private_whatever_existed_before() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let secret = open.join("nested/secret");
        std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
        std::fs::write(&secret, "old").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&secret, b"new").unwrap();
        assert_eq!((mode(&secret), mode(secret.parent().unwrap())), (0o600, 0o700));
        private_dir(&open).unwrap();
        assert_eq!(mode(&open), 0o700);
        let fresh = dir.path().join("a/b/c");
        private_dir(&fresh).unwrap();
        assert_eq!((mode(&fresh), mode(&dir.path().join("a"))), (0o700, 0o700));
    }
}
