//! The operator's subcommands: `login`, `tenant`, `user`, `workflow`,
//! `usage` and `cost`, over the mesh's gRPC APIs with the session's token.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use tenantmesh_proto::audit::v1::{
    AuditEvent, ExportAuditEventsRequest, ListAuditEventsRequest, VerifyAuditChainRequest,
};

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tenantmesh_proto::auth::v1::{
    CreateUserRequest, DeleteUserRequest, DisableUserRequest, EntitlementSource, GetEntitlementsRequest,
    ListUsersRequest, LoginRequest, RevokeRequest, Role,
};
use tenantmesh_proto::metering::v1::{GetTenantCostRequest, GetUsageRequest, ListTenantCostsRequest, Window};
use tenantmesh_proto::onboarding::v1::{
    ChangeTierRequest, GetWorkflowRequest, ListTenantResourcesRequest, ListWorkflowsRequest, OffboardTenantRequest,
    RegisterTenantRequest, RestoreTarget, RestoreTenantRequest, RetryOnboardingRequest, WatchEventsRequest, Workflow,
};
use tenantmesh_proto::registry::v1::{
    EntitlementOverride, GetTenantRequest, ListTenantsRequest, SetEntitlementOverrideRequest, SetTenantLimitsRequest,
    SetTenantStatusRequest, SetUsageAlertRequest, Tenant, TenantLimits, TenantStatus, UsageAlert, WatchTenantsRequest,
};
use tonic::Code;

use super::client::{CliError, Ops, Service, channel, explain};
use super::output::{Format, Table, clean, fields, print_json};
use super::progress;
use super::session::{self, Endpoints, Session};
use super::views::*;
use super::when;
use tenantmesh_metering::latency;

