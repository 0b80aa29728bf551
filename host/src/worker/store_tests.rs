//! The store's refusals: a database it did not make or that was damaged
//! under it is reported naming the database, and a failed write leaves the
//! index as it was.

use super::*;

const MODEL: &str = "test-model";

fn store(dir: &Path) -> Store {
    Store::open(dir, MODEL, 2).unwrap()
}

/// A second connection to the same database, to damage it as another
/// program (or a broken disk) would.
fn raw(dir: &Path) -> Connection {
    Connection::open(dir.join(DB_FILE)).unwrap()
}

fn meta(size: u64) -> FileMeta {
    FileMeta { size, mtime_ns: 7 }
}

/// `err` is SQLite's, for the database in `dir`, and says `words`.
fn assert_sqlite(err: StoreError, dir: &Path, words: &str) {
    match &err {
        StoreError::Sqlite { path, source } => {
            assert_eq!(path, &dir.join(DB_FILE), "{err}");
            assert!(source.to_string().contains(words), "{err}");
        }
        other => panic!("not an SQLite error: {other}"),
    }
}

fn commit_one(store: &mut Store, path: &Path) -> Vec<i64> {
    store.enqueue(&[path.to_path_buf()]).unwrap();
    let chunk = NewChunk {
        text: "hello world",
        start_line: 1,
        end_line: 1,
        vector: &[0.6, 0.8],
    };
    store
        .commit_file(path, &meta(11), "abc", &[chunk], None)
        .unwrap()
        .1
}

#[test]
fn open_names_a_directory_it_cannot_create() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let dir = file.join("index");
    let err = Store::open(&dir, MODEL, 2).unwrap_err();
    assert!(
        matches!(&err, StoreError::CreateDir { dir: d, .. } if *d == dir),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_a_database_is_refused_naming_it_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = b"this is not an SQLite database, but somebody's notes ......".repeat(20);
    std::fs::write(dir.path().join(DB_FILE), &garbage).unwrap();
    assert_sqlite(
        Store::open(dir.path(), MODEL, 2).unwrap_err(),
        dir.path(),
        "not a database",
    );
    assert_sqlite(
        Store::open_existing(dir.path()).unwrap_err(),
        dir.path(),
        "not a database",
    );
    assert_eq!(std::fs::read(dir.path().join(DB_FILE)).unwrap(), garbage);
}

#[test]
fn open_existing_without_an_index_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open_existing(dir.path()).unwrap_err();
    assert!(
        matches!(&err, StoreError::Missing { dir: d } if d == dir.path()),
        "{err}"
    );
    assert!(err.to_string().contains("embedhost index"), "{err}");
}

#[test]
fn a_newer_or_unreadable_schema_version_is_refused_by_open_existing() {
    let dir = tempfile::tempdir().unwrap();
    drop(store(dir.path()));
    for (version, found) in [("99", 99), ("four", -1)] {
        raw(dir.path())
            .execute("UPDATE meta SET value = ?1 WHERE key = 'schema'", [version])
            .unwrap();
        let err = Store::open_existing(dir.path()).unwrap_err();
        assert!(
            matches!(&err, StoreError::Schema { found: f, .. } if *f == found),
            "{version}: {err}"
        );
    }
}

#[test]
fn a_failed_migration_step_leaves_the_schema_version_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    drop(store(dir.path()));
    // Claims version 3, but already has version 4's column: the step that
    // adds it fails.
    raw(dir.path())
        .execute("UPDATE meta SET value = '3' WHERE key = 'schema'", [])
        .unwrap();
    assert_sqlite(
        Store::open_existing(dir.path()).unwrap_err(),
        dir.path(),
        "duplicate column",
    );
    let schema: String = raw(dir.path())
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(schema, "3", "the step's transaction was rolled back");
}

#[test]
fn a_database_whose_tables_are_not_ours_is_refused_and_gets_no_schema() {
    // `chunks` a view: the keyword index's triggers cannot be made on it.
    // `meta` a view: the model cannot be recorded in it.
    for view in [
        "CREATE VIEW chunks AS SELECT 1 AS id, '' AS text",
        "CREATE VIEW meta AS SELECT '' AS key, '' AS value WHERE 0",
    ] {
        let dir = tempfile::tempdir().unwrap();
        raw(dir.path()).execute_batch(view).unwrap();
        let err = Store::open(dir.path(), MODEL, 2).unwrap_err();
        assert_sqlite(err, dir.path(), "view");
        let tables: i64 = raw(dir.path())
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name IN ('chunks_fts', 'roots')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0, "{view}: the first transaction was rolled back");
    }
}

