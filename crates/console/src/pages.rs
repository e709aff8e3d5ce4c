//! The console's routes: pages, their JSON twins, server-sent events and
//! the forms' POSTs.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tenantmesh_proto::audit::v1::ListAuditEventsRequest;
use tenantmesh_proto::audit::v1::audit_client::AuditClient;

use askama::Template;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tenantmesh_proto::auth::v1::auth_client::AuthClient;
use tenantmesh_proto::auth::v1::{ListUsersRequest, LoginRequest, RefreshRequest, RevokeRequest};
use tenantmesh_proto::metering::v1::metering_client::MeteringClient;
use tenantmesh_proto::metering::v1::{GetTenantCostRequest, GetUsageRequest, ListTenantCostsRequest, Window};
use tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient;
use tenantmesh_proto::onboarding::v1::{
    ChangeTierRequest, GetWorkflowRequest, ListTenantResourcesRequest, ListWorkflowsRequest, OffboardTenantRequest,
    RegisterTenantRequest, RestoreTarget, RestoreTenantRequest, RetryOnboardingRequest,
};
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{
    GetTenantRequest, ListTenantsRequest, SetTenantLimitsRequest, SetTenantStatusRequest, Tenant, TenantLimits,
    TenantStatus, WatchTenantsRequest,
};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::Console;
use crate::plot;
use crate::sessions::{WebSession, cookie_of, same_secret, set_cookie};
use crate::views::*;
use tenantmesh_metering::schema::{CALL_METERS, REFUSAL_DIMENSION, REFUSED};

type Shared = Arc<Console>;
type Params = Query<HashMap<String, String>>;

