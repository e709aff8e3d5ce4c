//! What each step does, against the registry, auth and data services, as
//! the onboarding service's platform identity. Every step is idempotent:
//! run again after a crash, it creates nothing twice.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tenantmesh_proto::auth::v1::auth_client::AuthClient;
use tenantmesh_proto::auth::v1::{CreateUserRequest, DeleteUserRequest, ListUsersRequest, Role as ProtoRole};
use tenantmesh_proto::data::v1::data_admin_client::DataAdminClient;
use tenantmesh_proto::data::v1::{
    DropStoreRequest, ExportItemsRequest, ImportItemsRequest, ProvisionStoreRequest, PurgeItemsRequest,
    RewindItemsRequest, SetFenceRequest, StoreRef, StoredItem,
};
use tenantmesh_proto::onboarding::v1::EventKind;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{
    CreateTenantRequest, GetTenantRequest, SetPlacementRequest, SetTenantLimitsRequest, SetTenantStatusRequest,
    TenantStatus,
};
use tenantmesh_service::tiers::Tiers;
use tenantmesh_tenant_context::client::{self, PropagatedChannel, ServiceTokenSource};
use tonic::Code;

use crate::compute::SiloCompute;
use crate::engine::{StepError, StepRunner};
use crate::events::EventLog;
use crate::export;
use crate::resources::{self, Ledger};
use crate::workflow::{Kind, Spot, Step, Workflow};
use tenantmesh_service::clock::now_us;

/// Items per ImportItems (and ImportTenant) call: the services' limit.
const IMPORT_BATCH: usize = 500;
/// Bytes of items per ImportItems call: half the 4 MiB message limit, so a
/// batch of items at DynamoDB's 400 KiB limit still fits, whatever the mix.
const IMPORT_BATCH_BYTES: usize = 2 << 20;

