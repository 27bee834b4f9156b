//! The request bodies of the build API as the published SDK sends them
//! (`docs/sdk-contract.md` §3, §6, §9): read leniently (unknown keys
//! ignored, keys omitted when unset), written back in the same shape. The
//! server parses them, the CLI builds them; [`super::plan::plan`] turns a
//! [`BuildRequest`] into the typed plan, checking every rule.
//!
//! Steps, readiness and credentials stay JSON values here so that a
//! request with broken ones still parses and validation can name every
//! problem; the typed forms are [`Step`], [`Readiness`] and [`Credentials`],
//! with setters that write their wire JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::probe::Readiness;
use super::step::Step;

/// `POST /v1/templates/build`, `/builds`, `/validate`, `/plan`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BuildRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Absent means `["default"]`; `[]` is invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// An OCI image reference or a template ref.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image: Option<String>,
    /// Dockerfile text (instead of `base_image` and `steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Vec<Step>>"))]
    pub steps: Option<Vec<Value>>,
    /// Seen by the build steps only, never by the template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_envs: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_config: Option<RuntimeConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_context: Option<BuildContext>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_config: Option<BuildConfig>,
    /// `native`, `buildkit` or `buildah`; absent: native for steps, the
    /// server's first engine for a Dockerfile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_backend: Option<String>,
    /// Credentials: used for the pull, never persisted (only `kind`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Credentials>"))]
    pub base_image_auth: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Vec<RegistryAuth>>"))]
    pub registry_auth: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_secrets: Option<Vec<BuildSecret>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_cache: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_args: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_token: Option<String>,
}

impl BuildRequest {
    /// Sets `steps` from typed steps (their SDK JSON).
    pub fn set_steps(&mut self, steps: &[Step]) {
        self.steps = Some(steps.iter().map(Step::to_json).collect());
    }

    /// Sets `base_image_auth` from typed credentials.
    pub fn set_base_image_auth(&mut self, c: &Credentials) {
        self.base_image_auth = Some(c.to_json());
    }

    /// The request with secret values and passwords replaced by
    /// `<redacted>` (for printing).
    pub fn redacted(&self) -> BuildRequest {
        let mut r = self.clone();
        for s in r.build_secrets.iter_mut().flatten() {
            if s.value.is_some() {
                s.value = Some(REDACTED.into());
            }
        }
        let redact = |a: &mut Value| {
            if let Some(o) = a.as_object_mut() {
                for k in [
                    "password",
                    "secret_access_key",
                    "session_token",
                    "service_account_json",
                ] {
                    if o.contains_key(k) {
                        o.insert(k.into(), json!(REDACTED));
                    }
                }
            }
        };
        if let Some(a) = r.base_image_auth.as_mut() {
            redact(a);
        }
        for e in r.registry_auth.iter_mut().flatten() {
            if let Some(a) = e.get_mut("auth") {
                redact(a);
            }
        }
        r
    }
}

/// What [`BuildRequest::redacted`] writes in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// `runtime_config` (contract §3.5): the template's defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RuntimeConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_envs: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Readiness>"))]
    pub readiness: Option<Value>,
}

impl RuntimeConfig {
    pub fn set_readiness(&mut self, r: &Readiness) {
        self.readiness = Some(r.to_json());
    }

    pub fn is_empty(&self) -> bool {
        self == &RuntimeConfig::default()
    }
}

