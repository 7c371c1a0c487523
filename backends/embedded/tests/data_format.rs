//! A data directory records the layout it was written in; a build refuses one of a newer
//! layout instead of misreading it.

use redb::{ReadableDatabase, TableDefinition};
use tally_embedded::{Options, DATA_FORMAT};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

fn stored_format(dir: &std::path::Path) -> Option<u64> {
    let db = redb::Database::open(dir.join("tally.redb")).unwrap();
    let read = db.begin_read().unwrap();
    let meta = read.open_table(META).unwrap();
    let format = meta.get("format").unwrap().map(|g| g.value());
    format
}

/// The error and its causes, as the command line prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}

#[test]
fn a_directory_of_a_newer_layout_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    drop(tally_embedded::open(dir.path(), Options::default()).expect("a new directory opens"));
    assert_eq!(stored_format(dir.path()), Some(DATA_FORMAT));

    // As a newer build would leave it.
    {
        let db = redb::Database::open(dir.path().join("tally.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("format", DATA_FORMAT + 1)
            .unwrap();
        txn.commit().unwrap();
    }
    let refused = match tally_embedded::open(dir.path(), Options::default()) {
        Ok(_) => panic!("a directory of a newer layout opened"),
        Err(e) => chain(&e),
    };
    assert!(
        refused.contains("newer tally")
            && refused.contains(&format!("data format {}", DATA_FORMAT + 1)),
        "{refused}"
    );
    // Refusing wrote nothing: the newer build still finds its own layout.
    assert_eq!(stored_format(dir.path()), Some(DATA_FORMAT + 1));
}

#[test]
fn a_directory_of_the_layout_before_the_stamp_opens_and_is_stamped() {
    let dir = tempfile::tempdir().unwrap();
    drop(tally_embedded::open(dir.path(), Options::default()).unwrap());
    // The layout before the stamp: no `format` key.
    {
        let db = redb::Database::open(dir.path().join("tally.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().remove("format").unwrap();
        txn.commit().unwrap();
    }
    assert_eq!(stored_format(dir.path()), None);
    drop(tally_embedded::open(dir.path(), Options::default()).expect("an older layout opens"));
    assert_eq!(stored_format(dir.path()), Some(DATA_FORMAT));
    // Stamped now: it opens again as it is.
    drop(tally_embedded::open(dir.path(), Options::default()).expect("a stamped directory opens"));
    assert_eq!(stored_format(dir.path()), Some(DATA_FORMAT));
}
