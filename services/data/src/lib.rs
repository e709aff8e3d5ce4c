//! The data service: a tenant's items, keyed `pk = <tenant id>`,
//! `sk = <collection>#<id>`. The tenant always comes from the verified
//! [`TenantContext`], never from the request, so no request can name
//! another tenant's items; and every storage call goes through the store
//! [`TenantStores`] hands out for that tenant, confined by the tenant's
//! session policy (checked locally on the embedded backend; vended STS
//! credentials plus a request guard on DynamoDB), so even a bug here cannot
//! reach another tenant's partition.
#![forbid(unsafe_code)]

mod error;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use prost::Message as _;
use tenantmesh_isolation::TenantStores;
use tenantmesh_isolation::backend::StorageConfig;
use tenantmesh_proto::data::v1::data_server::{Data, DataServer};
use tenantmesh_proto::data::v1::*;
use tenantmesh_storage::{Condition, DynTable, Query, StorageError};
use tenantmesh_tenant_context::TenantContext;
use tenantmesh_tenant_context::config::{CommonConfig, ConfigError, DATA_PORT};
use tenantmesh_tenant_context::errors::{Violations, invalid_field};
use tenantmesh_tenant_context::paging;
use tenantmesh_tenant_context::server::Authenticator;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

pub use error::DataError;

/// Largest encoded item accepted (DynamoDB's item limit).
pub const MAX_ITEM_BYTES: usize = 400 * 1024;
const MAX_COLLECTION_LEN: usize = 64;
const MAX_ID_LEN: usize = 256;

/// Data service settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub storage: StorageConfig,
}

impl Config {
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Ok(Self { common: CommonConfig::from_env(env, DATA_PORT)?, storage: StorageConfig::from_env(env)? })
    }
}

/// The data service's state: tenant-confined views of its pooled table.
#[derive(Clone)]
pub struct DataService {
    stores: Arc<dyn TenantStores>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

fn check_name(v: &mut Violations, field: &str, value: &str, max: usize, extra: &[char], required: bool) {
    if value.is_empty() {
        if required {
            v.add(field, "is required");
        }
        return;
    }
    if value.len() > max {
        v.add(field, format!("must be at most {max} characters"));
    } else if !value.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c) || extra.contains(&c)) {
        let allowed: String = extra.iter().collect();
        v.add(field, format!("may contain only letters, digits and _.-{allowed}"));
    }
}

const ID_EXTRA: &[char] = &[':', '@'];

/// Violations of an item's collection and id, to add more to.
fn item_key(collection: &str, id: &str) -> Violations {
    let mut v = Violations::new();
    check_name(&mut v, "collection", collection, MAX_COLLECTION_LEN, &[], true);
    check_name(&mut v, "id", id, MAX_ID_LEN, ID_EXTRA, true);
    v
}

fn sort_key(collection: &str, id: &str) -> String {
    format!("{collection}#{id}")
}

fn decode_item(raw: &tenantmesh_storage::Item) -> Result<Item, DataError> {
    let mut item = Item::decode(raw.data.as_slice()).map_err(|e| DataError::Corrupt(e.to_string()))?;
    item.version = raw.version;
    Ok(item)
}

impl DataService {
    pub fn new(stores: Arc<dyn TenantStores>) -> Self {
        Self { stores }
    }

    /// The store as the calling tenant may see it.
    async fn scoped<T>(&self, request: &Request<T>) -> Result<(String, DynTable), Status> {
        let tenant = TenantContext::from_request(request)?.tenant_id.clone();
        let table = self.stores.store_for(&tenant).await.map_err(|e| {
            tracing::error!(error = %e, "cannot build the tenant's session policy");
            Status::internal("internal error")
        })?;
        Ok((tenant, table))
    }
}

