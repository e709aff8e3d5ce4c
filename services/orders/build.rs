//! Compiles the service's proto, with the mesh's policy options it
//! imports, and keeps its descriptor set (policies, reflection).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto = root.join("example/orders/v1/orders.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().file_descriptor_set_path(out.join("orders_descriptor.bin")).compile_with_config(
        config,
        &[proto],
        &[root, protoc_bin_vendored::include_path()?],
    )?;
    Ok(())
}
