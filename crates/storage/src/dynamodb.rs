//! The DynamoDB backend: one table per service (or per tenant, later),
//! items `{pk: S, sk: S, v: N, d: B}`. Versions and conditions are enforced
//! by DynamoDB condition expressions, transactions by TransactWriteItems.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConditionCheck, Delete, KeySchemaElement, KeyType, ReturnValue,
    ScalarAttributeType, TableStatus, TransactWriteItem, Update,
};

use crate::table::{Condition, Item, Page, Query, Result, StorageError, Table, Write, check_key, check_transaction};

type Attrs = HashMap<String, AttributeValue>;

/// How the backend recognises a refusal raised inside the SDK pipeline
/// (the isolation guard): any error in the chain whose message starts with
/// this marker.
pub const ACCESS_DENIED_MARKER: &str = "tenantmesh access denied:";

/// A [`Table`] in DynamoDB.
#[derive(Clone, Debug)]
pub struct DynamoTable {
    client: Client,
    table: String,
}

fn key(pk: &str, sk: &str) -> Attrs {
    HashMap::from([
        ("pk".to_owned(), AttributeValue::S(pk.to_owned())),
        ("sk".to_owned(), AttributeValue::S(sk.to_owned())),
    ])
}

fn version_of(attrs: &Attrs) -> Option<u64> {
    match attrs.get("v") {
        Some(AttributeValue::N(n)) => n.parse().ok(),
        _ => None,
    }
}

fn to_item(attrs: &Attrs) -> Result<Item> {
    let s = |name: &str| match attrs.get(name) {
        Some(AttributeValue::S(s)) => Ok(s.clone()),
        _ => Err(StorageError::Backend(format!("item without a string {name}"))),
    };
    let data = match attrs.get("d") {
        Some(AttributeValue::B(b)) => b.clone().into_inner(),
        None => Vec::new(),
        _ => return Err(StorageError::Backend("item data is not binary".into())),
    };
    Ok(Item {
        pk: s("pk")?,
        sk: s("sk")?,
        version: version_of(attrs).ok_or_else(|| StorageError::Backend("item without a version".into()))?,
        data,
    })
}

/// The condition expression (and its values) for a [`Condition`].
fn condition_expr(c: Condition) -> Option<(&'static str, Option<AttributeValue>)> {
    match c {
        Condition::None => None,
        Condition::NotExists | Condition::Version(0) => Some(("attribute_not_exists(pk)", None)),
        Condition::Exists => Some(("attribute_exists(pk)", None)),
        Condition::Version(v) => Some(("v = :expected", Some(AttributeValue::N(v.to_string())))),
    }
}

const UPSERT: &str = "SET d = :d, v = if_not_exists(v, :zero) + :one";

fn upsert_values(data: &[u8]) -> Attrs {
    HashMap::from([
        (":d".to_owned(), AttributeValue::B(Blob::new(data.to_vec()))),
        (":zero".to_owned(), AttributeValue::N("0".into())),
        (":one".to_owned(), AttributeValue::N("1".into())),
    ])
}

/// Maps an SDK error; `conditional` is the result for a failed condition.
fn map_err<E, R>(e: SdkError<E, R>, conditional: impl FnOnce() -> StorageError) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    if let Some(denied) = denial_in_chain(&e) {
        return StorageError::AccessDenied { action: String::new(), key: denied };
    }
    match e.code() {
        Some("ConditionalCheckFailedException") => conditional(),
        Some("AccessDeniedException") | Some("UnrecognizedClientException") => {
            StorageError::AccessDenied { action: String::new(), key: String::new() }
        }
        Some("ValidationException") => StorageError::Invalid(e.message().unwrap_or("validation error").to_owned()),
        Some("ResourceNotFoundException") => StorageError::NoSuchTable(e.message().unwrap_or("not found").to_owned()),
        _ => StorageError::Backend(format!("dynamodb: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e))),
    }
}

/// The refused key, if the chain holds an isolation refusal.
fn denial_in_chain(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        if let Some(rest) = msg.strip_prefix(ACCESS_DENIED_MARKER) {
            return Some(rest.trim().to_owned());
        }
        cur = err.source();
    }
    None
}

