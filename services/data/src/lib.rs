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
pub mod history;
pub mod metering;
pub mod quota;
pub mod storage_meter;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use prost::Message as _;
use tenantmesh_isolation::TenantStores;
use tenantmesh_isolation::backend::StorageConfig;
use tenantmesh_isolation::stores::{Location, locate};
use tenantmesh_metering::meters::{Meters, Usage};
use tenantmesh_proto::data::v1::data_admin_server::DataAdminServer;
use tenantmesh_proto::data::v1::data_client::DataClient;
use tenantmesh_proto::data::v1::data_server::{Data, DataServer};
use tenantmesh_proto::data::v1::*;
use tenantmesh_proto::metering::v1::metering_server::MeteringServer;
use tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient;
use tenantmesh_proto::registry::v1::TenantStatus;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_service::config::{CommonConfig, ConfigError, DATA_PORT};
use tenantmesh_service::errors::{Violations, invalid_field};
use tenantmesh_service::handled::Cost;
use tenantmesh_service::handled::Handled;
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

/// Largest encoded item accepted: DynamoDB's item limit (400 KiB, names
/// and values of all attributes) less 1 KiB, so that both the stored item
/// and the history entry holding it as a before-image (its bytes plus its
/// sort key and version) fit, whatever the tenant id and sort key.
pub const MAX_ITEM_BYTES: usize = 399 * 1024;
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
    /// `TENANTMESH_METERING` (`on`, the default, or `off`: for a
    /// benchmark's control run, as `TENANTMESH_LIMITS`): whether usage is
    /// metered at all.
    pub metering: bool,
    /// `TENANTMESH_METERING_FLUSH_MS` (default 10000): how often usage is
    /// written to the usage table; a process killed with -9 loses at most
    /// the usage of one interval.
    pub metering_flush: std::time::Duration,
    /// `TENANTMESH_USAGE_GRACE_SECS` (default 3600): how old an
    /// application's usage event may be when it is recorded.
    pub usage_grace: std::time::Duration,
    /// `TENANTMESH_PRICING_FILE`: unit prices, dedicated resources' hourly
    /// costs and tier prices (default: the built-in example).
    pub pricing: Arc<tenantmesh_metering::pricing::Pricing>,
    /// `TENANTMESH_STORAGE_SAMPLE_SECS` (default 3600): how often every
    /// tenant's stored bytes are measured for `storage_byte_hours`.
    pub storage_sample: std::time::Duration,
    /// `TENANTMESH_ONBOARDING_URL` (default `http://127.0.0.1:50053`): the
    /// onboarding service, whose resource ledger says which dedicated
    /// resources a tenant held when (for its cost).
    pub onboarding_url: String,
    /// `TENANTMESH_STREAM_STALL_MS` (default 30000): how long an export
    /// stream (ExportUsage, ExportItems) waits for its client to read
    /// before it ends with DEADLINE_EXCEEDED.
    pub stream_stall: std::time::Duration,
    /// `TENANTMESH_USAGE_RETENTION_DAYS` (default 400): usage older than
    /// this is deleted (by the hourly stored-bytes sampler).
    pub usage_retention_days: u32,
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
            metering: match tenantmesh_service::config::var(env, "TENANTMESH_METERING") {
                None | Some("on") => true,
                Some("off") => false,
                Some(other) => {
                    return Err(ConfigError {
                        var: "TENANTMESH_METERING",
                        message: format!("{other:?}: use on or off"),
                    });
                }
            },
            metering_flush: std::time::Duration::from_millis(
                tenantmesh_service::config::parse_var(env, "TENANTMESH_METERING_FLUSH_MS", 10_000u64)?.max(10),
            ),
            usage_grace: std::time::Duration::from_secs(tenantmesh_service::config::parse_var(
                env,
                "TENANTMESH_USAGE_GRACE_SECS",
                3600,
            )?),
            onboarding_url: tenantmesh_service::config::url_var(
                env,
                "TENANTMESH_ONBOARDING_URL",
                tenantmesh_service::config::ONBOARDING_PORT,
            )?,
            storage_sample: std::time::Duration::from_secs(
                tenantmesh_service::config::parse_var(env, "TENANTMESH_STORAGE_SAMPLE_SECS", 3600u64)?.max(1),
            ),
            stream_stall: std::time::Duration::from_millis(
                tenantmesh_service::config::parse_var(env, "TENANTMESH_STREAM_STALL_MS", 30_000u64)?.max(1),
            ),
            usage_retention_days: match tenantmesh_service::config::parse_var(
                env,
                "TENANTMESH_USAGE_RETENTION_DAYS",
                400u32,
            )? {
                0 => {
                    return Err(ConfigError {
                        var: "TENANTMESH_USAGE_RETENTION_DAYS",
                        message: "must be at least 1".into(),
                    });
                }
                n => n,
            },
            pricing: Arc::new(match tenantmesh_service::config::var(env, "TENANTMESH_PRICING_FILE") {
                Some(path) => tenantmesh_metering::pricing::Pricing::load(std::path::Path::new(path))
                    .map_err(|e| ConfigError { var: "TENANTMESH_PRICING_FILE", message: e.to_string() })?,
                None => tenantmesh_metering::pricing::Pricing::default(),
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
    /// Silo instances, called with the caller's own context.
    silos: Arc<client::Channels>,
    quotas: Arc<quota::Quotas>,
    stall_writes: Option<std::time::Duration>,
    /// Tenant -> the table where this process has seen its history (see
    /// [`history`]) marked complete: looked up on every write, without
    /// allocating.
    history_started: Arc<std::sync::Mutex<HashMap<Arc<str>, String>>>,
    /// The tiers: each one's cap on its tenants' history.
    tiers: Arc<tenantmesh_service::tiers::Tiers>,
}

/// Encoded bytes of a length-delimited field of `len` bytes (field numbers
/// 1-15): a response's size from its items' sizes, each item encoded in
/// length once.
fn field_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// Where a tenant's call is served.
enum Route {
    Local { tenant: Arc<str>, store: DynTable },
    Forward(DataClient<PropagatedChannel>),
}

use tenantmesh_service::clock::now_ms;

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

/// Bytes of an item's `version` field (field 4) when it is `version`.
fn version_len(version: u64) -> usize {
    if version == 0 { 0 } else { 1 + prost::encoding::encoded_len_varint(version) }
}

/// The item in `raw` with its version, and its encoded size as returned:
/// the stored bytes with the stored version field swapped for the real
/// one, without encoding it again (for metering).
fn decode_sized(raw: &tenantmesh_storage::Item) -> Result<(Item, usize), DataError> {
    let mut item = Item::decode(raw.data.as_slice()).map_err(|e| DataError::Corrupt(e.to_string()))?;
    let size = raw.data.len() - version_len(item.version) + version_len(raw.version);
    item.version = raw.version;
    Ok((item, size))
}

impl DataService {
    /// `silo_tenant`: serve only that tenant (a silo instance).
    pub fn new(stores: Arc<dyn TenantStores>, table_prefix: &str, silo_tenant: Option<String>) -> Self {
        Self {
            stores,
            table_prefix: table_prefix.to_owned(),
            silo_tenant,
            silos: Arc::new(client::Channels::new(Identity::Caller)),
            quotas: Arc::new(quota::Quotas::new(std::time::Duration::from_secs(10))),
            stall_writes: None,
            history_started: Default::default(),
            tiers: Default::default(),
        }
    }

    /// The tiers whose history caps apply (default: the built-in ones).
    pub fn with_tiers(mut self, tiers: Arc<tenantmesh_service::tiers::Tiers>) -> Self {
        self.tiers = tiers;
        self
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

    /// The counts of the tenants' stored bytes, shared with whatever else
    /// changes them in this process (DataAdmin, the history trim), which
    /// forgets a tenant's counts when it does.
    pub fn with_quotas(mut self, quotas: Arc<quota::Quotas>) -> Self {
        self.quotas = quotas;
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
        let (table, endpoint) = ctx.placement().map_or(("", ""), |p| (p.table.as_str(), p.endpoint.as_str()));
        let endpoint = match &self.silo_tenant {
            Some(silo) if **silo != *ctx.tenant_id => return Err(DataError::WrongSilo.into()),
            // A silo instance serves its tenant here.
            Some(_) => "",
            None => endpoint,
        };
        let table = match locate(self.stores.as_ref(), &self.table_prefix, &ctx.tenant_id, table, endpoint) {
            Some(Location::Silo { endpoint, .. }) => return Ok(Route::Forward(self.silo_client(endpoint)?)),
            Some(Location::Here { table }) => table,
            None => return Err(DataError::ForeignTable.into()),
        };
        let tenant = ctx.tenant_id.clone();
        let store = self.stores.store_for(&tenant, table).await.map_err(DataError::from)?;
        if write {
            self.start_history(&tenant, table, &store).await?;
        }
        Ok(Route::Local { store, tenant })
    }

    /// Before this process's first write of `tenant` in `table`: marks its
    /// history complete from now, unless it already was (one conditional
    /// write per tenant and process, while the fence is down).
    async fn start_history(&self, tenant: &Arc<str>, table: &str, store: &DynTable) -> Result<(), Status> {
        if self.history_started.lock().expect("history lock").get(tenant).is_some_and(|t| t == table) {
            return Ok(());
        }
        match history::mark_start(store.as_ref(), tenant, FENCE_SK).await {
            // Fenced: the write is refused below, and the next one marks.
            Ok(false) => return Ok(()),
            Ok(true) => {}
            Err(e) => return Err(DataError::from(e).into()),
        }
        let mut started = self.history_started.lock().expect("history lock");
        if started.len() >= 100_000 {
            started.clear();
        }
        started.insert(tenant.clone(), table.to_owned());
        Ok(())
    }

    /// The byte limits of the caller's tenant: its storage quota and its
    /// history's cap (its tier's multiple of the quota); `None` when it has
    /// none (the platform).
    fn storage_limits(&self, ctx: &TenantContext) -> Option<quota::Limits> {
        let items = ctx.tenant.storage_quota?;
        let multiple = self.tiers.get(ctx.tier()).map_or(2, |t| u64::from(t.history_quota_multiple));
        Some(quota::Limits { items, history: items.saturating_mul(multiple) })
    }

    /// A client of a silo tenant's instance that sends the caller's own
    /// context (token, tenant, trace).
    fn silo_client(&self, endpoint: &str) -> Result<DataClient<PropagatedChannel>, Status> {
        let channel = self
            .silos
            .get(endpoint)
            .map_err(|e| DataError::BadEndpoint { endpoint: endpoint.to_owned(), cause: e.to_string() })?;
        Ok(tenantmesh_service::sized!(DataClient::new(channel)))
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

/// A forwarded call's answer, reporting what it returned (the silo
/// instance charged its tenant for the rest).
fn forwarded_as<T>(
    result: Result<Response<T>, Status>,
    usage: impl FnOnce(&T) -> Usage,
) -> Result<Response<T>, Status> {
    let response = forwarded(result)?;
    let usage = usage(response.get_ref());
    Ok(Handled { usage, cost: Cost(1), forwarded: true }.report(response))
}

/// What a stored item of `size` encoded bytes uses when returned.
fn item_usage(item: Option<&Item>) -> Usage {
    let size = item.map_or(0, |i| i.encoded_len());
    Usage::read([size], field_len(size))
}

/// A page's read units and bytes from its items' encoded sizes.
fn query_usage(sizes: &[usize], next_page_token: &str) -> Usage {
    let token = if next_page_token.is_empty() { 0 } else { field_len(next_page_token.len()) };
    Usage::read(sizes.iter().copied(), sizes.iter().map(|&s| field_len(s)).sum::<usize>() + token)
}

/// The data RPCs. Each reports what it read and wrote ([`Handled`]), which
/// admission charges and metering counts.
#[tonic::async_trait]
impl Data for DataService {
    async fn put_item(&self, request: Request<PutItemRequest>) -> Result<Response<PutItemResponse>, Status> {
        let limits = self.storage_limits(TenantContext::from_request(&request)?);
        let (tenant, store) = match self.route(&request, true).await? {
            Route::Local { tenant, store } => (tenant, store),
            Route::Forward(mut c) => {
                return forwarded_as(c.put_item(request.into_inner()).await, |r| {
                    let item = r.item.as_ref().map_or(0, |i| i.encoded_len());
                    Usage::write(item, field_len(item))
                });
            }
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
        if let Some(limits) = limits
            && let Err(over) = self
                .quotas
                .admit(&tenant, &store, &sort_key(&item.collection, &item.id), size as u64, limits)
                .await
                .map_err(DataError::from)?
        {
            tracing::warn!(
                tenant_id = %tenant,
                limit = ?over.over,
                quota = over.quota,
                stored = over.stored,
                "write refused by the storage quota"
            );
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
        let done = history::put(store.as_ref(), &tenant, &sk, item.encode_to_vec(), condition, FENCE_SK)
            .await
            .map_err(|e| match e {
                StorageError::ConditionFailed { current, .. } => {
                    DataError::VersionMismatch { expected: req.expected_version.unwrap_or_default(), current }
                }
                e => e.into(),
            })?;
        if limits.is_some() {
            self.quotas.settle(&tenant, &done);
        }
        item.version = done.version;
        tracing::debug!(collection = %item.collection, version = item.version, "item written");
        let returned = size + version_len(item.version);
        let usage = Usage::write(returned, field_len(returned));
        // What was stored: the item and the history entry of what it replaced.
        let cost = Cost::write(size + done.undo_bytes as usize);
        Ok(Handled { usage, cost, forwarded: false }.report(Response::new(PutItemResponse { item: Some(item) })))
    }

    async fn get_item(&self, request: Request<GetItemRequest>) -> Result<Response<GetItemResponse>, Status> {
        let (tenant, store) = match self.route(&request, false).await? {
            Route::Local { tenant, store } => (tenant, store),
            Route::Forward(mut c) => {
                return forwarded_as(c.get_item(request.into_inner()).await, |r| item_usage(r.item.as_ref()));
            }
        };
        let req = request.into_inner();
        item_key(&req.collection, &req.id).check()?;
        let raw = store
            .get(&tenant, &sort_key(&req.collection, &req.id))
            .await
            .map_err(DataError::from)?
            .ok_or(DataError::NotFound)?;
        let (item, size) = decode_sized(&raw)?;
        let usage = Usage::read([size], field_len(size));
        let cost = Cost::read(raw.data.len());
        Ok(Handled { usage, cost, forwarded: false }.report(Response::new(GetItemResponse { item: Some(item) })))
    }

    async fn delete_item(&self, request: Request<DeleteItemRequest>) -> Result<Response<DeleteItemResponse>, Status> {
        let counted = self.storage_limits(TenantContext::from_request(&request)?).is_some();
        let (tenant, store) = match self.route(&request, true).await? {
            Route::Local { tenant, store } => (tenant, store),
            // DeleteItemResponse is empty.
            Route::Forward(mut c) => {
                return forwarded_as(c.delete_item(request.into_inner()).await, |_| Usage::write(0, 0));
            }
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
        match history::delete(store.as_ref(), &tenant, &sk, condition, FENCE_SK).await {
            Ok(done) => {
                if counted {
                    self.quotas.settle(&tenant, &done);
                }
                // A delete stores the item's bytes in the history.
                let cost = Cost::write(done.undo_bytes as usize);
                Ok(Handled { usage: Usage::write(0, 0), cost, forwarded: false }
                    .report(Response::new(DeleteItemResponse {})))
            }
            Err(StorageError::ConditionFailed { current: None, .. }) => Err(DataError::NotFound.into()),
            Err(StorageError::ConditionFailed { current, .. }) => {
                Err(DataError::VersionMismatch { expected: req.expected_version.unwrap_or_default(), current }.into())
            }
            Err(e) => Err(DataError::from(e).into()),
        }
    }

    async fn query_items(&self, request: Request<QueryItemsRequest>) -> Result<Response<QueryItemsResponse>, Status> {
        let (tenant, store) = match self.route(&request, false).await? {
            Route::Local { tenant, store } => (tenant, store),
            Route::Forward(mut c) => {
                return forwarded_as(c.query_items(request.into_inner()).await, |r| {
                    let sizes: Vec<usize> = r.items.iter().map(|i| i.encoded_len()).collect();
                    query_usage(&sizes, &r.next_page_token)
                });
            }
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
        let (items, sizes): (Vec<Item>, Vec<usize>) =
            page.items.iter().map(decode_sized).collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
        let next_page_token = page.last_evaluated.as_deref().map(paging::encode_token).unwrap_or_default();
        let read: usize = page.items.iter().map(|i| i.data.len()).sum();
        let usage = query_usage(&sizes, &next_page_token);
        let cost = Cost::read(read);
        Ok(Handled { usage, cost, forwarded: false }
            .report(Response::new(QueryItemsResponse { items, next_page_token })))
    }
}

/// Opens the pooled data table on the configured backend, as per-tenant
/// policy-confined stores.
pub async fn open_store(config: &Config) -> Result<Arc<dyn TenantStores>, Box<dyn std::error::Error + Send + Sync>> {
    config.storage.tenant_stores(&config.common, "data").await
}

/// On DynamoDB, where the shared data service may run as several replicas,
/// each tenant's limits are held across them: leases of each replica's
/// share in the `leases` table (see `tenantmesh_admission::leases`). On the
/// embedded store there is one process; a silo instance serves one tenant
/// behind the shared service, which already holds that tenant's limits.
async fn rate_shares(
    config: &Config,
) -> Result<Option<Arc<tenantmesh_admission::leases::RateShares>>, Box<dyn std::error::Error + Send + Sync>> {
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
    Ok(Some(tenantmesh_admission::leases::RateShares::start(table, "data", config.common.lease_interval)))
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
    let policies = authn.policies().clone();
    let charges = authn.limiter().map(|limiter| admin::TenantCharges {
        limiter,
        directory: authn.directory(),
        tiers: config.common.tiers.clone(),
    });
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
        None if !config.metering => {
            tracing::warn!(
                "TENANTMESH_METERING=off: no usage is metered, and the Metering service is not served \
                 (the change history is still trimmed to the tiers' history_days)"
            );
            None
        }
        None => Some(config.storage.open_table(&config.common, USAGE_TABLE).await?),
    };
    let meters = usage.clone().map(|table| {
        let hook: tenantmesh_metering::meters::FlushHook = Box::new(tenantmesh_telemetry::metrics::usage);
        let meters = Arc::new(Meters::new(table, policies.metered(), config.metering_flush).with_hook(hook));
        meters.start();
        tracing::info!(
            replica = %meters.replica(),
            flush_ms = config.metering_flush.as_millis() as u64,
            "metering every tenant's usage"
        );
        meters
    });
    let quotas = Arc::new(quota::Quotas::new(config.quota_rescan));
    let (stop_sampling, sampling_stopped) = tokio::sync::watch::channel(false);
    // The data service's own identity, when it has one.
    let tokens = match &config.common.service_client {
        Some(credentials) => Some(Arc::new(client::ServiceTokenSource::new(
            client::channel(&config.common.auth_url)?,
            credentials.clone(),
        ))),
        None => None,
    };
    // A silo instance's tenant is sampled and trimmed by the shared service.
    match (config.silo_tenant.is_none(), &tokens) {
        (true, Some(tokens)) => {
            let tokens = tokens.clone();
            let sampler = storage_meter::StorageSampler::new(
                usage.clone(),
                stores.clone(),
                &config.storage.table_prefix,
                &config.common.registry_url,
                tokens,
                config.storage_sample,
                config.common.tiers.clone(),
            )?
            .with_quotas(quotas.clone())
            .with_usage_retention(config.usage_retention_days);
            Arc::new(sampler).start(sampling_stopped);
        }
        (true, None) => {
            tracing::warn!(
                "no service identity (TENANTMESH_SERVICE_CLIENT_ID/_SECRET): stored bytes are not metered, \
                 and the change history is not trimmed (it grows past the tiers' history_days)"
            );
        }
        (false, _) => {}
    }
    let data = DataService::new(stores.clone(), &config.storage.table_prefix, config.silo_tenant.clone())
        .with_quotas(quotas.clone())
        .with_tiers(config.common.tiers.clone())
        .with_stalled_writes(config.stall_writes);
    let admin = admin::DataAdminService::new(stores, &config.storage.table_prefix, config.silo_tenant.clone())
        .with_quotas(quotas)
        .with_stall(config.stream_stall)
        .with_charges(charges);
    let mut routes = tonic::service::Routes::new(tenantmesh_service::sized!(DataServer::new(data)))
        .add_service(tenantmesh_service::sized!(DataAdminServer::new(admin)));
    let mut names = vec![
        <DataServer<DataService> as tonic::server::NamedService>::NAME,
        <DataAdminServer<admin::DataAdminService> as tonic::server::NamedService>::NAME,
    ];
    if let Some(table) = usage {
        let registry_channel = client::channel(&config.common.registry_url)?;
        let registry = TenantRegistryClient::new(client::wrap(registry_channel.clone(), Identity::Caller));
        let onboarding =
            OnboardingClient::new(client::wrap(client::channel(&config.onboarding_url)?, Identity::Caller));
        let mut service =
            metering::MeteringService::new(table, config.pricing.clone(), config.usage_grace, registry, onboarding)
                .with_stall(config.stream_stall);
        if let Some(tokens) = &tokens {
            // The same connection, with the data service's identity.
            let own = client::wrap(registry_channel, Identity::Service(tokens.clone()));
            service = service.with_own_registry(TenantRegistryClient::new(own));
        }
        routes = routes.add_service(MeteringServer::new(service));
        names.push(<MeteringServer<metering::MeteringService> as tonic::server::NamedService>::NAME);
    }
    let stack = tenantmesh_tenant_context::server::stack(authn, meters.clone())?;
    let embedded = config.storage.backend == tenantmesh_isolation::backend::Backend::Embedded;
    routes = routes.add_service(tenantmesh_service::backup::server(config.common.data_dir.clone(), embedded));
    names.push(tenantmesh_service::backup::NAME);
    let served = tenantmesh_service::runtime::serve_routes(
        listener,
        routes,
        &names,
        stack,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metering_settings_name_their_variable() {
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        let c = Config::from_env(&env(&[])).unwrap();
        assert!(c.metering);
        assert_eq!(c.metering_flush, std::time::Duration::from_secs(10));
        assert!(!Config::from_env(&env(&[("TENANTMESH_METERING", "off")])).unwrap().metering);
        for (var, value) in [
            ("TENANTMESH_METERING", "maybe"),
            ("TENANTMESH_METERING_FLUSH_MS", "soon"),
            ("TENANTMESH_PRICING_FILE", "/no/such/pricing.toml"),
            ("TENANTMESH_ONBOARDING_URL", "ftp://x"),
        ] {
            let e = Config::from_env(&env(&[(var, value)])).unwrap_err();
            assert_eq!(e.var, var, "{e:?}");
        }
    }

    /// With the longest tenant id and sort key and the largest version,
    /// the largest item and the history entry of its overwrite are both
    /// within DynamoDB's 400 KiB per item (attribute names `pk`, `sk`, `d`,
    /// `v`; a number takes at most 21 bytes).
    #[test]
    fn the_largest_item_and_its_history_entry_fit_in_a_dynamodb_item() {
        const DYNAMODB_ITEM_LIMIT: usize = 400 * 1024;
        let tenant = "t".repeat(63);
        assert!(tenantmesh_service::validate_tenant_id(&tenant).is_ok());
        assert!(tenantmesh_service::validate_tenant_id(&format!("{tenant}t")).is_err());
        let sk = sort_key(&"c".repeat(MAX_COLLECTION_LEN), &"i".repeat(MAX_ID_LEN));
        let stored = |sk: &str, data: usize| {
            "pk".len() + tenant.len() + "sk".len() + sk.len() + "d".len() + data + "v".len() + 21
        };
        let entry = history::entry_key(i64::MAX);
        let image =
            tenantmesh_storage::BeforeImage { sk: sk.clone(), version: u64::MAX, data: vec![0; MAX_ITEM_BYTES] };
        assert!(stored(&sk, MAX_ITEM_BYTES) <= DYNAMODB_ITEM_LIMIT);
        let record = stored(&entry, image.encode().len());
        assert!(record <= DYNAMODB_ITEM_LIMIT, "a history entry of {record} bytes");
    }

    #[test]
    fn an_items_size_as_returned_without_encoding_it() {
        for (stored_version, version) in [(0u64, 1u64), (0, 300), (5, 70_000), (0, 0)] {
            let item = Item { id: "x".into(), version: stored_version, update_time_ms: 7, ..Default::default() };
            let raw =
                tenantmesh_storage::Item { pk: "t".into(), sk: "c#x".into(), data: item.encode_to_vec(), version };
            let (decoded, size) = decode_sized(&raw).unwrap();
            assert_eq!((decoded.version, size), (version, decoded.encoded_len()));
        }
    }

    #[test]
    fn response_sizes_from_item_sizes() {
        for bytes in [0usize, 10, 200, 20_000] {
            let item = Item { id: "x".repeat(bytes), ..Default::default() };
            let get = GetItemResponse { item: Some(item.clone()) };
            assert_eq!(field_len(item.encoded_len()), get.encoded_len());
            let query =
                QueryItemsResponse { items: vec![item.clone(), item.clone()], next_page_token: "t".repeat(bytes) };
            let token = if bytes == 0 { 0 } else { field_len(bytes) };
            assert_eq!(2 * field_len(item.encoded_len()) + token, query.encoded_len());
        }
    }
}
