//! The data service: a tenant's items, keyed `pk = <tenant id>`,
//! `sk = <collection>#<id>`. The tenant always comes from the verified
//! [`TenantContext`], never from the request, so no request can name
//! another tenant's items; and every storage call goes through the store
//! [`TenantStores`] hands out for that tenant, confined by the tenant's
//! session policy (checked locally on the embedded backend; vended STS
//! credentials plus a request guard on DynamoDB), so even a bug here cannot
//! reach another tenant's partition.
//!
//! Placement: a pool tenant's items are in the pooled table; a bridge
//! tenant's in its dedicated table; a silo tenant's in its dedicated table
//! behind its own data-service instance (`TENANTMESH_SILO_TENANT`), to which
//! this service forwards the tenant's calls with their context (same token,
//! same trace). While a tier change moves a tenant (status MIGRATING),
//! reads are served and writes are UNAVAILABLE with RetryInfo.
//!
//! The fence: a service that has not yet seen MIGRATING (its cached record
//! is older) would still write, so the status alone cannot keep a late
//! write out of a copy. Every PutItem and DeleteItem is therefore one
//! atomic step with a check of the tenant's fence item ([`FENCE_SK`]) in
//! the table it writes to; a workflow raises that fence (`SetFence`) before
//! it copies or exports, and from then on a write to the old table is
//! refused (UNAVAILABLE with RetryInfo) instead of landing where no copy
//! will see it. The client's retry reaches the new placement.
//!
//! [`DataAdminService`] is the lifecycle side, for the onboarding workflows
//! only: provision and drop dedicated tables, export, import and purge.

pub mod admin;
mod error;
pub mod metering;
pub mod quota;
pub mod storage_meter;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use prost::Message as _;
use tenantmesh_isolation::TenantStores;
use tenantmesh_isolation::backend::StorageConfig;
use tenantmesh_proto::data::v1::data_admin_server::DataAdminServer;
use tenantmesh_proto::data::v1::data_client::DataClient;
use tenantmesh_proto::data::v1::data_server::{Data, DataServer};
use tenantmesh_proto::data::v1::*;
use tenantmesh_proto::metering::v1::metering_server::MeteringServer;
use tenantmesh_proto::registry::v1::TenantStatus;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_service::config::{CommonConfig, ConfigError, DATA_PORT};
use tenantmesh_service::errors::{Violations, invalid_field};
use tenantmesh_service::limits::Cost;
use tenantmesh_service::metering::{Meters, Usage};
use tenantmesh_service::paging;
use tenantmesh_storage::{Condition, DynTable, Query, StorageError};
use tenantmesh_tenant_context::TenantContext;
use tenantmesh_tenant_context::client::{self, Identity, PropagatedChannel};
use tenantmesh_tenant_context::server::Authenticator;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

pub use error::DataError;

/// The sort key of a tenant's write fence in a table (see the module
/// docs). No item's key can take it: sort keys are `<collection>#<id>`
/// and collections are letters, digits and `_.-`.
pub const FENCE_SK: &str = "~fence";

/// Whether `sort_key` is reserved for the service's own bookkeeping (the
/// fence): never exported, copied, imported or purged as an item.
pub fn reserved_sort_key(sort_key: &str) -> bool {
    sort_key.starts_with('~')
}

/// Largest encoded item accepted (DynamoDB's item limit).
pub const MAX_ITEM_BYTES: usize = 400 * 1024;
const MAX_COLLECTION_LEN: usize = 64;
const MAX_ID_LEN: usize = 256;

/// Data service settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub storage: StorageConfig,
    /// `TENANTMESH_SILO_TENANT`: this instance is that silo tenant's
    /// dedicated data service and serves no other tenant.
    pub silo_tenant: Option<String>,
    /// `TENANTMESH_QUOTA_RESCAN_MS` (default 10000): how often, at most, a
    /// tenant at its storage quota has its stored bytes counted again.
    pub quota_rescan: std::time::Duration,
    /// `TENANTMESH_DATA_FAULTS=stall-writes:<ms>`, for tests only: a
    /// PutItem whose id starts with `stall-` waits this long between its
    /// checks and its write, as a write delayed in flight would.
    pub stall_writes: Option<std::time::Duration>,
    /// `TENANTMESH_METERING_FLUSH_MS` (default 10000): how often usage is
    /// written to the usage table; a process killed with -9 loses at most
    /// the usage of one interval.
    pub metering_flush: std::time::Duration,
    /// `TENANTMESH_USAGE_GRACE_SECS` (default 3600): how old an
    /// application's usage event may be when it is recorded.
    pub usage_grace: std::time::Duration,
    /// `TENANTMESH_PRICING_FILE`: unit prices, dedicated resources' hourly
    /// costs and tier prices (default: the built-in example).
    pub pricing: Arc<tenantmesh_service::pricing::Pricing>,
    /// `TENANTMESH_STORAGE_SAMPLE_SECS` (default 3600): how often every
    /// tenant's stored bytes are measured for `storage_byte_hours`.
    pub storage_sample: std::time::Duration,
}

