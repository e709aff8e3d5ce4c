//! Contract tests of `example.orders.v1.Orders`, the example application
//! service, served as a team would run it (only `tenantmesh-app`) next to
//! an in-process mesh: every RPC, its policy, bad input, and that one
//! tenant never sees another's orders.

use tenantmesh_orders::proto::orders_client::OrdersClient;
use tenantmesh_orders::proto::*;
use tenantmesh_proto::auth::v1::Role;
use tenantmesh_proto::data::v1::PutItemRequest;
use tenantmesh_proto::onboarding::v1::{ChangeTierRequest, RestoreTenantRequest, WorkflowStatus};
use tenantmesh_test_support::*;
use tonic::Code;
use tonic::transport::Channel;

/// The orders service, serving next to `mesh` until dropped.
pub(crate) struct Running {
    pub(crate) client: OrdersClient<Channel>,
    pub(crate) addr: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub(crate) async fn start(mesh: &TestMesh) -> Running {
    start_with(mesh, &[]).await
}

/// [`start`] with `extra` settings.
pub(crate) async fn start_with(mesh: &TestMesh, extra: &[(&str, &str)]) -> Running {
    let mut env = mesh.app_env("orders");
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let app = tenantmesh_orders::app().unwrap().configure(&env).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let data_url = env["TENANTMESH_DATA_URL"].clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        let served = app.serve(listener, shutdown, move |ctx| tenantmesh_orders::routes(ctx, &data_url)).await;
        served.expect("the orders service serves");
    });
    Running { client: OrdersClient::new(TestMesh::channel(addr)), addr, _stop: stop }
}

/// The orders service, serving next to `mesh` and listed in its service
/// catalog at this instance's address: workflows started from now on
/// include it.
pub(crate) async fn start_registered(mesh: &TestMesh) -> Running {
    let orders = start(mesh).await;
    let endpoint = format!("http://{}", orders.addr);
    until_listed(TestMesh::channel(mesh.addrs.registry), &mesh.admin_token().await, "orders", &endpoint).await;
    orders
}

pub(crate) async fn add_product(mesh: &TestMesh, token: &str, id: &str) {
    let put = PutItemRequest { collection: "products".into(), id: id.into(), attributes: None, expected_version: None };
    mesh.data().put_item(authed(put, token)).await.unwrap();
}

pub(crate) fn create(order_id: &str, product_id: &str, quantity: u32) -> CreateOrderRequest {
    CreateOrderRequest { order_id: order_id.into(), product_id: product_id.into(), quantity }
}

fn get(order_id: &str) -> GetOrderRequest {
    GetOrderRequest { order_id: order_id.into() }
}

pub(crate) fn list(page_size: u32, page_token: &str) -> ListOrdersRequest {
    ListOrdersRequest { page_size, page_token: page_token.into() }
}

pub(crate) fn ids(orders: &[Order]) -> Vec<&str> {
    orders.iter().map(|o| o.order_id.as_str()).collect()
}

#[test]
fn every_rpc_has_a_contract_test() {
    assert_contract_covers_in(
        tenantmesh_orders::proto::FILE_DESCRIPTOR_SET,
        include_str!("contract.rs"),
        &["example.orders.v1.Orders"],
    );
}

