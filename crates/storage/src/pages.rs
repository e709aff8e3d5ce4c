//! The pages of a query, read one at a time: the one loop that follows
//! `last_evaluated` until it is empty.
//!
//! ```no_run
//! # async fn f(table: &dyn tenantmesh_storage::Table) -> tenantmesh_storage::Result<()> {
//! let mut pages = tenantmesh_storage::Pages::new(table, "acme", "notes#", 100);
//! while let Some(items) = pages.next().await? {
//!     for item in items {
//!         println!("{}", item.sk);
//!     }
//! }
//! # Ok(()) }
//! ```

use crate::table::{Item, Query, Result, Table};

/// A query's pages in key order, each at most `limit` items (and about
/// [`crate::table::MAX_PAGE_BYTES`]).
pub struct Pages<'a, T: ?Sized> {
    table: &'a T,
    query: Query,
    done: bool,
}

impl<'a, T: Table + ?Sized> Pages<'a, T> {
    /// The items of partition `pk` whose sort key starts with `sk_prefix`.
    pub fn new(table: &'a T, pk: impl Into<String>, sk_prefix: impl Into<String>, limit: usize) -> Self {
        let query = Query { pk: pk.into(), sk_prefix: sk_prefix.into(), start_after: None, limit };
        Self { table, query, done: false }
    }

    /// Starts after sort key `sk` (a cursor kept from an earlier read).
    pub fn after(mut self, sk: Option<String>) -> Self {
        self.query.start_after = sk;
        self
    }

    /// The next page; `None` after the last. A page may be empty only when
    /// nothing matched at all.
    pub async fn next(&mut self) -> Result<Option<Vec<Item>>> {
        if self.done {
            return Ok(None);
        }
        let page = self.table.query(self.query.clone()).await?;
        match page.last_evaluated {
            Some(sk) => self.query.start_after = Some(sk),
            None => self.done = true,
        }
        Ok(Some(page.items))
    }

    /// The sort key the next page starts after (`None` at the start, or
    /// once the last page was read).
    pub fn cursor(&self) -> Option<&str> {
        if self.done { None } else { self.query.start_after.as_deref() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::EmbeddedTable;
    use crate::table::Condition;

    #[tokio::test]
    async fn every_item_once_in_order_across_pages() {
        let dir = tempfile::tempdir().unwrap();
        let table = EmbeddedTable::open_shared(dir.path().join("t.redb")).unwrap();
        for i in 0..25 {
            table.put("p", &format!("a#{i:02}"), vec![1], Condition::None).await.unwrap();
        }
        table.put("p", "b#1", vec![1], Condition::None).await.unwrap();
        let mut pages = Pages::new(table.as_ref(), "p", "a#", 10);
        let mut sizes = Vec::new();
        let mut keys = Vec::new();
        while let Some(items) = pages.next().await.unwrap() {
            sizes.push(items.len());
            keys.extend(items.into_iter().map(|i| i.sk));
        }
        assert_eq!(sizes, [10, 10, 5]);
        assert_eq!(keys, (0..25).map(|i| format!("a#{i:02}")).collect::<Vec<_>>());
        assert!(pages.next().await.unwrap().is_none(), "done stays done");
        let rest = Pages::new(table.as_ref(), "p", "a#", 100).after(Some("a#19".into())).next().await.unwrap();
        assert_eq!(rest.unwrap().len(), 5);
    }
}