fn parse_data_faults(spec: &str) -> Result<Option<std::time::Duration>, ConfigError> {
    let bad = || ConfigError { var: "TENANTMESH_DATA_FAULTS", message: format!("{spec:?} is not stall-writes:<ms>") };
    match spec.trim() {
        "" => Ok(None),
        s => {
            let ms = s.strip_prefix("stall-writes:").ok_or_else(bad)?.parse().map_err(|_| bad())?;
            Ok(Some(std::time::Duration::from_millis(ms)))
        }
    }
}

impl Config {
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let silo_tenant = tenantmesh_service::config::var(env, "TENANTMESH_SILO_TENANT").map(str::to_owned);
        if let Some(t) = &silo_tenant
            && let Err(e) = tenantmesh_service::validate_tenant_id(t)
        {
            return Err(ConfigError { var: "TENANTMESH_SILO_TENANT", message: e.into() });
        }
        Ok(Self {
            common: CommonConfig::from_env(env, DATA_PORT)?,
            storage: StorageConfig::from_env(env)?,
            silo_tenant,
            quota_rescan: std::time::Duration::from_millis(tenantmesh_service::config::parse_var(
                env,
                "TENANTMESH_QUOTA_RESCAN_MS",
                10_000,
            )?),
            stall_writes: parse_data_faults(
                tenantmesh_service::config::var(env, "TENANTMESH_DATA_FAULTS").unwrap_or_default(),
            )?,
            metering_flush: std::time::Duration::from_millis(
                tenantmesh_service::config::parse_var(env, "TENANTMESH_METERING_FLUSH_MS", 10_000u64)?.max(10),
            ),
            usage_grace: std::time::Duration::from_secs(tenantmesh_service::config::parse_var(
                env,
                "TENANTMESH_USAGE_GRACE_SECS",
                3600,
            )?),
            storage_sample: std::time::Duration::from_secs(
                tenantmesh_service::config::parse_var(env, "TENANTMESH_STORAGE_SAMPLE_SECS", 3600u64)?.max(1),
            ),
            pricing: Arc::new(match tenantmesh_service::config::var(env, "TENANTMESH_PRICING_FILE") {
                Some(path) => tenantmesh_service::pricing::Pricing::load(std::path::Path::new(path))
                    .map_err(|e| ConfigError { var: "TENANTMESH_PRICING_FILE", message: e.to_string() })?,
                None => tenantmesh_service::pricing::Pricing::default(),
            }),
        })
    }
}

/// The data service's state: tenant-confined views of its tables, and
/// clients of silo tenants' instances.
#[derive(Clone)]
pub struct DataService {
    stores: Arc<dyn TenantStores>,
    table_prefix: String,
    silo_tenant: Option<String>,
    silos: Arc<std::sync::Mutex<HashMap<String, DataClient<PropagatedChannel>>>>,
    quotas: Arc<quota::Quotas>,
    stall_writes: Option<std::time::Duration>,
    meters: Option<Arc<Meters>>,
}

/// The data RPCs, by their index in the usage counters.
pub const RPCS: &[&str] = &["PutItem", "GetItem", "DeleteItem", "QueryItems"];
const PUT: usize = 0;
const GET: usize = 1;
const DELETE: usize = 2;
const QUERY: usize = 3;

/// A call being metered: its tenant and when its handler began.
struct Metered(Arc<str>, std::time::Instant);

