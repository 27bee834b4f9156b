//! Why a root filesystem's packages could not be listed.

use crate::source::FsError;

#[derive(Debug, thiserror::Error)]
pub enum SbomError {
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A package database that does not follow its format.
    #[error("corrupt package database {path}: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("package database {path} is not readable as SQLite: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("a temporary copy of {path}: {source}")]
    Temp {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the root filesystem has more than {limit} {what}; refusing to scan further")]
    TooMany { what: &'static str, limit: usize },
}

impl SbomError {
    pub(crate) fn corrupt(path: &str, reason: impl Into<String>) -> Self {
        SbomError::Corrupt {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}