/// `build_context` (contract §6.7).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BuildContext {
    #[serde(default)]
    pub files: Vec<ContextFile>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContextFile {
    pub path: String,
    /// `file` or `dir`.
    pub entry_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Build: the uploaded blob (`blob_<sha256 hex>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_id: Option<String>,
    /// Validate/plan: the bytes inline. Never persisted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
}

/// `build_config` (contract §3.8): the build VM's size and network.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BuildConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internet_access: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<i64>,
    /// nullspace's own: the most vCPUs a machine of the template may ask
    /// for (default [`crate::size::DEFAULT_MAX_VCPUS`] or `vcpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<i64>,
    /// nullspace's own: the most memory a machine of the template may ask
    /// for (default [`crate::size::DEFAULT_MAX_MEMORY_MIB`] or
    /// `memory_mib`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<i64>,
}

/// `build_secrets[]` (contract §3.7).
#[derive(Clone, Default, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BuildSecret {
    pub id: String,
    #[serde(default)]
    pub value: Option<String>,
    /// `value`, `env` or `file` (a hint; the value is always sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl std::fmt::Debug for BuildSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BuildSecret({}, <redacted>)", self.id)
    }
}

/// Registry credentials (`base_image_auth`, `registry_auth[].auth`,
/// contract §3.6). Held in memory only; `Debug` shows the kind alone.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credentials {
    Basic {
        username: String,
        password: String,
    },
    GcpArtifactRegistry {
        service_account_json: Map<String, Value>,
    },
    AwsEcr {
        access_key_id: String,
        secret_access_key: String,
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_token: Option<String>,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.kind())
    }
}

impl Credentials {
    /// `basic`, `gcp_artifact_registry` or `aws_ecr`.
    pub fn kind(&self) -> &'static str {
        match self {
            Credentials::Basic { .. } => "basic",
            Credentials::GcpArtifactRegistry { .. } => "gcp_artifact_registry",
            Credentials::AwsEcr { .. } => "aws_ecr",
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// Parses credentials as sent, with the client-side rules the SDK
    /// applies (contract §3.6): no blank field, a non-empty GCP object.
    pub fn parse(v: &Value) -> Result<Credentials, String> {
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .filter(|x| !x.trim().is_empty())
                .map(str::to_string)
        };
        match v.get("kind").and_then(Value::as_str) {
            Some("basic") => match (s("username"), s("password")) {
                (Some(username), Some(password)) => Ok(Credentials::Basic { username, password }),
                _ => Err("basic auth needs username and password".into()),
            },
            Some("aws_ecr") => match (s("access_key_id"), s("secret_access_key"), s("region")) {
                (Some(access_key_id), Some(secret_access_key), Some(region)) => {
                    Ok(Credentials::AwsEcr {
                        access_key_id,
                        secret_access_key,
                        region,
                        session_token: s("session_token"),
                    })
                }
                _ => Err("aws_ecr auth needs access_key_id, secret_access_key and region".into()),
            },
            Some("gcp_artifact_registry") => match v.get("service_account_json") {
                Some(Value::Object(o)) if !o.is_empty() => Ok(Credentials::GcpArtifactRegistry {
                    service_account_json: o.clone(),
                }),
                _ => Err(
                    "gcp_artifact_registry auth needs a non-empty service_account_json object"
                        .into(),
                ),
            },
            _ => Err("kind must be basic, gcp_artifact_registry or aws_ecr".into()),
        }
    }
}

/// One `registry_auth[]` entry: credentials for one registry host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RegistryAuth {
    pub registry: String,
    pub auth: Credentials,
}

impl RegistryAuth {
    /// Parses an entry; errors name the field.
    pub fn parse(v: &Value) -> Result<RegistryAuth, String> {
        let registry = v
            .get("registry")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
            .ok_or("registry is required")?
            .to_string();
        let auth = v.get("auth").ok_or("auth is required")?;
        let auth = Credentials::parse(auth).map_err(|e| format!("auth: {e}"))?;
        Ok(RegistryAuth { registry, auth })
    }
}

// ---- the other request bodies ------------------------------------------------
// Read leniently like `BuildRequest`: an empty body is `{}`.

/// `POST /v1/templates/builds/{build_id}/cancel`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CancelBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `POST /v1/templates/builds/{build_id}/retry`: fresh credentials and
/// secrets (old values are never replayed), optionally new tags.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RetryBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Credentials>"))]
    pub base_image_auth: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Vec<RegistryAuth>>"))]
    pub registry_auth: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_secrets: Option<Vec<BuildSecret>>,
}

