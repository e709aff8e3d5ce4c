//! An evaluator for the IAM subset tenant policies use: Allow/Deny with an
//! explicit Deny winning, `Action` (case-insensitive) and `Resource` with
//! `*` / `?` wildcards, and the condition operators `StringEquals` and
//! `StringLike` with their `ForAllValues:` / `ForAnyValue:` set forms.
//!
//! Condition semantics follow the IAM documentation:
//! - every operator of a block, and every key of an operator, must hold;
//!   the values listed for one key are alternatives;
//! - `ForAllValues:` holds when every value in the request matches some
//!   policy value, and also when the request has no value at all (which is
//!   why tenant policies never allow Scan);
//! - `ForAnyValue:` holds when at least one request value matches, never
//!   for a missing key;
//! - a plain (single-valued) operator needs the key with exactly one value.

use std::collections::BTreeMap;

use crate::policy::{Effect, Match, PolicyDocument, SetOp, Statement, parse_operator};

/// What a request does, as IAM sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    /// e.g. `dynamodb:GetItem`
    pub action: String,
    /// e.g. `arn:aws:dynamodb:us-east-1:123456789012:table/pool`
    pub resource: String,
    /// Condition keys (lower-cased) and their values in this request.
    pub keys: BTreeMap<String, Vec<String>>,
}

impl RequestContext {
    /// A DynamoDB request touching the partitions in `leading_keys`.
    pub fn dynamodb(action: &str, resource: &str, leading_keys: impl IntoIterator<Item = String>) -> Self {
        let mut keys = BTreeMap::new();
        let values: Vec<String> = leading_keys.into_iter().collect();
        if !values.is_empty() {
            keys.insert(crate::policy::LEADING_KEYS.to_ascii_lowercase(), values);
        }
        Self { action: action.into(), resource: resource.into(), keys }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// No statement allowed the request.
    ImplicitDeny,
    /// A Deny statement matched.
    ExplicitDeny,
}

impl Decision {
    pub fn is_allowed(self) -> bool {
        self == Decision::Allow
    }
}

/// Glob match with `*` (any run, possibly empty) and `?` (one character).
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn value_matches(m: Match, policy_value: &str, request_value: &str) -> bool {
    match m {
        Match::Equals => policy_value == request_value,
        Match::Like => wildcard_match(policy_value, request_value),
    }
}

fn condition_holds(op: &str, keys: &BTreeMap<String, crate::policy::OneOrMany>, req: &RequestContext) -> Option<bool> {
    let (set, m) = parse_operator(op)?;
    Some(keys.iter().all(|(key, allowed)| {
        let allowed = allowed.as_slice();
        let values = req.keys.get(&key.to_ascii_lowercase()).map(Vec::as_slice).unwrap_or(&[]);
        let matches_any = |v: &String| allowed.iter().any(|a| value_matches(m, a, v));
        match set {
            SetOp::ForAllValues => values.iter().all(matches_any),
            SetOp::ForAnyValue => values.iter().any(matches_any),
            SetOp::Single => values.len() == 1 && matches_any(&values[0]),
        }
    }))
}

/// Whether `st` applies to `req`. An unsupported operator makes an Allow
/// not apply and a Deny apply: unknown means refuse.
fn applies(st: &Statement, req: &RequestContext) -> bool {
    let action =
        st.action.as_slice().iter().any(|a| wildcard_match(&a.to_ascii_lowercase(), &req.action.to_ascii_lowercase()));
    let resource = st.resource.as_slice().iter().any(|r| wildcard_match(r, &req.resource));
    if !(action && resource) {
        return false;
    }
    st.condition.iter().all(|(op, keys)| condition_holds(op, keys, req).unwrap_or(st.effect == Effect::Deny))
}

/// Evaluates `req` against `policy`.
pub fn evaluate(policy: &PolicyDocument, req: &RequestContext) -> Decision {
    let mut allowed = false;
    for st in policy.statement.iter().filter(|st| applies(st, req)) {
        match st.effect {
            Effect::Deny => return Decision::ExplicitDeny,
            Effect::Allow => allowed = true,
        }
    }
    if allowed { Decision::Allow } else { Decision::ImplicitDeny }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Placement, parse, tenant_policy};

    const TABLE: &str = "arn:aws:dynamodb:us-east-1:123456789012:table/pool";