/// Create (idempotent by id), get, list by pages and cancel behave as the
/// proto says; the product is read from the data service as the caller, so
/// an order can only name a product of its own tenant's catalog; and one
/// tenant never sees, changes or collides with another's orders.
#[tokio::test]
async fn a_tenants_orders_are_its_own() {
    let mesh = TestMesh::start().await;
    let orders = start(&mesh).await;
    let mut client = orders.client.clone();
    let (a, b) = (mesh.onboard(&unique_tenant("shop")).await, mesh.onboard(&unique_tenant("rival")).await);
    add_product(&mesh, &a.token, "p1").await;

    let placed =
        client.create_order(authed(create("o1", "p1", 2), &a.token)).await.unwrap().into_inner().order.unwrap();
    assert_eq!((placed.status(), placed.quantity, placed.version), (OrderStatus::Placed, 2, 1));
    let again = client.create_order(authed(create("o1", "p1", 2), &a.token)).await.unwrap().into_inner().order;
    assert_eq!(again.as_ref(), Some(&placed), "a retry returns the order");
    expect_code(client.create_order(authed(create("o1", "p1", 3), &a.token)).await, Code::AlreadyExists);
    let got = client.get_order(authed(get("o1"), &a.token)).await.unwrap().into_inner().order;
    assert_eq!(got.as_ref(), Some(&placed));

    // Tenant B: A's order does not exist for it, A's product neither.
    expect_code(client.get_order(authed(get("o1"), &b.token)).await, Code::NotFound);
    assert!(client.list_orders(authed(list(0, ""), &b.token)).await.unwrap().into_inner().orders.is_empty());
    expect_code(
        client.cancel_order(authed(CancelOrderRequest { order_id: "o1".into() }, &b.token)).await,
        Code::NotFound,
    );
    let refused =
        expect_code(client.create_order(authed(create("o1", "p1", 9), &b.token)).await, Code::FailedPrecondition);
    assert!(refused.message().contains("no product p1"), "{refused:?}");
    // With its own product, B's o1 is its own order; A's is unchanged.
    add_product(&mesh, &b.token, "p1").await;
    let theirs =
        client.create_order(authed(create("o1", "p1", 9), &b.token)).await.unwrap().into_inner().order.unwrap();
    assert_eq!((theirs.quantity, theirs.version), (9, 1));
    let ours = client.get_order(authed(get("o1"), &a.token)).await.unwrap().into_inner().order.unwrap();
    assert_eq!(ours, placed);

    // Pages, in id order.
    for id in ["o2", "o3"] {
        client.create_order(authed(create(id, "p1", 1), &a.token)).await.unwrap();
    }
    let first = client.list_orders(authed(list(2, ""), &a.token)).await.unwrap().into_inner();
    assert_eq!(ids(&first.orders), ["o1", "o2"]);
    let rest = client.list_orders(authed(list(2, &first.next_page_token), &a.token)).await.unwrap().into_inner();
    assert_eq!((ids(&rest.orders), rest.next_page_token.as_str()), (vec!["o3"], ""));

    // Cancelling is for tenant admins; a second cancel changes nothing.
    let user = mesh.user_token(&a, &[Role::TenantUser]).await;
    let cancel = || CancelOrderRequest { order_id: "o1".into() };
    expect_code(client.cancel_order(authed(cancel(), &user)).await, Code::PermissionDenied);
    let cancelled = client.cancel_order(authed(cancel(), &a.token)).await.unwrap().into_inner().order.unwrap();
    assert_eq!((cancelled.status(), cancelled.version), (OrderStatus::Cancelled, 2));
    let twice = client.cancel_order(authed(cancel(), &a.token)).await.unwrap().into_inner().order.unwrap();
    assert_eq!(twice, cancelled);
    // A tenant user places and reads orders, as itself.
    client.create_order(authed(create("o4", "p1", 1), &user)).await.unwrap();
    let by_user = client.get_order(authed(get("o4"), &user)).await.unwrap().into_inner().order.unwrap();
    assert!(!placed.created_by.is_empty() && by_user.created_by != placed.created_by, "{by_user:?} {placed:?}");
    let b_orders = client.list_orders(authed(list(0, ""), &b.token)).await.unwrap().into_inner().orders;
    assert_eq!(ids(&b_orders), ["o1"], "B sees its one order only");
}

