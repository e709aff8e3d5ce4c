//! Nothing here: the package is its test binary, `e2e/main.rs`.
