//! The closed vocabularies of the build API, as enums whose serialised
//! strings are exactly what the published SDK (0.1.9 and 1.0.3) accepts:
//! `types.py` `TemplateBuildStatus`, `TemplateFailurePhase`,
//! `TemplateBuildLogKind`, … (see `docs/sdk-contract.md` §7, §8).

use std::fmt;
use std::str::FromStr;

/// An enum serialised as one of a fixed set of strings.
macro_rules! str_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $var),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            /// Every wire string, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($s),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$var => $s),+
                }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $($s => Some($name::$var),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<$name, UnknownValue> {
                $name::parse(s).ok_or_else(|| UnknownValue {
                    what: stringify!($name),
                    value: s.to_string(),
                    allowed: $name::NAMES,
                })
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

/// A string that is not one of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not one of {}", allowed.join(", "))]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
    pub allowed: &'static [&'static str],
}

str_enum! {
    /// `status` of a build record.
    BuildStatus {
        Waiting = "waiting",
        Building = "building",
        Ready = "ready",
        Error = "error",
        Cancelled = "cancelled",
    }
}

impl BuildStatus {
    /// Ready, error and cancelled builds never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BuildStatus::Ready | BuildStatus::Error | BuildStatus::Cancelled
        )
    }

    /// The terminal statuses.
    pub const TERMINAL: &'static [BuildStatus] = &[
        BuildStatus::Ready,
        BuildStatus::Error,
        BuildStatus::Cancelled,
    ];
}

str_enum! {
    /// `error_detail.phase` and `failure_phase`: where a build failed. A
    /// value outside this set makes the SDK reject the whole record.
    FailurePhase {
        Auth = "auth",
        Preflight = "preflight",
        BlobUpload = "blob_upload",
        Prepare = "prepare",
        BuildStep = "build_step",
        Readiness = "readiness",
        Snapshot = "snapshot",
        Finalize = "finalize",
        Interrupted = "interrupted",
    }
}

str_enum! {
    /// `code` of a validation issue, an `error_detail` or an error body of
    /// the build API. The SDK picks its exception class from it:
    /// `build_error` → `BuildError`, `file_upload_error` →
    /// `FileUploadError`, anything else here → a plain `SandboxError` /
    /// `MachineError` carrying the code.
    ErrorCode {
        BuildError = "build_error",
        FileUploadError = "file_upload_error",
        InvalidRequest = "invalid_request",
        InvalidName = "invalid_name",
        InvalidTags = "invalid_tags",
        InvalidSource = "invalid_source",
        InvalidStep = "invalid_step",
        InvalidBackend = "invalid_backend",
        BackendUnavailable = "backend_unavailable",
        InvalidSecret = "invalid_secret",
        InvalidAuth = "invalid_auth",
        InvalidEnv = "invalid_env",
        InvalidUser = "invalid_user",
        InvalidWorkdir = "invalid_workdir",
        InvalidReadiness = "invalid_readiness",
        InvalidBuildConfig = "invalid_build_config",
        InvalidContext = "invalid_context",
    }
}

str_enum! {
    /// `kind` of a log entry; anything else is `invalid_response`.
    LogKind {
        Start = "start",
        Message = "message",
        Cache = "cache",
        Retry = "retry",
        Warning = "warning",
        Error = "error",
        Cancelled = "cancelled",
        End = "end",
    }
}

str_enum! {
    /// `level` of a log entry (`warn`, not `warning`).
    LogLevel {
        Debug = "debug",
        Info = "info",
        Warn = "warn",
        Error = "error",
    }
}

str_enum! {
    /// `phase` of a log entry: free-form to the SDK; this is the docs'
    /// vocabulary, the only values nullspace writes.
    LogPhase {
        Cache = "cache",
        Preparing = "preparing",
        VmCreate = "vm_create",
        Step = "step",
        Sync = "sync",
        Startup = "startup",
        Readiness = "readiness",
        Snapshot = "snapshot",
        Finalize = "finalize",
        Cleanup = "cleanup",
        Retry = "retry",
    }
}

str_enum! {
    /// `cache_kind` of a cache log entry.
    CacheKind {
        FileBlob = "file_blob",
        Layer = "layer",
        FinalArtifact = "final_artifact",
    }
}

str_enum! {
    /// `cache_status` of a cache log entry.
    CacheStatus {
        Hit = "hit",
        Miss = "miss",
        Stored = "stored",
        Bypass = "bypass",
    }
}

str_enum! {
    /// `cache_reason` of a cache log entry.
    CacheReason {
        WholeBuildSkipCache = "whole_build_skip_cache",
        BuilderCacheBoundary = "builder_cache_boundary",
        ForceUpload = "force_upload",
        MissingOrIncompatible = "missing_or_incompatible",
    }
}