/// `-o table|json`.
#[derive(Args, Debug, Clone, Copy)]
pub struct Output {
    /// `table` for people, `json` for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

impl Output {
    fn json(self) -> bool {
        self.output == Format::Json
    }
}

/// Whether to follow the workflow a command starts.
#[derive(Args, Debug, Clone, Copy)]
pub struct Wait {
    /// Return once the workflow has started instead of following it to
    /// its end (follow it later with `tenantmesh workflow watch ID`).
    #[arg(long)]
    pub no_wait: bool,
}

/// A secret read without putting it on the command line (where `ps` shows
/// it to every user of the machine).
#[derive(Args, Debug, Clone)]
pub struct Secret {
    /// Read the password from the first line of stdin (otherwise from
    /// $TENANTMESH_PASSWORD, or asked for on the terminal).
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Subcommand, Debug)]
pub enum OpsCommand {
    /// Sign in as a platform admin (tenant `platform`) or a tenant's admin,
    /// and remember the session.
    ///
    /// The access and refresh tokens are kept in session.json under
    /// $TENANTMESH_CONFIG_DIR (else $XDG_CONFIG_HOME/tenantmesh, else
    /// ~/.config/tenantmesh), readable by you only; the access token is
    /// refreshed when it is about to expire. The mesh's addresses given here
    /// (or in TENANTMESH_*_ADDR) are remembered for the other commands.
    #[command(after_help = "Examples:\n  \
        tenantmesh login --email admin@platform.local --password-stdin < .tenantmesh/bootstrap-password\n  \
        TENANTMESH_PASSWORD=... tenantmesh login --tenant acme --email admin@acme.example --auth mesh.example:50052")]
    Login(LoginArgs),
    /// Sign out: revoke the session's refresh token and forget the session.
    #[command(after_help = "Example:\n  tenantmesh logout")]
    Logout,
    /// Who is signed in, to which tenant, and where the mesh is.
    #[command(after_help = "Example:\n  tenantmesh whoami -o json")]
    Whoami(Output),
    /// Lifecycle events as they happen (onboarded, suspended, tier changed,
    /// offboarded, restored, a step failed), until Ctrl-C: every tenant's
    /// for the platform admin, a tenant admin's own tenant's.
    #[command(after_help = "Examples:\n  tenantmesh events\n  tenantmesh events --tenant acme --all -o json")]
    Events {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
        /// The stored events first (from the oldest), then the live ones.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Tenants: list, show, register, change tier, set limits, entitlements
    /// (and the operator's exceptions to them), suspend, resume, offboard,
    /// restore to an instant, resources.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// A tenant's users: list, create, disable, delete.
    #[command(subcommand)]
    User(UserCommand),
    /// Lifecycle workflows: list, show, watch, retry.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// A tenant's metered usage over a period.
    ///
    /// Without --meter: the total of each built-in meter (requests,
    /// read_units, write_units, bytes_returned, compute_us). With --meter:
    /// that meter per window (--window), split by --by dimensions.
    #[command(after_help = "Examples:\n  \
        tenantmesh usage acme --hours 24\n  \
        tenantmesh usage acme --meter requests --window minute --by rpc -o json")]
    Usage(UsageArgs),
    /// What tenants cost to serve, what their tier pays, and the margin.
    #[command(subcommand)]
    Cost(CostCommand),
    /// Who changed what: a tenant's audit log (every change to its record,
    /// each refused or failed attempt), and a check of its hash chain.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// A tenant's audit events, oldest first: when, who, what, the
    /// outcome, and what changed. `platform` holds the service catalog's
    /// changes and attempts that named no tenant.
    #[command(after_help = "Examples:\n  \
        tenantmesh audit list acme\n  \
        tenantmesh audit list acme --action tenant.tier --hours 24 -o json\n  \
        tenantmesh audit list acme --last 10")]
    List {
        tenant: String,
        /// Only this action (e.g. tenant.status, tenant.limits, service.register).
        #[arg(long)]
        action: Option<String>,
        /// Only this actor (a user id, or service:<client id>).
        #[arg(long)]
        actor: Option<String>,
        /// Only the last this many hours.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..=87_600))]
        hours: Option<i64>,
        /// Only the last this many events (a tail), instead of all of them.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
        last: Option<u32>,
        #[command(flatten)]
        out: Output,
    },
    /// Write a tenant's audit events as JSON Lines (one object per event,
    /// the three logs in one timeline) to stdout, or to --file.
    #[command(after_help = "Examples:\n  \
        tenantmesh audit export acme > acme-audit.jsonl\n  \
        tenantmesh audit export acme --hours 720 --file acme-audit.jsonl")]
    Export {
        tenant: String,
        /// Only the last this many hours.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..=87_600))]
        hours: Option<i64>,
        /// Write here instead of stdout (created, or replaced).
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Recompute a tenant's hash chain: exit 0 when every event holds, 1
    /// naming the first that does not (changed, removed or reordered).
    #[command(after_help = "Example:\n  tenantmesh audit verify acme")]
    Verify {
        tenant: String,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The tenant whose user signs in (`platform` for the operator).
    #[arg(long, default_value = "platform", env = "TENANTMESH_TENANT")]
    pub tenant: String,
    /// The user's email.
    #[arg(long, env = "TENANTMESH_EMAIL")]
    pub email: String,
    #[command(flatten)]
    pub secret: Secret,
    #[command(flatten)]
    pub endpoints: Endpoints,
}

#[derive(Subcommand, Debug)]
pub enum TenantCommand {
    /// Every tenant: id, name, tier, isolation model, status.
    ///
    /// With --watch, a line for each tenant as it changes, until Ctrl-C.
    #[command(
        after_help = "Examples:\n  tenantmesh tenant list\n  tenantmesh tenant list -o json\n  tenantmesh tenant list --watch"
    )]
    List {
        #[command(flatten)]
        out: Output,
        /// Keep printing tenants as they change.
        #[arg(short, long)]
        watch: bool,
    },
    /// One tenant: its record, limits, placement, latest workflow and
    /// resources.
    #[command(after_help = "Example:\n  tenantmesh tenant show acme")]
    Show {
        tenant: String,
        #[command(flatten)]
        out: Output,
    },
    /// Onboard a tenant and follow its onboarding workflow step by step.
    ///
    /// The admin's password is read from stdin (--password-stdin), from
    /// $TENANTMESH_PASSWORD, or asked for on the terminal; at least 12
    /// characters. The same --idempotency-key (default: the tenant id)
    /// never onboards twice.
    #[command(after_help = "Example:\n  \
        echo 'a long admin password' | tenantmesh tenant register acme --name 'Acme Corp' --tier standard \\\n      \
        --admin-email admin@acme.example --password-stdin")]
    Register {
        tenant: String,
        /// The tenant's display name.
        #[arg(long)]
        name: String,
        /// A tier of the tiers file (by default basic, standard, premium, enterprise).
        #[arg(long)]
        tier: String,
        /// The tenant's first admin.
        #[arg(long)]
        admin_email: String,
        #[command(flatten)]
        secret: Secret,
        /// Default: the tenant id.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        out: Output,
    },
    /// Move a tenant to another tier (its items move when the isolation
    /// model changes), following the workflow.
    #[command(after_help = "Example:\n  tenantmesh tenant change-tier acme premium")]
    ChangeTier {
        tenant: String,
        tier: String,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        out: Output,
    },
    /// Override a tenant's limits (the others stay as they are).
    #[command(after_help = "Example:\n  tenantmesh tenant set-limits acme --requests-per-second 200 --burst 400")]
    SetLimits {
        tenant: String,
        /// Sustained requests per second, per service.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        requests_per_second: Option<u32>,
        /// Requests allowed at once above the rate.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        burst: Option<u32>,
        /// Requests in flight at once, per service.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        max_concurrency: Option<u32>,
        /// Stored item bytes.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        storage_quota_bytes: Option<u64>,
        #[command(flatten)]
        out: Output,
    },
    /// What a tenant's plan includes (its tier's, with the operator's
    /// overrides): each feature, granted or not, its cap, what the tenant
    /// uses of it, and where it comes from.
    #[command(after_help = "Example:\n  tenantmesh tenant entitlements acme -o json")]
    Entitlements {
        tenant: String,
        #[command(flatten)]
        out: Output,
    },
    /// Set (or --clear) the operator's exception to a tenant's plan for one
    /// feature: restore, export or external_idp with --granted, max_users
    /// with --limit, requests or write_units (per calendar month) with
    /// --limit and --hard. Takes effect in every service at once; audited.
    #[command(after_help = "Examples:\n  \
        tenantmesh tenant set-entitlement globex restore --granted true\n  \
        tenantmesh tenant set-entitlement globex max_users --limit 25\n  \
        tenantmesh tenant set-entitlement globex write_units --limit 1000000 --hard true\n  \
        tenantmesh tenant set-entitlement globex max_users --clear")]
    SetEntitlement {
        tenant: String,
        /// restore, export, external_idp, max_users, requests or write_units.
        feature: String,
        /// Whether the feature is granted (restore, export, external_idp).
        #[arg(long, conflicts_with_all = ["limit", "clear", "hard"])]
        granted: Option<bool>,
        /// The cap (max_users), or the monthly quantity (requests, write_units).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "clear")]
        limit: Option<u64>,
        /// requests, write_units: whether passing --limit is refused (true)
        /// or only reported (false); unset keeps the tier's.
        #[arg(long, requires = "limit")]
        hard: Option<bool>,
        /// Remove the exception: the tier's plan holds again.
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        out: Output,
    },
    /// A tenant's usage alerts: the thresholds on its monthly usage that
    /// each fire once per calendar month (a USAGE_THRESHOLD_REACHED event,
    /// and the data service's signed webhook where it has one).
    #[command(after_help = "Example:\n  tenantmesh tenant alerts acme")]
    Alerts {
        tenant: String,
        #[command(flatten)]
        out: Output,
    },
    /// Set (or --clear) one of a tenant's usage alerts: a percentage of its
    /// plan's monthly requests or write_units, or an absolute quantity of a
    /// meter. Setting an alert again starts it over; audited.
    #[command(after_help = "Examples:\n  \
        tenantmesh tenant set-alert acme writes-80 --meter write_units --percent 80\n  \
        tenantmesh tenant set-alert acme reads-1m --meter read_units --absolute 1000000\n  \
        tenantmesh tenant set-alert acme writes-80 --clear")]
    SetAlert {
        tenant: String,
        /// Names the alert: ^[a-z0-9][a-z0-9-]{0,31}$.
        alert_id: String,
        /// requests, read_units, write_units, bytes_returned or compute_us.
        #[arg(long, required_unless_present = "clear")]
        meter: Option<String>,
        /// A percentage (1-1000) of the plan's monthly quantity of the meter.
        #[arg(long, conflicts_with_all = ["absolute", "clear"], required_unless_present_any = ["absolute", "clear"])]
        percent: Option<u32>,
        /// An absolute quantity of the meter.
        #[arg(long, conflicts_with = "clear")]
        absolute: Option<u64>,
        /// Remove the alert.
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Suspend a tenant: every call with its tokens is refused.
    #[command(after_help = "Example:\n  tenantmesh tenant suspend acme")]
    Suspend {
        tenant: String,
        #[command(flatten)]
        out: Output,
    },
    /// Resume a suspended tenant.
    #[command(after_help = "Example:\n  tenantmesh tenant resume acme")]
    Resume {
        tenant: String,
        #[command(flatten)]
        out: Output,
    },
    /// Offboard a tenant: suspend, export its items (and each application
    /// service's) to JSONL, delete them and its users, mark it DELETED.
    #[command(after_help = "Example:\n  tenantmesh tenant offboard globex --yes")]
    Offboard {
        tenant: String,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        out: Output,
    },
    /// Put a tenant's items back as they were at an instant (in place), or
    /// export them as they were (--export, the tenant untouched).
    #[command(after_help = "Examples:\n  \
        tenantmesh tenant restore acme --to '10m ago' --export\n  \
        tenantmesh tenant restore acme --to 2026-12-07T09:30:00Z --yes")]
    Restore {
        tenant: String,
        /// The instant: RFC 3339 (2026-12-07T09:30:00Z), @<unix seconds>, or a time ago (10m ago).
        #[arg(long)]
        to: String,
        /// Export the items as they were to a JSONL file instead of restoring in place.
        #[arg(long)]
        export: bool,
        /// Do not ask for confirmation of an in-place restore (required when
        /// stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        out: Output,
    },
    /// What the workflows created for a tenant alone (dedicated tables,
    /// silo instances, exports), with their cost tags.
    #[command(after_help = "Example:\n  tenantmesh tenant resources bigco --all")]
    Resources {
        tenant: String,
        /// Also those removed since.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// A tenant's users (default: the signed-in tenant's).
    #[command(after_help = "Example:\n  tenantmesh user list --tenant acme")]
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        out: Output,
    },
    /// Create a user (password from stdin, $TENANTMESH_PASSWORD, or the terminal).
    #[command(after_help = "Example:\n  \
        echo 'a long user password' | tenantmesh user create bob@acme.example --tenant acme --role user --password-stdin")]
    Create {
        email: String,
        #[arg(long)]
        tenant: Option<String>,
        /// `admin` or `user`.
        #[arg(long, value_parser = ["admin", "user"], default_value = "user")]
        role: String,
        #[command(flatten)]
        secret: Secret,
        #[command(flatten)]
        out: Output,
    },
    /// Disable a user: they can neither sign in nor refresh.
    #[command(after_help = "Example:\n  tenantmesh user disable bob@acme.example --tenant acme")]
    Disable {
        email: String,
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        out: Output,
    },
    /// Delete a user.
    #[command(after_help = "Example:\n  tenantmesh user delete bob@acme.example --tenant acme --yes")]
    Delete {
        email: String,
        #[arg(long)]
        tenant: Option<String>,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum WorkflowCommand {
    /// A tenant's workflows, newest first: kind, status, when, error.
    #[command(after_help = "Example:\n  tenantmesh workflow list acme")]
    List {
        tenant: String,
        /// At most this many.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i32).range(1..=1000))]
        limit: i32,
        #[command(flatten)]
        out: Output,
    },
    /// A workflow with each step's state, attempts and last error: by id
    /// (acme/change-tier/1), or a tenant's latest (acme).
    #[command(
        after_help = "Examples:\n  tenantmesh workflow show acme/onboard\n  tenantmesh workflow show acme -o json"
    )]
    Show {
        workflow: String,
        #[command(flatten)]
        out: Output,
    },
    /// Follow a workflow until it ends: exit 0 when it succeeds, 1 with the
    /// failing step's error otherwise.
    #[command(after_help = "Example:\n  tenantmesh workflow watch acme/change-tier/1")]
    Watch {
        workflow: String,
        #[command(flatten)]
        out: Output,
    },
    /// Resume a FAILED workflow from its failed step, and follow it.
    #[command(after_help = "Example:\n  tenantmesh workflow retry acme/onboard")]
    Retry {
        workflow: String,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Args, Debug)]
pub struct UsageArgs {
    pub tenant: String,
    /// One meter, per window (e.g. requests, write_units, or an application's meter).
    #[arg(long)]
    pub meter: Option<String>,
    /// The period: this many hours up to now.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(i64).range(1..=87_600))]
    pub hours: i64,
    /// The window of each row with --meter.
    #[arg(long, value_parser = ["minute", "hour", "day"], default_value = "hour")]
    pub window: String,
    /// Dimensions to keep apart with --meter (e.g. rpc).
    #[arg(long)]
    pub by: Vec<String>,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Subcommand, Debug)]
pub enum CostCommand {
    /// Every tenant's cost, revenue and margin, lowest margin first.
    #[command(after_help = "Example:\n  tenantmesh cost list --hours 24")]
    List {
        /// The period: this many hours up to now.
        #[arg(long, default_value_t = 720, value_parser = clap::value_parser!(i64).range(1..=87_600))]
        hours: i64,
        #[command(flatten)]
        out: Output,
    },
    /// One tenant's cost line by line (meters, dedicated table, silo
    /// instance), its tier's price and the margin.
    #[command(after_help = "Example:\n  tenantmesh cost show bigco --hours 24")]
    Show {
        tenant: String,
        #[arg(long, default_value_t = 720, value_parser = clap::value_parser!(i64).range(1..=87_600))]
        hours: i64,
        #[command(flatten)]
        out: Output,
    },
}

/// The process environment, as the session and secrets read it.
pub type Env = HashMap<String, String>;

/// Runs an operator command.
pub async fn run(command: OpsCommand, env: &Env) -> Result<(), CliError> {
    match command {
        OpsCommand::Login(args) => login(args, env).await,
        OpsCommand::Logout => logout(env).await,
        OpsCommand::Whoami(out) => whoami(env, out),
        OpsCommand::Events { tenant, all, out } => events(&Ops::load(env).await?, tenant, all, out).await,
        OpsCommand::Tenant(c) => tenant(c, &Ops::load(env).await?, env).await,
        OpsCommand::User(c) => user(c, &Ops::load(env).await?, env).await,
        OpsCommand::Workflow(c) => workflow(c, &Ops::load(env).await?).await,
        OpsCommand::Usage(args) => usage(args, &Ops::load(env).await?).await,
        OpsCommand::Cost(c) => cost(c, &Ops::load(env).await?).await,
        OpsCommand::Audit(c) => audit(c, &Ops::load(env).await?).await,
    }
}

/// A password from stdin's first line, the environment, or the terminal
/// (not echoed).
fn read_password(secret: &Secret, env: &Env, prompt: &str) -> Result<String, CliError> {
    let password = if secret.password_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map_err(|e| CliError(format!("reading stdin: {e}")))?;
        line.trim_end_matches(['\n', '\r']).to_owned()
    } else if let Some(p) = env.get("TENANTMESH_PASSWORD").filter(|p| !p.is_empty()) {
        p.clone()
    } else if std::io::stdin().is_terminal() {
        prompt_hidden(prompt)?
    } else {
        return Err(CliError("no password: pass --password-stdin and pipe it in, or set TENANTMESH_PASSWORD".into()));
    };
    if password.is_empty() {
        return Err(CliError("the password is empty".into()));
    }
    Ok(password)
}