/// Where a tenant's call is served.
enum Route {
    Local { tenant: Arc<str>, store: DynTable },
    Forward(DataClient<PropagatedChannel>),
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
    /// `silo_tenant`: serve only that tenant (a silo instance).
    pub fn new(stores: Arc<dyn TenantStores>, table_prefix: &str, silo_tenant: Option<String>) -> Self {
        Self {
            stores,
            table_prefix: table_prefix.to_owned(),
            silo_tenant,
            silos: Default::default(),
            quotas: Arc::new(quota::Quotas::new(std::time::Duration::from_secs(10))),
            stall_writes: None,
            meters: None,
        }
    }

    /// Counts every call's usage for its tenant (see
    /// `tenantmesh_service::metering`).
    pub fn with_meters(mut self, meters: Option<Arc<Meters>>) -> Self {
        self.meters = meters;
        self
    }

    /// Starts metering a call, when this instance meters.
    fn metered<T>(&self, request: &Request<T>) -> Result<Option<Metered>, Status> {
        Ok(match self.meters {
            Some(_) => {
                Some(Metered(TenantContext::from_request(request)?.tenant_id.clone(), std::time::Instant::now()))
            }
            None => None,
        })
    }

    /// Counts a call that ended with `result`: a request whatever its
    /// outcome, its units and bytes when it succeeded.
    fn count<T>(
        &self,
        call: Option<Metered>,
        rpc: usize,
        result: &Result<Response<T>, Status>,
        usage: impl FnOnce(&T) -> Usage,
    ) {
        if let (Some(meters), Some(Metered(tenant, started))) = (&self.meters, call) {
            let usage = result.as_ref().map(|r| usage(r.get_ref())).unwrap_or_default();
            meters.record(&tenant, rpc, usage, started.elapsed());
        }
    }

    /// Test fault: see [`Config::stall_writes`].
    pub fn with_stalled_writes(mut self, stall: Option<std::time::Duration>) -> Self {
        if let Some(d) = stall {
            tracing::warn!(
                stall_ms = d.as_millis() as u64,
                "FAULT INJECTION IS ON (TENANTMESH_DATA_FAULTS): for tests only"
            );
        }
        self.stall_writes = stall;
        self
    }

    /// Counts a tenant at its storage quota again at most this often.
    pub fn with_quota_rescan(mut self, interval: std::time::Duration) -> Self {
        self.quotas = Arc::new(quota::Quotas::new(interval));
        self
    }

    /// Where the calling tenant's request is served: here, on the store
    /// the tenant may see, or at its silo instance. `write`: refused while
    /// the tenant is being moved.
    async fn route<T>(&self, request: &Request<T>, write: bool) -> Result<Route, Status> {
        let ctx = TenantContext::from_request(request)?;
        if write && ctx.status() == TenantStatus::Migrating {
            return Err(DataError::Migrating.into());
        }
        let placement = ctx.placement();
        match &self.silo_tenant {
            Some(silo) if **silo != *ctx.tenant_id => return Err(DataError::WrongSilo.into()),
            Some(_) => {}
            None => {
                if let Some(p) = placement.filter(|p| !p.endpoint.is_empty()) {
                    return Ok(Route::Forward(self.silo_client(&p.endpoint)?));
                }
            }
        }
        let table = placement.map(|p| p.table.as_str()).filter(|t| !t.is_empty()).unwrap_or(self.stores.pooled_table());
        let tenant = ctx.tenant_id.clone();
        Ok(Route::Local { store: self.store(&tenant, table).await?, tenant })
    }

    /// `tenant`'s view of `table`, if the table may hold its items.
    async fn store(&self, tenant: &str, table: &str) -> Result<DynTable, Status> {
        if !tenantmesh_isolation::stores::table_allowed(self.stores.as_ref(), &self.table_prefix, tenant, table) {
            return Err(DataError::ForeignTable.into());
        }
        Ok(self.stores.store_for(tenant, table).await.map_err(DataError::from)?)
    }

