//! Contract tests of `tenantmesh.lifecycle.v1.TenantLifecycle`, which the
//! app crate serves on every application service (here the example
//! `orders`): every RPC, with the identity the workflows call it with
//! (scope lifecycle), its bad input, and what it does to one tenant's
//! items and nobody else's.

use tenantmesh_orders::proto::{CreateOrderRequest, GetOrderRequest};
use tenantmesh_proto::lifecycle::v1::tenant_lifecycle_client::TenantLifecycleClient;
use tenantmesh_proto::lifecycle::v1::*;
use tenantmesh_proto::registry::v1::{IsolationModel, Placement};
use tenantmesh_test_support::*;
use tonic::Code;
use tonic::transport::Channel;

use crate::orders_contract::{add_product, start};

fn at(model: IsolationModel) -> Option<Placement> {
    Some(Placement { model: model as i32, ..Default::default() })
}

fn pool() -> Option<Placement> {
    at(IsolationModel::Pool)
}

/// Every item of `tenant` the service exports at `placement` (`history`:
/// with the change history).
async fn exported(
    client: &mut TenantLifecycleClient<Channel>,
    token: &str,
    tenant: &str,
    placement: Option<Placement>,
    history: bool,
) -> Vec<TableItem> {
    let req = ExportTenantRequest { tenant_id: tenant.into(), placement, include_history: history, as_of_us: None };
    let mut pages = client.export_tenant(authed(req, token)).await.unwrap().into_inner();
    let mut items = Vec::new();
    while let Some(page) = pages.message().await.unwrap() {
        items.extend(page.items);
    }
    items
}

#[test]
fn every_rpc_has_a_contract_test() {
    assert_contract_covers(include_str!("lifecycle_contract.rs"), &["tenantmesh.lifecycle.v1.TenantLifecycle"]);
}

/// Bad input is INVALID_ARGUMENT naming the field, before anything is done.
#[tokio::test]
async fn bad_input_names_the_field() {
    let mesh = TestMesh::start().await;
    let orders = start(&mesh).await;
    let token = mesh.service_token_as("tests-lifecycle").await;
    let mut client = TenantLifecycleClient::new(TestMesh::channel(orders.addr));
    let tenant = unique_tenant("bad");
    let provision = |tenant: &str, tier: &str, placement| ProvisionTenantRequest {
        tenant_id: tenant.into(),
        tier: tier.into(),
        placement,
    };
    expect_invalid(client.provision_tenant(authed(provision("Bad*", "basic", pool()), &token)).await, "tenant_id");
    expect_invalid(client.provision_tenant(authed(provision(&tenant, "basic", None), &token)).await, "placement");
    let unknown = Some(Placement { model: 42, ..Default::default() });
    expect_invalid(
        client.provision_tenant(authed(provision(&tenant, "basic", unknown), &token)).await,
        "placement.model",
    );
    expect_invalid(client.provision_tenant(authed(provision(&tenant, "", pool()), &token)).await, "tier");
    let fence = FenceTenantRequest { tenant_id: "".into(), placement: pool(), raised: true };
    expect_invalid(client.fence_tenant(authed(fence, &token)).await, "tenant_id");
    let both =
        ExportTenantRequest { tenant_id: tenant.clone(), placement: pool(), include_history: true, as_of_us: Some(1) };
    expect_invalid(client.export_tenant(authed(both, &token)).await, "include_history");
    let item =
        |table: &str, key: &str, version| TableItem { table: table.into(), key: key.into(), version, data: vec![] };
    for (bad, field) in [
        (item("invoices", "o1", 1), "items[0].table"),
        (item("orders", "~fence", 1), "items[0].key"),
        (item("orders", "", 1), "items[0].key"),
        (item("orders", "o1", 0), "items[0].version"),
    ] {
        let req = ImportTenantRequest { tenant_id: tenant.clone(), placement: pool(), items: vec![bad] };
        expect_invalid(client.import_tenant(authed(req, &token)).await, field);
    }
    let many =
        ImportTenantRequest { tenant_id: tenant.clone(), placement: pool(), items: vec![item("orders", "o", 1); 501] };
    expect_invalid(client.import_tenant(authed(many, &token)).await, "items");
    let rewind = RewindTenantRequest { tenant_id: tenant.clone(), placement: pool(), point_in_time_us: 0 };
    expect_invalid(client.rewind_tenant(authed(rewind, &token)).await, "point_in_time_us");
    let purge = PurgeTenantRequest { tenant_id: tenant.clone(), placement: None };
    expect_invalid(client.purge_tenant(authed(purge, &token)).await, "placement");
    // A tenant's own admin may not call it at all.
    let t = mesh.onboard(&unique_tenant("own")).await;
    let req = FenceTenantRequest { tenant_id: t.tenant_id.clone(), placement: pool(), raised: true };
    expect_code(client.fence_tenant(authed(req, &t.token)).await, Code::PermissionDenied);
}

