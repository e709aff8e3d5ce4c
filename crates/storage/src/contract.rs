//! The storage contract: behaviour every [`Table`] backend must have. Each
//! check uses its own partition keys, so they can share one table.

use crate::table::{Condition, Query, StorageError, Table, Write};

/// Runs every contract check against `table`.
pub async fn run_all(table: &dyn Table) {
    put_get_and_versions(table).await;
    conditions_refuse_without_writing(table).await;
    delete_semantics(table).await;
    query_prefix_and_pagination(table).await;
    pages_are_bounded_in_bytes(table).await;
    partitions_do_not_leak(table).await;
    transactions_are_all_or_nothing(table).await;
    empty_keys_are_invalid(table).await;
    restore_keeps_versions(table).await;
    fenced_writes(table).await;
    undo_records(table).await;
}

/// A fenced write with an undo key writes, in the same step, the item as
/// it was before; a refused one writes neither.
pub async fn undo_records(t: &dyn Table) {
    use crate::table::BeforeImage;
    const FENCE: &str = "~fence";
    let pk = "c-undo";
    let record = |sk: &'static str| async move {
        BeforeImage::decode(&t.get(pk, sk).await.unwrap().expect("an undo record").data).unwrap()
    };
    // Each write says what it replaced and how large its record is.
    let one = t.put_fenced(pk, "k", b"one".to_vec(), Condition::None, FENCE, Some("~u1")).await.unwrap();
    assert_eq!(record("~u1").await, BeforeImage { sk: "k".into(), version: 0, data: vec![] });
    assert_eq!(one, crate::table::Fenced { version: 1, previous_version: 0, previous_bytes: 0, undo_bytes: 12 + 1 });
    let two = t.put_fenced(pk, "k", b"two".to_vec(), Condition::Version(1), FENCE, Some("~u2")).await.unwrap();
    assert_eq!(
        (two, record("~u2").await),
        (
            crate::table::Fenced { version: 2, previous_version: 1, previous_bytes: 3, undo_bytes: 12 + 1 + 3 },
            BeforeImage { sk: "k".into(), version: 1, data: b"one".to_vec() }
        )
    );
    let stale = t.put_fenced(pk, "k", b"x".to_vec(), Condition::Version(1), FENCE, Some("~u3")).await;
    assert!(matches!(stale, Err(StorageError::ConditionFailed { current: Some(2), .. })), "{stale:?}");
    assert_eq!(t.get(pk, "~u3").await.unwrap(), None);
    assert_eq!(
        t.delete_fenced(pk, "k", Condition::Exists, FENCE, Some("~u4")).await.unwrap(),
        crate::table::Fenced { version: 0, previous_version: 2, previous_bytes: 3, undo_bytes: 12 + 1 + 3 }
    );
    assert_eq!(record("~u4").await, BeforeImage { sk: "k".into(), version: 2, data: b"two".to_vec() });
    assert_eq!(t.get(pk, "k").await.unwrap(), None);
    // Nothing deleted, nothing recorded.
    assert_eq!(
        t.delete_fenced(pk, "k", Condition::None, FENCE, Some("~u5")).await.unwrap(),
        crate::table::Fenced::default()
    );
    assert_eq!(t.get(pk, "~u5").await.unwrap(), None);
    t.put(pk, FENCE, Vec::new(), Condition::NotExists).await.unwrap();
    let fenced = t.put_fenced(pk, "k", b"late".to_vec(), Condition::None, FENCE, Some("~u6")).await;
    assert!(matches!(fenced, Err(StorageError::Fenced)), "{fenced:?}");
    assert_eq!((t.get(pk, "k").await.unwrap(), t.get(pk, "~u6").await.unwrap()), (None, None));
}

