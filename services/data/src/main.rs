//! The data service as a standalone process.

use tenantmesh_service::config::process_env;
use tenantmesh_service::runtime::shutdown_signal;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tenantmesh_service::runtime::exit_status("tenantmesh-data", run().await)
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let env = process_env();
    let _telemetry = tenantmesh_telemetry::init(tenantmesh_telemetry::Config::from_env("data", &env))?;
    let config = tenantmesh_data::Config::from_env(&env)?;
    let store = tenantmesh_data::open_store(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.common.listen_addr).await?;
    tenantmesh_data::serve(config, store, listener, shutdown_signal()).await
}