str_enum! {
    /// `artifact_availability.status`.
    AvailabilityStatus {
        Available = "available",
        Publishing = "publishing",
        Warming = "warming",
        Unavailable = "unavailable",
        Failed = "failed",
    }
}

str_enum! {
    /// `promotability.status`.
    PromotabilityStatus {
        Promotable = "promotable",
        NotReady = "not_ready",
        Expired = "expired",
        Purged = "purged",
        Unavailable = "unavailable",
    }
}

str_enum! {
    /// `source_type` of a build: what its source is.
    SourceType {
        Declarative = "declarative",
        Dockerfile = "dockerfile",
        OciImport = "oci_import",
        TemplateBase = "template_base",
    }
}

str_enum! {
    /// What runs a build: the build VM (`native`) or a Dockerfile engine.
    /// The request's `build_backend` names one of these.
    Backend {
        Native = "native",
        Buildkit = "buildkit",
        Buildah = "buildah",
    }
}

str_enum! {
    /// `build_backend` in records and plans: the SDK accepts only these
    /// two, so every Dockerfile engine reports as `buildkit` (the record's
    /// `engine` says which one ran).
    RecordBackend {
        Native = "native",
        Buildkit = "buildkit",
    }
}

impl Backend {
    pub fn record(self) -> RecordBackend {
        match self {
            Backend::Native => RecordBackend::Native,
            Backend::Buildkit | Backend::Buildah => RecordBackend::Buildkit,
        }
    }

    /// A Dockerfile engine (not the build VM).
    pub fn is_engine(self) -> bool {
        self != Backend::Native
    }
}

str_enum! {
    /// `visibility` of a template.
    Visibility {
        Private = "private",
        Public = "public",
    }
}

str_enum! {
    /// `entry_type` of a build-context file.
    EntryType {
        File = "file",
        Dir = "dir",
    }
}

str_enum! {
    /// `source` hint of a build secret (the value is always sent).
    SecretSource {
        Value = "value",
        Env = "env",
        File = "file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_strings_round_trip() {
        for s in BuildStatus::ALL {
            let j = serde_json::to_value(s).unwrap();
            assert_eq!(j, s.as_str());
            assert_eq!(serde_json::from_value::<BuildStatus>(j).unwrap(), *s);
        }
        assert_eq!(FailurePhase::BuildStep.as_str(), "build_step");
        assert_eq!(
            "build_step".parse::<FailurePhase>(),
            Ok(FailurePhase::BuildStep)
        );
        let e = "build".parse::<FailurePhase>().unwrap_err().to_string();
        assert!(
            e.starts_with("FailurePhase \"build\" is not one of auth, preflight"),
            "{e}"
        );
        assert_eq!(LogLevel::Warn.to_string(), "warn");
        assert_eq!(Backend::Buildah.record(), RecordBackend::Buildkit);
        assert!(BuildStatus::Cancelled.is_terminal() && !BuildStatus::Building.is_terminal());
    }

    /// The SDK's enums, copied from `types.py` of both published versions.
    #[test]
    fn vocabularies_match_the_sdk() {
        assert_eq!(
            BuildStatus::NAMES,
            ["waiting", "building", "ready", "error", "cancelled"]
        );
        assert_eq!(
            FailurePhase::NAMES,
            [
                "auth",
                "preflight",
                "blob_upload",
                "prepare",
                "build_step",
                "readiness",
                "snapshot",
                "finalize",
                "interrupted"
            ]
        );
        assert_eq!(
            LogKind::NAMES,
            [
                "start",
                "message",
                "cache",
                "retry",
                "warning",
                "error",
                "cancelled",
                "end"
            ]
        );
        assert_eq!(LogLevel::NAMES, ["debug", "info", "warn", "error"]);
        assert_eq!(CacheKind::NAMES, ["file_blob", "layer", "final_artifact"]);
        assert_eq!(CacheStatus::NAMES, ["hit", "miss", "stored", "bypass"]);
        assert_eq!(
            CacheReason::NAMES,
            [
                "whole_build_skip_cache",
                "builder_cache_boundary",
                "force_upload",
                "missing_or_incompatible"
            ]
        );
        assert_eq!(
            AvailabilityStatus::NAMES,
            [
                "available",
                "publishing",
                "warming",
                "unavailable",
                "failed"
            ]
        );
        assert_eq!(
            PromotabilityStatus::NAMES,
            [
                "promotable",
                "not_ready",
                "expired",
                "purged",
                "unavailable"
            ]
        );
        assert_eq!(
            SourceType::NAMES,
            ["declarative", "dockerfile", "oci_import", "template_base"]
        );
        assert_eq!(RecordBackend::NAMES, ["native", "buildkit"]);
        assert_eq!(Visibility::NAMES, ["private", "public"]);
        assert_eq!(SecretSource::NAMES, ["value", "env", "file"]);
    }
}
