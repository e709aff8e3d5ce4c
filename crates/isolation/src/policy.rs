//! IAM policy documents and the per-tenant session policy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// STS refuses inline session policies longer than this (packed JSON).
pub const MAX_SESSION_POLICY_LEN: usize = 2048;

/// The condition key holding the partition keys a DynamoDB request touches.
pub const LEADING_KEYS: &str = "dynamodb:LeadingKeys";

/// The item-level actions the data service needs. No Scan: a request with
/// no leading key satisfies a `ForAllValues` condition, so Scan would read
/// every tenant's items.
pub const DATA_ACTIONS: [&str; 8] = [
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:Query",
    "dynamodb:BatchGetItem",
    "dynamodb:BatchWriteItem",
    "dynamodb:ConditionCheckItem",
];

/// One string or a list of them, as IAM accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

impl From<&str> for OneOrMany {
    fn from(s: &str) -> Self {
        OneOrMany::One(s.to_owned())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    Allow,
    Deny,
}

/// Condition operator -> condition key -> accepted values.
pub type ConditionBlock = BTreeMap<String, BTreeMap<String, OneOrMany>>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Statement {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    pub effect: Effect,
    pub action: OneOrMany,
    pub resource: OneOrMany,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub condition: ConditionBlock,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PolicyDocument {
    pub version: String,
    pub statement: Vec<Statement>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("tenant id {0:?} is not safe in a policy document")]
    UnsafeTenantId(String),
    #[error("table name {0:?} is not a valid DynamoDB table name")]
    InvalidTable(String),
    #[error("table {0:?} does not exist (not provisioned, or dropped)")]
    NoSuchTable(String),
    #[error("session policy is {0} characters; STS allows {MAX_SESSION_POLICY_LEN}")]
    TooLong(usize),
    #[error("policy uses unsupported condition operator {0:?}")]
    UnsupportedOperator(String),
    #[error("policy document is not valid JSON: {0}")]
    Json(String),
}

/// Where a tenant's items live: a DynamoDB table (the pooled one, or a
/// dedicated one) in an account and region.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Placement {
    pub partition: String,
    pub region: String,
    pub account: String,
    pub table: String,
}

impl Placement {
    /// A placement in the `aws` partition.
    pub fn new(region: &str, account: &str, table: &str) -> Self {
        Self { partition: "aws".into(), region: region.into(), account: account.into(), table: table.into() }
    }

    /// `arn:<partition>:dynamodb:<region>:<account>:table/<table>`.
    pub fn table_arn(&self) -> String {
        format!("arn:{}:dynamodb:{}:{}:table/{}", self.partition, self.region, self.account, self.table)
    }
}

/// Tenant ids must match `^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$`: no `*`, `?`, `"` or
/// `$`, so a tenant id can never widen the policy it is written into.
fn check_tenant_id(id: &str) -> Result<(), PolicyError> {
    let b = id.as_bytes();
    let ok = (3..=63).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok { Ok(()) } else { Err(PolicyError::UnsafeTenantId(id.to_owned())) }
}