/// `POST /v1/templates/builds/{build_id}/promote`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PromoteBody {
    pub tag: String,
}

/// `POST /v1/templates/blobs/preflight`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PreflightBody {
    pub files: Vec<PreflightFile>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PreflightFile {
    pub path: String,
    /// `file` or `dir`.
    pub entry_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Files: 64 lowercase hex characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_upload: Option<bool>,
}

/// `POST /v1/templates/refs/{ref}/tags`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TagsBody {
    pub tags: Vec<String>,
}

/// `POST /v1/templates/refs/{ref}/rename`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RenameBody {
    pub new_name: String,
}

/// `PATCH /v1/templates/refs/{ref}/visibility`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct VisibilityBody {
    /// `private` or `public`.
    pub visibility: String,
}

/// `POST /v1/templates/claims`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ClaimBody {
    pub template_ref: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Contract §3.8: the SDK's request with every build option.
    #[test]
    fn sdk_request_round_trips() {
        let wire = json!({"base_image":"127.0.0.1:5000/x:1","name":"t1","tags":["stable"],
            "build_config":{"vcpus":4,"memory_mib":2048,"internet_access":false,"disk_mb":4096},
            "build_backend":"native","skip_cache":true});
        let r: BuildRequest = serde_json::from_value(wire.clone()).unwrap();
        assert_eq!(serde_json::to_value(&r).unwrap(), wire);
        // Unknown keys are ignored.
        let r: BuildRequest = serde_json::from_value(json!({"base_image":"x","future":1})).unwrap();
        assert_eq!(r.base_image.as_deref(), Some("x"));
    }

    #[test]
    fn typed_setters_write_the_wire_shapes() {
        let mut r = BuildRequest {
            base_image: Some("x".into()),
            ..Default::default()
        };
        r.set_steps(&[Step::Run {
            command: "echo one".into(),
            user: Some("app".into()),
        }]);
        r.set_base_image_auth(&Credentials::Basic {
            username: "u".into(),
            password: "PASSW0RD".into(),
        });
        r.build_secrets = Some(vec![BuildSecret {
            id: "x".into(),
            value: Some("SUPERSECRET".into()),
            source: Some("value".into()),
        }]);
        let mut rc = RuntimeConfig::default();
        rc.set_readiness(&Readiness::tcp(8080));
        r.runtime_config = Some(rc);
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(
            j["steps"],
            json!([{"action":"run","command":"echo one","user":"app"}])
        );
        assert_eq!(
            j["base_image_auth"],
            json!({"kind":"basic","username":"u","password":"PASSW0RD"})
        );
        assert_eq!(
            j["runtime_config"]["readiness"],
            json!({"kind":"tcp","port":8080,"timeout_secs":30,"interval_ms":500,"startup_grace_secs":2})
        );
        let shown = serde_json::to_string(&r.redacted()).unwrap();
        assert!(
            !shown.contains("PASSW0RD") && !shown.contains("SUPERSECRET"),
            "{shown}"
        );
        assert!(
            !format!("{:?}", Credentials::parse(&j["base_image_auth"]).unwrap())
                .contains("PASSW0RD")
        );
    }

    #[test]
    fn credential_rules() {
        for (v, msg) in [
            (
                json!({"kind":"basic","username":"u"}),
                "username and password",
            ),
            (json!({"kind":"oauth"}), "kind must be"),
            (
                json!({"kind":"aws_ecr","access_key_id":"a","secret_access_key":" ","region":"r"}),
                "aws_ecr",
            ),
            (
                json!({"kind":"gcp_artifact_registry","service_account_json":{}}),
                "non-empty",
            ),
        ] {
            assert!(Credentials::parse(&v).unwrap_err().contains(msg), "{v}");
        }
        assert!(
            RegistryAuth::parse(&json!({"auth":{"kind":"basic","username":"u","password":"p"}}))
                .unwrap_err()
                .contains("registry")
        );
    }
}
