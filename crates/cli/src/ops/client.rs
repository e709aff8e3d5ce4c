//! Calls from the operator commands to the mesh, with the session's
//! token, and errors that say what to do instead of a gRPC dump.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use tenantmesh_proto::audit::v1::audit_client::AuditClient;

use tenantmesh_proto::auth::v1::RefreshRequest;
use tenantmesh_proto::auth::v1::auth_client::AuthClient;
use tenantmesh_proto::metering::v1::metering_client::MeteringClient;
use tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::session::{self, Endpoints, Session};

/// An error for the operator: one or two sentences, printed after
/// `tenantmesh <command>: ` and exit status 1.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for CliError {
    fn from(s: String) -> Self {
        CliError(s)
    }
}

/// Which of the mesh's services a call went to.
#[derive(Clone, Copy, Debug)]
pub enum Service {
    Registry,
    Auth,
    Onboarding,
    Data,
}

impl Service {
    /// The name of its audit log (as the events say).
    pub fn log(self) -> &'static str {
        match self {
            Service::Registry => "registry",
            Service::Auth => "auth",
            Service::Onboarding => "onboarding",
            Service::Data => "data",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Service::Registry => "tenant registry",
            Service::Auth => "auth service",
            Service::Onboarding => "onboarding service",
            Service::Data => "data service",
        }
    }

    fn addr(self, e: &Endpoints) -> &str {
        match self {
            Service::Registry => &e.registry,
            Service::Auth => &e.auth,
            Service::Onboarding => &e.onboarding,
            Service::Data => &e.data,
        }
    }
}

/// `status` from `service` at `addr`, as the operator should read it.
pub fn explain(status: &Status, service: Service, addr: &str, who: Option<&Session>) -> CliError {
    let message = super::output::clean(status.message());
    let text = match status.code() {
        Code::Unavailable if message.contains("connect") || message.contains("transport") => format!(
            "cannot reach the {} at {addr} ({message}); is the mesh running (`tenantmesh up`), and is that its address (`tenantmesh login --help`)?",
            service.name()
        ),
        Code::Unauthenticated => {
            format!("not signed in, or the session ended ({message}): run `tenantmesh login` again")
        }
        Code::PermissionDenied => match who {
            Some(s) => format!("not allowed: {message} (you are {} of tenant {})", s.email, s.tenant_id),
            None => format!("not allowed: {message}"),
        },
        Code::InvalidArgument => {
            let fields: Vec<String> = status
                .get_error_details()
                .bad_request()
                .map(|b| {
                    b.field_violations
                        .iter()
                        .map(|v| format!("{}: {}", v.field, super::output::clean(&v.description)))
                        .collect()
                })
                .unwrap_or_default();
            if fields.is_empty() { format!("invalid: {message}") } else { format!("invalid {}", fields.join("; ")) }
        }
        Code::NotFound => format!("not found: {message}"),
        Code::AlreadyExists => format!("already exists: {message}"),
        Code::FailedPrecondition => format!("not now: {message}"),
        Code::ResourceExhausted => format!("refused for now, try again shortly: {message}"),
        Code::DeadlineExceeded => format!("the {} at {addr} did not answer in time: {message}", service.name()),
        code => format!("the {} at {addr} failed ({}): {message}", service.name(), code.description()),
    };
    CliError(text)
}

/// `addr` as a URL: `host:port` gets `http://`.
pub fn url(addr: &str) -> String {
    if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") }
}

/// A channel to `addr` that connects on first use.
pub fn channel(addr: &str) -> Result<Channel, CliError> {
    let endpoint = tonic::transport::Endpoint::from_shared(url(addr))
        .map_err(|e| CliError(format!("{addr} is not an address ({e}): give HOST:PORT or http://HOST:PORT")))?;
    Ok(endpoint.connect_timeout(Duration::from_secs(5)).timeout(CALL_TIMEOUT).connect_lazy())
}

/// Each unary call's deadline.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The signed-in operator's connection to the mesh.
pub struct Ops {
    pub session: Session,
    path: PathBuf,
}

