//! Unit tests of [`super`].

use super::*;

/// Runs the backend-agnostic contract suite on a fresh embedded table.
#[tokio::test]
async fn embedded_backend_meets_the_table_contract() {
    let dir = tempfile::tempdir().unwrap();
    let table = EmbeddedTable::open(dir.path().join("t.redb")).unwrap();
    crate::contract::run_all(&table).await;
}

/// Concurrent writes commit in groups with the same outcome as one at a
/// time: of many creations of one key exactly one wins, every other
/// write lands once with its own version, and a transaction that loses
/// its condition inside a group writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_writes_keep_every_condition() {
    let dir = tempfile::tempdir().unwrap();
    let table = Arc::new(EmbeddedTable::open(dir.path().join("t.redb")).unwrap());
    let mut tasks = Vec::new();
    for i in 0..200 {
        let t = table.clone();
        tasks.push(tokio::spawn(async move {
            let contested = t.put("a", "contested", vec![i as u8], Condition::NotExists).await;
            let own = t.put("a", &format!("k{i}"), vec![i as u8], Condition::None).await.unwrap();
            let txn = t
                .transact_write(vec![
                    Write::Put { pk: "a".into(), sk: format!("t{i}"), data: vec![1], condition: Condition::None },
                    Write::Check { pk: "a".into(), sk: "contested".into(), condition: Condition::NotExists },
                ])
                .await;
            (contested.is_ok(), own.version, txn)
        }));
    }
    let mut winners = 0;
    for t in tasks {
        let (won, version, txn) = t.await.unwrap();
        winners += usize::from(won);
        assert_eq!(version, 1);
        // `contested` exists by the time any transaction runs after its own put.
        assert!(matches!(txn, Err(StorageError::ConditionFailed { index: 1, current: Some(1) })), "{txn:?}");
    }
    assert_eq!(winners, 1, "exactly one creation of the contested key wins");
    assert_eq!(table.get("a", "contested").await.unwrap().unwrap().version, 1);
    let page =
        table.query(Query { pk: "a".into(), sk_prefix: "t".into(), start_after: None, limit: 10 }).await.unwrap();
    assert!(page.items.is_empty(), "a refused transaction wrote {:?}", page.items);
    let page =
        table.query(Query { pk: "a".into(), sk_prefix: "k".into(), start_after: None, limit: 1000 }).await.unwrap();
    assert_eq!(page.items.len(), 200);
}

/// The writer thread leaves when idle and comes back with the next
/// write; dropping the last handle closes the file at once.
#[tokio::test]
async fn an_idle_writer_retires_and_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.redb");
    let mut table = EmbeddedTable::open(&path).unwrap();
    Arc::get_mut(&mut table.shared).unwrap().idle = Duration::from_millis(20);
    table.put("a", "1", b"x".to_vec(), Condition::None).await.unwrap();
    let retired = async {
        while table.shared.writer.lock().unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), retired).await.expect("the idle writer retires");
    assert_eq!(table.put("a", "1", b"y".to_vec(), Condition::Version(1)).await.unwrap().version, 2);
    drop(table);
    let reopened = EmbeddedTable::open(&path).unwrap();
    assert_eq!(reopened.get("a", "1").await.unwrap().unwrap().data, b"y");
}

/// Acknowledged writes survive closing and reopening the file.
#[tokio::test]
async fn writes_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.redb");
    {
        let table = EmbeddedTable::open(&path).unwrap();
        table.put("a", "x", b"1".to_vec(), Condition::None).await.unwrap();
        table.put("a", "x", b"2".to_vec(), Condition::Version(1)).await.unwrap();
    }
    let table = EmbeddedTable::open(&path).unwrap();
    let item = table.get("a", "x").await.unwrap().unwrap();
    assert_eq!((item.version, item.data.as_slice()), (2, b"2".as_slice()));
}
