//! The `Data` RPCs: a tenant's items. A silo tenant's calls reach its own
//! instance without coming here: the application crate's silo layer
//! forwards them, per call, before any handler runs (see `serve`).

use std::sync::Arc;

use crate::error::DataError;
use crate::keys::*;
use prost::Message as _;
use tenantmesh_app::history;
use tenantmesh_app::quota;
use tenantmesh_isolation::TenantStores;
use tenantmesh_isolation::stores::{Location, locate};
use tenantmesh_metering::meters::Usage;
use tenantmesh_proto::data::v1::data_server::Data;
use tenantmesh_proto::data::v1::*;
use tenantmesh_proto::registry::v1::TenantStatus;
use tenantmesh_service::clock::now_ms;
use tenantmesh_service::errors::{Violations, invalid_field};
use tenantmesh_service::handled::Cost;
use tenantmesh_service::handled::Handled;
use tenantmesh_service::paging;
use tenantmesh_storage::{Condition, DynTable, Query, StorageError};
use tenantmesh_tenant_context::TenantContext;
use tonic::{Request, Response, Status};

/// The data service's state: tenant-confined views of its tables.
#[derive(Clone)]
pub struct DataService {
    stores: Arc<dyn TenantStores>,
    table_prefix: String,
    silo_tenant: Option<String>,
    quotas: Arc<quota::Quotas>,
    stall_writes: Option<std::time::Duration>,
    /// Where this process has seen its tenants' history (see [`history`])
    /// marked complete.
    history_started: Arc<history::Started>,
    /// The tiers: each one's cap on its tenants' history.
    tiers: Arc<tenantmesh_service::tiers::Tiers>,
}

/// Encoded bytes of a length-delimited field of `len` bytes (field numbers
/// 1-15): a response's size from its items' sizes, each item encoded in
/// length once.
fn field_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
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

    /// Test fault: see [`Config::stall_writes`](crate::config::Config::stall_writes).
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

    /// The store the calling tenant may see, where its placement puts its
    /// items. `write`: refused while the tenant is being moved.
    async fn route<T>(&self, request: &Request<T>, write: bool) -> Result<(Arc<str>, DynTable), Status> {
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
            Some(Location::Here { table }) => table,
            // The silo layer forwards every such call; this is a bug, and
            // the shared table must not serve it.
            Some(Location::Silo { .. }) => {
                tracing::error!("a silo tenant's call reached the shared instance's handler instead of its instance");
                return Err(Status::internal("internal error"));
            }
            None => return Err(DataError::ForeignTable.into()),
        };
        let tenant = ctx.tenant_id.clone();
        let store = self.stores.store_for(&tenant, table).await.map_err(DataError::from)?;
        if write {
            self.history_started.ensure(store.as_ref(), &tenant, table).await.map_err(DataError::from)?;
        }
        Ok((tenant, store))
    }

    /// The storage limits of the caller's tenant: its storage quota, its
    /// history's cap (its tier's multiple of the quota) and its plan's
    /// `max_items`; `None` when it has none (the platform).
    fn storage_limits(&self, ctx: &TenantContext) -> Option<quota::Limits> {
        let items = ctx.tenant.storage_quota?;
        let tier = self.tiers.get(ctx.tier());
        let multiple = tier.map_or(2, |t| u64::from(t.history_quota_multiple));
        // The plan's cap on items (an entitlement), with the tenant's override.
        let overrides = &ctx.tenant.entitlement_overrides;
        let count = match tier {
            Some(t) if overrides.is_empty() => t.entitlements.max_items,
            Some(t) => t.entitlements.with(overrides).max_items,
            None => None,
        };
        Some(quota::Limits { items, history: items.saturating_mul(multiple), count })
    }
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
        let (tenant, store) = self.route(&request, true).await?;
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
        let (tenant, store) = self.route(&request, false).await?;
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
        let (tenant, store) = self.route(&request, true).await?;
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
        let (tenant, store) = self.route(&request, false).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
