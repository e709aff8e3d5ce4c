//! The request guard on a tenant's DynamoDB client: an SDK interceptor that
//! evaluates every outgoing request (its action, table, and the partition
//! keys in `Key`, `Item`, `KeyConditionExpression`, batch and transaction
//! items) against the tenant's session policy and refuses it before it
//! leaves the process. Against AWS this is defence in depth; against an
//! emulator that ignores session policies it is the enforcement.

use std::sync::Arc;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use serde_json::Value;
use tenantmesh_storage::ACCESS_DENIED_MARKER;

use crate::eval::{RequestContext, evaluate};
use crate::policy::{Placement, PolicyDocument};

/// A refusal; its message starts with the storage crate's marker so the
/// backend maps it to `AccessDenied`.
#[derive(Debug)]
pub struct GuardDenied {
    pub action: String,
    pub refused_key: String,
}

impl std::fmt::Display for GuardDenied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{ACCESS_DENIED_MARKER} {}", self.refused_key)
    }
}

impl std::error::Error for GuardDenied {}

/// The interceptor (see the module docs).
#[derive(Debug, Clone)]
pub struct PolicyGuard {
    tenant_id: String,
    policy: Arc<PolicyDocument>,
    placement: Placement,
}

/// One DynamoDB sub-request: action, table, leading keys.
#[derive(Debug, PartialEq, Eq)]
pub struct Access {
    pub action: String,
    pub table: String,
    pub leading_keys: Vec<String>,
}

fn pk_of(item: &Value) -> Option<String> {
    item.get("pk")?.get("S")?.as_str().map(str::to_owned)
}

/// The partition key value a Query's key condition pins, if it pins one.
fn query_pk(body: &Value) -> Option<String> {
    let expr = body.get("KeyConditionExpression")?.as_str()?;
    let names = body.get("ExpressionAttributeNames");
    let values = body.get("ExpressionAttributeValues")?;
    for clause in expr.split(" AND ").chain(expr.split(" and ")) {
        let Some((lhs, rhs)) = clause.split_once('=') else { continue };
        let (lhs, rhs) = (lhs.trim().trim_start_matches('('), rhs.trim().trim_end_matches(')'));
        let name = if lhs.starts_with('#') { names?.get(lhs)?.as_str()? } else { lhs };
        if name == "pk" && rhs.starts_with(':') {
            return values.get(rhs)?.get("S")?.as_str().map(str::to_owned);
        }
    }
    None
}

/// What a DynamoDB JSON request touches; `None` if it cannot be told (refused).
pub fn accesses(operation: &str, body: &Value) -> Option<Vec<Access>> {
    let table = |v: &Value| v.get("TableName").and_then(Value::as_str).map(str::to_owned);
    let single = |action: &str, keys: Vec<String>| -> Option<Vec<Access>> {
        Some(vec![Access { action: format!("dynamodb:{action}"), table: table(body)?, leading_keys: keys }])
    };
    match operation {
        "GetItem" | "DeleteItem" | "UpdateItem" => single(operation, vec![pk_of(body.get("Key")?)?]),
        "PutItem" => single(operation, vec![pk_of(body.get("Item")?)?]),
        // A Query that pins no partition would pass a ForAllValues
        // condition with no leading key: refuse it outright.
        "Query" => single(operation, vec![query_pk(body)?]),
        "TransactWriteItems" => {
            let mut out = Vec::new();
            for item in body.get("TransactItems")?.as_array()? {
                let (kind, inner) = item.as_object()?.iter().next()?;
                let (action, key) = match kind.as_str() {
                    "Put" => ("PutItem", inner.get("Item")?),
                    "Update" => ("UpdateItem", inner.get("Key")?),
                    "Delete" => ("DeleteItem", inner.get("Key")?),
                    "ConditionCheck" => ("ConditionCheckItem", inner.get("Key")?),
                    _ => return None,
                };
                out.push(Access {
                    action: format!("dynamodb:{action}"),
                    table: table(inner)?,
                    leading_keys: vec![pk_of(key)?],
                });
            }
            Some(out)
        }
        "BatchGetItem" | "BatchWriteItem" => {
            let mut out = Vec::new();
            for (table, req) in body.get("RequestItems")?.as_object()? {
                let mut keys = Vec::new();
                if operation == "BatchGetItem" {
                    for k in req.get("Keys")?.as_array()? {
                        keys.push(pk_of(k)?);
                    }
                } else {
                    for w in req.as_array()? {
                        let k = w
                            .get("PutRequest")
                            .and_then(|p| p.get("Item"))
                            .or_else(|| w.get("DeleteRequest").and_then(|d| d.get("Key")))?;
                        keys.push(pk_of(k)?);
                    }
                }
                out.push(Access { action: format!("dynamodb:{operation}"), table: table.clone(), leading_keys: keys });
            }
            Some(out)
        }
        _ => None,
    }
}

impl PolicyGuard {
    pub fn new(tenant_id: &str, policy: Arc<PolicyDocument>, placement: Placement) -> Self {
        Self { tenant_id: tenant_id.to_owned(), policy, placement }
    }