/// A valid DynamoDB table name: 3-255 of letters, digits, `_`, `-`, `.`.
pub fn valid_table_name(name: &str) -> bool {
    (3..=255).contains(&name.len())
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

fn check_table(name: &str) -> Result<(), PolicyError> {
    if valid_table_name(name) { Ok(()) } else { Err(PolicyError::InvalidTable(name.to_owned())) }
}

/// The session policy that confines a tenant to its own partition of its
/// placement's table.
pub fn tenant_policy(tenant_id: &str, placement: &Placement) -> Result<PolicyDocument, PolicyError> {
    check_tenant_id(tenant_id)?;
    check_table(&placement.table)?;
    let table = placement.table_arn();
    let mut keys = BTreeMap::new();
    keys.insert(LEADING_KEYS.to_owned(), OneOrMany::Many(vec![tenant_id.to_owned()]));
    let mut condition = BTreeMap::new();
    condition.insert("ForAllValues:StringEquals".to_owned(), keys);
    let doc = PolicyDocument {
        version: "2012-10-17".into(),
        statement: vec![Statement {
            sid: Some("TenantItems".into()),
            effect: Effect::Allow,
            action: OneOrMany::Many(DATA_ACTIONS.iter().map(|a| (*a).to_owned()).collect()),
            resource: OneOrMany::Many(vec![table.clone(), format!("{table}/index/*")]),
            condition,
        }],
    };
    render(&doc)?;
    Ok(doc)
}

/// The packed JSON sent to STS; refused over the STS length limit.
pub fn render(doc: &PolicyDocument) -> Result<String, PolicyError> {
    let json = serde_json::to_string(doc).map_err(|e| PolicyError::Json(e.to_string()))?;
    if json.len() > MAX_SESSION_POLICY_LEN {
        return Err(PolicyError::TooLong(json.len()));
    }
    Ok(json)
}

/// Parses a policy document and checks it uses only the condition operators
/// [`parse_operator`] knows (what the evaluator supports).
pub fn parse(json: &str) -> Result<PolicyDocument, PolicyError> {
    let doc: PolicyDocument = serde_json::from_str(json).map_err(|e| PolicyError::Json(e.to_string()))?;
    for st in &doc.statement {
        for op in st.condition.keys() {
            if parse_operator(op).is_none() {
                return Err(PolicyError::UnsupportedOperator(op.clone()));
            }
        }
    }
    Ok(doc)
}

/// The condition operators the evaluator supports: a set form and a
/// comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetOp {
    Single,
    ForAllValues,
    ForAnyValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Match {
    Equals,
    Like,
}

/// `(set form, comparison)` of a supported operator, `None` otherwise.
pub(crate) fn parse_operator(op: &str) -> Option<(SetOp, Match)> {
    let (set, base) = match op.split_once(':') {
        Some(("ForAllValues", b)) => (SetOp::ForAllValues, b),
        Some(("ForAnyValue", b)) => (SetOp::ForAnyValue, b),
        Some(_) => return None,
        None => (SetOp::Single, op),
    };
    let m = match base {
        "StringEquals" => Match::Equals,
        "StringLike" => Match::Like,
        _ => return None,
    };
    Some((set, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement() -> Placement {
        Placement::new("us-east-1", "123456789012", "tenantmesh-pool")
    }

    /// The rendered policy for a pool tenant equals the reviewed golden file.
    #[test]
    fn pool_policy_matches_golden_file() {
        let doc = tenant_policy("acme", &placement()).unwrap();
        let golden: serde_json::Value =
            serde_json::from_str(include_str!("../tests/golden/pool_policy_acme.json")).unwrap();
        assert_eq!(serde_json::to_value(&doc).unwrap(), golden);
        let packed = render(&doc).unwrap();
        assert!(packed.len() < MAX_SESSION_POLICY_LEN);
        assert_eq!(parse(&packed).unwrap(), doc, "round trip");
        assert!(!packed.contains("Scan"), "{packed}");
    }

    #[test]
    fn unsafe_ids_never_reach_a_policy() {
        for bad in ["*", "acme*", "ac?e", "a\"b", "${aws:username}", "Acme", "ab", "a b", "acme/../x"] {
            assert_eq!(tenant_policy(bad, &placement()), Err(PolicyError::UnsafeTenantId(bad.to_owned())));
        }
        let mut p = placement();
        p.table = "bad*table".into();
        assert!(matches!(tenant_policy("acme", &p), Err(PolicyError::InvalidTable(_))));
    }

    #[test]
    fn oversized_policies_are_refused() {
        let mut p = placement();
        p.table = "t".repeat(255);
        p.account = "9".repeat(900);
        match tenant_policy("acme", &p) {
            Err(PolicyError::TooLong(n)) => assert!(n > MAX_SESSION_POLICY_LEN),
            other => panic!("expected TooLong, got {other:?}"),
        }
    }

    #[test]
    fn unsupported_operators_are_refused_on_parse() {
        let json = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":"*","Resource":"*",
            "Condition":{"NumericLessThan":{"aws:x":"1"}}}]}"#;
        assert_eq!(parse(json), Err(PolicyError::UnsupportedOperator("NumericLessThan".into())));
    }

    mod properties {
        use super::*;
        use crate::eval::{RequestContext, evaluate};
        use proptest::prelude::*;

        fn tenant_id() -> impl Strategy<Value = String> {
            "[a-z0-9][a-z0-9-]{1,61}[a-z0-9]"
        }

        fn table() -> impl Strategy<Value = String> {
            "[A-Za-z0-9_.-]{3,60}"
        }

        proptest! {
            /// For any tenant and table: the policy renders within the
            /// session-policy limit and parses back to itself; it allows
            /// every data action on the tenant's own partition of that
            /// table, and refuses another tenant's partition, a request
            /// naming both, another table, and Scan.
            #[test]
            fn a_policy_confines_its_tenant(tenant in tenant_id(), other in tenant_id(), t in table(), t2 in table()) {
                prop_assume!(tenant != other && t != t2);
                let placement = Placement::new("us-east-1", "123456789012", &t);
                let doc = tenant_policy(&tenant, &placement).unwrap();
                let packed = render(&doc).unwrap();
                prop_assert!(packed.len() <= MAX_SESSION_POLICY_LEN);
                prop_assert_eq!(&parse(&packed).unwrap(), &doc);
                let arn = placement.table_arn();
                let other_arn = Placement::new("us-east-1", "123456789012", &t2).table_arn();
                for action in DATA_ACTIONS {
                    let allowed = |arn: &str, keys: Vec<String>| evaluate(&doc, &RequestContext::dynamodb(action, arn, keys)).is_allowed();
                    prop_assert!(allowed(&arn, vec![tenant.clone()]), "{} on its own partition", action);
                    prop_assert!(!allowed(&arn, vec![other.clone()]), "{} on another tenant's", action);
                    prop_assert!(!allowed(&arn, vec![tenant.clone(), other.clone()]), "{} naming both", action);
                    prop_assert!(!allowed(&other_arn, vec![tenant.clone()]), "{} on another table", action);
                }
                prop_assert!(!evaluate(&doc, &RequestContext::dynamodb("dynamodb:Scan", &arn, Vec::new())).is_allowed());
            }

            /// An id that is not a safe tenant id never reaches a policy.
            #[test]
            fn unsafe_ids_are_refused(id in ".{0,70}") {
                let safe = check_tenant_id(&id).is_ok();
                let result = tenant_policy(&id, &Placement::new("us-east-1", "123456789012", "pool"));
                prop_assert_eq!(result.is_ok(), safe);
                if safe {
                    prop_assert!(!id.contains(['*', '?', '"', '$']));
                }
            }
        }
    }
}
