//! A tenant's item keys and names, and the sort keys the service keeps for
//! itself (the fence, the history).

use tenantmesh_service::errors::Violations;

/// The fence and the reserved keys, shared with every application
/// service. No item's key can take them: sort keys are
/// `<collection>#<id>` and collections are letters, digits and `_.-`.
pub use tenantmesh_app::history::{FENCE_SK, reserved_sort_key};

/// Largest encoded item accepted (see the app crate's).
pub use tenantmesh_app::history::MAX_ITEM_BYTES;
pub(crate) const MAX_COLLECTION_LEN: usize = 64;
pub(crate) const MAX_ID_LEN: usize = 256;

pub(crate) fn check_name(v: &mut Violations, field: &str, value: &str, max: usize, extra: &[char], required: bool) {
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

pub(crate) const ID_EXTRA: &[char] = &[':', '@'];

/// Violations of an item's collection and id, to add more to.
pub(crate) fn item_key(collection: &str, id: &str) -> Violations {
    let mut v = Violations::new();
    check_name(&mut v, "collection", collection, MAX_COLLECTION_LEN, &[], true);
    check_name(&mut v, "id", id, MAX_ID_LEN, ID_EXTRA, true);
    v
}

pub(crate) fn sort_key(collection: &str, id: &str) -> String {
    format!("{collection}#{id}")
}
