//! Cross-service tests live in the `[[test]]` targets beside this file.
