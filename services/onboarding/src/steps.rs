//! What each step does, against the registry, auth and data services, as
//! the onboarding service's platform identity. Every step is idempotent:
//! run again after a crash, it creates nothing twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tenantmesh_proto::auth::v1::auth_client::AuthClient;
use tenantmesh_proto::auth::v1::{CreateUserRequest, DeleteUserRequest, ListUsersRequest, Role as ProtoRole};
use tenantmesh_proto::data::v1::data_admin_client::DataAdminClient;
use tenantmesh_proto::data::v1::{
    DropStoreRequest, ExportItemsRequest, ImportItemsRequest, ProvisionStoreRequest, PurgeItemsRequest, StoreRef,
    StoredItem,
};
use tenantmesh_proto::onboarding::v1::EventKind;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{
    CreateTenantRequest, GetTenantRequest, SetPlacementRequest, SetTenantLimitsRequest, SetTenantStatusRequest,
    TenantStatus,
};
use tenantmesh_service::tiers::Tiers;
use tenantmesh_tenant_context::client::{self, Identity, PropagatedChannel, ServiceTokenSource};
use tonic::Code;

use crate::compute::SiloCompute;
use crate::engine::{StepError, StepRunner};
use crate::events::EventLog;
use crate::export;
use crate::workflow::{Kind, Spot, Step, Workflow};

/// Items per ImportItems call.
const IMPORT_BATCH: usize = 500;

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
    /// placement: after a pause or a switch, waiting this long means no
    /// instance still acts on the old one.
    pub fence: Duration,
    pub exports_dir: PathBuf,
    /// DataAdmin clients by URL (the shared data service, silo instances).
    pub data_clients: std::sync::Mutex<HashMap<String, DataAdminClient<PropagatedChannel>>>,
}

#[async_trait]
impl StepRunner for Steps {
    async fn run(&self, step: Step, wf: &mut Workflow) -> Result<(), StepError> {
        match step {
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
                // Every instance now sees MIGRATING (no more writes) once its cache expires.
                tokio::time::sleep(self.fence).await;
                Ok(())
            }
            Step::CopyItems => self.copy_items(wf).await,
            Step::SwitchPlacement => self.switch_placement(wf).await,
            Step::Drain => {
                // Instances that still route by the old placement stop doing so within the fence.
                tokio::time::sleep(self.fence).await;
                Ok(())
            }
            Step::RemoveOldCopy => self.remove_copy(&wf.from, &wf.params.tenant_id, true).await,
            Step::SuspendTenant => {
                self.set_status(wf, TenantStatus::Suspended).await?;
                tokio::time::sleep(self.fence).await;
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
        }
    }

    async fn failed(&self, wf: &Workflow, step: Step, reason: &str) {
        let detail = format!("{step}: {reason}");
        self.events.emit(EventKind::StepFailed, &wf.params.tenant_id, &wf.id, detail).await;
    }
}

fn store_ref(wf: &Workflow, spot: &Spot) -> Option<StoreRef> {
    Some(StoreRef { tenant_id: wf.params.tenant_id.clone(), table: spot.table.clone() })
}

impl Steps {
    /// DataAdmin of the instance serving `spot`.
    fn data_admin(&self, spot: &Spot) -> Result<DataAdminClient<PropagatedChannel>, StepError> {
        let url = if spot.endpoint.is_empty() { self.data_url.as_str() } else { spot.endpoint.as_str() };
        let mut clients = self.data_clients.lock().expect("data clients lock");
        if let Some(c) = clients.get(url) {
            return Ok(c.clone());
        }
        let channel = client::channel(url).map_err(|e| StepError::permanent(format!("data endpoint {url}: {e}")))?;
        let c = DataAdminClient::new(client::wrap(channel, Identity::Service(self.tokens.clone())))
            .max_decoding_message_size(tenantmesh_service::runtime::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(tenantmesh_service::runtime::MAX_MESSAGE_BYTES);
        clients.insert(url.to_owned(), c.clone());
        Ok(c)
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
        wf.to.endpoint = self.compute.provision(&tenant).await.map_err(StepError::transient)?;
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

    async fn copy_items(&self, wf: &mut Workflow) -> Result<(), StepError> {
        let items = self.export(&wf.from, &wf.params.tenant_id).await?;
        let mut target = self.data_admin(&wf.to)?;
        for batch in items.chunks(IMPORT_BATCH) {
            target.import_items(ImportItemsRequest { store: store_ref(wf, &wf.to), items: batch.to_vec() }).await?;
        }
        wf.outputs.insert("copied_items".into(), items.len().to_string());
        tracing::info!(items = items.len(), from = %wf.from.table, to = %wf.to.table, "items copied");
        Ok(())
    }

    async fn switch_placement(&self, wf: &Workflow) -> Result<(), StepError> {
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

    async fn export_items(&self, wf: &mut Workflow) -> Result<(), StepError> {
        let tenant = wf.params.tenant_id.clone();
        let items = self.export(&wf.from, &tenant).await?;
        let lines = items.iter().map(export::line).collect::<Result<Vec<_>, _>>().map_err(StepError::permanent)?;
        let path = self.exports_dir.join(format!("{tenant}.jsonl"));
        let write = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || export::write_atomically(&path, &lines))
        };
        write
            .await
            .map_err(|e| StepError::permanent(e.to_string()))?
            .map_err(|e| StepError::transient(format!("export {}: {e}", path.display())))?;
        wf.export_path = path.display().to_string();
        tracing::info!(items = items.len(), path = %wf.export_path, "tenant items exported");
        Ok(())
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

    /// Every item of `tenant` where `spot` keeps them (none if its table is gone).
    async fn export(&self, spot: &Spot, tenant: &str) -> Result<Vec<StoredItem>, StepError> {
        let request =
            ExportItemsRequest { store: Some(StoreRef { tenant_id: tenant.into(), table: spot.table.clone() }) };
        let mut stream = match self.data_admin(spot)?.export_items(request).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::FailedPrecondition && spot.dedicated() => return Ok(Vec::new()),
            Err(s) => return Err(s.into()),
        };
        let mut items = Vec::new();
        while let Some(batch) = stream.message().await? {
            items.extend(batch.items);
        }
        Ok(items)
    }

    /// Removes the tenant's items at `spot`: its dedicated table and silo
    /// instance, or (`purge_pooled`) its items in the pooled table.
    async fn remove_copy(&self, spot: &Spot, tenant: &str, purge_pooled: bool) -> Result<(), StepError> {
        let store = Some(StoreRef { tenant_id: tenant.into(), table: spot.table.clone() });
        if spot.dedicated() {
            let dropped = self.data_admin(spot)?.drop_store(DropStoreRequest { store }).await?.into_inner().dropped;
            tracing::info!(table = %spot.table, dropped, "dedicated table removed");
        } else if purge_pooled {
            let deleted = self.data_admin(spot)?.purge_items(PurgeItemsRequest { store }).await?.into_inner().deleted;
            tracing::info!(deleted, "pooled items removed");
        }
        if spot.silo() {
            self.compute.deprovision(tenant).await.map_err(StepError::transient)?;
            tracing::info!("silo instance removed");
        }
        Ok(())
    }
}