#[tonic::async_trait]
impl Data for DataService {
    async fn put_item(&self, request: Request<PutItemRequest>) -> Result<Response<PutItemResponse>, Status> {
        let (tenant, store) = self.scoped(&request).await?;
        let req = request.into_inner();
        let mut v = item_key(&req.collection, &req.id);
        let mut item = Item {
            collection: req.collection,
            id: req.id,
            attributes: Some(req.attributes.unwrap_or_default()),
            version: 0,
            update_time_ms: now_ms(),
        };
        let size = item.encoded_len();
        if size > MAX_ITEM_BYTES {
            v.add("attributes", format!("item is {size} bytes; the limit is {MAX_ITEM_BYTES}"));
        }
        v.check()?;
        let condition = match req.expected_version {
            Some(expected) => Condition::Version(expected),
            None => Condition::None,
        };
        let sk = sort_key(&item.collection, &item.id);
        let stored = store.put(&tenant, &sk, item.encode_to_vec(), condition).await.map_err(|e| match e {
            StorageError::ConditionFailed { current, .. } => {
                DataError::VersionMismatch { expected: req.expected_version.unwrap_or_default(), current }
            }
            e => e.into(),
        })?;
        item.version = stored.version;
        tracing::debug!(collection = %item.collection, version = item.version, "item written");
        Ok(Response::new(PutItemResponse { item: Some(item) }))
    }

    async fn get_item(&self, request: Request<GetItemRequest>) -> Result<Response<GetItemResponse>, Status> {
        let (tenant, store) = self.scoped(&request).await?;
        let req = request.into_inner();
        item_key(&req.collection, &req.id).check()?;
        let raw = store
            .get(&tenant, &sort_key(&req.collection, &req.id))
            .await
            .map_err(DataError::from)?
            .ok_or(DataError::NotFound)?;
        Ok(Response::new(GetItemResponse { item: Some(decode_item(&raw)?) }))
    }

    async fn delete_item(&self, request: Request<DeleteItemRequest>) -> Result<Response<DeleteItemResponse>, Status> {
        let (tenant, store) = self.scoped(&request).await?;
        let req = request.into_inner();
        item_key(&req.collection, &req.id).check()?;
        let condition = match req.expected_version {
            Some(0) => {
                return Err(invalid_field("expected_version", "must be at least 1 to delete"));
            }
            Some(expected) => Condition::Version(expected),
            None => Condition::Exists,
        };
        let sk = sort_key(&req.collection, &req.id);
        match store.delete(&tenant, &sk, condition).await {
            Ok(_) => Ok(Response::new(DeleteItemResponse {})),
            Err(StorageError::ConditionFailed { current: None, .. }) => Err(DataError::NotFound.into()),
            Err(StorageError::ConditionFailed { current, .. }) => {
                Err(DataError::VersionMismatch { expected: req.expected_version.unwrap_or_default(), current }.into())
            }
            Err(e) => Err(DataError::from(e).into()),
        }
    }

    async fn query_items(&self, request: Request<QueryItemsRequest>) -> Result<Response<QueryItemsResponse>, Status> {
        let (tenant, store) = self.scoped(&request).await?;
        let req = request.into_inner();
        let mut v = Violations::new();
        check_name(&mut v, "collection", &req.collection, MAX_COLLECTION_LEN, &[], true);
        check_name(&mut v, "id_prefix", &req.id_prefix, MAX_ID_LEN, ID_EXTRA, false);
        let limit = paging::page_size(&mut v, req.page_size);
        let sk_prefix = sort_key(&req.collection, &req.id_prefix);
        let start_after = paging::decode_token(&mut v, &req.page_token, &sk_prefix);
        v.check()?;
        let page = store.query(Query { pk: tenant, sk_prefix, start_after, limit }).await.map_err(DataError::from)?;
        let items = page.items.iter().map(decode_item).collect::<Result<Vec<_>, _>>()?;
        let next_page_token = page.last_evaluated.as_deref().map(paging::encode_token).unwrap_or_default();
        Ok(Response::new(QueryItemsResponse { items, next_page_token }))
    }
}

/// Opens the pooled data table on the configured backend, as per-tenant
/// policy-confined stores.
pub async fn open_store(config: &Config) -> Result<Arc<dyn TenantStores>, Box<dyn std::error::Error + Send + Sync>> {
    config.storage.tenant_stores(&config.common, "data").await
}

/// Runs the data service on `listener` until `shutdown` completes.
pub async fn serve(
    config: Config,
    stores: Arc<dyn TenantStores>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let authn = Authenticator::remote(&config.common)?;
    tenantmesh_tenant_context::runtime::serve(
        listener,
        DataServer::new(DataService::new(stores)),
        authn,
        config.common.shutdown_grace,
        shutdown,
    )
    .await?;
    Ok(())
}