/// Asks on the terminal with echo off.
fn prompt_hidden(prompt: &str) -> Result<String, CliError> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin).map_err(|e| CliError(format!("terminal: {e}")))?;
    let mut quiet = saved.clone();
    quiet.local_modes -= LocalModes::ECHO;
    eprint!("{prompt}: ");
    let _ = std::io::stderr().flush();
    tcsetattr(&stdin, OptionalActions::Now, &quiet).map_err(|e| CliError(format!("terminal: {e}")))?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, OptionalActions::Now, &saved);
    eprintln!();
    read.map_err(|e| CliError(format!("reading the terminal: {e}")))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// Asks "`question` [y/N]" on the terminal, unless `yes`; off a terminal,
/// refuses without `--yes`.
fn confirm(question: &str, yes: bool) -> Result<(), CliError> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(CliError(format!("{question}: pass --yes to confirm (stdin is not a terminal)")));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| CliError(e.to_string()))?;
    if matches!(line.trim(), "y" | "Y" | "yes") { Ok(()) } else { Err(CliError("cancelled".into())) }
}

async fn login(args: LoginArgs, env: &Env) -> Result<(), CliError> {
    let path = session::path(env)?;
    let password = read_password(&args.secret, env, &format!("Password for {} ({})", args.email, args.tenant))?;
    let request = LoginRequest { tenant_id: args.tenant.clone(), email: args.email.clone(), password };
    let addr = args.endpoints.auth.clone();
    let mut client = tenantmesh_proto::auth::v1::auth_client::AuthClient::new(channel(&addr)?);
    let answer = client.login(request).await.map_err(|s| {
        if s.code() == Code::Unauthenticated {
            CliError(format!("sign-in refused for {} of tenant {}: {}", args.email, args.tenant, s.message()))
        } else {
            explain(&s, Service::Auth, &addr, None)
        }
    })?;
    let answer = answer.into_inner();
    let session = Session {
        endpoints: args.endpoints,
        tenant_id: args.tenant,
        email: args.email,
        access_token: answer.access_token,
        refresh_token: answer.refresh_token,
        expires_at: tenantmesh_service::clock::now_secs() + answer.expires_in,
    };
    session.save(&path)?;
    println!("signed in as {} of tenant {} (session in {})", session.email, session.tenant_id, path.display());
    Ok(())
}

async fn logout(env: &Env) -> Result<(), CliError> {
    let path = session::path(env)?;
    let Some(session) = Session::load(&path)? else {
        println!("not signed in");
        return Ok(());
    };
    let addr = session.endpoints.auth.clone();
    let revoked = match channel(&addr) {
        Ok(ch) => tenantmesh_proto::auth::v1::auth_client::AuthClient::new(ch)
            .revoke(RevokeRequest { refresh_token: session.refresh_token.clone() })
            .await
            .map_err(|s| explain(&s, Service::Auth, &addr, None).0),
        Err(e) => Err(e.0),
    };
    Session::forget(&path)?;
    match revoked {
        Ok(_) => println!("signed out: the session's refresh token is revoked and {} removed", path.display()),
        Err(e) => println!("signed out ({} removed), but the refresh token could not be revoked: {e}", path.display()),
    }
    Ok(())
}

