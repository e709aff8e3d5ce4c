//! The pages rendered with edge cases, and the console's own refusals
//! (another tenant's page, a POST from elsewhere or without the CSRF
//! token), through the router without a mesh behind it: each is refused
//! before any call to the mesh.

use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::ConsoleConfig;

fn row(id: &str, name: &str) -> TenantRow {
    TenantRow {
        tenant_id: id.into(),
        name: name.into(),
        status: "ACTIVE",
        tier: "standard".into(),
        model: "pool",
        requests: 3,
        requests_per_minute: 0.1,
        refused: 2,
        p99: "<= 1 ms".into(),
        cost: 0.5,
        revenue: 1.0,
        margin: 0.5,
    }
}

fn who() -> Option<Who> {
    Some(Who { tenant_id: "platform".into(), email: "admin@platform.local".into(), platform: true, csrf: "tok".into() })
}

fn fleet_html(rows: Vec<TenantRow>, page: usize) -> String {
    let fleet = Fleet::new(rows, 24, 1_765_100_000, "USD".into(), "tenant", false, page);
    FleetPage { who: who(), fleet, sorts: SORTS }.render().unwrap()
}

#[test]
fn no_tenants_says_so() {
    let html = fleet_html(Vec::new(), 1);
    assert!(html.contains("0 tenants") && html.contains("No tenants yet"), "{html}");
    assert!(!html.contains("<table id=\"fleet\""));
}

