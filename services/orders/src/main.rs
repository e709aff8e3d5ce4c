//! The orders service as a process: `tenantmesh-orders`, configured by the
//! mesh's variables (see `tenantmesh_app::App::configure`) and
//! `TENANTMESH_DATA_URL` (default `http://127.0.0.1:50054`).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenantmesh-orders: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let telemetry = tenantmesh_app::telemetry::Config::from_env("orders", &env);
    let _telemetry = tenantmesh_app::telemetry::init(telemetry)?;
    let app = tenantmesh_orders::app()?.configure(&env)?;
    let data_url = env.get("TENANTMESH_DATA_URL").cloned().unwrap_or_else(|| "http://127.0.0.1:50054".into());
    let listener = tokio::net::TcpListener::bind(app.listen_addr()).await?;
    app.serve(listener, tenantmesh_app::shutdown_signal(), |ctx| tenantmesh_orders::routes(ctx, &data_url)).await?;
    Ok(())
}