fn whoami(env: &Env, out: Output) -> Result<(), CliError> {
    let path = session::path(env)?;
    let Some(s) = Session::load(&path)? else { return Err(CliError("not signed in: run `tenantmesh login`".into())) };
    if out.json() {
        print_json(&json!({
            "tenant_id": s.tenant_id, "email": s.email, "expires_at": s.expires_at, "endpoints": s.endpoints,
        }));
    } else {
        print!(
            "{}",
            fields(&[
                ("tenant", s.tenant_id.clone()),
                ("email", s.email.clone()),
                ("token expires", format!("{} (refreshed when needed)", when::format(s.expires_at))),
                ("registry", s.endpoints.registry.clone()),
                ("auth", s.endpoints.auth.clone()),
                ("onboarding", s.endpoints.onboarding.clone()),
                ("data", s.endpoints.data),
            ])
        );
    }
    Ok(())
}

/// A line per lifecycle event, until Ctrl-C or the stream ends.
async fn events(ops: &Ops, tenant: Option<String>, all: bool, out: Output) -> Result<(), CliError> {
    let request = WatchEventsRequest { tenant_id: tenant.unwrap_or_default(), after_sequence: all.then_some(0) };
    let mut stream = ops
        .onboarding()?
        .watch_events(ops.request(request))
        .await
        .map_err(ops.error(Service::Onboarding))?
        .into_inner();
    loop {
        let message = tokio::select! {
            m = stream.message() => m.map_err(ops.error(Service::Onboarding))?,
            () = tenantmesh_service::runtime::shutdown_signal() => return Ok(()),
        };
        let Some(e) = message.and_then(|m| m.event) else {
            return Err(CliError("the onboarding service ended the stream: run the command again".into()));
        };
        let kind = tenantmesh_proto::onboarding::v1::EventKind::try_from(e.kind)
            .map_or("UNKNOWN", |k| k.as_str_name().strip_prefix("EVENT_KIND_").unwrap_or("UNKNOWN"));
        if out.json() {
            let line = json!({
                "sequence": e.sequence, "time": e.time, "kind": kind, "tenant_id": e.tenant_id,
                "workflow_id": e.workflow_id, "detail": e.detail,
            });
            println!("{line}");
        } else {
            println!("{}  {kind}  {}  {}  {}", when::format(e.time), e.tenant_id, e.workflow_id, clean(&e.detail));
        }
        let _ = std::io::stdout().flush();
    }
}

fn tenant_row(t: &Tenant) -> Vec<String> {
    vec![
        t.tenant_id.clone(),
        clean(&t.name),
        t.tier.clone(),
        model(t.isolation_model).to_owned(),
        tenant_status(t.status).to_owned(),
        when::format(t.create_time),
    ]
}

const TENANT_COLUMNS: [&str; 6] = ["TENANT", "NAME", "TIER", "MODEL", "STATUS", "CREATED"];

async fn list_tenants(ops: &Ops) -> Result<Vec<Tenant>, CliError> {
    let mut client = ops.registry()?;
    let mut tenants = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ops.request(ListTenantsRequest { page_size: 1000, page_token });
        let page = client.list_tenants(request).await.map_err(ops.error(Service::Registry))?.into_inner();
        tenants.extend(page.tenants);
        if page.next_page_token.is_empty() {
            return Ok(tenants);
        }
        page_token = page.next_page_token;
    }
}

async fn get_tenant(ops: &Ops, id: &str) -> Result<Tenant, CliError> {
    let request = ops.request(GetTenantRequest { tenant_id: id.to_owned() });
    let answer = ops.registry()?.get_tenant(request).await.map_err(ops.error(Service::Registry))?;
    answer.into_inner().tenant.ok_or_else(|| CliError(format!("the registry sent no tenant for {id}")))
}

/// Prints the tenant after a change.
fn print_tenant_change(t: &Tenant, out: Output, what: &str) {
    if out.json() {
        print_json(&tenant_json(t));
    } else {
        println!("{} {what}", t.tenant_id);
    }
}

/// Follows the workflow a command started, unless --no-wait.
async fn follow(ops: &Ops, id: &str, wait: Wait, out: Output) -> Result<(), CliError> {
    if wait.no_wait {
        if out.json() {
            print_json(&json!({ "workflow_id": id }));
        } else {
            println!("started {id}: follow it with `tenantmesh workflow watch {id}`");
        }
        return Ok(());
    }
    if !out.json() {
        println!("started {id}");
    }
    progress::watch(ops, id, progress::mode(out.json())).await.map(|_| ())
}

