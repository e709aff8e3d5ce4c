//! The console as a process of its own (compose, Kubernetes):
//! `tenantmesh-console`, listening on TENANTMESH_LISTEN_ADDR (default
//! 127.0.0.1:50080) and reaching the mesh through TENANTMESH_REGISTRY_URL,
//! TENANTMESH_AUTH_URL, TENANTMESH_ONBOARDING_URL and TENANTMESH_DATA_URL.
//! TENANTMESH_CONSOLE_ORIGIN is the origin browsers use (https makes the
//! session cookie Secure). Logs are JSON on stdout.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenantmesh-console: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let _telemetry = tenantmesh_telemetry::init(tenantmesh_telemetry::Config::from_env("console", &env))?;
    let config = tenantmesh_console::ConsoleConfig::from_env(&env)?;
    let addr: std::net::SocketAddr = match env.get("TENANTMESH_LISTEN_ADDR").filter(|v| !v.is_empty()) {
        Some(a) => a.parse().map_err(|e| format!("TENANTMESH_LISTEN_ADDR: {a:?}: {e}"))?,
        None => ([127, 0, 0, 1], tenantmesh_console::DEFAULT_PORT).into(),
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "console serving");
    let console = tenantmesh_console::Console::new(config)?;
    tenantmesh_console::serve(listener, console, tenantmesh_service::runtime::shutdown_signal()).await?;
    Ok(())
}