impl DynamoTable {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }

    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// Creates the table (pk/sk strings, on-demand) if it does not exist,
    /// and waits until it is ACTIVE.
    /// Creates a tenant's dedicated table, tagged with `tags`, and turns
    /// point-in-time recovery on, once it is ACTIVE; `Ok(false)` when it
    /// already existed (its recovery setting is still made sure of).
    pub async fn provision_table(client: &Client, table: &str, tags: &[(&str, &str)]) -> Result<bool> {
        let tags = tags
            .iter()
            .map(|(k, v)| aws_sdk_dynamodb::types::Tag::builder().key(*k).value(*v).build().map_err(backend))
            .collect::<Result<Vec<_>>>()?;
        let created = Self::create_and_wait(client, table, Some(tags)).await?;
        client
            .update_continuous_backups()
            .table_name(table)
            .point_in_time_recovery_specification(
                aws_sdk_dynamodb::types::PointInTimeRecoverySpecification::builder()
                    .point_in_time_recovery_enabled(true)
                    .build()
                    .map_err(backend)?,
            )
            .send()
            .await
            .map_err(|e| map_err(e, || backend("update continuous backups")))?;
        if created {
            tracing::info!(table, "provisioned a dedicated dynamodb table (tagged, point-in-time recovery on)");
        }
        Ok(created)
    }

    /// Deletes `table`; `Ok(false)` when it did not exist.
    pub async fn drop_table(client: &Client, table: &str) -> Result<bool> {
        match client.delete_table().table_name(table).send().await {
            Ok(_) => {
                tracing::info!(table, "dropped a dedicated dynamodb table");
                Ok(true)
            }
            Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(false),
            Err(e) => Err(map_err(e, || backend("delete table"))),
        }
    }

    pub async fn ensure_table(client: &Client, table: &str) -> Result<()> {
        Self::create_and_wait(client, table, None).await.map(drop)
    }

    async fn create_and_wait(
        client: &Client,
        table: &str,
        tags: Option<Vec<aws_sdk_dynamodb::types::Tag>>,
    ) -> Result<bool> {
        let created = client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(
                KeySchemaElement::builder().attribute_name("pk").key_type(KeyType::Hash).build().map_err(backend)?,
            )
            .key_schema(
                KeySchemaElement::builder().attribute_name("sk").key_type(KeyType::Range).build().map_err(backend)?,
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("pk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(backend)?,
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("sk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(backend)?,
            )
            .set_tags(tags)
            .send()
            .await;
        let fresh = match created {
            Ok(_) => {
                tracing::info!(table, "created dynamodb table");
                true
            }
            Err(e) if e.code() == Some("ResourceInUseException") => false,
            Err(e) => return Err(map_err(e, || StorageError::Backend("create table".into()))),
        };
        for _ in 0..120 {
            let d = client
                .describe_table()
                .table_name(table)
                .send()
                .await
                .map_err(|e| map_err(e, || backend("describe")))?;
            if d.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                return Ok(fresh);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        Err(StorageError::Backend(format!("table {table} did not become ACTIVE")))
    }

    async fn current_version(&self, pk: &str, sk: &str) -> Option<u64> {
        self.get(pk, sk).await.ok().flatten().map(|i| i.version)
    }

    /// A failed single-item write; a failed condition reports the version
    /// found now (informational: it may have moved again).
    async fn write_error<E, R>(&self, e: SdkError<E, R>, pk: &str, sk: &str) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        match map_err(e, || StorageError::ConditionFailed { index: 0, current: None }) {
            StorageError::ConditionFailed { index, .. } => {
                StorageError::ConditionFailed { index, current: self.current_version(pk, sk).await }
            }
            other => other,
        }
    }
}

fn backend(e: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(e.to_string())
}

#[async_trait]
impl Table for DynamoTable {
    async fn restore(&self, item: Item) -> Result<()> {
        check_key(&item.pk, &item.sk)?;
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(&item.pk, &item.sk)))
            .update_expression("SET d = :d, v = :v")
            .expression_attribute_values(":d", AttributeValue::B(Blob::new(item.data)))
            .expression_attribute_values(":v", AttributeValue::N(item.version.to_string()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => Err(self.write_error(e, &item.pk, &item.sk).await),
        }
    }

    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>> {
        check_key(pk, sk)?;
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| map_err(e, || backend("unexpected condition failure")))?;
        out.item().map(to_item).transpose()
    }

    async fn put(&self, pk: &str, sk: &str, data: Vec<u8>, condition: Condition) -> Result<Item> {
        check_key(pk, sk)?;
        let mut values = upsert_values(&data);
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(pk, sk)))
            .update_expression(UPSERT)
            .return_values(ReturnValue::AllNew);
        if let Some((expr, value)) = condition_expr(condition) {
            req = req.condition_expression(expr);
            if let Some(v) = value {
                values.insert(":expected".into(), v);
            }
        }
        match req.set_expression_attribute_values(Some(values)).send().await {
            Ok(out) => {
                let version =
                    out.attributes().and_then(version_of).ok_or_else(|| backend("update returned no version"))?;
                Ok(Item { pk: pk.into(), sk: sk.into(), version, data })
            }
            Err(e) => Err(self.write_error(e, pk, sk).await),
        }
    }

    async fn delete(&self, pk: &str, sk: &str, condition: Condition) -> Result<Option<u64>> {
        check_key(pk, sk)?;
        let mut req = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(pk, sk)))
            .return_values(ReturnValue::AllOld);
        if let Some((expr, value)) = condition_expr(condition) {
            req = req.condition_expression(expr);
            if let Some(v) = value {
                req = req.expression_attribute_values(":expected", v);
            }
        }
        match req.send().await {
            Ok(out) => Ok(out.attributes().and_then(version_of)),
            Err(e) => Err(self.write_error(e, pk, sk).await),
        }
    }

    async fn query(&self, query: Query) -> Result<Page> {
        if query.pk.is_empty() {
            return Err(StorageError::Invalid("pk must not be empty".into()));
        }
        let mut req = self
            .client
            .query()
            .table_name(&self.table)
            .consistent_read(true)
            .limit(query.limit.clamp(1, i32::MAX as usize) as i32)
            .expression_attribute_values(":pk", AttributeValue::S(query.pk.clone()));
        req = if query.sk_prefix.is_empty() {
            req.key_condition_expression("pk = :pk")
        } else {
            req.key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":prefix", AttributeValue::S(query.sk_prefix.clone()))
        };
        if let Some(after) = &query.start_after {
            req = req.set_exclusive_start_key(Some(key(&query.pk, after)));
        }
        let out = req.send().await.map_err(|e| map_err(e, || backend("unexpected condition failure")))?;
        let mut items = Vec::new();
        let mut bytes = 0;
        for raw in out.items() {
            if bytes >= crate::table::MAX_PAGE_BYTES {
                // DynamoDB stops at 1 MB itself; the same bound here keeps
                // the backends alike (and emulators that do not bound pages).
                let last = items.last().map(|i: &Item| i.sk.clone());
                return Ok(Page { items, last_evaluated: last });
            }
            let item = to_item(raw)?;
            bytes += item.pk.len() + item.sk.len() + item.data.len();
            items.push(item);
        }
        let last_evaluated = match out.last_evaluated_key().and_then(|k| k.get("sk")) {
            Some(AttributeValue::S(sk)) => Some(sk.clone()),
            _ => None,
        };
        Ok(Page { items, last_evaluated })
    }

    async fn transact_write(&self, writes: Vec<Write>) -> Result<()> {
        check_transaction(&writes)?;
        let mut items = Vec::with_capacity(writes.len());
        for w in &writes {
            let item = match w {
                Write::Put { pk, sk, data, condition } => {
                    let mut values = upsert_values(data);
                    let mut u =
                        Update::builder().table_name(&self.table).set_key(Some(key(pk, sk))).update_expression(UPSERT);
                    if let Some((expr, value)) = condition_expr(*condition) {
                        u = u.condition_expression(expr);
                        if let Some(v) = value {
                            values.insert(":expected".into(), v);
                        }
                    }
                    TransactWriteItem::builder()
                        .update(u.set_expression_attribute_values(Some(values)).build().map_err(backend)?)
                        .build()
                }
                Write::Delete { pk, sk, condition } => {
                    let mut d = Delete::builder().table_name(&self.table).set_key(Some(key(pk, sk)));
                    if let Some((expr, value)) = condition_expr(*condition) {
                        d = d.condition_expression(expr);
                        if let Some(v) = value {
                            d = d.expression_attribute_values(":expected", v);
                        }
                    }
                    TransactWriteItem::builder().delete(d.build().map_err(backend)?).build()
                }
                Write::Check { pk, sk, condition } => {
                    // DynamoDB needs an expression; `None` always holds.
                    let (expr, value) = condition_expr(*condition)
                        .unwrap_or(("attribute_exists(pk) OR attribute_not_exists(pk)", None));
                    let mut c = ConditionCheck::builder()
                        .table_name(&self.table)
                        .set_key(Some(key(pk, sk)))
                        .condition_expression(expr);
                    if let Some(v) = value {
                        c = c.expression_attribute_values(":expected", v);
                    }
                    TransactWriteItem::builder().condition_check(c.build().map_err(backend)?).build()
                }
            };
            items.push(item);
        }
        // A transaction that met another one on an item (TransactionConflict)
        // changed nothing and may go again at once: a few times, briefly apart.
        let mut conflicts = 0;
        loop {
            // The SDK retries an attempt that timed out, which may have been
            // applied: with the same token, DynamoDB answers the retry with
            // the first attempt's success instead of applying it again (and
            // failing its own conditions). A new token per try of ours.
            let token = uuid::Uuid::new_v4().simple().to_string();
            let send =
                self.client.transact_write_items().set_transact_items(Some(items.clone())).client_request_token(token);
            match send.send().await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let reasons: Vec<Option<String>> = match e.as_service_error() {
                        Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(t)) => {
                            t.cancellation_reasons().iter().map(|r| r.code().map(str::to_owned)).collect()
                        }
                        _ => Vec::new(),
                    };
                    if let Some(index) = reasons.iter().position(|c| c.as_deref() == Some("ConditionalCheckFailed")) {
                        let (pk, sk) = writes[index].key();
                        return Err(StorageError::ConditionFailed {
                            index,
                            current: self.current_version(pk, sk).await,
                        });
                    }
                    if conflicts < 5 && reasons.iter().any(|c| c.as_deref() == Some("TransactionConflict")) {
                        conflicts += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(5 << conflicts)).await;
                        continue;
                    }
                    return Err(map_err(e, || backend("transaction cancelled")));
                }
            }
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// The attributes `restore` writes for `item`.
    fn attributes(item: &Item) -> Attrs {
        let mut attrs = key(&item.pk, &item.sk);
        attrs.insert("d".into(), AttributeValue::B(Blob::new(item.data.clone())));
        attrs.insert("v".into(), AttributeValue::N(item.version.to_string()));
        attrs
    }

    proptest! {
        /// An item survives its conversion to DynamoDB attributes and back,
        /// whatever its keys, bytes and version.
        #[test]
        fn items_round_trip_through_attributes(
            pk in ".{1,40}", sk in ".{1,80}", version in any::<u64>(),
            data in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            let item = Item { pk, sk, version, data };
            prop_assert_eq!(to_item(&attributes(&item)).unwrap(), item);
        }

        /// Conditions become the expressions that mean them: a version
        /// condition carries exactly that version.
        #[test]
        fn version_conditions_carry_their_version(v in 1u64..) {
            let (expr, value) = condition_expr(Condition::Version(v)).unwrap();
            prop_assert_eq!(expr, "v = :expected");
            prop_assert_eq!(value, Some(AttributeValue::N(v.to_string())));
        }

        /// Attributes of the wrong shape are a backend error, never a panic.
        #[test]
        fn malformed_attributes_are_errors(version in ".{0,20}", data_is_string in any::<bool>()) {
            let mut attrs = key("p", "s");
            attrs.insert("v".into(), AttributeValue::N(version.clone()));
            if data_is_string {
                attrs.insert("d".into(), AttributeValue::S("not binary".into()));
            }
            let parsed = to_item(&attrs);
            let valid = version.parse::<u64>().is_ok() && !data_is_string;
            prop_assert_eq!(parsed.is_ok(), valid);
        }
    }
}
