//! The operator's session: who logged in, where the mesh is, and the
//! tokens, in one file readable by its owner only
//! (`$TENANTMESH_CONFIG_DIR`, else `$XDG_CONFIG_HOME/tenantmesh`, else
//! `~/.config/tenantmesh`: `session.json`, mode 0600). The access token is
//! refreshed with the refresh token when it is about to expire; `logout`
//! revokes the refresh token and removes the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the mesh's four services listen.
#[derive(clap::Args, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// The tenant registry (HOST:PORT or a URL).
    #[arg(long = "registry", env = "TENANTMESH_REGISTRY_ADDR", default_value = "localhost:50051")]
    pub registry: String,
    /// The auth service.
    #[arg(long = "auth", env = "TENANTMESH_AUTH_ADDR", default_value = "localhost:50052")]
    pub auth: String,
    /// The onboarding service (workflows).
    #[arg(long = "onboarding", env = "TENANTMESH_ONBOARDING_ADDR", default_value = "localhost:50053")]
    pub onboarding: String,
    /// The data service (metering and cost).
    #[arg(long = "data", env = "TENANTMESH_DATA_ADDR", default_value = "localhost:50054")]
    pub data: String,
}

/// A signed-in operator.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Session {
    pub endpoints: Endpoints,
    pub tenant_id: String,
    pub email: String,
    pub access_token: String,
    pub refresh_token: String,
    /// When the access token expires (Unix seconds).
    pub expires_at: i64,
}

/// Refresh when the access token has less than this left (seconds): a
/// command that starts a workflow and watches it should not lose its
/// token halfway.
pub const REFRESH_MARGIN_SECS: i64 = 60;

const FILE: &str = "session.json";

/// The directory the session lives in, from the environment.
pub fn config_dir(env: &HashMap<String, String>) -> Result<PathBuf, String> {
    let set = |k: &str| env.get(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set("TENANTMESH_CONFIG_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = set("XDG_CONFIG_HOME") {
        return Ok(dir.join("tenantmesh"));
    }
    set("HOME")
        .map(|home| home.join(".config").join("tenantmesh"))
        .ok_or_else(|| "no config directory: set TENANTMESH_CONFIG_DIR (or HOME)".to_owned())
}

pub fn path(env: &HashMap<String, String>) -> Result<PathBuf, String> {
    config_dir(env).map(|d| d.join(FILE))
}

impl Session {
    /// The session at `path`; `None` when nobody is logged in.
    pub fn load(path: &Path) -> Result<Option<Session>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                format!("{} is not a tenantmesh session ({e}): run `tenantmesh login` again", path.display())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes the session to `path`, readable by its owner only, replacing
    /// the old one in one rename (a crash leaves the old or the new).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let dir = path.parent().unwrap_or(Path::new("."));
        tenantmesh_storage::files::private_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let json = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        tenantmesh_storage::files::write_private(&tmp, &json)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("cannot save the session to {}: {e}", path.display()))
    }

    /// Removes the session at `path`; whether there was one.
    pub fn forget(path: &Path) -> Result<bool, String> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    pub fn needs_refresh(&self, now: i64) -> bool {
        self.expires_at - now < REFRESH_MARGIN_SECS
    }
}

/// Holds the lock beside the session at `path` (exclusive, across
/// processes) until dropped.
pub fn lock(path: &Path) -> Result<std::fs::File, String> {
    let lock_path = path.with_extension("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn session() -> Session {
        Session {
            endpoints: Endpoints {
                registry: "localhost:1".into(),
                auth: "localhost:2".into(),
                onboarding: "localhost:3".into(),
                data: "localhost:4".into(),
            },
            tenant_id: "platform".into(),
            email: "admin@platform.local".into(),
            access_token: "a".into(),
            refresh_token: "r".into(),
            expires_at: 1_000,
        }
    }

    #[test]
    fn saved_for_its_owner_only_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cfg").join(FILE);
        assert!(Session::load(&path).unwrap().is_none());
        session().save(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        let back = Session::load(&path).unwrap().unwrap();
        assert_eq!((back.email.as_str(), back.endpoints.data.as_str()), ("admin@platform.local", "localhost:4"));
        assert!(Session::forget(&path).unwrap());
        assert!(!Session::forget(&path).unwrap());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(Session::load(&path).unwrap_err().contains("tenantmesh login"));
    }

    #[test]
    fn refreshed_a_minute_before_it_expires() {
        assert!(!session().needs_refresh(1_000 - REFRESH_MARGIN_SECS));
        assert!(session().needs_refresh(1_000 - REFRESH_MARGIN_SECS + 1));
    }

    #[test]
    fn config_dir_follows_the_environment() {
        let env = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        assert_eq!(config_dir(&env(&[("TENANTMESH_CONFIG_DIR", "/c"), ("HOME", "/h")])).unwrap(), PathBuf::from("/c"));
        assert_eq!(
            config_dir(&env(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/x/tenantmesh")
        );
        assert_eq!(config_dir(&env(&[("HOME", "/h")])).unwrap(), PathBuf::from("/h/.config/tenantmesh"));
        assert!(config_dir(&env(&[])).is_err());
    }
}
