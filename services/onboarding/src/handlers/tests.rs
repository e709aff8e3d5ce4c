//! Unit tests of [`super`].

use super::*;

#[test]
fn tenant_admins_see_file_names_and_no_endpoints() {
    let r = Redactor::new(&[std::path::Path::new(".tenantmesh/exports")]);
    assert_eq!(r.text(".tenantmesh/exports/acme-at-17.jsonl"), "acme-at-17.jsonl");
    let abs = std::path::absolute(".tenantmesh/exports/x.jsonl").unwrap().display().to_string();
    assert_eq!(r.text(&format!("export {abs}: disk full")), "export x.jsonl: disk full");
    assert_eq!(
        r.text("Unavailable: data endpoint http://10.0.0.7:50054 (silo), https://x.example/y down"),
        "Unavailable: data endpoint <endpoint> (silo), <endpoint> down"
    );
    assert_eq!(r.text("nothing to hide"), "nothing to hide");
}
