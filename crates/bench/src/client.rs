//! Calls a benchmark makes to set a mesh up: log in, onboard tenants, seed
//! items, and the requests the load generator sends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tenantmesh_proto::auth::v1::LoginRequest;
use tenantmesh_proto::auth::v1::auth_client::AuthClient;
use tenantmesh_proto::data::v1::data_client::DataClient;
use tenantmesh_proto::data::v1::{GetItemRequest, PutItemRequest, QueryItemsRequest};
use tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient;
use tenantmesh_proto::onboarding::v1::{GetOnboardingStatusRequest, RegisterTenantRequest, WorkflowStatus};
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{SetTenantLimitsRequest, TenantLimits};
use tonic::transport::Channel;

use crate::load::{CallFn, Method, frame};
use crate::procs::ADMIN_PASSWORD;

pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

pub fn lazy(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(url(addr)).expect("endpoint").connect_lazy()
}

/// A request with `authorization: Bearer <token>`.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii token"));
    req
}

pub async fn login(auth: SocketAddr, tenant: &str, email: &str, password: &str) -> Result<String, String> {
    let req = LoginRequest { tenant_id: tenant.into(), email: email.into(), password: password.into() };
    let resp = AuthClient::new(lazy(auth)).login(req).await.map_err(|s| format!("login {email}: {s:?}"))?;
    Ok(resp.into_inner().access_token)
}

pub async fn platform_admin(auth: SocketAddr) -> Result<String, String> {
    login(auth, "platform", "admin@platform.local", ADMIN_PASSWORD).await
}

/// Starts onboarding `tenant` on `tier` (its admin's password is
/// `<tenant>-password`).
pub async fn register(
    onboarding: &mut OnboardingClient<Channel>,
    admin: &str,
    tenant: &str,
    tier: &str,
) -> Result<(), String> {
    let req = RegisterTenantRequest {
        tenant_id: tenant.into(),
        name: format!("Bench {tenant}"),
        tier: tier.into(),
        admin_email: format!("admin@{tenant}.example"),
        admin_password: format!("{tenant}-password"),
        idempotency_key: format!("bench-{tenant}"),
    };
    onboarding.register_tenant(authed(req, admin)).await.map_err(|s| format!("register {tenant}: {s:?}"))?;
    Ok(())
}

/// Onboards `tenant` with limits far above what one machine serves (the
/// throughput scenarios measure the request path, the limiter's check
/// included, not a tier's quota), and returns its admin's token.
pub async fn onboard(addrs: &crate::procs::MeshAddrs, admin: &str, tenant: &str, tier: &str) -> Result<String, String> {
    let token = onboard_on_tier(addrs, admin, tenant, tier).await?;
    let limits = TenantLimits {
        requests_per_second: 1_000_000_000,
        burst: 1_000_000_000,
        max_concurrency: 1_000_000,
        storage_quota_bytes: 1 << 50,
    };
    let req = SetTenantLimitsRequest { tenant_id: tenant.into(), limits: Some(limits) };
    let mut registry = TenantRegistryClient::new(lazy(addrs.registry));
    registry.set_tenant_limits(authed(req, admin)).await.map_err(|s| format!("limits of {tenant}: {s:?}"))?;
    Ok(token)
}

/// Onboards `tenant` on `tier` (with the tier's limits), waits until its
/// workflow succeeded and returns its admin's token.
pub async fn onboard_on_tier(
    addrs: &crate::procs::MeshAddrs,
    admin: &str,
    tenant: &str,
    tier: &str,
) -> Result<String, String> {
    let mut onboarding = OnboardingClient::new(lazy(addrs.onboarding));
    register(&mut onboarding, admin, tenant, tier).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let req = GetOnboardingStatusRequest { tenant_id: tenant.into() };
        let status = onboarding.get_onboarding_status(authed(req, admin)).await.map_err(|s| format!("{s:?}"))?;
        match WorkflowStatus::try_from(status.get_ref().status) {
            Ok(WorkflowStatus::Succeeded) => break,
            Ok(WorkflowStatus::Failed) => {
                return Err(format!("onboarding {tenant} failed: {}", status.get_ref().error));
            }
            _ if tokio::time::Instant::now() > deadline => return Err(format!("onboarding {tenant} timed out")),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    login(addrs.auth, tenant, &format!("admin@{tenant}.example"), &format!("{tenant}-password")).await
}

/// A `google.protobuf.Struct` of string fields.
pub fn attributes(fields: &[(&str, String)]) -> prost_types::Struct {
    prost_types::Struct {
        fields: fields
            .iter()
            .map(|(k, v)| {
                ((*k).to_owned(), prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(v.clone())) })
            })
            .collect(),
    }
}