/// What each RPC does, on one tenant, with a neighbour in the same pooled
/// table that never notices: provision makes the tenant's own table once;
/// the fence refuses its writes until lowered; export, import (a copy to
/// its own table, history included), rewind and purge.
#[tokio::test]
async fn each_rpc_acts_on_one_tenant_only() {
    let mesh = TestMesh::start().await;
    let orders = start(&mesh).await;
    let token = mesh.service_token_as("tests-lifecycle").await;
    let mut client = TenantLifecycleClient::new(TestMesh::channel(orders.addr));
    let (a, b) = (mesh.onboard(&unique_tenant("life")).await, mesh.onboard(&unique_tenant("nbr")).await);
    let order = |id: &str| CreateOrderRequest { order_id: id.into(), product_id: "p1".into(), quantity: 1 };
    for t in [&a, &b] {
        add_product(&mesh, &t.token, "p1").await;
        orders.client.clone().create_order(authed(order("o1"), &t.token)).await.unwrap();
    }

    // Provision: the tenant's own table, once.
    let bridge = at(IsolationModel::Bridge);
    let req =
        || ProvisionTenantRequest { tenant_id: a.tenant_id.clone(), tier: "premium".into(), placement: bridge.clone() };
    let first = client.provision_tenant(authed(req(), &token)).await.unwrap().into_inner();
    assert_eq!(first.tables, [format!("tenantmesh-tenant-{}-bridge-orders-orders", a.tenant_id)]);
    assert_eq!((first.created, first.detail.as_str()), (1, "on its own tables"));
    assert_eq!(client.provision_tenant(authed(req(), &token)).await.unwrap().into_inner().created, 0);

    // Fence: A's writes are refused (UNAVAILABLE), B's go on; lowered, A's go.
    let fence = |raised| FenceTenantRequest { tenant_id: a.tenant_id.clone(), placement: pool(), raised };
    assert_eq!(client.fence_tenant(authed(fence(true), &token)).await.unwrap().into_inner().changed, 1);
    assert_eq!(client.fence_tenant(authed(fence(true), &token)).await.unwrap().into_inner().changed, 0);
    expect_code(orders.client.clone().create_order(authed(order("o2"), &a.token)).await, Code::Unavailable);
    orders.client.clone().create_order(authed(order("o2"), &b.token)).await.unwrap();
    client.fence_tenant(authed(fence(false), &token)).await.unwrap();
    orders.client.clone().create_order(authed(order("o2"), &a.token)).await.unwrap();

    // Export: A's orders only; with history, their entries too.
    let items = exported(&mut client, &token, &a.tenant_id, pool(), false).await;
    let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["o1", "o2"]);
    assert!(items.iter().all(|i| i.table == "orders" && i.version == 1));
    let with_history = exported(&mut client, &token, &a.tenant_id, pool(), true).await;
    assert!(with_history.len() > items.len() && with_history.iter().any(|i| i.key.starts_with("~u#")));

    // Import into A's own table: the copy a tier change makes.
    let req =
        ImportTenantRequest { tenant_id: a.tenant_id.clone(), placement: bridge.clone(), items: with_history.clone() };
    assert_eq!(
        client.import_tenant(authed(req, &token)).await.unwrap().into_inner().imported as usize,
        with_history.len()
    );
    let copied = exported(&mut client, &token, &a.tenant_id, bridge.clone(), true).await;
    assert_eq!(copied, with_history, "an exact copy, history included");

    // Rewind: to before o2, o2 is gone (in the pooled table); B keeps its o2.
    let before_o2 = copied.iter().filter(|i| i.key.starts_with("~u#")).map(|i| i.key.clone()).collect::<Vec<_>>();
    let second_entry: i64 = before_o2[1][3..19].parse().unwrap();
    let rewind =
        RewindTenantRequest { tenant_id: a.tenant_id.clone(), placement: pool(), point_in_time_us: second_entry - 1 };
    let done = client.rewind_tenant(authed(rewind, &token)).await.unwrap().into_inner();
    assert_eq!((done.restored, done.deleted), (0, 1));
    let get = |t: &TestTenant, id: &str| {
        let (mut c, req) = (orders.client.clone(), authed(GetOrderRequest { order_id: id.into() }, &t.token));
        async move { c.get_order(req).await.map(drop).map_err(|s| s.code()) }
    };
    assert_eq!(get(&a, "o2").await, Err(Code::NotFound));
    assert_eq!(get(&b, "o2").await, Ok(()));
    let too_early = RewindTenantRequest { tenant_id: a.tenant_id.clone(), placement: pool(), point_in_time_us: 1 };
    expect_code(client.rewind_tenant(authed(too_early, &token)).await, Code::FailedPrecondition);

    // Purge: A's own table dropped, its pooled items deleted; B untouched.
    let purge = |placement| PurgeTenantRequest { tenant_id: a.tenant_id.clone(), placement };
    let dropped = client.purge_tenant(authed(purge(bridge.clone()), &token)).await.unwrap().into_inner();
    assert_eq!((dropped.dropped, dropped.tables.len()), (1, 1));
    let again = client.purge_tenant(authed(purge(bridge.clone()), &token)).await.unwrap().into_inner();
    assert_eq!((again.dropped, again.tables.len()), (0, 1), "gone already; still named");
    let deleted = client.purge_tenant(authed(purge(pool()), &token)).await.unwrap().into_inner();
    assert!(deleted.deleted >= 1, "{deleted:?}");
    assert!(exported(&mut client, &token, &a.tenant_id, pool(), true).await.is_empty());
    assert_eq!(get(&a, "o1").await, Err(Code::NotFound));
    assert_eq!((get(&b, "o1").await, get(&b, "o2").await), (Ok(()), Ok(())));
}