    /// A client of a silo tenant's instance that sends the caller's own
    /// context (token, tenant, trace).
    fn silo_client(&self, endpoint: &str) -> Result<DataClient<PropagatedChannel>, Status> {
        let mut silos = self.silos.lock().expect("silo clients lock");
        if let Some(c) = silos.get(endpoint) {
            return Ok(c.clone());
        }
        let channel = client::channel(endpoint)
            .map_err(|e| DataError::BadEndpoint { endpoint: endpoint.to_owned(), cause: e.to_string() })?;
        let c = DataClient::new(client::wrap(channel, Identity::Caller))
            .max_decoding_message_size(tenantmesh_service::runtime::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(tenantmesh_service::runtime::MAX_MESSAGE_BYTES);
        if silos.len() >= 1024 {
            silos.clear();
        }
        silos.insert(endpoint.to_owned(), c.clone());
        Ok(c)
    }
}

/// A forwarded call's answer; an unreachable silo is UNAVAILABLE.
fn forwarded<T>(result: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
    result.inspect_err(|s| {
        if s.code() == tonic::Code::Unavailable {
            tracing::warn!(error = %s.message(), "the tenant's silo instance is unreachable");
        }
    })
}

/// `response`, reporting what its call cost when that is more than the one
/// token every call takes (so the common small call allocates nothing).
fn costing<T>(mut response: Response<T>, cost: Cost) -> Response<T> {
    if cost.0 > 1 {
        response.extensions_mut().insert(cost);
    }
    response
}

#[tonic::async_trait]
impl Data for DataService {
    async fn put_item(&self, request: Request<PutItemRequest>) -> Result<Response<PutItemResponse>, Status> {
        let call = self.metered(&request)?;
        let result = self.put_item_unmetered(request).await;
        self.count(call, PUT, &result, |r| {
            Usage::write(r.item.as_ref().map_or(0, |i| i.encoded_len()), r.encoded_len())
        });
        result
    }

    async fn get_item(&self, request: Request<GetItemRequest>) -> Result<Response<GetItemResponse>, Status> {
        let call = self.metered(&request)?;
        let result = self.get_item_unmetered(request).await;
        self.count(call, GET, &result, |r| Usage::read(r.item.as_ref().map(|i| i.encoded_len()), r.encoded_len()));
        result
    }

    async fn delete_item(&self, request: Request<DeleteItemRequest>) -> Result<Response<DeleteItemResponse>, Status> {
        let call = self.metered(&request)?;
        let result = self.delete_item_unmetered(request).await;
        self.count(call, DELETE, &result, |r| Usage::write(0, r.encoded_len()));
        result
    }

    async fn query_items(&self, request: Request<QueryItemsRequest>) -> Result<Response<QueryItemsResponse>, Status> {
        let call = self.metered(&request)?;
        let result = self.query_items_unmetered(request).await;
        self.count(call, QUERY, &result, |r| Usage::read(r.items.iter().map(|i| i.encoded_len()), r.encoded_len()));
        result
    }
}

/// The handlers, metered by the trait's methods above.
impl DataService {
    async fn put_item_unmetered(&self, request: Request<PutItemRequest>) -> Result<Response<PutItemResponse>, Status> {
        let quota = TenantContext::from_request(&request)?.tenant.storage_quota;
        let (tenant, store) = match self.route(&request, true).await? {
            Route::Local { tenant, store } => (tenant, store),
            Route::Forward(mut c) => return forwarded(c.put_item(request.into_inner()).await),
        };
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
        if let Some(quota) = quota
            && let Err(over) = self
                .quotas
                .admit(&tenant, &store, &sort_key(&item.collection, &item.id), size as u64, quota)
                .await
                .map_err(DataError::from)?
        {
            tracing::warn!(tenant_id = %tenant, quota = over.quota, stored = over.stored, "write refused by the storage quota");
            return Err(DataError::OverQuota(over).into());
        }
        let condition = match req.expected_version {
            Some(expected) => Condition::Version(expected),
            None => Condition::None,
        };
        let sk = sort_key(&item.collection, &item.id);
        if let Some(stall) = self.stall_writes.filter(|_| item.id.starts_with("stall-")) {
            tokio::time::sleep(stall).await;
        }
        let stored =
            store.put_fenced(&tenant, &sk, item.encode_to_vec(), condition, FENCE_SK).await.map_err(|e| match e {
                StorageError::ConditionFailed { current, .. } => {
                    DataError::VersionMismatch { expected: req.expected_version.unwrap_or_default(), current }
                }
                e => e.into(),
            })?;
        item.version = stored.version;
        tracing::debug!(collection = %item.collection, version = item.version, "item written");
        Ok(costing(Response::new(PutItemResponse { item: Some(item) }), Cost::write(size)))
    }