async fn tenant(command: TenantCommand, ops: &Ops, env: &Env) -> Result<(), CliError> {
    match command {
        TenantCommand::List { out, watch } => {
            let tenants = list_tenants(ops).await?;
            if out.json() && !watch {
                print_json(&Value::Array(tenants.iter().map(tenant_json).collect()));
            } else if out.json() {
                tenants.iter().for_each(|t| println!("{}", tenant_json(t)));
            } else {
                let mut table = Table::new(&TENANT_COLUMNS);
                tenants.iter().for_each(|t| table.row(tenant_row(t)));
                print!("{}", table.render("no tenants"));
            }
            if watch {
                watch_tenants(ops, out).await?;
            }
            Ok(())
        }
        TenantCommand::Show { tenant, out } => show_tenant(ops, &tenant, out).await,
        TenantCommand::Register { tenant, name, tier, admin_email, secret, idempotency_key, wait, out } => {
            let admin_password = read_password(&secret, env, &format!("Password for {admin_email}"))?;
            let request = RegisterTenantRequest {
                idempotency_key: idempotency_key.unwrap_or_else(|| tenant.clone()),
                tenant_id: tenant,
                name,
                tier,
                admin_email,
                admin_password,
            };
            let started = ops.onboarding()?.register_tenant(ops.request(request)).await;
            let started = started.map_err(ops.error(Service::Onboarding))?.into_inner();
            follow(ops, &started.workflow_id, wait, out).await
        }
        TenantCommand::ChangeTier { tenant, tier, wait, out } => {
            let request = ops.request(ChangeTierRequest { tenant_id: tenant, tier });
            let started = ops.onboarding()?.change_tier(request).await.map_err(ops.error(Service::Onboarding))?;
            follow(ops, &started.into_inner().workflow_id, wait, out).await
        }
        TenantCommand::SetLimits { tenant, requests_per_second, burst, max_concurrency, storage_quota_bytes, out } => {
            if requests_per_second.is_none()
                && burst.is_none()
                && max_concurrency.is_none()
                && storage_quota_bytes.is_none()
            {
                return Err(CliError(
                    "nothing to set: give --requests-per-second, --burst, --max-concurrency or --storage-quota-bytes"
                        .into(),
                ));
            }
            let current = get_tenant(ops, &tenant).await?.limits.unwrap_or_default();
            let limits = TenantLimits {
                requests_per_second: requests_per_second.unwrap_or(current.requests_per_second),
                burst: burst.unwrap_or(current.burst),
                max_concurrency: max_concurrency.unwrap_or(current.max_concurrency),
                storage_quota_bytes: storage_quota_bytes.unwrap_or(current.storage_quota_bytes),
            };
            let request = ops.request(SetTenantLimitsRequest { tenant_id: tenant, limits: Some(limits) });
            let answer = ops.registry()?.set_tenant_limits(request).await.map_err(ops.error(Service::Registry))?;
            let t = answer.into_inner().tenant.unwrap_or_default();
            let l = t.limits.unwrap_or_default();
            let what = format!("limits: {}", tenantmesh_proto::names::limits(&l));
            print_tenant_change(&Tenant { limits: Some(l), ..t }, out, &what);
            Ok(())
        }
        TenantCommand::Entitlements { tenant, out } => {
            let request = ops.request(GetEntitlementsRequest { tenant_id: tenant.clone() });
            let answer = ops.auth()?.get_entitlements(request).await.map_err(ops.error(Service::Auth))?;
            let entitlements = answer.into_inner().entitlements;
            if out.json() {
                let rows = entitlements.iter().map(|e| {
                    json!({
                        "feature": e.feature, "granted": e.granted, "limit": e.limit, "used": e.used,
                        "reset_period": e.reset_period, "hard": e.hard,
                        "source": if e.source() == EntitlementSource::Override { "override" } else { "tier" },
                    })
                });
                print_json(&Value::Array(rows.collect()));
                return Ok(());
            }
            let mut table = Table::new(&["FEATURE", "GRANTED", "LIMIT", "USED", "FROM"]);
            let number = |n: Option<u64>| n.map_or("-".to_owned(), |n| n.to_string());
            for e in &entitlements {
                let limit = match (e.limit, e.reset_period.as_str()) {
                    (Some(l), "") => l.to_string(),
                    (Some(l), period) => format!("{l}/{period}{}", if e.hard { " (hard)" } else { "" }),
                    (None, _) => "-".to_owned(),
                };
                table.row(vec![
                    e.feature.clone(),
                    if e.granted { "yes" } else { "no" }.to_owned(),
                    limit,
                    number(e.used),
                    if e.source() == EntitlementSource::Override { "override" } else { "tier" }.to_owned(),
                ]);
            }
            print!("{}", table.render(&format!("no entitlements for {tenant}")));
            Ok(())
        }
        TenantCommand::SetEntitlement { tenant, feature, granted, limit, hard, clear, out } => {
            if !clear && granted.is_none() && limit.is_none() {
                return Err(CliError("nothing to set: give --granted true|false, --limit N or --clear".into()));
            }
            let r#override = EntitlementOverride { feature: feature.clone(), granted, limit, hard };
            let request =
                ops.request(SetEntitlementOverrideRequest { tenant_id: tenant, r#override: Some(r#override), clear });
            let answer =
                ops.registry()?.set_entitlement_override(request).await.map_err(ops.error(Service::Registry))?;
            let t = answer.into_inner().tenant.unwrap_or_default();
            let what = match (clear, granted, limit) {
                (true, _, _) => format!("{feature}: as its tier's plan says"),
                (_, Some(g), _) => format!("{feature}: {}", if g { "granted" } else { "not granted" }),
                (_, _, Some(l)) if tenantmesh_service::entitlements::MeteredFeature::of(&feature).is_some() => {
                    format!("{feature}: {l} a month{}", if hard == Some(true) { ", refused past it" } else { "" })
                }
                (_, _, Some(l)) => format!("{feature}: at most {l}"),
                _ => feature,
            };
            print_tenant_change(&t, out, &what);
            Ok(())
        }
        TenantCommand::Alerts { tenant, out } => {
            let request = ops.request(GetTenantRequest { tenant_id: tenant.clone() });
            let answer = ops.registry()?.get_tenant(request).await.map_err(ops.error(Service::Registry))?;
            let alerts = answer.into_inner().tenant.unwrap_or_default().usage_alerts;
            if out.json() {
                let rows = alerts.iter().map(|a| {
                    use tenantmesh_proto::registry::v1::usage_alert::Threshold;
                    let (percent, absolute) = match a.threshold {
                        Some(Threshold::Percent(p)) => (Some(p), None),
                        Some(Threshold::Absolute(n)) => (None, Some(n)),
                        None => (None, None),
                    };
                    json!({
                        "alert_id": a.alert_id, "meter": a.meter, "percent": percent, "absolute": absolute,
                        "create_time": tenantmesh_service::clock::rfc3339(a.create_time),
                    })
                });
                print_json(&Value::Array(rows.collect()));
                return Ok(());
            }
            let mut table = Table::new(&["ALERT", "METER", "AT", "SET"]);
            for a in &alerts {
                use tenantmesh_proto::registry::v1::usage_alert::Threshold;
                let at = match a.threshold {
                    Some(Threshold::Percent(p)) => format!("{p}% of the month's"),
                    Some(Threshold::Absolute(n)) => n.to_string(),
                    None => "-".into(),
                };
                table.row(vec![
                    a.alert_id.clone(),
                    a.meter.clone(),
                    at,
                    tenantmesh_service::clock::rfc3339(a.create_time),
                ]);
            }
            print!("{}", table.render(&format!("no usage alerts for {tenant}")));
            Ok(())
        }
        TenantCommand::SetAlert { tenant, alert_id, meter, percent, absolute, clear, out } => {
            use tenantmesh_proto::registry::v1::usage_alert::Threshold;
            let threshold = percent.map(Threshold::Percent).or(absolute.map(Threshold::Absolute));
            let alert =
                UsageAlert { alert_id: alert_id.clone(), meter: meter.unwrap_or_default(), threshold, create_time: 0 };
            let request = ops.request(SetUsageAlertRequest { tenant_id: tenant, alert: Some(alert.clone()), clear });
            let answer = ops.registry()?.set_usage_alert(request).await.map_err(ops.error(Service::Registry))?;
            let t = answer.into_inner().tenant.unwrap_or_default();
            let what = if clear {
                format!("usage alert {alert_id} removed")
            } else {
                format!("usage alert {}: fires once a month", tenantmesh_proto::names::usage_alert(&alert))
            };
            print_tenant_change(&t, out, &what);
            Ok(())
        }
        TenantCommand::Suspend { tenant, out } => {
            let t = set_status(ops, tenant, TenantStatus::Suspended).await?;
            print_tenant_change(&t, out, "is SUSPENDED: every call with its tokens is refused");
            Ok(())
        }
        TenantCommand::Resume { tenant, out } => {
            let t = set_status(ops, tenant, TenantStatus::Active).await?;
            print_tenant_change(&t, out, "is ACTIVE again");
            Ok(())
        }
        TenantCommand::Offboard { tenant, yes, wait, out } => {
            confirm(&format!("offboard {tenant}: its items are exported, then deleted with its users"), yes)?;
            let request = ops.request(OffboardTenantRequest { tenant_id: tenant });
            let started = ops.onboarding()?.offboard_tenant(request).await.map_err(ops.error(Service::Onboarding))?;
            follow(ops, &started.into_inner().workflow_id, wait, out).await
        }
        TenantCommand::Restore { tenant, to, export, yes, wait, out } => {
            let (seconds, nanos) = when::parse(&to, tenantmesh_service::clock::now_secs()).map_err(CliError)?;
            if !export {
                confirm(
                    &format!(
                        "restore {tenant}'s items in place to {} (changes since are undone)",
                        when::format(seconds)
                    ),
                    yes,
                )?;
            }
            let target = if export { RestoreTarget::Export } else { RestoreTarget::InPlace };
            let request = ops.request(RestoreTenantRequest {
                tenant_id: tenant,
                point_in_time: Some(prost_types::Timestamp { seconds, nanos }),
                target: target as i32,
            });
            let started = ops.onboarding()?.restore_tenant(request).await.map_err(ops.error(Service::Onboarding))?;
            follow(ops, &started.into_inner().workflow_id, wait, out).await
        }
        TenantCommand::Resources { tenant, all, out } => {
            let request = ops.request(ListTenantResourcesRequest { tenant_id: tenant, include_removed: all });
            let answer =
                ops.onboarding()?.list_tenant_resources(request).await.map_err(ops.error(Service::Onboarding))?;
            let resources = answer.into_inner().resources;
            if out.json() {
                print_json(&Value::Array(resources.iter().map(resource_json).collect()));
                return Ok(());
            }
            let mut table = Table::new(&["KIND", "NAME", "CREATED", "REMOVED", "BYTES", "TAGS"]);
            for r in &resources {
                let mut tags: Vec<String> = r.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                tags.sort();
                let bytes = if r.bytes == 0 { "-".to_owned() } else { r.bytes.to_string() };
                let removed = when::format(r.remove_time);
                table.row(vec![
                    r.kind.clone(),
                    clean(&r.name),
                    when::format(r.create_time),
                    removed,
                    bytes,
                    tags.join(","),
                ]);
            }
            print!("{}", table.render("no resources of its own (a pooled tenant shares the pool's)"));
            Ok(())
        }
    }
}

async fn set_status(ops: &Ops, tenant_id: String, status: TenantStatus) -> Result<Tenant, CliError> {
    let request = ops.request(SetTenantStatusRequest { tenant_id, status: status as i32 });
    let answer = ops.registry()?.set_tenant_status(request).await.map_err(ops.error(Service::Registry))?;
    Ok(answer.into_inner().tenant.unwrap_or_default())
}

/// A tenant's workflows, newest first (at most `limit`).
async fn list_workflows(ops: &Ops, tenant: &str, limit: i32) -> Result<Vec<Workflow>, CliError> {
    let request = ops.request(ListWorkflowsRequest { tenant_id: tenant.to_owned(), limit });
    let answer = ops.onboarding()?.list_workflows(request).await.map_err(ops.error(Service::Onboarding))?;
    Ok(answer.into_inner().workflows)
}

/// A tenant's latest workflow, if it has any.
async fn latest_workflow(ops: &Ops, tenant: &str) -> Result<Option<Workflow>, CliError> {
    Ok(list_workflows(ops, tenant, 1).await?.into_iter().next())
}

async fn show_tenant(ops: &Ops, id: &str, out: Output) -> Result<(), CliError> {
    let t = get_tenant(ops, id).await?;
    let workflow = latest_workflow(ops, id).await?;
    let request = ops.request(ListTenantResourcesRequest { tenant_id: id.to_owned(), include_removed: false });
    let resources = match ops.onboarding()?.list_tenant_resources(request).await {
        Ok(r) => r.into_inner().resources,
        Err(s) if s.code() == Code::NotFound => Vec::new(),
        Err(s) => return Err(ops.error(Service::Onboarding)(s)),
    };
    let changes = audit_tail(ops, id, SHOWN_CHANGES).await?;
    if out.json() {
        print_json(&json!({
            "tenant": tenant_json(&t),
            "workflow": workflow.as_ref().map(workflow_json),
            "changes": changes.iter().map(tenantmesh_service::audit::to_json).collect::<Vec<_>>(),
            "resources": resources.iter().map(resource_json).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    let l = t.limits.unwrap_or_default();
    let p = t.placement.clone().unwrap_or_default();
    let mut pairs = vec![
        ("tenant", t.tenant_id.clone()),
        ("name", clean(&t.name)),
        ("tier", t.tier.clone()),
        ("model", model(t.isolation_model).to_owned()),
        ("status", tenant_status(t.status).to_owned()),
        ("created", when::format(t.create_time)),
        ("updated", format!("{} (version {})", when::format(t.update_time), t.version)),
        ("table", if p.table.is_empty() { "-".to_owned() } else { clean(&p.table) }),
        ("instance", if p.endpoint.is_empty() { "shared".to_owned() } else { clean(&p.endpoint) }),
        ("limits", tenantmesh_proto::names::limits(&l)),
    ];
    if let Some(idp) = &t.identity_provider {
        pairs
            .push(("identity provider", format!("{} (tenant claim {})", clean(&idp.issuer), clean(&idp.tenant_claim))));
    }
    if let Some(w) = &workflow {
        let mut line = format!("{} {}", w.workflow_id, workflow_status(w.status));
        if !w.error.is_empty() {
            line.push_str(&format!(": {}", clean(&w.error)));
        }
        pairs.push(("latest workflow", line));
    }
    print!("{}", fields(&pairs));
    if !changes.is_empty() {
        println!();
        print!("{}", audit_table(&changes).render(""));
    }
    if !resources.is_empty() {
        println!();
        let mut table = Table::new(&["RESOURCE", "NAME", "CREATED"]);
        for r in &resources {
            table.row(vec![r.kind.clone(), clean(&r.name), when::format(r.create_time)]);
        }
        print!("{}", table.render(""));
    }
    Ok(())
}

/// How many of a tenant's latest audit events `tenant show` shows.
const SHOWN_CHANGES: u32 = 5;

/// A tenant's last `n` audit events across the services' logs, oldest first.
async fn audit_tail(ops: &Ops, tenant: &str, n: u32) -> Result<Vec<AuditEvent>, CliError> {
    let mut events = Vec::new();
    for (service, mut client) in ops.audit_logs()? {
        let request =
            ops.request(ListAuditEventsRequest { tenant_id: tenant.to_owned(), last: n, ..Default::default() });
        events.extend(client.list_audit_events(request).await.map_err(ops.error(service))?.into_inner().events);
    }
    Ok(tenantmesh_service::audit::timeline(events, Some(n as usize)))
}

fn audit_table(events: &[AuditEvent]) -> Table {
    let mut table = Table::new(&["WHEN", "LOG", "#", "WHO", "ACTION", "OUTCOME", "CHANGE"]);
    for e in events {
        table.row(vec![
            when::format(e.time_us / 1_000_000),
            clean(&e.service),
            e.sequence.to_string(),
            clean(e.actor.as_ref().map(|a| a.subject.as_str()).unwrap_or_default()),
            clean(&e.action),
            tenantmesh_proto::names::outcome(e.outcome).to_owned(),
            clean(&tenantmesh_proto::names::audit_change(e)),
        ]);
    }
    table
}

async fn audit(command: AuditCommand, ops: &Ops) -> Result<(), CliError> {
    match command {
        AuditCommand::List { tenant, action, actor, hours, last, out } => {
            let from_us = hours.map_or(0, |h| (tenantmesh_service::clock::now_ms() - h * 3_600_000) * 1000);
            let mut events = Vec::new();
            for (service, mut client) in ops.audit_logs()? {
                let mut page_token = String::new();
                loop {
                    let request = ops.request(ListAuditEventsRequest {
                        tenant_id: tenant.clone(),
                        action: action.clone().unwrap_or_default(),
                        actor: actor.clone().unwrap_or_default(),
                        from_us,
                        to_us: 0,
                        page_size: 100,
                        page_token,
                        last: last.unwrap_or(0),
                    });
                    let page = client.list_audit_events(request).await.map_err(ops.error(service))?.into_inner();
                    events.extend(page.events);
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    page_token = page.next_page_token;
                }
            }
            // One timeline across the logs.
            let events = tenantmesh_service::audit::timeline(events, last.map(|n| n as usize));
            if out.json() {
                print_json(&Value::Array(events.iter().map(tenantmesh_service::audit::to_json).collect()));
            } else {
                print!("{}", audit_table(&events).render(&format!("no audit events for {tenant}")));
            }
            Ok(())
        }
        AuditCommand::Export { tenant, hours, file } => {
            let from_us = hours.map_or(0, |h| (tenantmesh_service::clock::now_ms() - h * 3_600_000) * 1000);
            let mut lines: Vec<(i64, Vec<u8>)> = Vec::new();
            for (service, mut client) in ops.audit_logs()? {
                let request = ops.request(ExportAuditEventsRequest { tenant_id: tenant.clone(), from_us, to_us: 0 });
                let mut chunks = client.export_audit_events(request).await.map_err(ops.error(service))?.into_inner();
                while let Some(chunk) = chunks.message().await.map_err(ops.error(service))? {
                    for line in chunk.jsonl.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                        let time = serde_json::from_slice::<Value>(line).ok().and_then(|v| v["time_us"].as_i64());
                        lines.push((time.unwrap_or_default(), line.to_vec()));
                    }
                }
            }
            // One timeline across the logs.
            lines.sort_by_key(|(time, _)| *time);
            let mut out: Box<dyn std::io::Write> = match &file {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path).map_err(|e| CliError(format!("{}: {e}", path.display())))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let written = lines.iter().try_for_each(|(_, line)| {
                out.write_all(line)?;
                out.write_all(b"\n")
            });
            written.and_then(|()| out.flush()).map_err(|e| CliError(format!("writing the export: {e}")))?;
            if let Some(path) = &file {
                eprintln!("{} audit events of {tenant} written to {}", lines.len(), path.display());
            }
            Ok(())
        }
        AuditCommand::Verify { tenant, out } => {
            let mut chains = Vec::new();
            for (service, mut client) in ops.audit_logs()? {
                let request = ops.request(VerifyAuditChainRequest { tenant_id: tenant.clone() });
                let v = client.verify_audit_chain(request).await.map_err(ops.error(service))?.into_inner();
                chains.push((service, v));
            }
            let broken: Vec<String> = chains
                .iter()
                .filter(|(_, v)| !v.intact)
                .map(|(s, v)| {
                    format!(
                        "{} log broken at event {}: {} ({} events before it hold)",
                        s.log(),
                        v.first_broken,
                        v.reason,
                        v.events
                    )
                })
                .collect();
            if out.json() {
                let logs: Vec<Value> = chains
                    .iter()
                    .map(|(s, v)| {
                        json!({"log": s.log(), "intact": v.intact, "events": v.events, "first_broken": v.first_broken, "reason": v.reason})
                    })
                    .collect();
                print_json(&json!({"tenant_id": tenant, "intact": broken.is_empty(), "logs": logs}));
            } else if broken.is_empty() {
                let events: u64 = chains.iter().map(|(_, v)| v.events).sum();
                println!("{tenant}: the audit chain holds ({events} events in {} logs)", chains.len());
            }
            if broken.is_empty() { Ok(()) } else { Err(CliError(format!("{tenant}: {}", broken.join("; ")))) }
        }
    }
}

/// A line per tenant as the registry reports it changed, until Ctrl-C.
async fn watch_tenants(ops: &Ops, out: Output) -> Result<(), CliError> {
    let mut client = ops.registry()?;
    let mut stream = client
        .watch_tenants(ops.request(WatchTenantsRequest {}))
        .await
        .map_err(ops.error(Service::Registry))?
        .into_inner();
    loop {
        let message = tokio::select! {
            m = stream.message() => m.map_err(ops.error(Service::Registry))?,
            () = tenantmesh_service::runtime::shutdown_signal() => return Ok(()),
        };
        let Some(changed) = message else {
            return Err(CliError("the registry ended the watch: run the command again".into()));
        };
        let tenants = if changed.reset {
            list_tenants(ops).await?
        } else {
            let mut tenants = Vec::new();
            for id in &changed.tenant_ids {
                tenants.push(get_tenant(ops, id).await?);
            }
            tenants
        };
        for t in &tenants {
            if out.json() {
                println!("{}", tenant_json(t));
            } else {
                let mut table = Table::new(&TENANT_COLUMNS);
                table.row(tenant_row(t));
                // The row alone, aligned as well as a single row can be.
                print!("{}", table.render("").lines().nth(1).map(|l| format!("{l}\n")).unwrap_or_default());
            }
        }
        let _ = std::io::stdout().flush();
    }
}

async fn user(command: UserCommand, ops: &Ops, env: &Env) -> Result<(), CliError> {
    let tenant_of = |t: Option<String>| t.unwrap_or_else(|| ops.session.tenant_id.clone());
    match command {
        UserCommand::List { tenant, out } => {
            let tenant_id = tenant_of(tenant);
            let mut client = ops.auth()?;
            let mut users = Vec::new();
            let mut page_token = String::new();
            loop {
                let request = ListUsersRequest { tenant_id: tenant_id.clone(), page_size: 1000, page_token };
                let page = client.list_users(ops.request(request)).await.map_err(ops.error(Service::Auth))?;
                let page = page.into_inner();
                users.extend(page.users);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if out.json() {
                print_json(&Value::Array(users.iter().map(user_json).collect()));
                return Ok(());
            }
            let mut table = Table::new(&["EMAIL", "ROLES", "STATUS", "CREATED"]);
            for u in &users {
                let roles: Vec<&str> = u.roles.iter().map(|r| role(*r)).collect();
                let status = if u.disabled { "disabled" } else { "active" };
                table.row(vec![clean(&u.email), roles.join(","), status.to_owned(), when::format(u.create_time)]);
            }
            print!("{}", table.render(&format!("no users in {tenant_id}")));
            Ok(())
        }
        UserCommand::Create { email, tenant, role: r, secret, out } => {
            let password = read_password(&secret, env, &format!("Password for {email}"))?;
            let roles = vec![if r == "admin" { Role::TenantAdmin } else { Role::TenantUser } as i32];
            let request = CreateUserRequest {
                tenant_id: tenant_of(tenant),
                email,
                password,
                roles,
                password_hash: String::new(),
            };
            let answer = ops.auth()?.create_user(ops.request(request)).await.map_err(ops.error(Service::Auth))?;
            let u = answer.into_inner().user.unwrap_or_default();
            if out.json() {
                print_json(&user_json(&u));
            } else {
                println!("created {} in {} ({r})", clean(&u.email), u.tenant_id);
            }
            Ok(())
        }
        UserCommand::Disable { email, tenant, out } => {
            let request = DisableUserRequest { tenant_id: tenant_of(tenant), email };
            let answer = ops.auth()?.disable_user(ops.request(request)).await.map_err(ops.error(Service::Auth))?;
            let u = answer.into_inner().user.unwrap_or_default();
            if out.json() {
                print_json(&user_json(&u));
            } else {
                println!("disabled {} in {}: they can neither sign in nor refresh", clean(&u.email), u.tenant_id);
            }
            Ok(())
        }
        UserCommand::Delete { email, tenant, yes } => {
            let tenant_id = tenant_of(tenant);
            confirm(&format!("delete {email} from {tenant_id}"), yes)?;
            let request = DeleteUserRequest { tenant_id: tenant_id.clone(), email: email.clone() };
            ops.auth()?.delete_user(ops.request(request)).await.map_err(ops.error(Service::Auth))?;
            println!("deleted {} from {tenant_id}", clean(&email));
            Ok(())
        }
    }
}

/// A workflow by id, or (an id without `/`) the tenant's latest.
async fn find_workflow(ops: &Ops, id: &str) -> Result<Workflow, CliError> {
    if !id.contains('/') {
        return latest_workflow(ops, id).await?.ok_or_else(|| CliError(format!("not found: {id} has no workflow")));
    }
    let request = ops.request(GetWorkflowRequest { workflow_id: id.to_owned() });
    let answer = ops.onboarding()?.get_workflow(request).await.map_err(ops.error(Service::Onboarding))?;
    answer.into_inner().workflow.ok_or_else(|| CliError(format!("the onboarding service sent no workflow for {id}")))
}

async fn workflow(command: WorkflowCommand, ops: &Ops) -> Result<(), CliError> {
    match command {
        WorkflowCommand::List { tenant, limit, out } => {
            let workflows = list_workflows(ops, &tenant, limit).await?;
            if out.json() {
                print_json(&Value::Array(workflows.iter().map(workflow_json).collect()));
                return Ok(());
            }
            let mut table = Table::new(&["WORKFLOW", "KIND", "STATUS", "STARTED", "UPDATED", "ERROR"]);
            for w in &workflows {
                table.row(vec![
                    w.workflow_id.clone(),
                    w.kind.clone(),
                    workflow_status(w.status).to_owned(),
                    when::format(w.create_time),
                    when::format(w.update_time),
                    clean(&w.error),
                ]);
            }
            print!("{}", table.render(&format!("no workflows for {tenant}")));
            Ok(())
        }
        WorkflowCommand::Show { workflow, out } => {
            let w = find_workflow(ops, &workflow).await?;
            if out.json() {
                print_json(&workflow_json(&w));
            } else {
                print!("{}", workflow_text(&w));
            }
            Ok(())
        }
        WorkflowCommand::Watch { workflow, out } => {
            let id = find_workflow(ops, &workflow).await?.workflow_id;
            progress::watch(ops, &id, progress::mode(out.json())).await.map(|_| ())
        }
        WorkflowCommand::Retry { workflow, wait, out } => {
            let request = ops.request(RetryOnboardingRequest { workflow_id: workflow.clone() });
            ops.onboarding()?.retry_onboarding(request).await.map_err(ops.error(Service::Onboarding))?;
            follow(ops, &workflow, wait, out).await
        }
    }
}

async fn usage(args: UsageArgs, ops: &Ops) -> Result<(), CliError> {
    let to = tenantmesh_service::clock::now_secs() + 60;
    let from = to - args.hours * 3600;
    let window = match args.window.as_str() {
        "minute" => Window::Minute,
        "day" => Window::Day,
        _ => Window::Hour,
    };
    let mut client = ops.metering()?;
    let meters: Vec<String> = match &args.meter {
        Some(m) => vec![m.clone()],
        None => tenantmesh_metering::schema::CALL_METERS.iter().map(|m| (*m).to_owned()).collect(),
    };
    let mut all = Vec::new();
    for meter in &meters {
        let request = GetUsageRequest {
            tenant_id: args.tenant.clone(),
            meter: meter.clone(),
            from,
            to,
            window: if args.meter.is_some() { window } else { Window::Day } as i32,
            group_by: if args.meter.is_some() { args.by.clone() } else { Vec::new() },
        };
        let rows = client.get_usage(ops.request(request)).await.map_err(ops.error(Service::Data))?;
        all.push((meter.clone(), rows.into_inner().rows));
    }
    if args.meter.is_none() {
        let totals: Vec<(String, i64)> =
            all.iter().map(|(m, rows)| (m.clone(), rows.iter().map(|r| r.value).sum())).collect();
        // The time per request, from the latency meter's buckets.
        let request = latency::usage_request(&args.tenant, from, to);
        let rows = client.get_usage(ops.request(request)).await.map_err(ops.error(Service::Data))?.into_inner().rows;
        let buckets = latency::of_rows(&rows);
        let (p50, p99) = (latency::quantile(&buckets, 0.5), latency::quantile(&buckets, 0.99));
        if args.out.json() {
            let map: serde_json::Map<String, Value> = totals.iter().map(|(m, v)| (m.clone(), json!(v))).collect();
            let doc =
                json!({ "tenant_id": args.tenant, "from": from, "to": to, "totals": map, "p50": p50, "p99": p99 });
            print_json(&doc);
        } else {
            println!("{}'s usage from {} to {}", args.tenant, when::format(from), when::format(to));
            let mut table = Table::new(&["METER", "TOTAL"]);
            totals.iter().for_each(|(m, v)| table.row(vec![m.clone(), v.to_string()]));
            print!("{}", table.render(""));
            println!("time per request: p50 {p50}, p99 {p99}");
        }
        return Ok(());
    }
    let (meter, rows) = all.remove(0);
    if args.out.json() {
        let rows: Vec<Value> = rows
            .iter()
            .map(|r| json!({ "window_start": r.window_start, "window_end": r.window_end, "value": r.value, "dimensions": r.dimensions }))
            .collect();
        print_json(&json!({ "tenant_id": args.tenant, "meter": meter, "from": from, "to": to, "rows": rows }));
        return Ok(());
    }
    let mut table = Table::new(&["WINDOW", "VALUE", "DIMENSIONS"]);
    for r in &rows {
        let mut dims: Vec<String> = r.dimensions.iter().map(|(k, v)| format!("{k}={}", clean(v))).collect();
        dims.sort();
        table.row(vec![when::format(r.window_start), r.value.to_string(), dims.join(",")]);
    }
    println!("{} of {} from {} to {}", meter, args.tenant, when::format(from), when::format(to));
    print!("{}", table.render("no usage in this period"));
    Ok(())
}

async fn cost(command: CostCommand, ops: &Ops) -> Result<(), CliError> {
    let now = tenantmesh_service::clock::now_secs();
    match command {
        CostCommand::List { hours, out } => {
            let from = now - hours * 3600;
            let request = ops.request(ListTenantCostsRequest { from, to: now });
            let answer = ops.metering()?.list_tenant_costs(request).await.map_err(ops.error(Service::Data))?;
            let costs = answer.into_inner().tenants;
            if out.json() {
                print_json(&Value::Array(costs.iter().map(cost_json).collect()));
            } else {
                print!("{}", crate::report::render(&costs, from, now));
            }
            Ok(())
        }
        CostCommand::Show { tenant, hours, out } => {
            let from = now - hours * 3600;
            let request = ops.request(GetTenantCostRequest { tenant_id: tenant.clone(), from, to: now });
            let answer = ops.metering()?.get_tenant_cost(request).await.map_err(ops.error(Service::Data))?;
            let c = answer.into_inner().cost.unwrap_or_default();
            if out.json() {
                print_json(&cost_json(&c));
                return Ok(());
            }
            println!(
                "{tenant} ({} tier, {}) from {} to {}, in {}",
                c.tier,
                c.isolation,
                when::format(from),
                when::format(now),
                if c.currency.is_empty() { "-" } else { &c.currency }
            );
            let mut table = Table::new(&["ITEM", "QUANTITY", "UNIT PRICE", "COST"]);
            for l in &c.lines {
                table.row(vec![
                    l.item.clone(),
                    format!("{}", l.quantity),
                    format!("{:.9}", l.unit_price),
                    format!("{:.6}", l.cost),
                ]);
            }
            print!("{}", table.render("no cost in this period"));
            print!(
                "{}",
                fields(&[
                    ("cost", format!("{:.6}", c.cost)),
                    ("revenue", format!("{:.6}", c.revenue)),
                    (
                        "margin",
                        format!("{:.6}{}", c.margin, if c.margin < 0.0 { "  costs more than it pays" } else { "" })
                    ),
                ])
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser, Debug)]
    #[command(name = "tenantmesh")]
    struct Cli {
        #[command(subcommand)]
        command: OpsCommand,
    }

    /// Every command a person runs (not the groups) has `--help` with an
    /// example of it, and the flags hang together.
    #[test]
    fn every_command_has_an_example() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", c.get_name());
            if c.has_subcommands() {
                c.get_subcommands().for_each(|s| walk(s, &path, missing));
                return;
            }
            let after = c.get_after_help().map(ToString::to_string).unwrap_or_default();
            let name = path.trim_start_matches(" tenantmesh ");
            if !after.contains("Example") || !after.contains(&format!("tenantmesh {name}")) {
                missing.push(name.to_owned());
            }
        }
        let mut missing = Vec::new();
        cli.get_subcommands().for_each(|s| walk(s, " tenantmesh", &mut missing));
        assert!(missing.is_empty(), "commands without an example of themselves: {missing:?}");
    }

    #[test]
    fn kubectl_and_gh_habits_parse() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["tenantmesh"], args].concat());
        let Ok(Cli { command: OpsCommand::Tenant(TenantCommand::List { out, watch }) }) =
            parse(&["tenant", "list", "-o", "json", "--watch"])
        else {
            panic!("tenant list -o json --watch")
        };
        assert!(out.json() && watch);
        assert!(parse(&["tenant", "list", "-o", "yaml"]).is_err());
        assert!(parse(&["tenant", "set-limits", "acme", "--burst", "0"]).is_err(), "limits are above 0");
        assert!(parse(&["user", "create", "b@x.example", "--role", "owner"]).is_err());
        assert!(parse(&["tenant", "register", "acme", "--tier", "basic"]).is_err(), "name and admin are required");
    }
}