/// The item every GetItem benchmark reads: about 200 bytes encoded.
pub fn sample_item(id: &str) -> PutItemRequest {
    PutItemRequest {
        collection: "notes".into(),
        id: id.into(),
        attributes: Some(attributes(&[
            ("title", "Quarterly planning notes".into()),
            ("owner", "user-7f3a9c".into()),
            ("body", "x".repeat(120)),
        ])),
        expected_version: None,
    }
}

/// Writes `req` through `channel` (with `token` when it is not empty).
pub async fn put(channel: Channel, token: &str, req: PutItemRequest) -> Result<(), String> {
    let req = if token.is_empty() { tonic::Request::new(req) } else { authed(req, token) };
    DataClient::new(channel).put_item(req).await.map(|_| ()).map_err(|s| format!("put: {s:?}"))
}

/// `QUERY_ITEMS` small items in collection `q` for the QueryItems benchmark.
pub const QUERY_ITEMS: usize = 20;

pub async fn seed(channel: Channel, token: &str) -> Result<(), String> {
    put(channel.clone(), token, sample_item("n1")).await?;
    for i in 0..QUERY_ITEMS {
        let req = PutItemRequest {
            collection: "q".into(),
            id: format!("item-{i:03}"),
            attributes: Some(attributes(&[("name", format!("small item {i}")), ("n", i.to_string())])),
            expected_version: None,
        };
        put(channel.clone(), token, req).await?;
    }
    Ok(())
}

/// The benchmarked calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    GetItem,
    PutItem,
    QueryItems,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::GetItem => "GetItem",
            Op::PutItem => "PutItem",
            Op::QueryItems => "QueryItems",
        }
    }

    /// The call, carrying `token` (empty: none).
    pub fn call(self, token: &str) -> CallFn {
        match self {
            Op::GetItem => {
                let method = Method::new("/tenantmesh.data.v1.Data/GetItem", token);
                let body = frame(&GetItemRequest { collection: "notes".into(), id: "n1".into() });
                Arc::new(move |conn, _| {
                    let (method, body) = (method.clone(), body.clone());
                    Box::pin(async move { method.call(conn, body).await })
                })
            }
            Op::PutItem => {
                let method = Method::new("/tenantmesh.data.v1.Data/PutItem", token);
                Arc::new(move |conn, seq| {
                    let mut item = sample_item(&format!("p{}", seq % 1000));
                    item.collection = "writes".into();
                    let (method, body) = (method.clone(), frame(&item));
                    Box::pin(async move { method.call(conn, body).await })
                })
            }
            Op::QueryItems => {
                let method = Method::new("/tenantmesh.data.v1.Data/QueryItems", token);
                let body = frame(&QueryItemsRequest {
                    collection: "q".into(),
                    id_prefix: String::new(),
                    page_size: QUERY_ITEMS as i32,
                    page_token: String::new(),
                });
                Arc::new(move |conn, _| {
                    let (method, body) = (method.clone(), body.clone());
                    Box::pin(async move { method.call(conn, body).await })
                })
            }
        }
    }
}

/// The example application's `GetOrder` of order `o1`, carrying `token`.
pub fn get_order(token: &str) -> CallFn {
    let method = Method::new("/example.orders.v1.Orders/GetOrder", token);
    let body = frame(&tenantmesh_orders::proto::GetOrderRequest { order_id: "o1".into() });
    Arc::new(move |conn, _| {
        let (method, body) = (method.clone(), body.clone());
        Box::pin(async move { method.call(conn, body).await })
    })
}

/// Order `o1` of product `p1` (which it puts in the tenant's catalog at
/// `data`, when given) at the orders service on `orders`.
pub async fn seed_order(data: Option<Channel>, orders: Channel, token: &str) -> Result<(), String> {
    use tenantmesh_orders::proto::{CreateOrderRequest, orders_client::OrdersClient};
    if let Some(data) = data {
        put(data, token, PutItemRequest { collection: "products".into(), id: "p1".into(), ..Default::default() })
            .await?;
    }
    let create = CreateOrderRequest { order_id: "o1".into(), product_id: "p1".into(), quantity: 2 };
    OrdersClient::new(orders).create_order(authed(create, token)).await.map_err(|s| format!("CreateOrder: {s:?}"))?;
    Ok(())
}

pub fn code<T>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}