impl Ops {
    /// The session from the environment's config dir, refreshed first when
    /// its access token is about to expire.
    pub async fn load(env: &HashMap<String, String>) -> Result<Ops, CliError> {
        let path = session::path(env)?;
        let Some(session) = Session::load(&path)? else {
            return Err(CliError(
                "not signed in: run `tenantmesh login --tenant platform --email EMAIL --password-stdin` first".into(),
            ));
        };
        let mut ops = Ops { session, path };
        if ops.session.needs_refresh(tenantmesh_service::clock::now_secs()) {
            // One process at a time (a refresh token is good for one use:
            // two commands refreshing with it would end the session); the
            // one that waited finds the session refreshed.
            let _lock = session::lock(&ops.path)?;
            if let Some(now) = Session::load(&ops.path)? {
                ops.session = now;
            }
            if ops.session.needs_refresh(tenantmesh_service::clock::now_secs()) {
                ops.refresh().await?;
            }
        }
        Ok(ops)
    }

    /// Trades the refresh token for new tokens and saves them.
    pub async fn refresh(&mut self) -> Result<(), CliError> {
        let addr = self.session.endpoints.auth.clone();
        let request = RefreshRequest { refresh_token: self.session.refresh_token.clone() };
        let answer = AuthClient::new(channel(&addr)?).refresh(request).await.map_err(|s| {
            if s.code() == Code::Unauthenticated {
                CliError(format!("the session has ended ({}): run `tenantmesh login` again", s.message()))
            } else {
                explain(&s, Service::Auth, &addr, None)
            }
        })?;
        let answer = answer.into_inner();
        self.session.access_token = answer.access_token;
        if !answer.refresh_token.is_empty() {
            self.session.refresh_token = answer.refresh_token;
        }
        self.session.expires_at = tenantmesh_service::clock::now_secs() + answer.expires_in;
        self.session.save(&self.path)?;
        Ok(())
    }

    /// `message` with the session's token.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(bearer) = format!("Bearer {}", self.session.access_token).parse() {
            request.metadata_mut().insert("authorization", bearer);
        }
        request
    }

    /// The error of a call to `service`.
    pub fn error(&self, service: Service) -> impl Fn(Status) -> CliError + '_ {
        move |s| explain(&s, service, service.addr(&self.session.endpoints), Some(&self.session))
    }

    pub fn registry(&self) -> Result<TenantRegistryClient<Channel>, CliError> {
        Ok(TenantRegistryClient::new(channel(&self.session.endpoints.registry)?))
    }

    /// The services that keep an audit log (the registry, auth and
    /// onboarding: each its own changes), with a client of each.
    pub fn audit_logs(&self) -> Result<Vec<(Service, AuditClient<Channel>)>, CliError> {
        [Service::Registry, Service::Auth, Service::Onboarding]
            .into_iter()
            .map(|s| Ok((s, AuditClient::new(channel(s.addr(&self.session.endpoints))?))))
            .collect()
    }

    pub fn auth(&self) -> Result<AuthClient<Channel>, CliError> {
        Ok(AuthClient::new(channel(&self.session.endpoints.auth)?))
    }

    pub fn onboarding(&self) -> Result<OnboardingClient<Channel>, CliError> {
        Ok(OnboardingClient::new(channel(&self.session.endpoints.onboarding)?))
    }

    pub fn metering(&self) -> Result<MeteringClient<Channel>, CliError> {
        Ok(MeteringClient::new(channel(&self.session.endpoints.data)?))
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::{ErrorDetails, FieldViolation};

    use super::*;

    #[test]
    fn errors_say_what_to_do() {
        let e = |s: Status| explain(&s, Service::Onboarding, "localhost:50053", None).0;
        let down = e(Status::unavailable("tcp connect error: Connection refused"));
        assert!(
            down.contains("cannot reach the onboarding service at localhost:50053") && down.contains("tenantmesh up")
        );
        assert!(e(Status::unauthenticated("token expired")).contains("tenantmesh login"));
        let bad = Status::with_error_details(
            Code::InvalidArgument,
            "bad request",
            ErrorDetails::with_bad_request(vec![FieldViolation::new("tier", "unknown tier \"gold\"")]),
        );
        assert_eq!(e(bad), "invalid tier: unknown tier \"gold\"");
        assert_eq!(e(Status::not_found("tenant acme")), "not found: tenant acme");
        assert_eq!(url("localhost:50054"), "http://localhost:50054");
        assert_eq!(url("https://mesh.example"), "https://mesh.example");
        assert!(
            e(Status::internal("boom")).contains("failed (Internal error): boom"),
            "{}",
            e(Status::internal("boom"))
        );
    }
}