    async fn get_item_unmetered(&self, request: Request<GetItemRequest>) -> Result<Response<GetItemResponse>, Status> {
        let (tenant, store) = match self.route(&request, false).await? {
            Route::Local { tenant, store } => (tenant, store),
            Route::Forward(mut c) => return forwarded(c.get_item(request.into_inner()).await),
        };
        let req = request.into_inner();
        item_key(&req.collection, &req.id).check()?;
        let raw = store
            .get(&tenant, &sort_key(&req.collection, &req.id))
            .await
            .map_err(DataError::from)?
            .ok_or(DataError::NotFound)?;
        Ok(costing(Response::new(GetItemResponse { item: Some(decode_item(&raw)?) }), Cost::read(raw.data.len())))
    }

    async fn delete_item_unmetered(
        &self,
        request: Request<DeleteItemRequest>,
    ) -> Result<Response<DeleteItemResponse>, Status> {
        let (tenant, store) = match self.route(&request, true).await? {
            Route::Local { tenant, store } => (tenant, store),
            Route::Forward(mut c) => return forwarded(c.delete_item(request.into_inner()).await),
        };
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
        match store.delete_fenced(&tenant, &sk, condition, FENCE_SK).await {
            Ok(_) => Ok(Response::new(DeleteItemResponse {})),
            Err(StorageError::ConditionFailed { current: None, .. }) => Err(DataError::NotFound.into()),
            Err(StorageError::ConditionFailed { current, .. }) => {
                Err(DataError::VersionMismatch { expected: req.expected_version.unwrap_or_default(), current }.into())
            }
            Err(e) => Err(DataError::from(e).into()),
        }
    }