/// The Content-Security-Policy of every response: nothing inline, nothing
/// from elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes.
pub fn router(console: Shared) -> Router {
    Router::new()
        .route("/", get(fleet_page))
        .route("/api/fleet", get(fleet_json))
        .route("/events/fleet", get(fleet_events))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/tenants", post(register))
        .route("/tenants/new", get(new_tenant_page))
        .route("/tenants/{id}", get(tenant_page))
        .route("/api/tenants/{id}", get(tenant_json))
        .route("/tenants/{id}/tier", post(change_tier))
        .route("/tenants/{id}/limits", post(set_limits))
        .route("/tenants/{id}/suspend", post(suspend))
        .route("/tenants/{id}/resume", post(resume))
        .route("/tenants/{id}/offboard", post(offboard))
        .route("/tenants/{id}/restore", post(restore))
        .route("/workflows/{*id}", get(workflow_page))
        .route("/api/workflows/{*id}", get(workflow_json))
        .route("/events/workflows/{*id}", get(workflow_events))
        .route("/retry/{*id}", post(retry))
        .route("/static/console.js", get(|| async { asset("text/javascript", include_str!("../static/console.js")) }))
        .route("/static/console.css", get(|| async { asset("text/css", include_str!("../static/console.css")) }))
        // For the container's healthcheck and Kubernetes' probes.
        .route("/healthz", get(|| async { "ok" }))
        // Browsers ask for it on every site: an empty answer, not a 404 in their console.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .fallback(|| async { Fail::NotFound("no such page".into()).page(None) })
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(console)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn secure_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Not no-referrer: under it browsers send `Origin: null` with a form's POST.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Who is signed in, as the layout shows them.
pub struct Who {
    pub tenant_id: String,
    pub email: String,
    pub platform: bool,
    pub csrf: String,
}

impl From<&WebSession> for Who {
    fn from(s: &WebSession) -> Self {
        Who { tenant_id: s.tenant_id.clone(), email: s.email.clone(), platform: s.is_platform(), csrf: s.csrf.clone() }
    }
}

/// Why a request could not be served.
#[derive(Debug)]
pub enum Fail {
    /// Not signed in (or the session ended): to the sign-in page.
    SignIn,
    NotFound(String),
    Forbidden(String),
    Bad(String),
    Conflict(String),
    Unavailable(String),
}

impl Fail {
    fn status(&self) -> StatusCode {
        match self {
            Fail::SignIn => StatusCode::UNAUTHORIZED,
            Fail::NotFound(_) => StatusCode::NOT_FOUND,
            Fail::Forbidden(_) => StatusCode::FORBIDDEN,
            Fail::Bad(_) => StatusCode::BAD_REQUEST,
            Fail::Conflict(_) => StatusCode::CONFLICT,
            Fail::Unavailable(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn message(&self) -> &str {
        match self {
            Fail::SignIn => "sign in first",
            Fail::NotFound(m) | Fail::Forbidden(m) | Fail::Bad(m) | Fail::Conflict(m) | Fail::Unavailable(m) => m,
        }
    }

    /// As a page (sign-in: a redirect to it).
    fn page(self, who: Option<&WebSession>) -> Response {
        if matches!(self, Fail::SignIn) {
            return Redirect::to("/login").into_response();
        }
        let heading = match self.status() {
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::BAD_REQUEST => "Invalid",
            StatusCode::CONFLICT => "Not now",
            _ => "The mesh did not answer",
        };
        let page = ErrorPage { who: who.map(Who::from), heading, message: self.message().to_owned(), back: "/".into() };
        (self.status(), html(page.render())).into_response()
    }

    fn json(self) -> Response {
        (self.status(), Json(json!({ "error": self.message() }))).into_response()
    }
}

/// A gRPC error as the console shows it.
fn fail(s: Status) -> Fail {
    let message = s.message().to_owned();
    match s.code() {
        Code::NotFound => Fail::NotFound(message),
        Code::PermissionDenied => Fail::Forbidden(message),
        Code::Unauthenticated => Fail::SignIn,
        Code::InvalidArgument => {
            let fields: Vec<String> = s
                .get_error_details()
                .bad_request()
                .map(|b| b.field_violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect())
                .unwrap_or_default();
            Fail::Bad(if fields.is_empty() { message } else { fields.join("; ") })
        }
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => Fail::Conflict(message),
        _ => Fail::Unavailable(format!("{}: {message}", s.code().description())),
    }
}

fn html(rendered: Result<String, askama::Error>) -> Response {
    match rendered {
        Ok(body) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "console: a template failed to render");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered").into_response()
        }
    }
}

fn authed<T>(s: &WebSession, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(v) = format!("Bearer {}", s.access_token).parse() {
        request.metadata_mut().insert("authorization", v);
    }
    request
}

impl Console {
    fn registry(&self) -> TenantRegistryClient<tonic::transport::Channel> {
        TenantRegistryClient::new(self.channels.registry.clone())
    }
    fn auth(&self) -> AuthClient<tonic::transport::Channel> {
        AuthClient::new(self.channels.auth.clone())
    }
    /// The services that keep an audit log: the registry, auth, onboarding.
    fn audit_logs(&self) -> [AuditClient<tonic::transport::Channel>; 3] {
        [&self.channels.registry, &self.channels.auth, &self.channels.onboarding].map(|c| AuditClient::new(c.clone()))
    }
    fn onboarding(&self) -> OnboardingClient<tonic::transport::Channel> {
        OnboardingClient::new(self.channels.onboarding.clone())
    }
    fn metering(&self) -> MeteringClient<tonic::transport::Channel> {
        MeteringClient::new(self.channels.data.clone())
    }

    /// The signed-in session of the request, its access token refreshed
    /// when it is about to expire.
    async fn session(&self, headers: &HeaderMap) -> Result<(String, WebSession), Fail> {
        let id = cookie_of(headers).ok_or(Fail::SignIn)?;
        let s = self.session_by_id(&id).await?;
        Ok((id, s))
    }

    /// The session `id`, its access token refreshed when it is about to
    /// expire. Refreshes are one at a time: a refresh token is good for
    /// one use (a second use would end the session), and two requests of
    /// one browser may both find the token about to expire.
    async fn session_by_id(&self, id: &str) -> Result<WebSession, Fail> {
        let s = self.sessions.get(id).ok_or(Fail::SignIn)?;
        if s.expires_at - tenantmesh_service::clock::now_secs() >= 60 {
            return Ok(s);
        }
        let _one_at_a_time = self.refreshing.lock().await;
        // Another request may have refreshed it meanwhile.
        let s = self.sessions.get(id).ok_or(Fail::SignIn)?;
        let now = tenantmesh_service::clock::now_secs();
        if s.expires_at - now >= 60 {
            return Ok(s);
        }
        match self.auth().refresh(RefreshRequest { refresh_token: s.refresh_token.clone() }).await {
            Ok(a) => {
                let a = a.into_inner();
                self.sessions.update(id, a.access_token, a.refresh_token, now + a.expires_in);
                self.sessions.get(id).ok_or(Fail::SignIn)
            }
            Err(e) => {
                tracing::info!(tenant.id = %s.tenant_id, error = %e.message(), "console: session ended (refresh refused)");
                self.sessions.remove(id);
                Err(Fail::SignIn)
            }
        }
    }

    /// The origin browsers reach the console at, for a request's headers.
    fn origin_of(&self, headers: &HeaderMap) -> Option<String> {
        if let Some(o) = &self.config.origin {
            return Some(o.clone());
        }
        headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(|h| format!("http://{h}"))
    }

    /// A state-changing request must come from the console's own pages:
    /// the same Origin, and the session's CSRF token.
    fn check_post(
        &self,
        headers: &HeaderMap,
        s: Option<&WebSession>,
        form: &HashMap<String, String>,
    ) -> Result<(), Fail> {
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        let expected = self.origin_of(headers);
        if origin.is_none() || origin.map(str::to_owned) != expected {
            tracing::warn!(security_event = "console_cross_origin", origin = ?origin, "console: a POST from another origin refused");
            return Err(Fail::Forbidden("this form must be sent from the console's own pages (Origin)".into()));
        }
        if let Some(s) = s {
            let token = form.get("csrf").map(String::as_str).unwrap_or_default();
            if !same_secret(token, &s.csrf) {
                tracing::warn!(security_event = "console_csrf", tenant.id = %s.tenant_id, "console: a POST without the session's CSRF token refused");
                return Err(Fail::Forbidden("the form is stale or forged (CSRF token): reload the page".into()));
            }
        }
        Ok(())
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    who: Option<Who>,
    heading: &'static str,
    message: String,
    back: String,
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    who: Option<Who>,
    error: String,
    tenant: String,
    email: String,
}

#[derive(Template)]
#[template(path = "fleet.html")]
pub struct FleetPage {
    pub who: Option<Who>,
    pub fleet: Fleet,
    pub sorts: [&'static str; 8],
}

#[derive(Template)]
#[template(path = "tenant.html")]
pub struct TenantPageView {
    pub who: Option<Who>,
    pub p: TenantPage,
    pub plots: Vec<String>,
    pub platform: bool,
    pub csrf: String,
    pub tiers: Vec<String>,
}

#[derive(Template)]
#[template(path = "workflow.html")]
pub struct WorkflowPage {
    pub who: Option<Who>,
    pub w: WorkflowView,
    pub platform: bool,
    pub csrf: String,
}

#[derive(Default)]
pub struct RegisterForm {
    pub tenant_id: String,
    pub name: String,
    pub tier: String,
    pub admin_email: String,
}

#[derive(Template)]
#[template(path = "new_tenant.html")]
pub struct NewTenantPage {
    pub who: Option<Who>,
    pub error: String,
    pub form: RegisterForm,
    pub tiers: Vec<String>,
    pub csrf: String,
}

async fn login_page() -> Response {
    html(LoginPage { who: None, error: String::new(), tenant: "platform".into(), email: String::new() }.render())
}

async fn login(State(c): State<Shared>, headers: HeaderMap, Form(form): Form<HashMap<String, String>>) -> Response {
    if let Err(f) = c.check_post(&headers, None, &form) {
        return f.page(None);
    }
    let field = |k: &str| form.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
    let (tenant, email) = (field("tenant"), field("email"));
    let password = form.get("password").cloned().unwrap_or_default();
    let again = |status: StatusCode, error: String| {
        (status, html(LoginPage { who: None, error, tenant: tenant.clone(), email: email.clone() }.render()))
            .into_response()
    };
    let request = LoginRequest { tenant_id: tenant.clone(), email: email.clone(), password };
    match c.auth().login(request).await {
        Ok(answer) => {
            let a = answer.into_inner();
            let expires_at = tenantmesh_service::clock::now_secs() + a.expires_in;
            let session = WebSession::new(tenant.clone(), email.clone(), a.access_token, a.refresh_token, expires_at);
            // A new id for every sign-in; the browser's previous session ends.
            if let Some(previous) = cookie_of(&headers) {
                c.sessions.remove(&previous);
            }
            let id = c.sessions.create(session);
            tracing::info!(tenant.id = %tenant, "console: signed in");
            let mut response = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&set_cookie(Some(&id), c.config.secure())) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        Err(s) if matches!(s.code(), Code::Unauthenticated | Code::InvalidArgument | Code::PermissionDenied) => {
            again(StatusCode::UNAUTHORIZED, format!("Sign-in refused: {}", s.message()))
        }
        Err(s) => again(StatusCode::BAD_GATEWAY, format!("The auth service did not answer: {}", s.message())),
    }
}

async fn logout(State(c): State<Shared>, headers: HeaderMap, Form(form): Form<HashMap<String, String>>) -> Response {
    let Ok((id, s)) = c.session(&headers).await else { return Redirect::to("/login").into_response() };
    if let Err(f) = c.check_post(&headers, Some(&s), &form) {
        return f.page(Some(&s));
    }
    c.sessions.remove(&id);
    if let Err(e) = c.auth().revoke(RevokeRequest { refresh_token: s.refresh_token.clone() }).await {
        tracing::warn!(tenant.id = %s.tenant_id, error = %e.message(), "console: the refresh token could not be revoked at sign-out");
    }
    let mut response = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&set_cookie(None, c.config.secure())) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// `hours` of the query: 1..=8760, default 24.
fn hours(q: &HashMap<String, String>) -> i64 {
    q.get("hours").and_then(|h| h.parse().ok()).filter(|h| (1..=8760).contains(h)).unwrap_or(24)
}

async fn list_tenants(c: &Console, s: &WebSession) -> Result<Vec<Tenant>, Fail> {
    let mut tenants = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = authed(s, ListTenantsRequest { page_size: 1000, page_token });
        let page = c.registry().list_tenants(request).await.map_err(fail)?.into_inner();
        tenants.extend(page.tenants);
        if page.next_page_token.is_empty() {
            return Ok(tenants);
        }
        page_token = page.next_page_token;
    }
}

async fn fleet_data(c: &Console, s: &WebSession, q: &HashMap<String, String>) -> Result<Fleet, Fail> {
    if !s.is_platform() {
        return Err(Fail::NotFound("no such page".into()));
    }
    let hours = hours(q);
    let to = tenantmesh_service::clock::now_secs();
    let from = to - hours * 3600;
    let tenants = list_tenants(c, s).await?;
    let costs = c.metering().list_tenant_costs(authed(s, ListTenantCostsRequest { from, to })).await.map_err(fail)?;
    let costs = costs.into_inner().tenants;
    let currency = costs.first().map(|c| c.currency.clone()).unwrap_or_default();
    let by_tenant: HashMap<&str, _> = costs.iter().map(|c| (c.tenant_id.as_str(), c)).collect();
    let minutes = (hours * 60) as f64;
    let rows =
        tenants.iter().map(|t| TenantRow::new(t, by_tenant.get(t.tenant_id.as_str()).copied(), minutes)).collect();
    let sort = q.get("sort").map_or("tenant", String::as_str);
    let desc = q.get("desc").is_some_and(|d| d == "1");
    let page = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    let mut fleet = Fleet::new(rows, hours, to, currency, sort, desc, page);
    // The percentiles of the rows shown (a call per tenant), eight at a time.
    let mut p99s = Vec::with_capacity(fleet.rows.len());
    for chunk in fleet.rows.chunks(8) {
        let calls = chunk.iter().map(|r| latency_buckets(c, s, &r.tenant_id, from, to));
        for buckets in futures_util::future::join_all(calls).await {
            p99s.push(buckets.map(|b| quantile(&b, 0.99)).unwrap_or_else(|_| "-".into()));
        }
    }
    for (row, p99) in fleet.rows.iter_mut().zip(p99s) {
        row.p99 = p99;
    }
    Ok(fleet)
}

async fn fleet_page(State(c): State<Shared>, headers: HeaderMap, Query(q): Params) -> Response {
    let (_, s) = match c.session(&headers).await {
        Ok(v) => v,
        Err(f) => return f.page(None),
    };
    if !s.is_platform() {
        return Redirect::to(&format!("/tenants/{}", s.tenant_id)).into_response();
    }
    match fleet_data(&c, &s, &q).await {
        Ok(fleet) => html(FleetPage { who: Some(Who::from(&s)), fleet, sorts: SORTS }.render()),
        Err(f) => f.page(Some(&s)),
    }
}

async fn fleet_json(State(c): State<Shared>, headers: HeaderMap, Query(q): Params) -> Response {
    let (_, s) = match c.session(&headers).await {
        Ok(v) => v,
        Err(f) => return f.json(),
    };
    match fleet_data(&c, &s, &q).await {
        Ok(fleet) => Json(fleet).into_response(),
        Err(f) => f.json(),
    }
}

/// The window of each usage point for a period of `hours`.
fn window_for(hours: i64) -> (Window, i64) {
    if hours <= 3 {
        (Window::Minute, 60)
    } else if hours <= 72 {
        (Window::Hour, 3600)
    } else {
        (Window::Day, 86_400)
    }
}

async fn tenant_data(c: &Console, s: &WebSession, id: &str, hours: i64) -> Result<TenantPage, Fail> {
    // Another tenant's page does not exist for a tenant's admin: not even its name.
    if !s.may_see(id) || tenantmesh_service::ids::validate_tenant_id(id).is_err() {
        return Err(Fail::NotFound(format!("no tenant {id}")));
    }
    let to = tenantmesh_service::clock::now_secs() + 60;
    let from = to - hours * 3600;
    let (window, window_secs) = window_for(hours);
    let tenant = async {
        let t = c.registry().get_tenant(authed(s, GetTenantRequest { tenant_id: id.into() })).await.map_err(fail)?;
        t.into_inner().tenant.ok_or_else(|| Fail::NotFound(format!("no tenant {id}")))
    };
    // Each meter once, per window; `refused` split by limit, which gives
    // both its plot (summed per window) and its table (summed per limit).
    let usage = async {
        let mut all = Vec::new();
        let mut refusals: BTreeMap<String, i64> = BTreeMap::new();
        for &meter in CALL_METERS {
            let group_by = if meter == REFUSED { vec![REFUSAL_DIMENSION.into()] } else { Vec::new() };
            let request = GetUsageRequest {
                tenant_id: id.into(),
                meter: meter.into(),
                from,
                to,
                window: window as i32,
                group_by,
            };
            let rows = c.metering().get_usage(authed(s, request)).await.map_err(fail)?.into_inner().rows;
            let mut per_window: BTreeMap<i64, i64> = BTreeMap::new();
            for r in &rows {
                *per_window.entry(r.window_start).or_default() += r.value;
                if meter == REFUSED {
                    *refusals.entry(r.dimensions.get(REFUSAL_DIMENSION).cloned().unwrap_or_default()).or_default() +=
                        r.value;
                }
            }
            let points: Vec<Point> = per_window.into_iter().map(|(t, v)| Point { t, v }).collect();
            let total = points.iter().map(|p| p.v).sum();
            all.push(MeterUsage { meter: meter.into(), total, window_secs, points });
        }
        Ok::<_, Fail>((all, refusals.into_iter().collect::<Vec<_>>()))
    };
    let cost = async {
        let request = GetTenantCostRequest { tenant_id: id.into(), from, to };
        let answer = c.metering().get_tenant_cost(authed(s, request)).await.map_err(fail)?;
        Ok::<_, Fail>(answer.into_inner().cost.unwrap_or_default())
    };
    let users = async {
        let request = ListUsersRequest { tenant_id: id.into(), page_size: 100, page_token: String::new() };
        Ok::<_, Fail>(c.auth().list_users(authed(s, request)).await.map_err(fail)?.into_inner().users)
    };
    let workflows = async {
        let request = ListWorkflowsRequest { tenant_id: id.into(), limit: 10 };
        Ok::<_, Fail>(c.onboarding().list_workflows(authed(s, request)).await.map_err(fail)?.into_inner().workflows)
    };
    // The last changes across the services' audit logs, oldest first.
    let changes = async {
        let mut events = Vec::new();
        for mut log in c.audit_logs() {
            let request = ListAuditEventsRequest { tenant_id: id.into(), last: SHOWN_CHANGES, ..Default::default() };
            events.extend(log.list_audit_events(authed(s, request)).await.map_err(fail)?.into_inner().events);
        }
        Ok::<_, Fail>(tenantmesh_service::audit::timeline(events, Some(SHOWN_CHANGES as usize)))
    };
    let resources = async {
        let request = ListTenantResourcesRequest { tenant_id: id.into(), include_removed: false };
        let answer = c.onboarding().list_tenant_resources(authed(s, request)).await.map_err(fail)?;
        Ok::<_, Fail>(answer.into_inner().resources)
    };
    let latency = latency_buckets(c, s, id, from, to);
    let (tenant, (usage, refusals), latency, cost, users, workflows, changes, resources) =
        tokio::try_join!(tenant, usage, latency, cost, users, workflows, changes, resources)?;
    let limits = tenant.limits.unwrap_or_default();
    let placement = tenant.placement.clone().unwrap_or_default();
    let (history_days, tenant_restore) = c.config.history.get(&tenant.tier).copied().unwrap_or((7, false));
    let now = tenantmesh_service::clock::now_secs();
    let restore_from = tenant.create_time.max(now - i64::from(history_days) * 86_400);
    let mut row = TenantRow::new(&tenant, Some(&cost), (hours * 60) as f64);
    row.p99 = quantile(&latency, 0.99);
    Ok(TenantPage {
        tenant: row,
        p50: quantile(&latency, 0.5),
        p99: quantile(&latency, 0.99),
        latency,
        create_time: tenant.create_time,
        version: tenant.version,
        table: placement.table,
        instance: placement.endpoint,
        limits: LimitsView {
            requests_per_second: limits.requests_per_second,
            burst: limits.burst,
            max_concurrency: limits.max_concurrency,
            storage_quota_bytes: limits.storage_quota_bytes,
        },
        hours,
        from,
        to,
        usage,
        refusals,
        cost: CostView::from(&cost),
        users: users.iter().map(UserView::from).collect(),
        workflows: workflows.iter().map(WorkflowView::from).collect(),
        changes: changes.iter().map(ChangeView::from).collect(),
        resources: resources.iter().map(ResourceView::from).collect(),
        restore_from,
        history_days,
        tenant_restore,
    })
}

/// How many of a tenant's latest changes its page lists.
const SHOWN_CHANGES: u32 = 10;

/// `tenant`'s requests over `[from, to)` by latency bucket.
async fn latency_buckets(
    c: &Console,
    s: &WebSession,
    tenant: &str,
    from: i64,
    to: i64,
) -> Result<Vec<(u64, i64)>, Fail> {
    let request = tenantmesh_metering::latency::usage_request(tenant, from, to);
    let rows = c.metering().get_usage(authed(s, request)).await.map_err(fail)?.into_inner().rows;
    Ok(tenantmesh_metering::latency::of_rows(&rows))
}

/// The tenant page's plots, one per meter.
pub fn plots(p: &TenantPage) -> Vec<String> {
    p.usage
        .iter()
        .map(|u| {
            let title = format!(
                "{} per {}",
                u.meter,
                if u.window_secs == 60 {
                    "minute"
                } else if u.window_secs == 3600 {
                    "hour"
                } else {
                    "day"
                }
            );
            let points: Vec<(i64, i64)> = u.points.iter().map(|pt| (pt.t, pt.v)).collect();
            plot::line(&format!("plot-{}", u.meter), &title, &points, p.from, p.to)
        })
        .collect()
}

async fn tenant_page(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Params,
) -> Response {
    let (_, s) = match c.session(&headers).await {
        Ok(v) => v,
        Err(f) => return f.page(None),
    };
    match tenant_data(&c, &s, &id, hours(&q)).await {
        Ok(p) => {
            let plots = plots(&p);
            let page = TenantPageView {
                who: Some(Who::from(&s)),
                plots,
                p,
                platform: s.is_platform(),
                csrf: s.csrf.clone(),
                tiers: c.config.tiers.clone(),
            };
            html(page.render())
        }
        Err(f) => f.page(Some(&s)),
    }
}

async fn tenant_json(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Params,
) -> Response {
    let (_, s) = match c.session(&headers).await {
        Ok(v) => v,
        Err(f) => return f.json(),
    };
    match tenant_data(&c, &s, &id, hours(&q)).await {
        Ok(p) => Json(p).into_response(),
        Err(f) => f.json(),
    }
}

/// The tenant a workflow id (`<tenant>/<kind>[/...]`) belongs to.
fn tenant_of(workflow_id: &str) -> &str {
    workflow_id.split('/').next().unwrap_or_default()
}

async fn workflow_data(c: &Console, s: &WebSession, id: &str) -> Result<WorkflowView, Fail> {
    if !s.may_see(tenant_of(id)) {
        return Err(Fail::NotFound(format!("no workflow {id}")));
    }
    let answer = c.onboarding().get_workflow(authed(s, GetWorkflowRequest { workflow_id: id.into() })).await;
    let w = answer.map_err(fail)?.into_inner().workflow.ok_or_else(|| Fail::NotFound(format!("no workflow {id}")))?;
    Ok(WorkflowView::from(&w))
}

async fn workflow_page(State(c): State<Shared>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let (_, s) = match c.session(&headers).await {
        Ok(v) => v,
        Err(f) => return f.page(None),
    };
    match workflow_data(&c, &s, &id).await {
        Ok(w) => {
            html(WorkflowPage { who: Some(Who::from(&s)), w, platform: s.is_platform(), csrf: s.csrf.clone() }.render())
        }
        Err(f) => f.page(Some(&s)),
    }
}

async fn workflow_json(State(c): State<Shared>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let (_, s) = match c.session(&headers).await {
        Ok(v) => v,
        Err(f) => return f.json(),
    };
    match workflow_data(&c, &s, &id).await {
        Ok(w) => Json(w).into_response(),
        Err(f) => f.json(),
    }
}

/// A server-sent event stream: the sender, and the response that streams it.
fn events() -> (tokio::sync::mpsc::Sender<Result<Event, Infallible>>, Response) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let sse = Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::default());
    (tx, sse.into_response())
}

/// The workflow, each time it changes, until it ends (or the page goes).
async fn workflow_events(State(c): State<Shared>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let (session_id, s) = match c.session(&headers).await {
        Ok(v) => v,
        Err(f) => return f.json(),
    };
    let first = match workflow_data(&c, &s, &id).await {
        Ok(w) => w,
        Err(f) => return f.json(),
    };
    let (tx, sse) = events();
    tokio::spawn(async move {
        let mut last = String::new();
        let mut w = first;
        loop {
            let data = serde_json::to_string(&w).unwrap_or_default();
            if data != last {
                if tx.send(Ok(Event::default().event("workflow").data(&data))).await.is_err() {
                    return;
                }
                last = data;
            }
            if !w.running() {
                let _ = tx.send(Ok(Event::default().event("end").data(""))).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            if tx.is_closed() {
                return;
            }
            // The session as it is now: refreshed, or ended by a sign-out.
            let Ok(s) = c.session_by_id(&session_id).await else { return };
            w = match workflow_data(&c, &s, &id).await {
                Ok(w) => w,
                Err(_) => return,
            };
        }
    });
    sse
}

/// Each tenant as the registry reports it changed (the platform admin only).
async fn fleet_events(State(c): State<Shared>, headers: HeaderMap) -> Response {
    let (session_id, s) = match c.session(&headers).await {
        Ok(v) => v,
        Err(f) => return f.json(),
    };
    if !s.is_platform() {
        return Fail::NotFound("no such page".into()).json();
    }
    let (tx, sse) = events();
    let Ok(permit) = c.fleet_watches.clone().try_acquire_owned() else {
        let busy = Event::default().event("busy").data("too many fleet pages follow the registry now");
        let _ = tx.try_send(Ok(busy));
        return sse;
    };
    let stream = match c.registry().watch_tenants(authed(&s, WatchTenantsRequest {})).await {
        Ok(st) => st.into_inner(),
        Err(e) => return fail(e).json(),
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        while let Ok(Some(changed)) = stream.message().await {
            // The session as it is now: refreshed, or ended by a sign-out.
            let Ok(s) = c.session_by_id(&session_id).await else { return };
            for id in changed.tenant_ids {
                let Ok(t) = c.registry().get_tenant(authed(&s, GetTenantRequest { tenant_id: id })).await else {
                    continue;
                };
                let Some(t) = t.into_inner().tenant else { continue };
                let data = json!({
                    "tenant_id": t.tenant_id,
                    "status": tenant_status(t.status),
                    "tier": t.tier,
                    "model": model(t.isolation_model),
                });
                if tx.send(Ok(Event::default().event("tenant").data(data.to_string()))).await.is_err() {
                    return;
                }
            }
        }
    });
    sse
}

/// The signed-in platform admin for a form that only they may send, the
/// form checked (Origin, CSRF, confirmation).
async fn form_session(
    c: &Console,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    platform_only: bool,
    tenant: Option<&str>,
) -> Result<WebSession, (Fail, Option<WebSession>)> {
    let (_, s) = c.session(headers).await.map_err(|f| (f, None))?;
    if let Err(f) = c.check_post(headers, Some(&s), form) {
        return Err((f, Some(s)));
    }
    if tenant.is_some_and(|t| !s.may_see(t)) {
        return Err((Fail::NotFound("no such tenant".into()), Some(s)));
    }
    if platform_only && !s.is_platform() {
        return Err((Fail::Forbidden("only the platform's operator may do this".into()), Some(s)));
    }
    if form.get("confirm").is_none_or(|v| v.is_empty()) {
        return Err((Fail::Bad("confirm: tick the box to confirm".into()), Some(s)));
    }
    Ok(s)
}

/// Runs a form's action: to the workflow it started, or back to the tenant.
macro_rules! form_action {
    ($c:expr, $headers:expr, $form:expr, $platform_only:expr, $tenant:expr, |$s:ident| $body:expr) => {{
        match form_session(&$c, &$headers, &$form, $platform_only, $tenant).await {
            Err((f, s)) => f.page(s.as_ref()),
            Ok($s) => {
                let result: Result<String, Fail> = $body;
                match result {
                    Ok(to) => Redirect::to(&to).into_response(),
                    Err(f) => f.page(Some(&$s)),
                }
            }
        }
    }};
}

fn workflow_url(id: &str) -> String {
    format!("/workflows/{id}")
}

async fn new_tenant_page(State(c): State<Shared>, headers: HeaderMap) -> Response {
    let (_, s) = match c.session(&headers).await {
        Ok(v) => v,
        Err(f) => return f.page(None),
    };
    if !s.is_platform() {
        return Fail::NotFound("no such page".into()).page(Some(&s));
    }
    let form = RegisterForm { tier: c.config.tiers.first().cloned().unwrap_or_default(), ..Default::default() };
    let page = NewTenantPage {
        who: Some(Who::from(&s)),
        error: String::new(),
        form,
        tiers: c.config.tiers.clone(),
        csrf: s.csrf,
    };
    html(page.render())
}

async fn register(State(c): State<Shared>, headers: HeaderMap, Form(form): Form<HashMap<String, String>>) -> Response {
    let field = |k: &str| form.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
    form_action!(c, headers, form, true, None, |s| {
        let request = RegisterTenantRequest {
            tenant_id: field("tenant_id"),
            name: field("name"),
            tier: field("tier"),
            admin_email: field("admin_email"),
            admin_password: form.get("admin_password").cloned().unwrap_or_default(),
            idempotency_key: field("tenant_id"),
        };
        match c.onboarding().register_tenant(authed(&s, request)).await {
            Ok(r) => {
                let r = r.into_inner();
                tracing::info!(tenant.id = %r.tenant_id, by = %s.email, "console: tenant registered");
                Ok(workflow_url(&r.workflow_id))
            }
            Err(e) => {
                // The form again, filled in, with what was wrong.
                let f = fail(e);
                let page = NewTenantPage {
                    who: Some(Who::from(&s)),
                    error: f.message().to_owned(),
                    form: RegisterForm {
                        tenant_id: field("tenant_id"),
                        name: field("name"),
                        tier: field("tier"),
                        admin_email: field("admin_email"),
                    },
                    tiers: c.config.tiers.clone(),
                    csrf: s.csrf.clone(),
                };
                return (f.status(), html(page.render())).into_response();
            }
        }
    })
}

async fn change_tier(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    form_action!(c, headers, form, true, Some(id.as_str()), |s| {
        let tier = form.get("tier").cloned().unwrap_or_default();
        let request = authed(&s, ChangeTierRequest { tenant_id: id.clone(), tier: tier.clone() });
        c.onboarding().change_tier(request).await.map_err(fail).map(|r| {
            tracing::info!(tenant.id = %id, tier = %tier, by = %s.email, "console: tier change started");
            workflow_url(&r.into_inner().workflow_id)
        })
    })
}

async fn set_limits(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    form_action!(c, headers, form, true, Some(id.as_str()), |s| {
        let number = |k: &str| -> Result<u64, Fail> {
            form.get(k)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|v| *v > 0)
                .ok_or_else(|| Fail::Bad(format!("{k}: must be a whole number above 0")))
        };
        let small = |k: &str| -> Result<u32, Fail> {
            number(k).and_then(|v| u32::try_from(v).map_err(|_| Fail::Bad(format!("{k}: at most {}", u32::MAX))))
        };
        let limits = (|| {
            Ok::<_, Fail>(TenantLimits {
                requests_per_second: small("requests_per_second")?,
                burst: small("burst")?,
                max_concurrency: small("max_concurrency")?,
                storage_quota_bytes: number("storage_quota_bytes")?,
            })
        })();
        match limits {
            Err(f) => Err(f),
            Ok(limits) => {
                let request = authed(&s, SetTenantLimitsRequest { tenant_id: id.clone(), limits: Some(limits) });
                c.registry().set_tenant_limits(request).await.map_err(fail).map(|_| {
                    tracing::info!(tenant.id = %id, by = %s.email, "console: limits set");
                    format!("/tenants/{id}")
                })
            }
        }
    })
}

