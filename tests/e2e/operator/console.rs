//! The web console against a real mesh, over HTTP as a browser speaks it:
//! sign-in and its cookie, a tenant registered from the form and its
//! workflow followed by server-sent events to the end, the usage and cost
//! pages equal to what the Metering API says, a tier change, and a tenant's
//! admin confined to their tenant (another's pages are 404).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tenantmesh_proto::metering::v1::{GetTenantCostRequest, GetUsageRequest, Window};
use tenantmesh_test_support::*;

/// The console of `mesh`, served in this process; its address.
pub async fn start_console(mesh: &TestMesh) -> SocketAddr {
    // As the process reads its environment, with the mesh's tiers file.
    let a = mesh.addrs;
    let mut env = test_env();
    for (var, addr) in [
        ("TENANTMESH_REGISTRY_URL", a.registry),
        ("TENANTMESH_AUTH_URL", a.auth),
        ("TENANTMESH_ONBOARDING_URL", a.onboarding),
        ("TENANTMESH_DATA_URL", a.data),
    ] {
        env.insert(var.into(), format!("http://{addr}"));
    }
    let config = tenantmesh_console::ConsoleConfig::from_env(&env).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let console = tenantmesh_console::Console::new(config).unwrap();
    tokio::spawn(tenantmesh_console::serve(listener, console, std::future::pending()));
    addr
}

/// A browser's worth of HTTP: one cookie jar of one session.
pub(crate) struct Browser {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    cookie: String,
}

pub(crate) struct Page {
    status: StatusCode,
    location: String,
    body: String,
}

impl Browser {
    pub(crate) fn new(addr: SocketAddr) -> Browser {
        Browser {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
            cookie: String::new(),
        }
    }

    async fn send(&mut self, request: http::request::Builder, body: String) -> Page {
        let request = request.header(header::COOKIE, &self.cookie).body(Full::new(Bytes::from(body))).unwrap();
        let response = self.client.request(request).await.unwrap();
        if let Some(set) = response.headers().get(header::SET_COOKIE) {
            let set = set.to_str().unwrap();
            assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
            self.cookie = set.split(';').next().unwrap().to_owned();
        }
        let status = response.status();
        let location = response.headers().get(header::LOCATION).map(|l| l.to_str().unwrap().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Page { status, location: location.unwrap_or_default(), body: String::from_utf8_lossy(&body).into_owned() }
    }

    async fn get(&mut self, path: &str) -> Page {
        self.send(Request::get(format!("{}{path}", self.base)), String::new()).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", v.bytes().map(|b| format!("%{b:02X}")).collect::<String>()))
            .collect::<Vec<_>>()
            .join("&");
        let request = Request::post(format!("{}{path}", self.base))
            .header(header::ORIGIN, &self.base)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        self.send(request, body).await
    }

    pub(crate) async fn sign_in(&mut self, tenant: &str, email: &str, password: &str) {
        let page = self.post("/login", &[("tenant", tenant), ("email", email), ("password", password)]).await;
        assert_eq!((page.status, page.location.as_str()), (StatusCode::SEE_OTHER, "/"), "{}", page.body);
    }

    /// The CSRF token the page's forms carry.
    async fn csrf(&mut self, path: &str) -> String {
        let page = self.get(path).await;
        let at = page.body.find(r#"name="csrf" value=""#).expect("a form with the CSRF token") + 19;
        page.body[at..].split('"').next().unwrap().to_owned()
    }

    pub(crate) async fn json(&mut self, path: &str) -> serde_json::Value {
        let page = self.get(path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.body);
        serde_json::from_str(&page.body).unwrap()
    }

    /// Follows the workflow's server-sent events until it ends; every
    /// status it reported, and the last workflow.
    async fn follow(&self, workflow: &str) -> (Vec<String>, serde_json::Value) {
        let request = Request::get(format!("{}/events/workflows/{workflow}", self.base))
            .header(header::COOKIE, &self.cookie)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
        let mut body = response.into_body();
        let (mut buffer, mut statuses, mut last) = (String::new(), Vec::new(), serde_json::Value::Null);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, body.frame()).await {
            let Ok(data) = frame.into_data() else { continue };
            buffer.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                if event.contains("event: end") {
                    return (statuses, last);
                }
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                    last = serde_json::from_str(data).unwrap();
                    statuses.push(last["status"].as_str().unwrap().to_owned());
                }
            }
        }
        panic!("the workflow's events did not end: {statuses:?}");
    }
}

