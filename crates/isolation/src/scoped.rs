//! A [`Table`] confined to one tenant by that tenant's session policy:
//! every call is evaluated (action, table, partition keys) before it
//! reaches the store, so a bug above it cannot read or write another
//! tenant's items.
//!
//! The policy is fixed for the life of a scoped table, so the decision for
//! a call on the tenant's own partition is the same every time: it is
//! evaluated once per action when the table is made, and remembered. Any
//! other key is evaluated in full, every time, against the policy rendered
//! again from the same inputs (such a call is a bug or an attack, never
//! the common case, and a tenant's view stays small while it is cached).

use std::sync::Arc;

use async_trait::async_trait;
use tenantmesh_storage::{Condition, DynTable, Fenced, Item, Page, Query, Result, StorageError, Table, Write};

use crate::eval::{Decision, RequestContext, evaluate};
use crate::policy::{Placement, PolicyDocument, PolicyError, tenant_policy};

/// The storage actions a scoped table performs, as IAM names them.
#[derive(Debug, Clone, Copy)]
enum Action {
    GetItem,
    PutItem,
    DeleteItem,
    Query,
    ConditionCheckItem,
}

impl Action {
    const ALL: [Action; 5] =
        [Action::GetItem, Action::PutItem, Action::DeleteItem, Action::Query, Action::ConditionCheckItem];

    fn iam(self) -> &'static str {
        match self {
            Action::GetItem => "dynamodb:GetItem",
            Action::PutItem => "dynamodb:PutItem",
            Action::DeleteItem => "dynamodb:DeleteItem",
            Action::Query => "dynamodb:Query",
            Action::ConditionCheckItem => "dynamodb:ConditionCheckItem",
        }
    }
}

/// A tenant's view of a table (see the module docs).
pub struct ScopedTable {
    inner: DynTable,
    tenant_id: Box<str>,
    /// Shared with the other tenants of the same table.
    placement: Arc<Placement>,
    /// The policy's decision for each action on the tenant's own partition.
    own: [Decision; Action::ALL.len()],
}

impl std::fmt::Debug for ScopedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopedTable").field("tenant_id", &self.tenant_id).field("table", &self.placement.table).finish()
    }
}

impl ScopedTable {
    /// Confines `inner` (the table of `placement`) to `tenant_id`.
    pub fn new(inner: DynTable, tenant_id: &str, placement: Arc<Placement>) -> Result<Self, PolicyError> {
        let policy = tenant_policy(tenant_id, &placement)?;
        let arn = placement.table_arn();
        let own = Action::ALL.map(|action| decide(&policy, &arn, action, tenant_id));
        Ok(Self { inner, tenant_id: tenant_id.into(), placement, own })
    }

    pub fn tenant_id(&self) -> &str {
        &self.tenant_id
    }

    fn check(&self, action: Action, key: &str) -> Result<()> {
        let decision = if key == &*self.tenant_id {
            self.own[action as usize]
        } else {
            // Rendered as at construction, which succeeded: the same document.
            match tenant_policy(&self.tenant_id, &self.placement) {
                Ok(policy) => decide(&policy, &self.placement.table_arn(), action, key),
                Err(_) => Decision::ImplicitDeny,
            }
        };
        if decision.is_allowed() {
            return Ok(());
        }
        let refused = if key == &*self.tenant_id { "" } else { key };
        tracing::warn!(
            security_event = "isolation_denied",
            tenant_id = %self.tenant_id,
            action = action.iam(),
            refused_key = %refused,
            decision = ?decision,
            "storage call refused by the tenant's session policy"
        );
        Err(StorageError::AccessDenied { action: action.iam().to_owned(), key: refused.to_owned() })
    }
}

/// `policy`'s decision on `action` against table `arn` for partition `key`.
fn decide(policy: &PolicyDocument, arn: &str, action: Action, key: &str) -> Decision {
    evaluate(policy, &RequestContext::dynamodb(action.iam(), arn, [key.to_owned()]))
}

#[async_trait]
impl Table for ScopedTable {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>> {
        self.check(Action::GetItem, pk)?;
        self.inner.get(pk, sk).await
    }

    async fn restore(&self, item: Item) -> Result<()> {
        self.check(Action::PutItem, &item.pk)?;
        self.inner.restore(item).await
    }

    async fn put(&self, pk: &str, sk: &str, data: Vec<u8>, condition: Condition) -> Result<Item> {
        self.check(Action::PutItem, pk)?;
        self.inner.put(pk, sk, data, condition).await
    }

    async fn delete(&self, pk: &str, sk: &str, condition: Condition) -> Result<Option<u64>> {
        self.check(Action::DeleteItem, pk)?;
        self.inner.delete(pk, sk, condition).await
    }

