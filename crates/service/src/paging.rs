//! Paging shared by every List/Query RPC: `page_size` 0 means the default,
//! 1..=1000 is taken as is, anything else is INVALID_ARGUMENT; page tokens
//! are opaque (base64url of the last sort key) and a token must lie within
//! the query's own range, so a token can never widen a query.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::errors::Violations;

pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: i32 = 1000;

const TOKEN_TAG: &str = "p1:";

/// The number of items to return, or a `page_size` violation.
pub fn page_size(v: &mut Violations, size: i32) -> usize {
    match size {
        0 => DEFAULT_PAGE_SIZE,
        n @ 1..=MAX_PAGE_SIZE => n as usize,
        _ => {
            v.add("page_size", format!("must be between 0 and {MAX_PAGE_SIZE}"));
            0
        }
    }
}

/// The token that resumes after `last_sk`.
pub fn encode_token(last_sk: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{TOKEN_TAG}{last_sk}"))
}

/// The sort key to resume after (`None` for the first page), or a
/// `page_token` violation when the token is not one of ours or lies outside
/// the range of sort keys starting with `sk_prefix`.
pub fn decode_token(v: &mut Violations, token: &str, sk_prefix: &str) -> Option<String> {
    if token.is_empty() {
        return None;
    }
    let sk = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix(TOKEN_TAG).map(str::to_owned))
        .filter(|sk| sk.starts_with(sk_prefix));
    if sk.is_none() {
        v.add("page_token", "is not a token from a previous response to this query");
    }
    sk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_tokens() {
        let mut v = Violations::new();
        assert_eq!((page_size(&mut v, 0), page_size(&mut v, 1), page_size(&mut v, 1000)), (100, 1, 1000));
        assert!(v.is_empty());
        page_size(&mut v, 1001);
        page_size(&mut v, -1);
        assert_eq!(crate::errors::violated_fields(&v.check().unwrap_err()), vec!["page_size", "page_size"]);

        let mut v = Violations::new();
        assert_eq!(decode_token(&mut v, "", "a#"), None);
        assert_eq!(decode_token(&mut v, &encode_token("a#7"), "a#"), Some("a#7".into()));
        assert!(v.is_empty());
        assert_eq!(decode_token(&mut v, &encode_token("b#7"), "a#"), None, "outside the query's range");
        assert_eq!(decode_token(&mut v, "junk", ""), None);
        assert_eq!(crate::errors::violated_fields(&v.check().unwrap_err()), vec!["page_token", "page_token"]);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// A token resumes exactly where it was made, for any sort key
            /// in the query's range.
            #[test]
            fn tokens_round_trip(prefix in ".{0,20}", rest in ".{0,200}") {
                let sk = format!("{prefix}{rest}");
                let mut v = Violations::new();
                prop_assert_eq!(decode_token(&mut v, &encode_token(&sk), &prefix), Some(sk));
                prop_assert!(v.is_empty());
            }

            /// No token, however made, widens a query: whatever decodes lies
            /// in the query's range; anything else is a page_token
            /// violation, never a panic.
            #[test]
            fn no_token_widens_a_query(token in ".{0,300}", raw in proptest::collection::vec(any::<u8>(), 0..200), prefix in "[a-z]{0,3}#?") {
                let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
                for t in [token, b64] {
                    let mut v = Violations::new();
                    match decode_token(&mut v, &t, &prefix) {
                        Some(sk) => prop_assert!(sk.starts_with(&prefix) && v.is_empty()),
                        None => prop_assert_eq!(t.is_empty(), v.is_empty()),
                    }
                }
            }

            /// Page sizes: 0 is the default, 1..=1000 as asked, anything
            /// else a violation.
            #[test]
            fn page_sizes(size in any::<i32>()) {
                let mut v = Violations::new();
                let n = page_size(&mut v, size);
                match size {
                    0 => prop_assert_eq!(n, DEFAULT_PAGE_SIZE),
                    1..=MAX_PAGE_SIZE => prop_assert_eq!(n, size as usize),
                    _ => prop_assert!(!v.is_empty()),
                }
            }
        }
    }
}
