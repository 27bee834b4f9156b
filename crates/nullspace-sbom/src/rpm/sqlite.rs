//! rpm's sqlite database (rpm 4.16+): `var/lib/rpm/rpmdb.sqlite`, table
//! `Packages(hnum, blob)`, one header blob per installed package.

use crate::{DB_LIMIT, SbomError, Scan};

pub const PATHS: &[&str] = &[
    "var/lib/rpm/rpmdb.sqlite",
    "usr/lib/sysimage/rpm/rpmdb.sqlite",
];

/// The header blobs, read from a private copy of the database (SQLite
/// needs a file; the root filesystem may be a disk image).
pub(crate) fn blobs(
    scan: &Scan<'_>,
    path: &str,
    bytes: Vec<u8>,
) -> Result<Vec<Vec<u8>>, SbomError> {
    let temp = |source| SbomError::Temp {
        path: path.to_owned(),
        source,
    };
    let sql = |source| SbomError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let dir = tempfile::tempdir().map_err(temp)?;
    let db = dir.path().join("rpmdb.sqlite");
    std::fs::write(&db, &bytes).map_err(temp)?;
    let mut size = bytes.len() as u64;
    drop(bytes);
    // A write-ahead log not yet checkpointed holds committed packages too.
    let wal = format!("{path}-wal");
    if let Some(log) = scan.fs.read(&wal, DB_LIMIT)? {
        size += log.len() as u64;
        std::fs::write(dir.path().join("rpmdb.sqlite-wal"), log).map_err(temp)?;
    }
    let conn = rusqlite::Connection::open_with_flags(
        &db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    // The file is hostile: no schema-defined functions, cell sizes checked,
    // and `Packages` must be a table (a view could compute rows forever).
    conn.execute_batch("PRAGMA trusted_schema = OFF; PRAGMA cell_size_check = ON;")
        .map_err(sql)?;
    let kind: Option<String> = conn
        .query_row(
            "SELECT type FROM sqlite_master WHERE name = 'Packages'",
            [],
            |row| row.get(0),
        )
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(sql)?;
    if kind.as_deref() != Some("table") {
        return Err(SbomError::corrupt(path, "no Packages table"));
    }
    let mut stmt = conn
        .prepare("SELECT blob FROM Packages ORDER BY hnum")
        .map_err(sql)?;
    let rows = stmt
        .query_map([], |row| row.get::<_, Vec<u8>>(0))
        .map_err(sql)?;
    let mut out = Vec::new();
    // A table's rows are stored in the file: together they cannot be larger.
    let mut budget = size;
    for row in rows {
        let blob = row.map_err(sql)?;
        budget = budget
            .checked_sub(blob.len() as u64)
            .ok_or_else(|| SbomError::corrupt(path, "rows larger than the database"))?;
        out.push(blob);
    }
    Ok(out)
}