/// Fenced writes behave as plain ones until their partition's fence item
/// exists, and then write nothing; a fence elsewhere does not matter.
pub async fn fenced_writes(t: &dyn Table) {
    const FENCE: &str = "~fence";
    let (pk, other) = ("c-fence", "c-fence-other");
    let a = t.put_fenced(pk, "k", b"one".to_vec(), Condition::None, FENCE, None).await.unwrap();
    assert_eq!(a.version, 1);
    let b = t.put_fenced(pk, "k", b"two".to_vec(), Condition::None, FENCE, None).await.unwrap();
    assert_eq!((b.version, t.get(pk, "k").await.unwrap().unwrap().version), (2, 2));
    let c = t.put_fenced(pk, "k", b"three".to_vec(), Condition::Version(2), FENCE, None).await.unwrap();
    assert_eq!(c.version, 3);
    let stale = t.put_fenced(pk, "k", b"x".to_vec(), Condition::Version(2), FENCE, None).await;
    assert!(matches!(stale, Err(StorageError::ConditionFailed { current: Some(3), .. })), "{stale:?}");
    let taken = t.put_fenced(pk, "k", b"x".to_vec(), Condition::NotExists, FENCE, None).await;
    assert!(matches!(taken, Err(StorageError::ConditionFailed { current: Some(3), .. })), "{taken:?}");
    let missing = t.delete_fenced(pk, "absent", Condition::Exists, FENCE, None).await;
    assert!(matches!(missing, Err(StorageError::ConditionFailed { current: None, .. })), "{missing:?}");
    assert_eq!(t.delete_fenced(pk, "absent", Condition::None, FENCE, None).await.unwrap().previous_version, 0);
    t.put_fenced(pk, "gone", b"g".to_vec(), Condition::NotExists, FENCE, None).await.unwrap();
    assert_eq!(t.delete_fenced(pk, "gone", Condition::Exists, FENCE, None).await.unwrap().previous_version, 1);

    // Raised: nothing is written, whatever the condition.
    t.put(pk, FENCE, Vec::new(), Condition::None).await.unwrap();
    for condition in [Condition::None, Condition::Version(3), Condition::NotExists] {
        let r = t.put_fenced(pk, "k", b"late".to_vec(), condition, FENCE, None).await;
        assert!(matches!(r, Err(StorageError::Fenced)), "{condition:?}: {r:?}");
    }
    let r = t.delete_fenced(pk, "k", Condition::Exists, FENCE, None).await;
    assert!(matches!(r, Err(StorageError::Fenced)), "{r:?}");
    let kept = t.get(pk, "k").await.unwrap().unwrap();
    assert_eq!((kept.version, kept.data.as_slice()), (3, b"three".as_slice()));
    // Another partition's writes go on.
    t.put_fenced(other, "k", b"o".to_vec(), Condition::None, FENCE, None).await.unwrap();

    // Lowered: writes go on from where they were.
    t.delete(pk, FENCE, Condition::Exists).await.unwrap();
    assert_eq!(t.put_fenced(pk, "k", b"four".to_vec(), Condition::Version(3), FENCE, None).await.unwrap().version, 4);
}

pub async fn restore_keeps_versions(t: &dyn Table) {
    let item = |version, data: &[u8]| crate::table::Item {
        pk: "c-restore".into(),
        sk: "k".into(),
        version,
        data: data.into(),
    };
    t.restore(item(7, b"seven")).await.unwrap();
    t.restore(item(7, b"seven")).await.unwrap();
    let got = t.get("c-restore", "k").await.unwrap().unwrap();
    assert_eq!((got.version, got.data.as_slice()), (7, b"seven".as_slice()));
    // Versions go on from the restored one.
    let next = t.put("c-restore", "k", b"eight".to_vec(), Condition::Version(7)).await.unwrap();
    assert_eq!(next.version, 8);
    t.restore(item(3, b"three")).await.unwrap();
    assert_eq!(t.get("c-restore", "k").await.unwrap().unwrap().version, 3);
}

pub async fn put_get_and_versions(t: &dyn Table) {
    assert!(t.get("c-put", "k").await.unwrap().is_none());
    let a = t.put("c-put", "k", b"one".to_vec(), Condition::None).await.unwrap();
    assert_eq!(a.version, 1);
    let b = t.put("c-put", "k", b"two".to_vec(), Condition::None).await.unwrap();
    assert_eq!(b.version, 2);
    let got = t.get("c-put", "k").await.unwrap().unwrap();
    assert_eq!((got.version, got.data), (2, b"two".to_vec()));
}

pub async fn conditions_refuse_without_writing(t: &dyn Table) {
    t.put("c-cond", "k", b"v1".to_vec(), Condition::NotExists).await.unwrap();
    let err = t.put("c-cond", "k", b"x".to_vec(), Condition::NotExists).await.unwrap_err();
    assert!(matches!(err, StorageError::ConditionFailed { current: Some(1), .. }), "{err:?}");
    let err = t.put("c-cond", "k", b"x".to_vec(), Condition::Version(7)).await.unwrap_err();
    assert!(matches!(err, StorageError::ConditionFailed { current: Some(1), .. }), "{err:?}");
    let err = t.put("c-cond", "new", b"x".to_vec(), Condition::Exists).await.unwrap_err();
    assert!(matches!(err, StorageError::ConditionFailed { current: None, .. }), "{err:?}");
    assert!(t.get("c-cond", "new").await.unwrap().is_none());
    let ok = t.put("c-cond", "k", b"v2".to_vec(), Condition::Version(1)).await.unwrap();
    assert_eq!(ok.version, 2);
    assert_eq!(t.get("c-cond", "k").await.unwrap().unwrap().data, b"v2");
}

pub async fn delete_semantics(t: &dyn Table) {
    assert_eq!(t.delete("c-del", "k", Condition::None).await.unwrap(), None);
    t.put("c-del", "k", b"v".to_vec(), Condition::None).await.unwrap();
    let err = t.delete("c-del", "k", Condition::Version(5)).await.unwrap_err();
    assert!(matches!(err, StorageError::ConditionFailed { current: Some(1), .. }));
    assert_eq!(t.delete("c-del", "k", Condition::Version(1)).await.unwrap(), Some(1));
    assert!(t.get("c-del", "k").await.unwrap().is_none());
}