/// The operator registers a tenant and watches it onboard; the tenant's
/// usage and cost in the console are the Metering API's; a tier change from
/// the form; the tenant's admin sees only their tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_runs_a_tenants_life_and_shows_the_metering_numbers() {
    let mesh = TestMesh::start().await;
    let console = start_console(&mesh).await;
    let mut operator = Browser::new(console);
    assert_eq!(operator.get("/").await.location, "/login");
    operator.sign_in("platform", ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let fleet = operator.get("/").await;
    assert!(fleet.status == StatusCode::OK && fleet.body.contains("platform"), "{}", fleet.body);

    let id = unique_tenant("web");
    let csrf = operator.csrf("/tenants/new").await;
    let form = [
        ("csrf", csrf.as_str()),
        ("tenant_id", id.as_str()),
        ("name", "Web <Co>"),
        ("tier", "standard"),
        ("admin_email", "admin@web.example"),
        ("admin_password", "web-admin-password"),
        ("confirm", "on"),
    ];
    let started = operator.post("/tenants", &form).await;
    assert_eq!(started.status, StatusCode::SEE_OTHER, "{}", started.body);
    assert_eq!(started.location, format!("/workflows/{id}/onboard"));
    let (statuses, last) = operator.follow(&format!("{id}/onboard")).await;
    assert_eq!(statuses.last().map(String::as_str), Some("SUCCEEDED"), "{statuses:?}");
    assert!(last["steps"].as_array().unwrap().iter().all(|s| s["state"] == "DONE"), "{last}");
    let page = operator.get(&format!("/workflows/{id}/onboard")).await;
    assert!(page.body.contains("provision_storage") && page.body.contains("SUCCEEDED"));

    // N requests as the tenant; once flushed, the console's numbers are the Metering API's.
    let token = mesh.login(&id, "admin@web.example", "web-admin-password").await.unwrap();
    const N: i64 = 7;
    for i in 0..N {
        mesh.data().put_item(authed(put_v(&format!("i{i}"), "v"), &token)).await.unwrap();
    }
    let admin = mesh.admin_token().await;
    let mut shown = serde_json::Value::Null;
    for _ in 0..100 {
        shown = operator.json(&format!("/api/tenants/{id}?hours=1")).await;
        if shown["usage"][0]["total"] == N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(shown["usage"][0]["meter"], "requests");
    assert_eq!(shown["usage"][0]["total"], N, "{shown}");
    let (from, to) = (shown["from"].as_i64().unwrap(), shown["to"].as_i64().unwrap());
    let usage = GetUsageRequest {
        tenant_id: id.clone(),
        meter: "write_units".into(),
        from,
        to,
        window: Window::Minute as i32,
        group_by: vec![],
    };
    let rows = mesh.metering().get_usage(authed(usage, &admin)).await.unwrap().into_inner().rows;
    let points: Vec<(i64, i64)> = rows.iter().map(|r| (r.window_start, r.value)).collect();
    let console_points: Vec<(i64, i64)> = shown["usage"][2]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["t"].as_i64().unwrap(), p["v"].as_i64().unwrap()))
        .collect();
    assert_eq!(shown["usage"][2]["meter"], "write_units");
    assert_eq!(console_points, points, "the plot's points are the Metering API's rows");
    let cost = GetTenantCostRequest { tenant_id: id.clone(), from, to };
    let cost = mesh.metering().get_tenant_cost(authed(cost, &admin)).await.unwrap().into_inner().cost.unwrap();
    let requests_line = cost.lines.iter().find(|l| l.item == "requests").unwrap();
    let shown_line =
        shown["cost"]["lines"].as_array().unwrap().iter().find(|l| l["item"] == "requests").unwrap().clone();
    assert_eq!(shown_line["quantity"].as_f64().unwrap(), requests_line.quantity);
    assert_eq!(shown["cost"]["revenue"].as_f64().unwrap(), cost.revenue);
    let page = operator.get(&format!("/tenants/{id}?hours=1")).await;
    assert!(page.body.contains(&format!(r#"data-meter="requests" data-total="{N}""#)), "{}", page.body);
    assert!(page.body.contains("Web &#60;Co&#62;") || page.body.contains("Web &lt;Co&gt;"), "escaped name");
    assert_eq!(page.body.matches(r#"<svg xmlns="http://www.w3.org/2000/svg" id="plot-"#).count(), 6);
    // Its restore points: from its creation (younger than its tier's history).
    assert_eq!(shown["restore_from"], shown["create_time"]);
    assert!(shown["history_days"].as_u64().unwrap() > 0 && page.body.contains(r#"id="restore-points""#));

    // Limits set from the form hold the tenant to one call a second: the
    // calls refused are counted by limit, as the Metering API says.
    let csrf = operator.csrf(&format!("/tenants/{id}")).await;
    let limits = [
        ("csrf", csrf.as_str()),
        ("requests_per_second", "1"),
        ("burst", "1"),
        ("max_concurrency", "4"),
        ("storage_quota_bytes", "1000000"),
        ("confirm", "on"),
    ];
    let set = operator.post(&format!("/tenants/{id}/limits"), &limits).await;
    assert_eq!((set.status, set.location.as_str()), (StatusCode::SEE_OTHER, format!("/tenants/{id}").as_str()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut refused = 0;
    for _ in 0..10 {
        let get = tenantmesh_proto::data::v1::GetItemRequest { collection: "c".into(), id: "i0".into() };
        if let Err(s) = mesh.data().get_item(authed(get, &token)).await {
            assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
            refused += 1;
        }
    }
    assert!(refused >= 5, "{refused} of 10 refused at one call a second");
    let mut shown = serde_json::Value::Null;
    for _ in 0..100 {
        shown = operator.json(&format!("/api/tenants/{id}?hours=1")).await;
        if shown["refusals"][0][1] == refused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(shown["refusals"], serde_json::json!([["requests_per_second", refused]]), "{shown}");
    let (from, to) = (shown["from"].as_i64().unwrap(), shown["to"].as_i64().unwrap());
    let usage = GetUsageRequest {
        tenant_id: id.clone(),
        meter: "refused".into(),
        from,
        to,
        window: Window::Minute as i32,
        group_by: vec![],
    };
    let rows = mesh.metering().get_usage(authed(usage, &admin)).await.unwrap().into_inner().rows;
    assert_eq!(rows.iter().map(|r| r.value).sum::<i64>(), refused);
    let plotted = shown["usage"].as_array().unwrap().iter().find(|u| u["meter"] == "refused").unwrap().clone();
    assert_eq!(plotted["total"], refused);
    let fleet = operator.json("/api/fleet?hours=1&sort=refused&desc=1").await;
    assert_eq!(
        (fleet["rows"][0]["tenant_id"].as_str(), &fleet["rows"][0]["refused"]),
        (Some(id.as_str()), &refused.into())
    );
    let page = operator.get(&format!("/tenants/{id}?hours=1")).await;
    assert!(page.body.contains(r#"<table id="refusals">"#) && page.body.contains("requests_per_second"));
    // The limits just set are its latest change in the audit log, by the operator.
    let changes = shown["changes"].as_array().unwrap();
    let last = changes.last().unwrap();
    assert_eq!((last["action"].as_str(), last["outcome"].as_str()), (Some("tenant.limits"), Some("ok")), "{shown}");
    assert!(
        last["change"].as_str().unwrap().ends_with("1 requests/s, burst 1, 4 in flight, 1000000 bytes stored"),
        "{last}"
    );
    assert!(page.body.contains(r#"<table id="changes">"#) && page.body.contains("tenant.limits"));
    // Every request served is in a latency bucket; the percentiles are read from them.
    let served = shown["usage"][0]["total"].as_i64().unwrap();
    let bucketed: i64 = shown["latency"].as_array().unwrap().iter().map(|b| b[1].as_i64().unwrap()).sum();
    assert_eq!(bucketed, served, "{shown}");
    assert!(shown["p99"].as_str().unwrap().starts_with("<= "), "{shown}");
    assert!(fleet["rows"][0]["p99"].as_str().unwrap().starts_with("<= "), "{fleet}");

    // A tier change from the form, followed to its end.
    let csrf = operator.csrf(&format!("/tenants/{id}")).await;
    let moved =
        operator.post(&format!("/tenants/{id}/tier"), &[("csrf", &csrf), ("tier", "premium"), ("confirm", "on")]).await;
    assert_eq!(moved.status, StatusCode::SEE_OTHER, "{}", moved.body);
    let workflow = moved.location.strip_prefix("/workflows/").unwrap().to_owned();
    let (statuses, _) = operator.follow(&workflow).await;
    assert_eq!(statuses.last().map(String::as_str), Some("SUCCEEDED"));
    let shown = operator.json(&format!("/api/tenants/{id}")).await;
    assert_eq!(
        (shown["tenant"]["tier"].as_str(), shown["tenant"]["model"].as_str()),
        (Some("premium"), Some("bridge"))
    );
    let fleet = operator.json("/api/fleet?sort=margin").await;
    assert!(fleet["rows"].as_array().unwrap().iter().any(|r| r["tenant_id"] == id.as_str()), "{fleet}");

    // A bad tier names the field; the form's answer is the mesh's.
    let csrf = operator.csrf(&format!("/tenants/{id}")).await;
    let bad =
        operator.post(&format!("/tenants/{id}/tier"), &[("csrf", &csrf), ("tier", "gold"), ("confirm", "on")]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("tier:"), "{}", bad.body);

    // The tenant's admin: their tenant, and nothing of another's.
    let other = mesh.onboard(&unique_tenant("other")).await;
    let mut tenant_admin = Browser::new(console);
    tenant_admin.sign_in(&id, "admin@web.example", "web-admin-password").await;
    assert_eq!(tenant_admin.get("/").await.location, format!("/tenants/{id}"));
    assert_eq!(tenant_admin.get(&format!("/tenants/{id}")).await.status, StatusCode::OK);
    for path in [
        format!("/tenants/{}", other.tenant_id),
        format!("/api/tenants/{}", other.tenant_id),
        format!("/workflows/{}/onboard", other.tenant_id),
        "/api/fleet".to_owned(),
    ] {
        let page = tenant_admin.get(&path).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "{path}");
        assert!(!page.body.contains(&other.admin_email), "{path}");
    }
    // Signing out ends the session.
    let csrf = tenant_admin.csrf(&format!("/tenants/{id}")).await;
    assert_eq!(tenant_admin.post("/logout", &[("csrf", &csrf)]).await.location, "/login");
    assert_eq!(tenant_admin.get(&format!("/tenants/{id}")).await.location, "/login");
    mesh.shutdown().await;
}
