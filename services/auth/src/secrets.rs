//! Random tokens, digests and comparisons of secrets, and private files.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// `bytes` random bytes, base64url.
pub(crate) fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf).expect("system randomness");
    URL_SAFE_NO_PAD.encode(buf)
}

/// The SHA-256 digest of `data`, hex.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn write_private_file(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    tenantmesh_storage::files::write_private(path, format!("{contents}\n").as_bytes())
}

pub(crate) fn constant_time_eq(a: &str, b: &str) -> bool {
    // Compare digests so neither length nor content leaks through timing.
    let (da, db) = (sha256_hex(a.as_bytes()), sha256_hex(b.as_bytes()));
    da.bytes().zip(db.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