    /// Checks one serialized request: `target` is the `X-Amz-Target` header.
    pub fn check(&self, target: &str, body: &[u8]) -> Result<(), GuardDenied> {
        let operation = target.rsplit('.').next().unwrap_or_default();
        let deny = |action: &str, key: &str| {
            tracing::warn!(
                security_event = "isolation_denied",
                tenant_id = %self.tenant_id,
                action,
                refused_key = key,
                "dynamodb request refused by the tenant's session policy"
            );
            GuardDenied { action: action.to_owned(), refused_key: key.to_owned() }
        };
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let Some(accesses) = parsed.as_ref().and_then(|b| accesses(operation, b)) else {
            return Err(deny(&format!("dynamodb:{operation}"), ""));
        };
        for a in accesses {
            let mut placement = self.placement.clone();
            placement.table = a.table.clone();
            let ctx = RequestContext::dynamodb(&a.action, &placement.table_arn(), a.leading_keys.iter().cloned());
            if !evaluate(&self.policy, &ctx).is_allowed() {
                let refused = a.leading_keys.iter().find(|k| **k != self.tenant_id).cloned().unwrap_or_default();
                return Err(deny(&a.action, &refused));
            }
        }
        Ok(())
    }
}

impl Intercept for PolicyGuard {
    fn name(&self) -> &'static str {
        "tenantmesh-policy-guard"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        let target = request.headers().get("x-amz-target").unwrap_or_default();
        let body = request.body().bytes().unwrap_or_default();
        self.check(target, body).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tenant_policy;
    use serde_json::json;

    fn guard() -> PolicyGuard {
        let placement = Placement::new("us-east-1", "123456789012", "pool");
        PolicyGuard::new("acme", Arc::new(tenant_policy("acme", &placement).unwrap()), placement)
    }

    fn check(op: &str, body: Value) -> Result<(), GuardDenied> {
        guard().check(&format!("DynamoDB_20120810.{op}"), body.to_string().as_bytes())
    }

    fn key(pk: &str) -> Value {
        json!({"pk": {"S": pk}, "sk": {"S": "x"}})
    }

    #[test]
    fn own_partition_passes_everything_else_is_refused() {
        assert!(check("GetItem", json!({"TableName": "pool", "Key": key("acme")})).is_ok());
        assert_eq!(
            check("GetItem", json!({"TableName": "pool", "Key": key("globex")})).unwrap_err().refused_key,
            "globex"
        );
        assert!(check("GetItem", json!({"TableName": "other", "Key": key("acme")})).is_err(), "other table");
        assert!(check("PutItem", json!({"TableName": "pool", "Item": key("globex")})).is_err());
        assert!(check("UpdateItem", json!({"TableName": "pool", "Key": key("acme")})).is_ok());
        assert!(check("DeleteItem", json!({"TableName": "pool", "Key": key("globex")})).is_err());
        assert!(check("Scan", json!({"TableName": "pool"})).is_err(), "scan is never allowed");
        assert!(check("DeleteTable", json!({"TableName": "pool"})).is_err());
        assert!(check("GetItem", json!({"TableName": "pool"})).is_err(), "no key: cannot tell, refuse");
        assert!(guard().check("DynamoDB_20120810.GetItem", b"not json").is_err());
    }

    #[test]
    fn queries_must_pin_the_tenant_partition() {
        let q = |expr: &str, pk: &str| {
            json!({"TableName": "pool", "KeyConditionExpression": expr,
                   "ExpressionAttributeNames": {"#p": "pk"},
                   "ExpressionAttributeValues": {":pk": {"S": pk}, ":prefix": {"S": "notes#"}}})
        };
        assert!(check("Query", q("pk = :pk AND begins_with(sk, :prefix)", "acme")).is_ok());
        assert!(check("Query", q("#p = :pk", "acme")).is_ok());
        assert!(check("Query", q("pk = :pk AND begins_with(sk, :prefix)", "globex")).is_err());
        assert!(check("Query", q("begins_with(sk, :prefix)", "acme")).is_err(), "no partition pinned");
    }

    #[test]
    fn every_item_of_batches_and_transactions_is_checked() {
        let tx = |pk2: &str| {
            json!({"TransactItems": [
                {"Update": {"TableName": "pool", "Key": key("acme")}},
                {"ConditionCheck": {"TableName": "pool", "Key": key(pk2)}}]})
        };
        assert!(check("TransactWriteItems", tx("acme")).is_ok());
        assert_eq!(check("TransactWriteItems", tx("globex")).unwrap_err().action, "dynamodb:ConditionCheckItem");
        let batch = |pk2: &str| {
            json!({"RequestItems": {"pool": [
                {"PutRequest": {"Item": key("acme")}}, {"DeleteRequest": {"Key": key(pk2)}}]}})
        };
        assert!(check("BatchWriteItem", batch("acme")).is_ok());
        assert!(check("BatchWriteItem", batch("globex")).is_err());
        let get = |pk2: &str| json!({"RequestItems": {"pool": {"Keys": [key("acme"), key(pk2)]}}});
        assert!(check("BatchGetItem", get("acme")).is_ok());
        assert!(check("BatchGetItem", get("globex")).is_err());
    }
}
