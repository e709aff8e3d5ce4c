//! `tenantmesh`: run the whole tenantmesh mesh in one process, and report
//! what each tenant costs to serve.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use tenantmesh_cli::ops::OpsCommand;
use tenantmesh_cli::{Mesh, MeshOptions};
use tenantmesh_service::config::{AUTH_PORT, DATA_PORT, ONBOARDING_PORT, REGISTRY_PORT, process_env};

/// tenantmesh: a tenant-aware gRPC mesh (tenant registry, auth, onboarding,
/// data) with tenant isolation enforced on every call.
#[derive(Parser, Debug)]
#[command(name = "tenantmesh", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A platform admin's access token (Auth/Login as the operator), from the
/// environment or a file: never on the command line, where other users of
/// the machine see it (`ps`).
#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// The token (better from TENANTMESH_TOKEN than on the command line,
    /// where other users of the machine see it).
    #[arg(long, env = "TENANTMESH_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the token.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token; `None` after telling `command`'s user why there is none.
    async fn read_for(self, command: &str, env: &HashMap<String, String>) -> Option<String> {
        self.read(env).await.map_err(|e| eprintln!("tenantmesh {command}: {e}")).ok()
    }

    /// The token given, else the signed-in session's (`tenantmesh login`).
    async fn read(self, env: &HashMap<String, String>) -> Result<String, String> {
        match (self.token, self.token_file) {
            (Some(t), _) => Ok(t),
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map(|t| t.trim().to_owned())
                .map_err(|e| format!("--token-file {}: {e}", path.display())),
            (None, None) => match tenantmesh_cli::ops::client::Ops::load(env).await {
                Ok(ops) => Ok(ops.session.access_token),
                Err(e) => Err(format!(
                    "a platform admin's token is required: sign in (`tenantmesh login`), set TENANTMESH_TOKEN, or pass --token-file ({e})"
                )),
            },
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Ops(OpsCommand),
    /// Print a shell completion script for tenantmesh.
    #[command(
        after_help = "Examples:\n  tenantmesh completion bash > ~/.local/share/bash-completion/completions/tenantmesh\n  tenantmesh completion zsh > \"${fpath[1]}/_tenantmesh\""
    )]
    Completion { shell: clap_complete::Shell },
    /// Run all four services in this process on the embedded store, until Ctrl-C.
    ///
    /// Beside them runs the example application service, orders (built
    /// only on the tenantmesh-app crate, registered in the service catalog,
    /// so every tenant's workflows include it), unless --no-example, and
    /// the operator's web console (http://127.0.0.1:50080/), unless
    /// --no-console.
    ///
    /// On first start it creates the `platform` operator tenant and its admin
    /// (email admin@platform.local, or TENANTMESH_BOOTSTRAP_EMAIL). The admin
    /// password is TENANTMESH_BOOTSTRAP_PASSWORD, or is generated, printed
    /// once and written (mode 0600) to DATA_DIR/bootstrap-password. Data
    /// survives restarts on the same data dir. Logs are JSON on stderr
    /// (RUST_LOG sets the level; OTEL_EXPORTER_OTLP_ENDPOINT turns on OTLP
    /// trace export).
    ///
    /// Tiers come from TENANTMESH_TIERS_FILE (default: basic and standard
    /// pool, premium bridge, enterprise silo). Each silo tenant's dedicated
    /// data service runs in this process on its own port, recorded in
    /// DATA_DIR/silos.json and started again with the mesh.
    Up {
        /// Where the services keep their durable stores.
        #[arg(long, default_value = ".tenantmesh", env = "TENANTMESH_DATA_DIR")]
        data_dir: PathBuf,
        /// Address to listen on (use 0.0.0.0 to accept remote clients).
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// Tenant registry port (0: any free port).
        #[arg(long, default_value_t = REGISTRY_PORT)]
        registry_port: u16,
        /// Auth port (0: any free port).
        #[arg(long, default_value_t = AUTH_PORT)]
        auth_port: u16,
        /// Onboarding port (0: any free port).
        #[arg(long, default_value_t = ONBOARDING_PORT)]
        onboarding_port: u16,
        /// Data port (0: any free port).
        #[arg(long, default_value_t = DATA_PORT)]
        data_port: u16,
        /// Where the services store their state: `embedded` (redb files in
        /// the data dir) or `dynamodb` (the standard AWS configuration:
        /// AWS_REGION, credentials chain, AWS_ENDPOINT_URL_DYNAMODB /
        /// AWS_ENDPOINT_URL_STS for an emulator; tables named
        /// TENANTMESH_TABLE_PREFIX + service, created when absent; tenant
        /// credentials vended from TENANTMESH_TENANT_ROLE_ARN).
        #[arg(long, value_parser = ["embedded", "dynamodb"], env = "TENANTMESH_STORAGE", default_value = "embedded")]
        storage: String,
        /// Port of the example application service `orders` (built only on
        /// the tenantmesh-app crate, registered in the service catalog, so
        /// every tenant's workflows include it); 0: any free port.
        #[arg(long, default_value_t = tenantmesh_app::DEFAULT_PORT, env = "TENANTMESH_ORDERS_PORT")]
        orders_port: u16,
        /// Do not run the example application service.
        #[arg(long, env = "TENANTMESH_NO_EXAMPLE")]
        no_example: bool,
        /// Port of the operator's web console (on --host, loopback by
        /// default; sign in as the platform admin or a tenant's admin);
        /// 0: any free port.
        #[arg(long, default_value_t = tenantmesh_console::DEFAULT_PORT, env = "TENANTMESH_CONSOLE_PORT")]
        console_port: u16,
        /// Do not serve the web console.
        #[arg(long, env = "TENANTMESH_NO_CONSOLE")]
        no_console: bool,
    },
    /// Print every tenant's cost to serve, its tier's price and the margin over
    /// a period, lowest margin first: which tenants cost more than they pay.
    ///
    /// Cost is the tenant's metered usage (requests, read and write units,
    /// bytes returned, handler time, application meters) at the unit prices
    /// of the data service's pricing file (TENANTMESH_PRICING_FILE), plus its
    /// dedicated table and silo instance by the hour; revenue is its tier's
    /// monthly price prorated to the period. Asks the Metering service (on
    /// the data service) with a platform admin's token.
    CostReport {
        /// The data service, which hosts metering.
        #[arg(long, default_value = "localhost:50054")]
        addr: String,
        #[command(flatten)]
        token: TokenArgs,
        /// End of the period, Unix seconds (default: now).
        #[arg(long)]
        to: Option<i64>,
        /// Length of the period in hours, ending at --to.
        #[arg(long, default_value_t = 720, value_parser = clap::value_parser!(i64).range(1..=87_600))]
        hours: i64,
    },
    /// Copy a running embedded mesh's stores into a directory, without
    /// stopping it.
    ///
    /// Asks the service at --addr (tenantmesh.backup.v1.Backup, platform
    /// admin only) for every store open in its process: under `tenantmesh
    /// up`, the whole mesh (every service's store, the dedicated tables, the
    /// silo records, the exports); as separate processes (compose), that
    /// service's own stores, so back up each. Each store is copied from one
    /// read snapshot, so every write acknowledged before the backup's time
    /// is in it. Writes OUT/backup.json
    /// last, with each file's size and SHA-256, and checks every file
    /// against it.
    Backup {
        /// Any tenantmesh service (default: the data service).
        #[arg(long, default_value = "localhost:50054")]
        addr: String,
        #[command(flatten)]
        token: TokenArgs,
        /// Where to write the backup (absent, or an empty directory).
        #[arg(long)]
        out: PathBuf,
    },
    /// Bring a stopped mesh's data directory back from a backup.
    ///
    /// Checks every file of the backup against its manifest first. A
    /// non-empty data directory is refused unless --replace, which moves it
    /// aside to DATA_DIR.replaced-<unix seconds> (refused while a mesh runs
    /// on it). Then start the mesh on DATA_DIR as usual.
    Restore {
        /// A directory written by `tenantmesh backup`.
        backup: PathBuf,
        /// The data directory to restore.
        #[arg(long, default_value = ".tenantmesh", env = "TENANTMESH_DATA_DIR")]
        data_dir: PathBuf,
        /// Move a non-empty data directory aside instead of refusing.
        #[arg(long)]
        replace: bool,
    },
    /// Ask a service whether it is serving (grpc.health.v1 Health/Check):
    /// exit 0 when SERVING, 1 otherwise with what was seen on stderr.
    ///
    /// For container healthchecks and Kubernetes exec probes. Without ADDR
    /// it checks the service in the same container: TENANTMESH_LISTEN_ADDR,
    /// with 0.0.0.0 replaced by 127.0.0.1. Logs nothing and exports no
    /// telemetry.
    Health {
        /// HOST:PORT (or http://HOST:PORT) of the service.
        addr: Option<String>,
        /// A single gRPC service to ask about (default: the whole server).
        #[arg(long, default_value = "")]
        service: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
        timeout_ms: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = process_env();
    match cli.command {
        Command::Health { addr, service, timeout_ms } => {
            // Runs every few seconds in every container: no telemetry set-up.
            return health(addr, &service, timeout_ms, &env).await;
        }
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tenantmesh", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Ops(command) => {
            // An operator's command prints for people: no JSON logs.
            let name = command_name(&command);
            return match tenantmesh_cli::ops::run(command, &env).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tenantmesh {name}: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        command => run_with_telemetry(command, env).await,
    }
}