async fn set_status(c: &Console, s: &WebSession, id: &str, status: TenantStatus) -> Result<String, Fail> {
    let request = authed(s, SetTenantStatusRequest { tenant_id: id.into(), status: status as i32 });
    c.registry().set_tenant_status(request).await.map_err(fail)?;
    tracing::info!(tenant.id = %id, status = tenant_status(status as i32), by = %s.email, "console: tenant status set");
    Ok(format!("/tenants/{id}"))
}

async fn suspend(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    form_action!(c, headers, form, true, Some(id.as_str()), |s| set_status(&c, &s, &id, TenantStatus::Suspended).await)
}

async fn resume(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    form_action!(c, headers, form, true, Some(id.as_str()), |s| set_status(&c, &s, &id, TenantStatus::Active).await)
}

async fn offboard(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    form_action!(c, headers, form, true, Some(id.as_str()), |s| {
        let request = authed(&s, OffboardTenantRequest { tenant_id: id.clone() });
        c.onboarding().offboard_tenant(request).await.map_err(fail).map(|r| {
            tracing::info!(tenant.id = %id, by = %s.email, "console: offboarding started");
            workflow_url(&r.into_inner().workflow_id)
        })
    })
}

/// An instant typed in the restore form: RFC 3339 (`2026-12-07T09:30:00Z`),
/// or `@<unix seconds>`.
pub fn parse_instant(s: &str) -> Option<i64> {
    let s = s.trim();
    match s.strip_prefix('@') {
        Some(unix) => unix.parse().ok(),
        None => tenantmesh_service::clock::parse_rfc3339(s).map(|(secs, _)| secs),
    }
}