/// The service's calls are metered per tenant as `orders.<meter>` with
/// the RPC as a dimension, each call once, read back like the data
/// service's usage (another tenant's calls are not in it) and priced.
#[tokio::test]
async fn each_call_is_metered_once_for_its_tenant() {
    use tenantmesh_proto::metering::v1::{GetUsageRequest, Window};
    let mesh = TestMesh::start().await;
    let orders = start(&mesh).await;
    let mut client = orders.client.clone();
    let (a, b) = (mesh.onboard(&unique_tenant("metered")).await, mesh.onboard(&unique_tenant("other")).await);
    add_product(&mesh, &a.token, "p1").await;
    client.create_order(authed(create("m1", "p1", 1), &a.token)).await.unwrap();
    for _ in 0..3 {
        client.get_order(authed(get("m1"), &a.token)).await.unwrap();
    }
    expect_code(client.get_order(authed(get("m1"), &b.token)).await, Code::NotFound);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let usage = |tenant: &TestTenant, group_by: Vec<String>| {
        let req = GetUsageRequest {
            tenant_id: tenant.tenant_id.clone(),
            meter: "orders.requests".into(),
            from: now - 3600,
            to: now + 3600,
            window: Window::Hour as i32,
            group_by,
        };
        authed(req, &tenant.token)
    };
    let mut metering = mesh.metering();
    // Both tenants' counts are in (a later flush may carry B's).
    eventually(std::time::Duration::from_secs(20), || {
        let mut metering = metering.clone();
        let (a_req, b_req) = (usage(&a, vec![]), usage(&b, vec![]));
        async move {
            let sum = |rows: Vec<tenantmesh_proto::metering::v1::UsageRow>| rows.iter().map(|r| r.value).sum::<i64>();
            sum(metering.get_usage(a_req).await.unwrap().into_inner().rows) >= 4
                && sum(metering.get_usage(b_req).await.unwrap().into_inner().rows) >= 1
        }
    })
    .await;
    let rows = metering.get_usage(usage(&a, vec!["rpc".into()])).await.unwrap().into_inner().rows;
    let mut by_rpc: Vec<(String, i64)> = rows.iter().map(|r| (r.dimensions["rpc"].clone(), r.value)).collect();
    by_rpc.sort();
    assert_eq!(by_rpc, [("CreateOrder".to_owned(), 1), ("GetOrder".to_owned(), 3)]);
    let theirs = metering.get_usage(usage(&b, vec![])).await.unwrap().into_inner().rows;
    assert_eq!(theirs.iter().map(|r| r.value).sum::<i64>(), 1, "B's one refused lookup, counted for B alone");
    // Priced, as the built-in pricing file prices the example's requests.
    let cost = tenantmesh_proto::metering::v1::GetTenantCostRequest {
        tenant_id: a.tenant_id.clone(),
        from: now - 3600,
        to: now + 3600,
    };
    let admin = mesh.admin_token().await;
    let cost = metering.get_tenant_cost(authed(cost, &admin)).await.unwrap().into_inner().cost.unwrap();
    let line = cost.lines.iter().find(|l| l.item == "orders.requests").expect("an orders.requests line");
    assert_eq!(line.quantity, 4.0);
    assert!(line.cost > 0.0 && (line.cost - 4.0 * line.unit_price).abs() < 1e-12, "{line:?}");
}

/// Bad input is INVALID_ARGUMENT naming the field; a call without a token
/// is UNAUTHENTICATED and the platform admin, whom no policy of the
/// service names, is refused.
#[tokio::test]
async fn bad_input_and_callers_the_policy_refuses() {
    let mesh = TestMesh::start().await;
    let orders = start(&mesh).await;
    let mut client = orders.client.clone();
    let t = mesh.onboard(&unique_tenant("picky")).await;
    expect_invalid(client.create_order(authed(create("", "p1", 1), &t.token)).await, "order_id");
    expect_invalid(client.create_order(authed(create("o/1", "p1", 1), &t.token)).await, "order_id");
    expect_invalid(client.create_order(authed(create("o1", "", 1), &t.token)).await, "product_id");
    expect_invalid(client.create_order(authed(create("o1", "p1", 0), &t.token)).await, "quantity");
    expect_invalid(client.create_order(authed(create("o1", "p1", 1001), &t.token)).await, "quantity");
    expect_invalid(client.get_order(authed(get("~fence"), &t.token)).await, "order_id");
    expect_invalid(client.list_orders(authed(list(101, ""), &t.token)).await, "page_size");
    expect_invalid(client.list_orders(authed(list(1, "a b"), &t.token)).await, "page_token");
    let bare = tonic::Request::new(get("o1"));
    expect_code(client.get_order(bare).await, Code::Unauthenticated);
    let admin = mesh.admin_token().await;
    expect_code(client.list_orders(authed(list(0, ""), &admin)).await, Code::PermissionDenied);
}