pub async fn query_prefix_and_pagination(t: &dyn Table) {
    for i in 0..7 {
        t.put("c-q", &format!("notes#{i:02}"), vec![i], Condition::None).await.unwrap();
    }
    t.put("c-q", "notesx#00", vec![], Condition::None).await.unwrap();
    t.put("c-q", "a#00", vec![], Condition::None).await.unwrap();
    let mut seen = Vec::new();
    let mut start_after = None;
    loop {
        let page =
            t.query(Query { pk: "c-q".into(), sk_prefix: "notes#".into(), start_after, limit: 3 }).await.unwrap();
        assert!(page.items.len() <= 3);
        seen.extend(page.items.iter().map(|i| i.sk.clone()));
        match page.last_evaluated {
            Some(sk) => start_after = Some(sk),
            None => break,
        }
    }
    let want: Vec<String> = (0..7).map(|i| format!("notes#{i:02}")).collect();
    assert_eq!(seen, want);
    let all =
        t.query(Query { pk: "c-q".into(), sk_prefix: String::new(), start_after: None, limit: 100 }).await.unwrap();
    assert_eq!(all.items.len(), 9);
    assert!(all.last_evaluated.is_none());
}

/// Six items of 300 KB: a page stops at about 1 MiB (the item crossing it
/// included), and paging still returns every item once.
pub async fn pages_are_bounded_in_bytes(t: &dyn Table) {
    for i in 0..6u8 {
        t.put("c-big", &format!("big#{i}"), vec![i; 300 * 1024], Condition::None).await.unwrap();
    }
    let (mut seen, mut start_after, mut pages) = (Vec::new(), None, 0);
    loop {
        let page = t.query(Query { pk: "c-big".into(), sk_prefix: String::new(), start_after, limit: 100 }).await;
        let page = page.unwrap();
        let bytes: usize = page.items.iter().map(|i| i.data.len()).sum();
        assert!(bytes <= crate::table::MAX_PAGE_BYTES + 300 * 1024, "a page of {bytes} bytes");
        seen.extend(page.items.iter().map(|i| i.sk.clone()));
        pages += 1;
        match page.last_evaluated {
            Some(sk) => start_after = Some(sk),
            None => break,
        }
    }
    assert_eq!(seen, (0..6).map(|i| format!("big#{i}")).collect::<Vec<_>>());
    assert!(pages >= 2, "six 300 KB items came in one page");
}

pub async fn partitions_do_not_leak(t: &dyn Table) {
    t.put("c-p1", "x#1", b"a".to_vec(), Condition::None).await.unwrap();
    t.put("c-p2", "x#1", b"b".to_vec(), Condition::None).await.unwrap();
    t.put("c-p11", "x#1", b"c".to_vec(), Condition::None).await.unwrap();
    let page =
        t.query(Query { pk: "c-p1".into(), sk_prefix: String::new(), start_after: None, limit: 100 }).await.unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].data, b"a");
    assert_eq!(t.get("c-p2", "x#1").await.unwrap().unwrap().data, b"b");
}

pub async fn transactions_are_all_or_nothing(t: &dyn Table) {
    t.put("c-tx", "exists", b"e".to_vec(), Condition::None).await.unwrap();
    let err = t
        .transact_write(vec![
            Write::Put { pk: "c-tx".into(), sk: "a".into(), data: b"a".to_vec(), condition: Condition::NotExists },
            Write::Put { pk: "c-tx".into(), sk: "exists".into(), data: b"x".to_vec(), condition: Condition::NotExists },
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::ConditionFailed { index: 1, current: Some(1) }), "{err:?}");
    assert!(t.get("c-tx", "a").await.unwrap().is_none(), "first write of a failed transaction applied");
    t.transact_write(vec![
        Write::Put { pk: "c-tx".into(), sk: "a".into(), data: b"a".to_vec(), condition: Condition::NotExists },
        Write::Delete { pk: "c-tx".into(), sk: "exists".into(), condition: Condition::Version(1) },
        Write::Check { pk: "c-tx".into(), sk: "zzz".into(), condition: Condition::NotExists },
    ])
    .await
    .unwrap();
    assert!(t.get("c-tx", "a").await.unwrap().is_some());
    assert!(t.get("c-tx", "exists").await.unwrap().is_none());
    let err = t
        .transact_write(vec![
            Write::Check { pk: "c-tx".into(), sk: "a".into(), condition: Condition::Exists },
            Write::Delete { pk: "c-tx".into(), sk: "a".into(), condition: Condition::None },
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Invalid(_)), "{err:?}");
}

pub async fn empty_keys_are_invalid(t: &dyn Table) {
    assert!(matches!(t.get("", "x").await, Err(StorageError::Invalid(_))));
    assert!(matches!(t.put("p", "", vec![], Condition::None).await, Err(StorageError::Invalid(_))));
}