    #[test]
    fn wildcards() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("a*c", "abbbc", true),
            ("a*c", "ac", true),
            ("a*c", "acb", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*/index/*", "t/index/by-x", true),
            ("*/index/*", "t/index", false),
            ("abc", "abcd", false),
            ("a**", "a", true),
            ("*a*b", "xaxxb", true),
        ];
        for (p, t, want) in cases {
            assert_eq!(wildcard_match(p, t), want, "{p:?} vs {t:?}");
        }
    }

    fn acme() -> PolicyDocument {
        tenant_policy("acme", &Placement::new("us-east-1", "123456789012", "pool")).unwrap()
    }

    fn req(action: &str, resource: &str, keys: &[&str]) -> RequestContext {
        RequestContext::dynamodb(action, resource, keys.iter().map(|k| (*k).to_owned()))
    }

    /// The tenant policy allows exactly its own partition.
    #[test]
    fn tenant_policy_decisions() {
        let p = acme();
        let index = format!("{TABLE}/index/by-name");
        let cases: &[(&str, &str, &[&str], Decision)] = &[
            ("dynamodb:GetItem", TABLE, &["acme"], Decision::Allow),
            ("dynamodb:PutItem", TABLE, &["acme"], Decision::Allow),
            ("dynamodb:Query", &index, &["acme"], Decision::Allow),
            ("dynamodb:BatchWriteItem", TABLE, &["acme", "acme"], Decision::Allow),
            ("dynamodb:GetItem", TABLE, &["globex"], Decision::ImplicitDeny),
            ("dynamodb:BatchGetItem", TABLE, &["acme", "globex"], Decision::ImplicitDeny),
            ("dynamodb:GetItem", TABLE, &["acme2"], Decision::ImplicitDeny),
            ("dynamodb:GetItem", TABLE, &["ACME"], Decision::ImplicitDeny),
            ("dynamodb:Scan", TABLE, &[], Decision::ImplicitDeny),
            ("dynamodb:DeleteTable", TABLE, &["acme"], Decision::ImplicitDeny),
            (
                "dynamodb:GetItem",
                "arn:aws:dynamodb:us-east-1:123456789012:table/other",
                &["acme"],
                Decision::ImplicitDeny,
            ),
            (
                "dynamodb:GetItem",
                "arn:aws:dynamodb:us-east-1:123456789012:table/pool2",
                &["acme"],
                Decision::ImplicitDeny,
            ),
            // Action names are case-insensitive in IAM.
            ("DynamoDB:getitem", TABLE, &["acme"], Decision::Allow),
            // The documented ForAllValues edge case: no leading key at all
            // passes the condition; only the missing Scan action keeps a
            // key-less read out.
            ("dynamodb:Query", TABLE, &[], Decision::Allow),
        ];
        for (action, resource, keys, want) in cases {
            assert_eq!(evaluate(&p, &req(action, resource, keys)), *want, "{action} {resource} {keys:?}");
        }
    }

    fn doc(json: &str) -> PolicyDocument {
        parse(json).unwrap()
    }

    /// Set operators, single-valued operators, StringLike, AND/OR rules and
    /// explicit deny, as the IAM documentation describes them.
    #[test]
    fn condition_semantics() {
        let policy = |op: &str, values: &str| {
            doc(&format!(
                r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"dynamodb:*","Resource":"*",
                "Condition":{{"{op}":{{"dynamodb:LeadingKeys":{values}}}}}}}]}}"#
            ))
        };
        let cases: &[(&str, &str, &[&str], bool)] = &[
            ("ForAllValues:StringEquals", r#"["a","b"]"#, &["a"], true),
            ("ForAllValues:StringEquals", r#"["a","b"]"#, &["a", "b"], true),
            ("ForAllValues:StringEquals", r#"["a","b"]"#, &["a", "c"], false),
            ("ForAllValues:StringEquals", r#"["a"]"#, &[], true),
            ("ForAnyValue:StringEquals", r#"["a"]"#, &["c", "a"], true),
            ("ForAnyValue:StringEquals", r#"["a"]"#, &["c"], false),
            ("ForAnyValue:StringEquals", r#"["a"]"#, &[], false),
            ("StringEquals", r#""a""#, &["a"], true),
            ("StringEquals", r#""a""#, &[], false),
            ("StringEquals", r#""a""#, &["a", "a"], false),
            ("StringEquals", r#"["a","b"]"#, &["b"], true),
            ("StringLike", r#""ten-*""#, &["ten-42"], true),
            ("StringLike", r#""ten-?""#, &["ten-42"], false),
            ("ForAllValues:StringLike", r#"["ten-*"]"#, &["ten-1", "ten-2"], true),
            ("ForAllValues:StringLike", r#"["ten-*"]"#, &["ten-1", "x"], false),
            // Condition keys are case-insensitive, values are not.
            ("StringEquals", r#""A""#, &["a"], false),
        ];
        for (op, values, keys, allowed) in cases {
            let d = evaluate(&policy(op, values), &req("dynamodb:GetItem", TABLE, keys));
            assert_eq!(d.is_allowed(), *allowed, "{op} {values} with {keys:?}");
        }
        let mixed_case_key =
            doc(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*",
            "Condition":{"StringEquals":{"DynamoDB:leadingkeys":"a"}}}]}"#);
        assert!(evaluate(&mixed_case_key, &req("dynamodb:GetItem", TABLE, &["a"])).is_allowed());
    }

    #[test]
    fn explicit_deny_wins_and_conditions_combine_with_and() {
        let p = doc(r#"{"Version":"2012-10-17","Statement":[
            {"Effect":"Allow","Action":"dynamodb:*","Resource":"*"},
            {"Effect":"Deny","Action":["dynamodb:Delete*"],"Resource":"*",
             "Condition":{"ForAnyValue:StringEquals":{"dynamodb:LeadingKeys":["locked"]}}}]}"#);
        assert_eq!(evaluate(&p, &req("dynamodb:DeleteItem", TABLE, &["locked"])), Decision::ExplicitDeny);
        assert_eq!(evaluate(&p, &req("dynamodb:DeleteItem", TABLE, &["open"])), Decision::Allow);
        assert_eq!(evaluate(&p, &req("dynamodb:GetItem", TABLE, &["locked"])), Decision::Allow);

        let two_keys = doc(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*",
            "Condition":{"StringEquals":{"dynamodb:LeadingKeys":"a","aws:PrincipalTag/tier":"gold"}}}]}"#);
        let mut r = req("dynamodb:GetItem", TABLE, &["a"]);
        assert_eq!(evaluate(&two_keys, &r), Decision::ImplicitDeny, "both keys must hold");
        r.keys.insert("aws:principaltag/tier".into(), vec!["gold".into()]);
        assert_eq!(evaluate(&two_keys, &r), Decision::Allow);
        assert_eq!(evaluate(&doc(r#"{"Version":"2012-10-17","Statement":[]}"#), &r), Decision::ImplicitDeny);
    }
}
