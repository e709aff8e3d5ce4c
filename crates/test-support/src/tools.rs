//! Where things are: the repository, the workspace's built binaries, and
//! the tools `cargo xtask setup` installs.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

/// A service binary of the workspace built alongside the running test
/// (`target/<profile>/<name>`).
pub fn service_binary(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/<binary>
    let exe = std::env::current_exe().expect("test executable");
    let path = exe.parent().and_then(|p| p.parent()).expect("target dir").join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// A tool installed by `cargo xtask setup` into `.tools/bin`.
pub fn tool(name: &str) -> PathBuf {
    let path = workspace_root().join(".tools/bin").join(name);
    assert!(path.exists(), "{} is missing: run `cargo xtask setup` (or `cargo xtask test`)", path.display());
    path
}

/// A loopback port free when asked (for a process that binds it itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("its address").port()
}