/// A client in another language (Python's grpcio, no generated code)
/// that follows the metadata contract: its token is the identity, a
/// mismatched `x-tenant-id` is refused, no token is UNAUTHENTICATED.
#[tokio::test]
async fn a_python_client_calls_it_by_the_metadata_contract() {
    let mesh = TestMesh::start().await;
    let orders = start(&mesh).await;
    let (t, other) = (mesh.onboard(&unique_tenant("py")).await, mesh.onboard(&unique_tenant("snake")).await);
    add_product(&mesh, &t.token, "p1").await;
    let script = workspace_root().join("services/orders/tests/python_client.py");
    let python = workspace_root().join(".tools/venv/bin/python3");
    assert!(python.exists(), "{} is missing: run `cargo xtask setup`", python.display());
    let out = tokio::process::Command::new(python)
        .arg(script)
        .args([orders.addr.to_string(), t.token.clone(), other.tenant_id.clone()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results["create"], serde_json::json!(["OK", true]), "{results}");
    assert_eq!(results["get"], serde_json::json!(["OK", true]), "{results}");
    assert_eq!(results["no_token"][0], "UNAUTHENTICATED", "{results}");
    assert_eq!(results["other_tenant_header"][0], "PERMISSION_DENIED", "{results}");
    assert_eq!(results["bad_input"][0], "INVALID_ARGUMENT", "{results}");
    // The order is the token's tenant's, whoever wrote the client.
    let got = orders.client.clone().get_order(authed(get("py-1"), &t.token)).await.unwrap().into_inner();
    assert_eq!(got.order.unwrap().quantity, 2);
}

/// On start the service registers itself in the control plane's catalog,
/// with its own identity: what it serves, where, and its tables.
#[tokio::test]
async fn it_registers_itself_in_the_catalog() {
    use tenantmesh_proto::registry::v1::ListServicesRequest;
    let mesh = TestMesh::start().await;
    let orders = start(&mesh).await;
    let admin = mesh.admin_token().await;
    let listed = || {
        let (mut registry, admin) = (mesh.registry(), admin.clone());
        async move { registry.list_services(authed(ListServicesRequest {}, &admin)).await.unwrap().into_inner().services }
    };
    eventually(std::time::Duration::from_secs(10), || async { !listed().await.is_empty() }).await;
    let services = listed().await;
    let orders_entry = services.iter().find(|s| s.name == "orders").expect("orders in the catalog");
    assert_eq!(orders_entry.endpoint, format!("http://{}", orders.addr));
    assert_eq!(orders_entry.grpc_services, ["example.orders.v1.Orders", tenantmesh_app::LIFECYCLE]);
    assert_eq!(
        (orders_entry.tables.as_slice(), orders_entry.registered_by.as_str()),
        (&["orders".to_owned()][..], "service:orders")
    );
}

/// The README's "Build your own service" shows the example's own `main`,
/// not a copy that drifts.
#[test]
fn the_readme_shows_the_services_own_main() {
    let readme = include_str!("../../../README.md");
    let marked = readme.split("<!-- services/orders/src/main.rs -->\n```rust\n").nth(1).expect("the marked block");
    let block = marked.split("```").next().unwrap();
    assert!(include_str!("../src/main.rs").contains(block), "the README's block is not in main.rs:\n{block}");
}

/// As grpcurl (a client in no language of ours) sees the service:
/// reflection lists it beside health and describes each RPC's policy, and
/// a call with a token gets the proto's answer.
#[tokio::test]
async fn grpcurl_lists_describes_and_calls_it() {
    let mesh = TestMesh::start().await;
    let orders = start(&mesh).await;
    let t = mesh.onboard(&unique_tenant("curl")).await;
    let addr = orders.addr.to_string();
    let grpcurl = |args: Vec<String>| {
        let mut cmd = tokio::process::Command::new(tool("grpcurl"));
        cmd.arg("-plaintext").args(args);
        async move { cmd.output().await.unwrap() }
    };
    let listed = grpcurl(vec![addr.clone(), "list".into()]).await;
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(listed.contains("example.orders.v1.Orders") && listed.contains("grpc.health.v1.Health"), "{listed}");
    let described = grpcurl(vec![addr.clone(), "describe".into(), "example.orders.v1.Orders.CancelOrder".into()]).await;
    let described = String::from_utf8_lossy(&described.stdout).to_string();
    assert!(described.contains("ROLE_TENANT_ADMIN") && !described.contains("ROLE_TENANT_USER"), "{described}");
    let bearer = format!("authorization: Bearer {}", t.token);
    let args = ["-H", &bearer, "-d", r#"{"order_id":"g1"}"#, &addr, "example.orders.v1.Orders/GetOrder"];
    let missing = grpcurl(args.iter().map(|a| a.to_string()).collect()).await;
    let stderr = String::from_utf8_lossy(&missing.stderr).to_string();
    assert!(!missing.status.success() && stderr.contains("NotFound") && stderr.contains("no order g1"), "{stderr}");
}

/// Random operations of three tenants on the data service (their product
/// catalogs) and the orders service, against a model of what each tenant
/// wrote, with tier changes (pool, bridge, silo) and restores to an
/// earlier instant in between: every answer is the model's, so no tenant
/// ever sees, changes or collides with another's orders or products, no
/// write is lost or stale across a move, and a restore brings back exactly
/// what the tenant had then, in both services. The ids are drawn from a few
/// names, so the tenants keep using the same ones. The seed is printed;
/// `TENANTMESH_TEST_SEED` replays one.
#[tokio::test]
async fn random_operations_of_several_tenants_stay_apart() {
    use std::collections::{BTreeMap, HashSet};
    let seed: u64 = std::env::var("TENANTMESH_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("TENANTMESH_TEST_SEED={seed}");
    let mut state = seed;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mesh = TestMesh::start().await;
    let orders = start_registered(&mesh).await;
    let mut client = orders.client.clone();
    let admin = mesh.admin_token().await;
    let mut tenants = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        tenants.push(mesh.onboard(&unique_tenant(name)).await);
    }
    // Per tenant: its products, and its orders (product, quantity, cancelled).
    let mut products: Vec<HashSet<String>> = vec![HashSet::new(); 3];
    let mut placed: Vec<BTreeMap<String, (String, u32, bool)>> = vec![BTreeMap::new(); 3];
    // Per tenant: its tier, and an instant with what it had then.
    let mut tiers = ["standard"; 3];
    type Snapshot = (prost_types::Timestamp, HashSet<String>, BTreeMap<String, (String, u32, bool)>);
    let mut snapshots: Vec<Option<Snapshot>> = vec![None; 3];
    let (mut moves, mut restores) = (0, 0);
    for step in 0..150 {
        let t = next(3) as usize;
        let token = &tenants[t].token;
        let (order_id, product_id) = (format!("o{}", next(5)), format!("p{}", next(3)));
        let context = format!("seed {seed}, step {step}, tenant {t} ({})", tiers[t]);
        let op = match next(40) {
            // A lifecycle change now and then; the tenant's own operations otherwise.
            0 | 1 => 5,
            2..=5 => 6,
            n => n % 5,
        };
        match op {
            5 => {
                let tier = ["basic", "premium", "enterprise"][next(3) as usize];
                if tier == tiers[t] {
                    continue;
                }
                let req = ChangeTierRequest { tenant_id: tenants[t].tenant_id.clone(), tier: tier.into() };
                let id = mesh.onboarding().change_tier(authed(req, &admin)).await.unwrap().into_inner().workflow_id;
                let wf = mesh.wait_workflow(&id).await;
                assert_eq!(wf.status(), WorkflowStatus::Succeeded, "{context}: to {tier}: {wf:?}");
                tiers[t] = tier;
                moves += 1;
                // Every service's view of the tenant catches up (its cache's TTL).
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            6 => match snapshots[t].take() {
                // Back to the instant: products and orders as they were then.
                Some((at, then_products, then_placed)) => {
                    let req = RestoreTenantRequest {
                        tenant_id: tenants[t].tenant_id.clone(),
                        point_in_time: Some(at),
                        target: 0,
                    };
                    let id = mesh.onboarding().restore_tenant(authed(req, &admin)).await.unwrap().into_inner();
                    let wf = mesh.wait_workflow(&id.workflow_id).await;
                    assert_eq!(wf.status(), WorkflowStatus::Succeeded, "{context}: restore: {wf:?}");
                    (products[t], placed[t]) = (then_products, then_placed);
                    restores += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                // An instant to come back to, once the tenant has written to both.
                None if !products[t].is_empty() && !placed[t].is_empty() => {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    let us = tenantmesh_app::history::now_us();
                    let at = prost_types::Timestamp { seconds: us / 1_000_000, nanos: (us % 1_000_000) as i32 * 1000 };
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    snapshots[t] = Some((at, products[t].clone(), placed[t].clone()));
                }
                None => {}
            },
            0 => {
                add_product(&mesh, token, &product_id).await;
                products[t].insert(product_id);
            }
            1 => {
                let quantity = 1 + next(3) as u32;
                let got = client.create_order(authed(create(&order_id, &product_id, quantity), token)).await;
                let want = match placed[t].get(&order_id) {
                    _ if !products[t].contains(&product_id) => Err(Code::FailedPrecondition),
                    Some((p, q, _)) if (p, *q) == (&product_id, quantity) => Ok(()),
                    Some(_) => Err(Code::AlreadyExists),
                    None => Ok(()),
                };
                assert_eq!(got.as_ref().map(|_| ()).map_err(|s| s.code()), want, "{context}: create {order_id}");
                if want.is_ok() {
                    placed[t].entry(order_id).or_insert((product_id, quantity, false));
                }
            }
            2 => {
                let got = client.get_order(authed(get(&order_id), token)).await;
                match placed[t].get(&order_id) {
                    Some((p, q, cancelled)) => {
                        let o = got.unwrap().into_inner().order.unwrap();
                        let status = if *cancelled { OrderStatus::Cancelled } else { OrderStatus::Placed };
                        assert_eq!(
                            (&o.product_id, o.quantity, o.status()),
                            (p, *q, status),
                            "{context}: get {order_id}"
                        );
                    }
                    None => assert_eq!(got.map(|_| ()).map_err(|s| s.code()), Err(Code::NotFound), "{context}"),
                }
            }
            3 => {
                let got = client.cancel_order(authed(CancelOrderRequest { order_id: order_id.clone() }, token)).await;
                match placed[t].get_mut(&order_id) {
                    Some(order) => {
                        assert_eq!(
                            got.unwrap().into_inner().order.unwrap().status(),
                            OrderStatus::Cancelled,
                            "{context}"
                        );
                        order.2 = true;
                    }
                    None => assert_eq!(got.map(|_| ()).map_err(|s| s.code()), Err(Code::NotFound), "{context}"),
                }
            }
            _ => {
                let listed = client.list_orders(authed(list(100, ""), token)).await.unwrap().into_inner().orders;
                let got: Vec<(String, String, u32, bool)> = listed
                    .iter()
                    .map(|o| {
                        (o.order_id.clone(), o.product_id.clone(), o.quantity, o.status() == OrderStatus::Cancelled)
                    })
                    .collect();
                let want: Vec<(String, String, u32, bool)> =
                    placed[t].iter().map(|(id, (p, q, c))| (id.clone(), p.clone(), *q, *c)).collect();
                assert_eq!(got, want, "{context}: list");
            }
        }
    }
    eprintln!("{moves} tier changes, {restores} restores");
    // Each tenant's products, as the data service has them, are the model's.
    for (t, tenant) in tenants.iter().enumerate() {
        let req = tenantmesh_proto::data::v1::QueryItemsRequest {
            collection: "products".into(),
            id_prefix: String::new(),
            page_size: 100,
            page_token: String::new(),
        };
        let items = mesh.data().query_items(authed(req, &tenant.token)).await.unwrap().into_inner().items;
        let got: HashSet<String> = items.into_iter().map(|i| i.id).collect();
        assert_eq!(got, products[t], "seed {seed}: tenant {t}'s products");
    }
}
