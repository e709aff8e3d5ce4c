//! The tenant registry as a standalone process.

use tenantmesh_service::config::process_env;
use tenantmesh_service::runtime::shutdown_signal;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tenantmesh_service::runtime::exit_status("tenantmesh-registry", run().await)
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let env = process_env();
    let _telemetry = tenantmesh_telemetry::init(tenantmesh_telemetry::Config::from_env("tenant-registry", &env))?;
    let config = tenantmesh_registry::Config::from_env(&env)?;
    let store = tenantmesh_isolation::backend::open_store(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.common.listen_addr).await?;
    tenantmesh_registry::serve(config, store, listener, shutdown_signal()).await
}
