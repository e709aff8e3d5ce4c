//! A DynamoDB-shaped table API (partition key, sort key, conditional writes,
//! prefix queries with pagination, transactions) with two backends: a
//! durable embedded one on redb, and DynamoDB. Every service keeps its state behind [`Table`], so the
//! same service code runs on the embedded store and, later, on DynamoDB.

mod dynamodb;
mod embedded;

#[cfg(any(test, feature = "testsuite"))]
pub mod contract;
pub mod files;
mod pages;
mod table;

pub use dynamodb::{ACCESS_DENIED_MARKER, DynamoTable};
pub use embedded::EmbeddedTable;
pub use pages::Pages;
pub use table::{
    BeforeImage, Condition, DynTable, Fenced, Item, MAX_PAGE_BYTES, Page, Query, Result, StorageError, Table, Write,
};
