//! One error type whose message names the image, the object (descriptor,
//! file, registry) and the rule that was broken, on one line.

use std::fmt;
use std::io;

use crate::digest::{DigestError, VerifyError};
use crate::manifest::DocumentError;
use crate::platform::PlatformError;

#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("registry: {0}")]
    Registry(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug)]
pub struct OciError {
    /// The image as the user named it.
    pub image: String,
    /// The object the error is about: `manifest sha256:…`, `layer 2 sha256:…`.
    pub object: Option<String>,
    pub kind: ErrorKind,
}

impl OciError {
    pub fn new(image: impl Into<String>, kind: impl Into<ErrorKind>) -> OciError {
        OciError {
            image: image.into(),
            object: None,
            kind: kind.into(),
        }
    }
    pub fn at(
        image: impl Into<String>,
        object: impl Into<String>,
        kind: impl Into<ErrorKind>,
    ) -> OciError {
        OciError {
            image: image.into(),
            object: Some(object.into()),
            kind: kind.into(),
        }
    }
}

impl fmt::Display for OciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "image {}", self.image)?;
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        // An io::Error that wraps a VerifyError prints as that rule.
        let msg = self.kind.to_string();
        write!(f, ": {}", msg.replace('\n', " "))
    }
}

impl std::error::Error for OciError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.kind)
    }
}

impl OciError {
    /// A failed read of a blob: a verification failure (from a
    /// [`crate::digest::VerifyingReader`]) is reported as that rule, any
    /// other error as I/O.
    pub fn reading(image: impl Into<String>, object: impl Into<String>, e: io::Error) -> OciError {
        match verify_error_of(&e) {
            Some(v) => OciError::at(image, object, v.clone()),
            None => OciError::at(image, object, e),
        }
    }
}

/// Unwraps an io::Error raised by a [`crate::digest::VerifyingReader`].
pub fn verify_error_of(e: &io::Error) -> Option<&VerifyError> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<VerifyError>())
}