    /// A check of the fence item and a put: both actions, one partition.
    async fn put_fenced(
        &self,
        pk: &str,
        sk: &str,
        data: Vec<u8>,
        condition: Condition,
        fence_sk: &str,
        undo_sk: Option<&str>,
    ) -> Result<Fenced> {
        self.check(Action::ConditionCheckItem, pk)?;
        self.check(Action::PutItem, pk)?;
        if undo_sk.is_some() {
            self.check(Action::GetItem, pk)?;
        }
        self.inner.put_fenced(pk, sk, data, condition, fence_sk, undo_sk).await
    }

    async fn delete_fenced(
        &self,
        pk: &str,
        sk: &str,
        condition: Condition,
        fence_sk: &str,
        undo_sk: Option<&str>,
    ) -> Result<Fenced> {
        self.check(Action::ConditionCheckItem, pk)?;
        self.check(Action::DeleteItem, pk)?;
        if undo_sk.is_some() {
            self.check(Action::GetItem, pk)?;
            self.check(Action::PutItem, pk)?;
        }
        self.inner.delete_fenced(pk, sk, condition, fence_sk, undo_sk).await
    }

    async fn query(&self, query: Query) -> Result<Page> {
        self.check(Action::Query, &query.pk)?;
        self.inner.query(query).await
    }

    async fn transact_write(&self, writes: Vec<Write>) -> Result<()> {
        for w in &writes {
            let (action, pk) = match w {
                Write::Put { pk, .. } => (Action::PutItem, pk),
                Write::Delete { pk, .. } => (Action::DeleteItem, pk),
                Write::Check { pk, .. } => (Action::ConditionCheckItem, pk),
            };
            self.check(action, pk)?;
        }
        self.inner.transact_write(writes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenantmesh_storage::EmbeddedTable;

    fn setup() -> (tempfile::TempDir, DynTable, ScopedTable) {
        let dir = tempfile::tempdir().unwrap();
        let raw = EmbeddedTable::open_shared(dir.path().join("t.redb")).unwrap();
        let placement = Placement::new("local", "000000000000", "tenantmesh-data");
        let acme = ScopedTable::new(raw.clone(), "acme", Arc::new(placement)).unwrap();
        (dir, raw, acme)
    }

    fn denied<T: std::fmt::Debug>(r: Result<T>) {
        assert!(matches!(r, Err(StorageError::AccessDenied { ref key, .. }) if key == "globex"), "{r:?}");
    }

    /// Asked directly for another tenant's key — as buggy application code
    /// would — the scoped store refuses every kind of call, and nothing of
    /// the other tenant is read or written.
    #[tokio::test]
    async fn another_tenants_key_is_refused_for_every_call() {
        let (_dir, raw, acme) = setup();
        raw.put("globex", "notes#1", b"secret".to_vec(), Condition::None).await.unwrap();

        denied(acme.get("globex", "notes#1").await);
        denied(acme.put("globex", "notes#1", b"overwrite".to_vec(), Condition::None).await);
        denied(acme.delete("globex", "notes#1", Condition::None).await);
        denied(acme.put_fenced("globex", "notes#1", b"overwrite".to_vec(), Condition::None, "~fence", None).await);
        denied(acme.delete_fenced("globex", "notes#1", Condition::None, "~fence", None).await);
        denied(acme.put_fenced("globex", "notes#1", b"x".to_vec(), Condition::None, "~fence", Some("~u#1")).await);
        denied(acme.query(Query { pk: "globex".into(), sk_prefix: String::new(), start_after: None, limit: 10 }).await);
        let mixed = vec![
            Write::Put { pk: "acme".into(), sk: "a".into(), data: vec![], condition: Condition::None },
            Write::Delete { pk: "globex".into(), sk: "notes#1".into(), condition: Condition::None },
        ];
        denied(acme.transact_write(mixed).await);
        denied(
            acme.transact_write(vec![Write::Check { pk: "globex".into(), sk: "x".into(), condition: Condition::None }])
                .await,
        );

        let kept = raw.get("globex", "notes#1").await.unwrap().unwrap();
        assert_eq!((kept.version, kept.data.as_slice()), (1, b"secret".as_slice()));
        assert!(raw.get("acme", "a").await.unwrap().is_none(), "a refused transaction applied a write");
    }

    /// The tenant's own partition works normally through the scoped store.
    #[tokio::test]
    async fn own_partition_is_served() {
        let (_dir, _raw, acme) = setup();
        acme.put("acme", "notes#1", b"v".to_vec(), Condition::NotExists).await.unwrap();
        assert_eq!(acme.get("acme", "notes#1").await.unwrap().unwrap().data, b"v");
        let page = acme
            .query(Query { pk: "acme".into(), sk_prefix: "notes#".into(), start_after: None, limit: 10 })
            .await
            .unwrap();
        assert_eq!(page.items.len(), 1);
        acme.transact_write(vec![Write::Delete {
            pk: "acme".into(),
            sk: "notes#1".into(),
            condition: Condition::Exists,
        }])
        .await
        .unwrap();
        assert!(acme.get("acme", "notes#1").await.unwrap().is_none());
    }
}