/// Splits `items` into import batches: at most [`IMPORT_BATCH`] items
/// and [`IMPORT_BATCH_BYTES`] each by `size` (an item larger than that
/// goes alone).
pub(crate) fn import_batches<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut batches = Vec::new();
    let (mut batch, mut bytes) = (Vec::new(), 0);
    for item in items {
        let size = size(&item);
        if !batch.is_empty() && (batch.len() == IMPORT_BATCH || bytes + size > IMPORT_BATCH_BYTES) {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += size;
        batch.push(item);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// The step runner of the onboarding service.
pub struct Steps {
    pub registry: TenantRegistryClient<PropagatedChannel>,
    pub auth: AuthClient<PropagatedChannel>,
    /// The shared data service's DataAdmin URL.
    pub data_url: String,
    pub tokens: Arc<ServiceTokenSource>,
    pub compute: Arc<dyn SiloCompute>,
    pub tiers: Arc<Tiers>,
    pub events: Arc<EventLog>,
    /// How long every service may go on using a tenant's cached status and
    /// placement: after a switch, waiting this long means no instance still
    /// reads from the old placement (writes there are fenced already).
    pub drain: Duration,
    pub exports_dir: PathBuf,
    /// DataAdmin clients by URL (the shared data service, silo instances).
    /// DataAdmin of the shared data service and the silo instances, with
    /// the onboarding service's identity.
    pub data_clients: client::Channels,
    /// What was created for each tenant alone, with its tags.
    pub resources: Arc<Ledger>,
}

/// What an item of the data service weighs in an import batch.
fn stored_size(item: &StoredItem) -> usize {
    item.data.len() + item.sort_key.len() + 16
}

pub(crate) fn ledger_error(e: tenantmesh_storage::StorageError) -> StepError {
    StepError::transient(format!("resource ledger: {e}"))
}

#[async_trait]
impl StepRunner for Steps {
    async fn run(&self, at: usize, wf: &mut Workflow) -> Result<(), StepError> {
        if !wf.steps[at].service.is_empty() {
            return self.run_hook(at, wf).await;
        }
        match wf.steps[at].name {
            Step::CreateTenant => self.create_tenant(wf).await,
            Step::ProvisionCompute => self.provision_compute(wf).await,
            Step::ProvisionStorage => self.provision_storage(wf).await,
            Step::CreateAdminUser => self.create_admin_user(wf).await,
            Step::ApplyLimits => self.apply_limits(wf).await,
            Step::ActivateTenant => {
                self.set_status(wf, TenantStatus::Active).await?;
                let tier = wf.params.tier.clone();
                self.events.emit(EventKind::TenantOnboarded, &wf.params.tenant_id, &wf.id, tier).await;
                Ok(())
            }
            Step::PauseWrites => {
                self.set_status(wf, TenantStatus::Migrating).await?;
                // Instances that have not seen MIGRATING yet still try to
                // write; the fence refuses those writes from now on, so
                // the copy sees every write that was acknowledged.
                self.set_fence(&wf.from, &wf.params.tenant_id, true).await?;
                if wf.kind == Kind::Restore {
                    // Every write acknowledged is before this instant, and
                    // every change of the rewind after it: a rollback
                    // rewinds to here.
                    wf.outputs.insert(PAUSED_AT.into(), now_us().to_string());
                }
                Ok(())
            }
            Step::RewindItems => self.rewind_items(wf).await,
            Step::ResumeWrites => {
                self.resume_writes(wf).await?;
                let detail = format!("to {} µs since the epoch", wf.point_in_time_us);
                self.events.emit(EventKind::TenantRestored, &wf.params.tenant_id, &wf.id, detail).await;
                Ok(())
            }
            Step::CopyItems => self.copy_items(wf).await,
            Step::SwitchPlacement => self.switch_placement(wf).await,
            Step::Drain => {
                // Instances that still read by the old placement stop doing so within this wait.
                tokio::time::sleep(self.drain).await;
                Ok(())
            }
            Step::RemoveOldCopy => self.remove_copy(&wf.from, &wf.params.tenant_id, true).await,
            Step::SuspendTenant => {
                self.set_status(wf, TenantStatus::Suspended).await?;
                // No write lands after this: the export is complete.
                self.set_fence(&wf.from, &wf.params.tenant_id, true).await?;
                // And once every service's cached view has expired, the
                // tenant's tokens are refused everywhere before anything
                // of it is deleted.
                tokio::time::sleep(self.drain).await;
                let tenant = &wf.params.tenant_id;
                self.events.emit(EventKind::TenantSuspended, tenant, &wf.id, "offboarding".into()).await;
                Ok(())
            }
            Step::ExportItems => self.export_items(wf).await,
            Step::DeleteItems => self.delete_items(wf).await,
            Step::DeleteResources => self.remove_copy(&wf.from, &wf.params.tenant_id, false).await,
            Step::DeleteUsers => self.delete_users(wf).await,
            Step::MarkDeleted => {
                self.set_status(wf, TenantStatus::Deleted).await?;
                let (tenant, path) = (&wf.params.tenant_id, wf.export_path.clone());
                self.events.emit(EventKind::TenantOffboarded, tenant, &wf.id, path).await;
                Ok(())
            }
            step @ (Step::ProvisionService
            | Step::FenceService
            | Step::CopyService
            | Step::UnfenceService
            | Step::ExportService
            | Step::RewindService
            | Step::PurgeService) => Err(StepError::permanent(format!("{step} names no application service"))),
        }
    }

    async fn failed(&self, wf: &Workflow, at: usize, reason: &str) {
        let detail = format!("{}: {reason}", wf.steps[at].label());
        self.events.emit(EventKind::StepFailed, &wf.params.tenant_id, &wf.id, detail).await;
    }

    /// A tier change that failed before its switch: the new copy (whole or
    /// partial) is removed, and the tenant is ACTIVE again where it always
    /// was (its placement, tier and limits never changed; the old copy was
    /// never touched). Each part is idempotent.
    async fn roll_back(&self, wf: &mut Workflow) -> Result<(), StepError> {
        if wf.kind == Kind::Restore {
            return self.roll_back_restore(wf).await;
        }
        let tenant = wf.params.tenant_id.clone();
        // Through the shared data service: a silo instance may never have started.
        let to = Spot { endpoint: String::new(), ..wf.to.clone() };
        self.remove_copy(&to, &tenant, true).await?;
        self.roll_back_hooks(wf).await?;
        self.resume_writes(wf).await?;
        tracing::warn!(from = %wf.from_tier, to = %wf.params.tier, "tier change rolled back: the tenant is ACTIVE on its old placement");
        Ok(())
    }
}

/// The output of a restore's PauseWrites: when writes stopped (µs).
pub(crate) const PAUSED_AT: &str = "paused_at_us";

fn store_ref(wf: &Workflow, spot: &Spot) -> Option<StoreRef> {
    Some(StoreRef { tenant_id: wf.params.tenant_id.clone(), table: spot.table.clone() })
}

impl Steps {
    /// Puts the tenant's items back as they were at the restore's instant.
    async fn rewind_items(&self, wf: &mut Workflow) -> Result<(), StepError> {
        let req = RewindItemsRequest {
            store: store_ref(wf, &wf.from),
            point_in_time_us: wf.point_in_time_us,
            charge_tenant: wf.charge_tenant,
        };
        let done = match self.data_admin(&wf.from)?.rewind_items(req).await {
            Ok(r) => r.into_inner(),
            // The history does not reach back: nothing was changed, and trying again changes nothing.
            Err(s) if s.code() == Code::FailedPrecondition => return Err(StepError::permanent(s.message())),
            Err(s) => return Err(s.into()),
        };
        wf.outputs.insert("restored_items".into(), done.restored.to_string());
        wf.outputs.insert("deleted_items".into(), done.deleted.to_string());
        tracing::info!(
            restored = done.restored,
            deleted = done.deleted,
            point_in_time_us = wf.point_in_time_us,
            "items rewound"
        );
        Ok(())
    }

    /// A restore in place that failed for good: the items are put back as
    /// they were when writes paused (undoing any part of the rewind), and
    /// the tenant takes writes again. One into an export left nothing to undo.
    async fn roll_back_restore(&self, wf: &Workflow) -> Result<(), StepError> {
        if !wf.steps.iter().any(|s| s.name == Step::PauseWrites) {
            // Into an export: the tenant was never touched (an unfinished
            // export is never renamed into place).
            return Ok(());
        }
        if let Some(paused_at) = wf.outputs.get(PAUSED_AT).and_then(|t| t.parse().ok()) {
            // Undoing is never charged, nor refused.
            let req = RewindItemsRequest {
                store: store_ref(wf, &wf.from),
                point_in_time_us: paused_at,
                charge_tenant: false,
            };
            match self.data_admin(&wf.from)?.rewind_items(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    tracing::warn!(restored = r.restored, deleted = r.deleted, "restore undone");
                }
                // No history at all: no rewind ever changed anything.
                Err(s) if s.code() == Code::FailedPrecondition => {}
                Err(s) => return Err(s.into()),
            }
        }
        self.roll_back_hooks(wf).await?;
        self.resume_writes(wf).await?;
        tracing::warn!("restore rolled back: the tenant's items are as they were before it, and it takes writes");
        Ok(())
    }

    /// DataAdmin of the instance serving `spot`.
    fn data_admin(&self, spot: &Spot) -> Result<DataAdminClient<PropagatedChannel>, StepError> {
        let url = if spot.endpoint.is_empty() { self.data_url.as_str() } else { spot.endpoint.as_str() };
        let channel =
            self.data_clients.get(url).map_err(|e| StepError::permanent(format!("data endpoint {url}: {e}")))?;
        Ok(tenantmesh_service::sized!(DataAdminClient::new(channel)))
    }

    async fn set_status(&self, wf: &Workflow, status: TenantStatus) -> Result<(), StepError> {
        let req = SetTenantStatusRequest { tenant_id: wf.params.tenant_id.clone(), status: status as i32 };
        self.registry.clone().set_tenant_status(req).await?;
        Ok(())
    }

    async fn create_tenant(&self, wf: &Workflow) -> Result<(), StepError> {
        let p = &wf.params;
        let created = self
            .registry
            .clone()
            .create_tenant(CreateTenantRequest {
                tenant_id: p.tenant_id.clone(),
                name: p.name.clone(),
                tier: p.tier.clone(),
                status: TenantStatus::Provisioning as i32,
                placement: Some(wf.to.placement()),
            })
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                // Adopt only the record an earlier run of this very
                // workflow created: still provisioning, same name and tier.
                let existing = self
                    .registry
                    .clone()
                    .get_tenant(GetTenantRequest { tenant_id: p.tenant_id.clone() })
                    .await?
                    .into_inner()
                    .tenant
                    .unwrap_or_default();
                let ours = existing.status == TenantStatus::Provisioning as i32
                    && existing.name == p.name
                    && existing.tier == p.tier;
                if ours {
                    Ok(())
                } else {
                    Err(StepError::permanent(format!("tenant {} already exists outside this onboarding", p.tenant_id)))
                }
            }
            Err(s) => Err(s.into()),
        }
    }

    async fn provision_compute(&self, wf: &mut Workflow) -> Result<(), StepError> {
        let tenant = wf.params.tenant_id.clone();
        wf.to.endpoint = self.compute.provision(&tenant, &wf.params.tier).await.map_err(StepError::transient)?;
        self.resources
            .add(&tenant, resources::SILO_INSTANCE, &wf.to.endpoint, &wf.params.tier)
            .await
            .map_err(ledger_error)?;
        if wf.kind == Kind::Onboard {
            // Recorded now, so a retry or an offboarding finds the instance.
            self.registry
                .clone()
                .set_placement(SetPlacementRequest {
                    tenant_id: tenant,
                    placement: Some(wf.to.placement()),
                    ..Default::default()
                })
                .await?;
        }
        Ok(())
    }

    async fn provision_storage(&self, wf: &Workflow) -> Result<(), StepError> {
        if !wf.to.dedicated() {
            return Ok(());
        }
        // Listed before it exists: a crash in between never leaves it unlisted.
        self.resources
            .add(&wf.params.tenant_id, resources::TABLE, &wf.to.table, &wf.params.tier)
            .await
            .map_err(ledger_error)?;
        let req = ProvisionStoreRequest { store: store_ref(wf, &wf.to), tier: wf.params.tier.clone() };
        let created = self.data_admin(&wf.to)?.provision_store(req).await?.into_inner().created;
        tracing::info!(table = %wf.to.table, created, "tenant storage provisioned");
        Ok(())
    }

    async fn create_admin_user(&self, wf: &Workflow) -> Result<(), StepError> {
        let created = self
            .auth
            .clone()
            .create_user(CreateUserRequest {
                tenant_id: wf.params.tenant_id.clone(),
                email: wf.params.admin_email.clone(),
                password: String::new(),
                roles: vec![ProtoRole::TenantAdmin as i32],
                password_hash: wf.admin_password_hash.clone(),
            })
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(s.into()),
        }
    }

    async fn apply_limits(&self, wf: &Workflow) -> Result<(), StepError> {
        let tier = self
            .tiers
            .get(&wf.params.tier)
            .ok_or_else(|| StepError::permanent(format!("tier {} is not in the tiers file", wf.params.tier)))?;
        let req = SetTenantLimitsRequest { tenant_id: wf.params.tenant_id.clone(), limits: Some(tier.limits()) };
        self.registry.clone().set_tenant_limits(req).await?;
        Ok(())
    }

    /// Copies the tenant's items page by page (a page of the export at a
    /// time in memory, whatever the tenant holds), in byte-bounded batches.
    async fn copy_items(&self, wf: &mut Workflow) -> Result<(), StepError> {
        let mut target = self.data_admin(&wf.to)?;
        // Items, and the history entries that move with them (`~` keys).
        let (mut copied, mut history) = (0usize, 0usize);
        if let Some(mut pages) = self.export(&wf.from, &wf.params.tenant_id, true, None, false).await? {
            while let Some(page) = pages.message().await? {
                for batch in import_batches(page.items, stored_size) {
                    let entries = batch.iter().filter(|i| i.sort_key.starts_with('~')).count();
                    (copied, history) = (copied + batch.len() - entries, history + entries);
                    target.import_items(ImportItemsRequest { store: store_ref(wf, &wf.to), items: batch }).await?;
                }
            }
        }
        wf.outputs.insert("copied_items".into(), copied.to_string());
        wf.outputs.insert("copied_history_entries".into(), history.to_string());
        tracing::info!(items = copied, history, from = %wf.from.table, to = %wf.to.table, "items copied");
        Ok(())
    }

    async fn switch_placement(&self, wf: &Workflow) -> Result<(), StepError> {
        // The new table takes writes (a fence left there by an earlier
        // move away is lowered) before any instance is told to write there.
        self.set_fence(&wf.to, &wf.params.tenant_id, false).await?;
        self.registry
            .clone()
            .set_placement(SetPlacementRequest {
                tenant_id: wf.params.tenant_id.clone(),
                tier: wf.params.tier.clone(),
                placement: Some(wf.to.placement()),
                status: TenantStatus::Active as i32,
                expected_version: None,
            })
            .await?;
        let detail = format!("{} -> {}", wf.from_tier, wf.params.tier);
        self.events.emit(EventKind::TierChanged, &wf.params.tenant_id, &wf.id, detail).await;
        Ok(())
    }

    /// Writes the tenant's items to its JSONL export page by page (bounded
    /// memory), then syncs and renames it into place. Offboarding exports
    /// the items as they are; a restore into an export as they were at its
    /// instant (to `<tenant>-at-<µs>.jsonl`).
    async fn export_items(&self, wf: &mut Workflow) -> Result<(), StepError> {
        let tenant = wf.params.tenant_id.clone();
        let as_of = (wf.kind == Kind::Restore).then_some(wf.point_in_time_us);
        // Asked first: an export that cannot be made (an instant before the
        // history) leaves no file behind.
        let pages = self.export(&wf.from, &tenant, false, as_of, wf.charge_tenant).await?;
        let mut file = self.export_file(wf, "jsonl").await?;
        if let Some(mut pages) = pages {
            while let Some(page) = pages.message().await? {
                let lines =
                    page.items.iter().map(export::line).collect::<Result<Vec<_>, _>>().map_err(StepError::permanent)?;
                file.append(lines).await?;
            }
        }
        let (path, exported) = self.finish_export(wf, file).await?;
        wf.export_path = path;
        tracing::info!(items = exported, path = %wf.export_path, as_of_us = ?as_of, "tenant items exported");
        if as_of.is_some() {
            let detail = format!("export of the items at {} µs: {}", wf.point_in_time_us, wf.export_path);
            self.events.emit(EventKind::TenantRestored, &tenant, &wf.id, detail).await;
        }
        Ok(())
    }

    /// A new export of `wf`'s tenant: `<tenant>.<extension>`, or a
    /// restore's `<tenant>-at-<µs>.<extension>`.
    pub(crate) async fn export_file(&self, wf: &Workflow, extension: &str) -> Result<export::Writer, StepError> {
        let tenant = &wf.params.tenant_id;
        let name = match wf.kind {
            Kind::Restore => format!("{tenant}-at-{}.{extension}", wf.point_in_time_us),
            _ => format!("{tenant}.{extension}"),
        };
        export::Writer::create(self.exports_dir.join(name)).await
    }

    /// Puts the export in place and in the ledger (counted and billed by
    /// the byte-hour until its retention ends): its path and its lines.
    pub(crate) async fn finish_export(
        &self,
        wf: &Workflow,
        file: export::Writer,
    ) -> Result<(String, usize), StepError> {
        let (path, bytes, lines) = file.finish().await?;
        let shown = path.display().to_string();
        let tenant = &wf.params.tenant_id;
        self.resources
            .add_sized(tenant, resources::EXPORT, &shown, &wf.from_tier, bytes)
            .await
            .map_err(ledger_error)?;
        Ok((shown, lines))
    }

    async fn delete_items(&self, wf: &Workflow) -> Result<(), StepError> {
        match self.data_admin(&wf.from)?.purge_items(PurgeItemsRequest { store: store_ref(wf, &wf.from) }).await {
            Ok(r) => tracing::info!(deleted = r.into_inner().deleted, "tenant items deleted"),
            // A dedicated table that never got made (or was dropped by an earlier run).
            Err(s) if s.code() == Code::FailedPrecondition => {}
            Err(s) => return Err(s.into()),
        }
        Ok(())
    }

    async fn delete_users(&self, wf: &Workflow) -> Result<(), StepError> {
        let tenant = &wf.params.tenant_id;
        let mut auth = self.auth.clone();
        loop {
            let page = auth
                .list_users(ListUsersRequest { tenant_id: tenant.clone(), page_size: 100, page_token: String::new() })
                .await?
                .into_inner();
            if page.users.is_empty() {
                return Ok(());
            }
            for u in page.users {
                match auth.delete_user(DeleteUserRequest { tenant_id: tenant.clone(), email: u.email }).await {
                    Ok(_) => {}
                    Err(s) if s.code() == Code::NotFound => {}
                    Err(s) => return Err(s.into()),
                }
            }
        }
    }

    /// Raises or lowers `tenant`'s write fence where `spot` keeps its items
    /// (nothing to do where a dedicated table is gone).
    /// Lowers the fence where the tenant's items are and sets it ACTIVE:
    /// it takes writes again.
    async fn resume_writes(&self, wf: &Workflow) -> Result<(), StepError> {
        self.set_fence(&wf.from, &wf.params.tenant_id, false).await?;
        self.set_status(wf, TenantStatus::Active).await
    }

    async fn set_fence(&self, spot: &Spot, tenant: &str, raised: bool) -> Result<(), StepError> {
        let request =
            SetFenceRequest { store: Some(StoreRef { tenant_id: tenant.into(), table: spot.table.clone() }), raised };
        match self.data_admin(spot)?.set_fence(request).await {
            Ok(r) => {
                tracing::info!(table = %spot.table, raised, changed = r.into_inner().changed, "write fence set");
                Ok(())
            }
            Err(s) if s.code() == Code::FailedPrecondition && spot.dedicated() => Ok(()),
            Err(s) => Err(s.into()),
        }
    }

    /// The pages of every item of `tenant` where `spot` keeps them (`None`
    /// if its dedicated table is gone): as they are, with their change
    /// history (`include_history`: what moves with them), or as they were
    /// at `as_of`; `charge_tenant`: read on the tenant's own request,
    /// charged to its limits.
    async fn export(
        &self,
        spot: &Spot,
        tenant: &str,
        include_history: bool,
        as_of: Option<i64>,
        charge_tenant: bool,
    ) -> Result<Option<tonic::Streaming<tenantmesh_proto::data::v1::ExportItemsResponse>>, StepError> {
        let request = ExportItemsRequest {
            store: Some(StoreRef { tenant_id: tenant.into(), table: spot.table.clone() }),
            include_history,
            as_of_us: as_of,
            charge_tenant,
        };
        match self.data_admin(spot)?.export_items(request).await {
            Ok(s) => Ok(Some(s.into_inner())),
            // The history does not reach back to `as_of`: no export can be made.
            Err(s) if s.code() == Code::FailedPrecondition && as_of.is_some() => Err(StepError::permanent(s.message())),
            Err(s) if s.code() == Code::FailedPrecondition && spot.dedicated() => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    /// Removes the tenant's items at `spot`: its dedicated table and silo
    /// instance, or (`purge_pooled`) its items in the pooled table.
    async fn remove_copy(&self, spot: &Spot, tenant: &str, purge_pooled: bool) -> Result<(), StepError> {
        let store = Some(StoreRef { tenant_id: tenant.into(), table: spot.table.clone() });
        if spot.dedicated() {
            let dropped = self.data_admin(spot)?.drop_store(DropStoreRequest { store }).await?.into_inner().dropped;
            self.resources.remove(tenant, resources::TABLE, &spot.table).await.map_err(ledger_error)?;
            tracing::info!(table = %spot.table, dropped, "dedicated table removed");
        } else if purge_pooled {
            let deleted = self.data_admin(spot)?.purge_items(PurgeItemsRequest { store }).await?.into_inner().deleted;
            tracing::info!(deleted, "pooled items removed");
        }
        if spot.silo() {
            self.compute.deprovision(tenant).await.map_err(StepError::transient)?;
            self.resources.remove(tenant, resources::SILO_INSTANCE, &spot.endpoint).await.map_err(ledger_error)?;
            tracing::info!("silo instance removed");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: usize, bytes: usize) -> StoredItem {
        StoredItem { sort_key: format!("c#{i}"), version: 1, data: vec![0; bytes] }
    }

    #[test]
    fn import_batches_are_bounded_in_items_and_bytes() {
        // Items at the 400 KiB limit: 5 per 2 MiB batch, every item once, in order.
        let big: Vec<_> = (0..12).map(|i| item(i, 400 * 1024)).collect();
        let batches = import_batches(big, stored_size);
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [5, 5, 2]);
        let keys: Vec<_> = batches.iter().flatten().map(|i| i.sort_key.clone()).collect();
        assert_eq!(keys, (0..12).map(|i| format!("c#{i}")).collect::<Vec<_>>());
        // Many small ones: 500 per batch.
        let small: Vec<_> = (0..1200).map(|i| item(i, 10)).collect();
        assert_eq!(import_batches(small, stored_size).iter().map(Vec::len).collect::<Vec<_>>(), [500, 500, 200]);
        // One item over the byte bound still goes, alone.
        let batches = import_batches(vec![item(0, 10), item(1, 3 << 20), item(2, 10)], stored_size);
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
        assert!(import_batches(Vec::new(), stored_size).is_empty());
    }
}
