//! Compiles `proto/` with the vendored protoc: a fresh machine needs only cargo.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let protos: Vec<PathBuf> =
        ["options", "auth", "registry", "onboarding", "data", "metering", "backup", "lifecycle", "audit"]
            .iter()
            .map(|svc| root.join(format!("tenantmesh/{svc}/v1/{svc}.proto")))
            .collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let includes = [root, protoc_bin_vendored::include_path()?];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tenantmesh_descriptor.bin"))
        .compile_with_config(config, &protos, &includes)?;
    Ok(())
}