    async fn query_items_unmetered(
        &self,
        request: Request<QueryItemsRequest>,
    ) -> Result<Response<QueryItemsResponse>, Status> {
        let (tenant, store) = match self.route(&request, false).await? {
            Route::Local { tenant, store } => (tenant, store),
            Route::Forward(mut c) => return forwarded(c.query_items(request.into_inner()).await),
        };
        let req = request.into_inner();
        let mut v = Violations::new();
        check_name(&mut v, "collection", &req.collection, MAX_COLLECTION_LEN, &[], true);
        check_name(&mut v, "id_prefix", &req.id_prefix, MAX_ID_LEN, ID_EXTRA, false);
        let limit = paging::page_size(&mut v, req.page_size);
        let sk_prefix = sort_key(&req.collection, &req.id_prefix);
        let start_after = paging::decode_token(&mut v, &req.page_token, &sk_prefix);
        v.check()?;
        let page = store
            .query(Query { pk: tenant.to_string(), sk_prefix, start_after, limit })
            .await
            .map_err(DataError::from)?;
        let items = page.items.iter().map(decode_item).collect::<Result<Vec<_>, _>>()?;
        let next_page_token = page.last_evaluated.as_deref().map(paging::encode_token).unwrap_or_default();
        let read: usize = page.items.iter().map(|i| i.data.len()).sum();
        Ok(costing(Response::new(QueryItemsResponse { items, next_page_token }), Cost::read(read)))
    }
}

/// Opens the pooled data table on the configured backend, as per-tenant
/// policy-confined stores.
pub async fn open_store(config: &Config) -> Result<Arc<dyn TenantStores>, Box<dyn std::error::Error + Send + Sync>> {
    config.storage.tenant_stores(&config.common, "data").await
}

/// On DynamoDB, where the shared data service may run as several replicas,
/// each tenant's limits are held across them: leases of each replica's
/// share in the `leases` table (see `tenantmesh_service::leases`). On the
/// embedded store there is one process; a silo instance serves one tenant
/// behind the shared service, which already holds that tenant's limits.
async fn rate_shares(
    config: &Config,
) -> Result<Option<Arc<tenantmesh_service::leases::RateShares>>, Box<dyn std::error::Error + Send + Sync>> {
    if config.storage.backend != tenantmesh_isolation::backend::Backend::DynamoDb
        || config.silo_tenant.is_some()
        || !config.common.limits
    {
        return Ok(None);
    }
    let table = config.storage.open_table(&config.common, LEASES_TABLE).await?;
    tracing::info!(
        table = %config.storage.table_name(LEASES_TABLE),
        interval_ms = config.common.lease_interval.as_millis() as u64,
        "tenants' limits are shared with the other data-service replicas"
    );
    Ok(Some(tenantmesh_service::leases::RateShares::start(table, "data", config.common.lease_interval)))
}

/// The table of the replicas' heartbeats and leases (`<prefix>leases`).
pub const LEASES_TABLE: &str = "leases";

/// Runs the data service (and its DataAdmin) on `listener` until
/// `shutdown` completes.
pub async fn serve(
    config: Config,
    stores: Arc<dyn TenantStores>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut authn = Authenticator::remote(&config.common)?;
    if let Some(shares) = rate_shares(&config).await? {
        authn = authn.with_rate_shares(shares);
    }
    if let Some(t) = &config.silo_tenant {
        tracing::info!(silo_tenant = %t, "serving as a silo tenant's dedicated data service");
    }
    // A silo instance is only ever called through the shared service,
    // which meters its tenant's calls; it meters nothing itself.
    let usage = match config.silo_tenant {
        Some(_) => None,
        None => Some(config.storage.open_table(&config.common, USAGE_TABLE).await?),
    };
    let meters = usage.clone().map(|table| {
        let hook: tenantmesh_service::metering::FlushHook = Box::new(tenantmesh_telemetry::metrics::usage);
        let meters = Arc::new(Meters::new(table, RPCS, config.metering_flush).with_hook(hook));
        meters.start();
        tracing::info!(
            replica = %meters.replica(),
            flush_ms = config.metering_flush.as_millis() as u64,
            "metering every tenant's usage"
        );
        meters
    });
    let (stop_sampling, sampling_stopped) = tokio::sync::watch::channel(false);
    match (&usage, &config.common.service_client) {
        (Some(table), Some(credentials)) => {
            let tokens = Arc::new(client::ServiceTokenSource::new(
                client::channel(&config.common.auth_url)?,
                credentials.clone(),
            ));
            let sampler = storage_meter::StorageSampler::new(
                table.clone(),
                stores.clone(),
                &config.storage.table_prefix,
                &config.common.registry_url,
                tokens,
                config.storage_sample,
            )?;
            Arc::new(sampler).start(sampling_stopped);
        }
        (Some(_), None) => {
            tracing::warn!("no service identity (TENANTMESH_SERVICE_CLIENT_ID/_SECRET): stored bytes are not metered");
        }
        (None, _) => {}
    }
    let data = DataService::new(stores.clone(), &config.storage.table_prefix, config.silo_tenant.clone())
        .with_quota_rescan(config.quota_rescan)
        .with_stalled_writes(config.stall_writes)
        .with_meters(meters.clone());
    let admin = admin::DataAdminService::new(stores, &config.storage.table_prefix, config.silo_tenant.clone());
    let mut routes = tonic::service::Routes::new(
        DataServer::new(data)
            .max_decoding_message_size(tenantmesh_service::runtime::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(tenantmesh_service::runtime::MAX_MESSAGE_BYTES),
    )
    .add_service(
        DataAdminServer::new(admin)
            .max_decoding_message_size(tenantmesh_service::runtime::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(tenantmesh_service::runtime::MAX_MESSAGE_BYTES),
    );
    let mut names = vec![
        <DataServer<DataService> as tonic::server::NamedService>::NAME,
        <DataAdminServer<admin::DataAdminService> as tonic::server::NamedService>::NAME,
    ];
    if let Some(table) = usage {
        let registry =
            TenantRegistryClient::new(client::wrap(client::channel(&config.common.registry_url)?, Identity::Caller));
        let service = metering::MeteringService::new(table, config.pricing.clone(), config.usage_grace, registry);
        routes = routes.add_service(MeteringServer::new(service));
        names.push(<MeteringServer<metering::MeteringService> as tonic::server::NamedService>::NAME);
    }
    let served = tenantmesh_service::runtime::serve_routes(
        listener,
        routes,
        &names,
        tenantmesh_tenant_context::server::layer(authn),
        config.common.shutdown_grace,
        shutdown,
    )
    .await;
    stop_sampling.send_replace(true);
    // Whatever the outcome, what was counted is written.
    if let Some(meters) = meters {
        match meters.shutdown().await {
            Ok(()) => tracing::info!("usage flushed"),
            Err(e) => tracing::error!(error = %e, "usage counted since the last flush is lost"),
        }
    }
    served?;
    Ok(())
}

/// The table of metered usage (`<prefix>usage`, or `usage.redb`).
pub const USAGE_TABLE: &str = "usage";
