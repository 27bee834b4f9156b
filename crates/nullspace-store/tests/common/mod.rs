//! What the store's test files share: a SQLite database file in a
//! directory of its own, removed with it.

use nullspace_store::Store;

pub struct SqliteDb {
    /// `sqlite:<dir>/db.sqlite`, as `Store::open` takes it.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl SqliteDb {
    pub fn new() -> SqliteDb {
        let dir = tempfile::tempdir().unwrap();
        SqliteDb {
            url: format!("sqlite:{}", dir.path().join("db.sqlite").display()),
            _dir: dir,
        }
    }

    /// Opens (creating on first use) the store in this file.
    pub async fn open(&self) -> Store {
        Store::open(&self.url).await.unwrap()
    }
}