#[test]
fn ten_thousand_tenants_are_paged() {
    let rows: Vec<TenantRow> = (0..10_000).map(|i| row(&format!("t{i:05}"), "n")).collect();
    let html = fleet_html(rows, 2);
    assert!(html.contains("10000 tenants") && html.contains("page 2 of 100"), "page line");
    assert_eq!(html.matches("<tr data-tenant=").count(), 100);
    assert!(html.contains(r#"data-tenant="t00100""#) && !html.contains(r#"data-tenant="t00099""#));
    assert!(html.contains("rel=\"prev\"") && html.contains("page=3"));
}

#[test]
fn hostile_names_are_escaped() {
    let html = fleet_html(vec![row("evil", "<script>alert('x')</script>\" onmouseover=\"x")], 1);
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(html.contains("&#60;script&#62;") || html.contains("&lt;script&gt;"), "{html}");
    assert!(!html.contains("\" onmouseover=\"x"), "attribute injection: {html}");
}

#[test]
fn a_failed_workflow_shows_its_long_error_whole() {
    let error = format!("activate_tenant: {}", "y".repeat(2_000));
    let w = WorkflowView {
        workflow_id: "acme/onboard".into(),
        kind: "onboard".into(),
        tenant_id: "acme".into(),
        status: "FAILED",
        error,
        export_path: String::new(),
        create_time: 1,
        update_time: 2,
        steps: vec![StepView {
            index: 0,
            name: "activate_tenant".into(),
            service: "orders".into(),
            state: "FAILED",
            attempts: 3,
            last_error: "<b>boom</b>".into(),
            detail: String::new(),
        }],
    };
    let html = WorkflowPage { who: who(), w, platform: true, csrf: "tok".into() }.render().unwrap();
    assert!(html.contains(&"y".repeat(2_000)), "the whole error");
    assert!(html.contains("activate_tenant (orders)") && !html.contains("<b>boom</b>"));
    assert!(html.contains("Retry from the failed step") && html.contains(r#"name="csrf" value="tok""#));
    assert!(html.contains(r#"data-page="workflow""#) && html.contains(r#"data-id="acme/onboard""#));
}

fn console() -> Arc<Console> {
    let config = ConsoleConfig {
        registry: "http://127.0.0.1:1".into(),
        auth: "http://127.0.0.1:1".into(),
        onboarding: "http://127.0.0.1:1".into(),
        data: "http://127.0.0.1:1".into(),
        origin: None,
        tiers: vec!["basic".into()],
        history: HashMap::new(),
        idle: Duration::from_secs(60),
    };
    Console::new(config).unwrap()
}

fn signed_in(c: &Console, tenant: &str) -> (String, String) {
    let s = WebSession::new(tenant.into(), format!("admin@{tenant}.example"), "at".into(), "rt".into(), i64::MAX / 2);
    let csrf = s.csrf.clone();
    (c.sessions.create(s), csrf)
}

async fn send(c: &Arc<Console>, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let response = router(c.clone()).oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned())
}

fn get(path: &str, cookie: &str) -> Request<Body> {
    Request::get(path).header(header::COOKIE, format!("tm_session={cookie}")).body(Body::empty()).unwrap()
}

fn post(path: &str, cookie: &str, origin: Option<&str>, body: &str) -> Request<Body> {
    let mut r = Request::post(path)
        .header(header::HOST, "console.test")
        .header(header::COOKIE, format!("tm_session={cookie}"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(o) = origin {
        r = r.header(header::ORIGIN, o);
    }
    r.body(Body::from(body.to_owned())).unwrap()
}

#[tokio::test]
async fn a_tenant_admin_finds_no_other_tenant() {
    let c = console();
    let (cookie, csrf) = signed_in(&c, "acme");
    let paths = [
        "/tenants/globex",
        "/api/tenants/globex",
        "/workflows/globex/onboard",
        "/api/workflows/globex/onboard",
        "/events/workflows/globex/onboard",
        "/api/fleet",
        "/events/fleet",
        "/tenants/new",
    ];
    for path in paths {
        let (status, _, body) = send(&c, get(path, &cookie)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    // The fleet sends a tenant's admin to their own tenant.
    let (status, headers, _) = send(&c, get("/", &cookie)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers.get(header::LOCATION).unwrap(), "/tenants/acme");
    // And a form for another tenant is refused before it reaches the mesh.
    let form = format!("csrf={csrf}&confirm=on&instant=%402");
    let (status, _, _) = send(&c, post("/tenants/globex/restore", &cookie, Some("http://console.test"), &form)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A platform-only form from a tenant's admin, on their own tenant: refused.
    let form = format!("csrf={csrf}&confirm=on");
    let (status, _, _) = send(&c, post("/tenants/acme/offboard", &cookie, Some("http://console.test"), &form)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn posts_need_the_console_origin_and_the_csrf_token() {
    let c = console();
    let (cookie, csrf) = signed_in(&c, "platform");
    let good = format!("csrf={csrf}&confirm=on");
    let cases = [
        (Some("http://evil.example"), good.clone(), "Origin"),
        (None, good.clone(), "Origin"),
        (Some("http://console.test"), "confirm=on".to_owned(), "CSRF"),
        (Some("http://console.test"), "csrf=wrong&confirm=on".to_owned(), "CSRF"),
    ];
    for (origin, body, why) in cases {
        let (status, _, page) = send(&c, post("/tenants/acme/suspend", &cookie, origin, &body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{origin:?} {body}: {page}");
        assert!(page.contains(why), "{page}");
    }
    // Unconfirmed: refused, naming the box.
    let unconfirmed = post("/tenants/acme/suspend", &cookie, Some("http://console.test"), &format!("csrf={csrf}"));
    let (status, _, page) = send(&c, unconfirmed).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("confirm"), "{page}");
    // A login from another origin is refused too.
    let login = post("/login", "", Some("http://evil.example"), "tenant=platform&email=a&password=b");
    let (status, _, _) = send(&c, login).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn every_response_has_a_strict_policy_and_no_session_means_sign_in() {
    let c = console();
    let (status, headers, _) = send(&c, Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers.get(header::LOCATION).unwrap(), "/login");
    assert_eq!(headers.get(header::CONTENT_SECURITY_POLICY).unwrap(), CSP);
    let (status, headers, body) = send(&c, Request::get("/login").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(CSP.contains("script-src 'self'") && !CSP.contains("unsafe"));
    assert_eq!(headers.get(header::X_FRAME_OPTIONS).unwrap(), "DENY");
    assert!(body.contains(r#"<label for="password">"#) && !body.contains("style="));
    let (status, _, body) = send(&c, Request::get("/api/fleet").body(Body::empty()).unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::UNAUTHORIZED, r#"{"error":"sign in first"}"#));
    let (status, _, _) = send(&c, Request::get("/nowhere").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[test]
fn instants_of_the_restore_form() {
    assert_eq!(parse_instant("2000-02-29T00:00:00Z"), Some(951_782_400));
    assert_eq!(parse_instant("@42"), Some(42));
    assert_eq!(parse_instant("2000-13-01T00:00:00Z"), None);
    assert_eq!(parse_instant("yesterday"), None);
}

/// A session whose token cannot be refreshed ends: the request is sent to
/// sign in, and the session is gone.
#[tokio::test]
async fn a_session_that_cannot_be_refreshed_ends() {
    let c = console();
    let s = WebSession::new("platform".into(), "admin@platform.local".into(), "at".into(), "rt".into(), 0);
    let cookie = c.sessions.create(s);
    let (status, _, _) = send(&c, get("/api/fleet", &cookie)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(c.sessions.get(&cookie).is_none());
}