async fn restore(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    form_action!(c, headers, form, false, Some(id.as_str()), |s| {
        let instant = form.get("instant").map(String::as_str).unwrap_or_default();
        match parse_instant(instant) {
            None => Err(Fail::Bad(format!("instant: {instant:?} is not an instant like 2026-12-07T09:30:00Z"))),
            Some(seconds) => {
                let target = if form.get("target").is_some_and(|t| t == "in_place") {
                    RestoreTarget::InPlace
                } else {
                    RestoreTarget::Export
                };
                let request = authed(
                    &s,
                    RestoreTenantRequest {
                        tenant_id: id.clone(),
                        point_in_time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                        target: target as i32,
                    },
                );
                c.onboarding().restore_tenant(request).await.map_err(fail).map(|r| {
                    tracing::info!(tenant.id = %id, by = %s.email, "console: restore started");
                    workflow_url(&r.into_inner().workflow_id)
                })
            }
        }
    })
}

async fn retry(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(mut form): Form<HashMap<String, String>>,
) -> Response {
    // A retry button needs no confirmation: it resumes what was asked for.
    form.insert("confirm".into(), "on".into());
    let tenant = tenant_of(&id).to_owned();
    form_action!(c, headers, form, true, Some(tenant.as_str()), |s| {
        let request = authed(&s, RetryOnboardingRequest { workflow_id: id.clone() });
        c.onboarding().retry_onboarding(request).await.map_err(fail).map(|_| workflow_url(&id))
    })
}

#[cfg(test)]
mod tests;