#[test]
fn writes_to_a_damaged_index_name_the_database_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store(dir.path());
    let file = Path::new("/docs/a.txt");
    let ids = commit_one(&mut store, file);
    assert_eq!(ids.len(), 1);
    // The queue is gone: every write that touches it fails.
    raw(dir.path()).execute_batch("DROP TABLE queue").unwrap();
    let other = PathBuf::from("/docs/b.txt");
    assert_sqlite(
        store.enqueue(std::slice::from_ref(&other)).unwrap_err(),
        dir.path(),
        "queue",
    );
    assert_sqlite(
        store
            .commit_file(&other, &meta(1), "h", &[], None)
            .unwrap_err(),
        dir.path(),
        "queue",
    );
    assert_sqlite(
        store
            .commit_skip(&other, &meta(1), "binary", "d")
            .unwrap_err(),
        dir.path(),
        "queue",
    );
    assert_sqlite(
        store.commit_unchanged(&other, &meta(1)).unwrap_err(),
        dir.path(),
        "queue",
    );
    // `remove` deletes the file's row before it reaches the queue: rolled
    // back, the file and its chunk are still there.
    assert_sqlite(store.remove(file).unwrap_err(), dir.path(), "queue");
    assert_sqlite(
        store.forget(Path::new("/docs")).unwrap_err(),
        dir.path(),
        "queue",
    );
    assert!(store.file(file).unwrap().is_some(), "the file row survived");
    assert_eq!(store.vectors().unwrap().0, ids, "its chunk survived");
    // The roots are gone too.
    raw(dir.path()).execute_batch("DROP TABLE roots").unwrap();
    assert_sqlite(
        store.add_roots(&[PathBuf::from("/docs")]).unwrap_err(),
        dir.path(),
        "roots",
    );
}

#[test]
fn a_skip_whose_chunks_cannot_be_read_fails_naming_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store(dir.path());
    let file = PathBuf::from("/docs/a.txt");
    store.enqueue(std::slice::from_ref(&file)).unwrap();
    raw(dir.path()).execute_batch("DROP TABLE chunks").unwrap();
    assert_sqlite(
        store
            .commit_skip(&file, &meta(1), "binary", "d")
            .unwrap_err(),
        dir.path(),
        "chunks",
    );
    assert_eq!(store.queued().unwrap(), [file], "still queued");
}

#[test]
fn commits_for_a_file_no_longer_queued_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store(dir.path());
    let file = Path::new("/docs/a.txt");
    commit_one(&mut store, file);
    let before = store.file(file).unwrap().unwrap();
    // Not queued any more (another run finished it): nothing is recorded.
    assert_eq!(
        store.commit_skip(file, &meta(99), "binary", "d").unwrap(),
        Vec::<i64>::new()
    );
    store.commit_unchanged(file, &meta(99)).unwrap();
    assert_eq!(store.file(file).unwrap().unwrap(), before);
    assert_eq!(store.vectors().unwrap().0.len(), 1);
}

#[test]
fn a_vector_of_the_wrong_length_is_reported_as_corrupt_naming_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store(dir.path());
    let ids = commit_one(&mut store, Path::new("/docs/a.txt"));
    raw(dir.path())
        .execute(
            "UPDATE chunks SET vector = x'00010203' WHERE id = ?1",
            [ids[0]],
        )
        .unwrap();
    let err = store.vectors().unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { chunk, bytes: 4, expected: 8, .. } if *chunk == ids[0]),
        "{err}"
    );
}

#[test]
fn the_store_debugs_as_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let shown = format!("{:?}", store(dir.path()));
    assert!(
        shown.contains(&dir.path().join(DB_FILE).display().to_string()),
        "{shown}"
    );
}

#[test]
fn an_open_index_folder_is_narrowed_only_when_it_holds_only_the_index() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |dir: &Path| std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    let ours = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    for dir in [ours.path(), shared.path()] {
        drop(store(dir));
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(shared.path().join("notes.txt"), "mine").unwrap();
    drop(store(ours.path()));
    drop(store(shared.path()));
    assert_eq!(mode(ours.path()), 0o700);
    assert_eq!(
        mode(shared.path()),
        0o755,
        "a folder with other files is left"
    );
}

#[test]
fn a_keyword_query_is_its_words_and_phrases_without_the_stopwords() {
    assert_eq!(
        fts_query("why is my plant \"a::b\"").as_deref(),
        Some("\"plant\" OR \"a b\""),
    );
    // Only stopwords: they are all there is to search for.
    assert_eq!(fts_query("the of").as_deref(), Some("\"the\" OR \"of\""));
    assert_eq!(fts_query(":: --"), None);
    assert_eq!(fts_query(""), None);
}