/// The words of the command line that name the subcommand, for errors.
fn command_name(command: &OpsCommand) -> String {
    let words = match command {
        OpsCommand::Tenant(_) | OpsCommand::User(_) | OpsCommand::Workflow(_) | OpsCommand::Cost(_) => 2,
        _ => 1,
    };
    std::env::args().skip(1).filter(|a| !a.starts_with('-')).take(words).collect::<Vec<_>>().join(" ")
}

async fn run_with_telemetry(command: Command, env: HashMap<String, String>) -> ExitCode {
    let mut telemetry_config = tenantmesh_telemetry::Config::from_env("tenantmesh", &env);
    telemetry_config.log_target = tenantmesh_telemetry::LogTarget::Stderr;
    let _telemetry = match tenantmesh_telemetry::init(telemetry_config) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("tenantmesh: telemetry: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Command::Up {
            data_dir,
            host,
            registry_port,
            auth_port,
            onboarding_port,
            data_port,
            storage,
            orders_port,
            no_example,
            console_port,
            no_console,
        } => {
            let mut env = env;
            env.insert("TENANTMESH_STORAGE".into(), storage);
            let ports = [registry_port, auth_port, onboarding_port, data_port];
            let example = (!no_example).then_some(orders_port);
            let console = (!no_console).then_some(console_port);
            let options = MeshOptions { data_dir, host, ports, env, example, console };
            up(options).await
        }
        Command::Health { .. } | Command::Completion { .. } | Command::Ops(_) => {
            unreachable!("handled before telemetry")
        }
        Command::Backup { addr, token, out } => {
            let Some(token) = token.read_for("backup", &env).await else { return ExitCode::FAILURE };
            match tenantmesh_cli::backup::take(&addr, &token, &out).await {
                Ok(m) => {
                    let bytes: u64 = m.files.iter().map(|f| f.size).sum();
                    println!(
                        "backup of {} files ({bytes} bytes) written to {}; it holds every write acknowledged before {} (Unix ms)",
                        m.files.len(),
                        out.display(),
                        m.taken_at_ms
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tenantmesh backup: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Restore { backup, data_dir, replace } => {
            match tenantmesh_cli::backup::restore(&backup, &data_dir, replace) {
                Ok(moved) => {
                    if let Some(old) = moved {
                        println!("the previous data directory was moved to {}", old.display());
                    }
                    println!("restored {} from {}; start the mesh on it", data_dir.display(), backup.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tenantmesh restore: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CostReport { addr, token, to, hours } => {
            let Some(token) = token.read_for("cost-report", &env).await else { return ExitCode::FAILURE };
            let to = to.unwrap_or_else(tenantmesh_service::clock::now_secs);
            let from = to - hours * 3600;
            match tenantmesh_cli::report::fetch(&addr, &token, from, to).await {
                Ok(costs) => {
                    print!("{}", tenantmesh_cli::report::render(&costs, from, to));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tenantmesh cost-report: {addr}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn health(addr: Option<String>, service: &str, timeout_ms: u64, env: &HashMap<String, String>) -> ExitCode {
    use tenantmesh_cli::health;
    let addr =
        match addr.map_or_else(|| health::default_addr(env.get("TENANTMESH_LISTEN_ADDR").map(String::as_str)), Ok) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("tenantmesh health: {e}");
                return ExitCode::from(2);
            }
        };
    match tenantmesh_service::health::check(&addr, service, std::time::Duration::from_millis(timeout_ms)).await {
        Ok(()) => {
            println!("{addr}: SERVING");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tenantmesh health: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn up(options: MeshOptions) -> ExitCode {
    let mut mesh = match Box::pin(Mesh::start(options)).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("tenantmesh: cannot start the mesh: {e}");
            return ExitCode::FAILURE;
        }
    };
    let a = mesh.addrs;
    let email = std::env::var("TENANTMESH_BOOTSTRAP_EMAIL")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| tenantmesh_auth::DEFAULT_BOOTSTRAP_EMAIL.to_owned());
    let pw_file = mesh.data_dir.join(tenantmesh_auth::BOOTSTRAP_PASSWORD_FILE);
    let password_hint = if pw_file.exists() {
        format!("the password in {}", pw_file.display())
    } else {
        "the password from TENANTMESH_BOOTSTRAP_PASSWORD".to_owned()
    };
    println!("tenantmesh is up (data dir {}, storage {})", mesh.data_dir.display(), mesh.storage);
    println!("  tenant-registry  {}", a.registry);
    println!("  auth             {}", a.auth);
    println!("  onboarding       {}", a.onboarding);
    println!("  data             {}", a.data);
    if let Some(orders) = a.orders {
        println!("  orders           {orders}");
    }
    if let Some(console) = a.console {
        println!("  console          http://{console}/");
    }
    println!("Log in as the platform operator (tenant 'platform') with {password_hint}:");
    println!(
        "  grpcurl -plaintext -d '{{\"tenant_id\":\"platform\",\"email\":\"{email}\",\"password\":\"...\"}}' {} tenantmesh.auth.v1.Auth/Login",
        a.auth
    );
    println!("Press Ctrl-C to stop.");
    tokio::select! {
        () = tenantmesh_service::runtime::shutdown_signal() => {
            eprintln!("tenantmesh: shutting down");
            match mesh.shutdown().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tenantmesh: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        e = mesh.wait_for_failure() => {
            eprintln!("tenantmesh: {e}");
            ExitCode::FAILURE
        }
    }
}
