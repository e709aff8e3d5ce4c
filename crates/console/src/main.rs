//! The console as a process of its own (compose, Kubernetes):
//! `tenantmesh-console`, listening on TENANTMESH_LISTEN_ADDR (default
//! 127.0.0.1:50080) and reaching the mesh through TENANTMESH_REGISTRY_URL,
//! TENANTMESH_AUTH_URL, TENANTMESH_ONBOARDING_URL and TENANTMESH_DATA_URL.
//! TENANTMESH_CONSOLE_ORIGIN is the origin browsers use (https makes the
//! session cookie Secure). Logs are JSON on stdout.
//!
//! `tenantmesh-console health` asks the console in the same container
//! (TENANTMESH_LISTEN_ADDR, 0.0.0.0 as 127.0.0.1) for `/healthz`: exit 0
//! when it answers 200, for container healthchecks.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("health") {
        return health();
    }
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenantmesh-console: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The listen address, from TENANTMESH_LISTEN_ADDR or the default.
fn listen_addr(env: &std::collections::HashMap<String, String>) -> Result<std::net::SocketAddr, String> {
    let default = std::net::SocketAddr::from(([127, 0, 0, 1], tenantmesh_console::DEFAULT_PORT));
    tenantmesh_service::config::parse_var(env, "TENANTMESH_LISTEN_ADDR", default).map_err(|e| e.to_string())
}

/// GET /healthz of the console in this container, in three seconds.
fn health() -> ExitCode {
    use std::io::{Read, Write};
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let mut addr = match listen_addr(&env) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tenantmesh-console health: {e}");
            return ExitCode::from(2);
        }
    };
    if addr.ip().is_unspecified() {
        addr.set_ip([127, 0, 0, 1].into());
    }
    let timeout = std::time::Duration::from_secs(3);
    let answer = std::net::TcpStream::connect_timeout(&addr, timeout).and_then(|mut stream| {
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    });
    match answer {
        Ok(text) if text.starts_with("HTTP/1.1 200") => {
            println!("{addr}: SERVING");
            ExitCode::SUCCESS
        }
        Ok(text) => {
            eprintln!("tenantmesh-console health: {addr}: {}", text.lines().next().unwrap_or("no answer"));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tenantmesh-console health: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let _telemetry = tenantmesh_telemetry::init(tenantmesh_telemetry::Config::from_env("console", &env))?;
    let config = tenantmesh_console::ConsoleConfig::from_env(&env)?;
    let addr = listen_addr(&env)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "console serving");
    let console = tenantmesh_console::Console::new(config)?;
    let shutdown = async {
        tenantmesh_service::runtime::shutdown_signal().await;
        tracing::info!("shutting down: draining in-flight calls");
    };
    tenantmesh_console::serve(listener, console, shutdown).await?;
    Ok(())
}
