//! Registry access through `oci-client`, which implements the distribution
//! protocol and the `WWW-Authenticate` challenge flow (anonymous, basic,
//! bearer token). Everything it returns is verified again by the resolver.
//!
//! The rest of nullspace is synchronous streaming code; blob streams are
//! bridged from the async client through a small bounded channel.

use std::io::{self, Read};

use bytes::Bytes;
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::auth::{self, Credentials};
use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::manifest::{self, Descriptor};
use crate::resolve::{Backend, Root};

pub(crate) struct Registry {
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
    /// Always `Some` until drop; see the `Drop` impl.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        // An image may be dropped inside someone else's async runtime (the
        // server); a blocking runtime shutdown would panic there.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The client's error as ours, by its variant and the registry's status or
/// error codes (never by its message text).
fn map_err(e: oci_client::errors::OciDistributionError) -> ErrorKind {
    use oci_client::errors::OciDistributionError as E;
    use oci_client::errors::OciErrorCode as C;
    let msg = e.to_string();
    match e {
        E::AuthenticationFailure(m) => ErrorKind::Auth(m),
        E::UnauthorizedError { url } => ErrorKind::Auth(format!("unauthorized at {url}")),
        E::ImageManifestNotFoundError(m) => ErrorKind::NotFound(m),
        E::ServerError {
            code: 401 | 403, ..
        } => ErrorKind::Auth(msg),
        E::ServerError { code: 404, .. } => ErrorKind::NotFound(msg),
        E::RegistryError { ref envelope, .. } => {
            let codes: Vec<&C> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, C::Unauthorized | C::Denied))
            {
                ErrorKind::Auth(msg)
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    C::ManifestUnknown | C::NameUnknown | C::NotFound | C::BlobUnknown
                )
            }) {
                ErrorKind::NotFound(msg)
            } else {
                ErrorKind::Registry(msg)
            }
        }
        E::RequestError(ref r) => match r.status().map(|s| s.as_u16()) {
            Some(401 | 403) => ErrorKind::Auth(msg),
            Some(404) => ErrorKind::NotFound(msg),
            _ => ErrorKind::Registry(msg),
        },
        _ => ErrorKind::Registry(msg),
    }
}

impl Registry {
    pub(crate) fn new(
        reference: Reference,
        creds: Option<Credentials>,
        insecure: &[String],
    ) -> Result<Registry, ErrorKind> {
        let registry = reference.resolve_registry().to_string();
        let plain_http = auth::is_loopback(&registry) || insecure.contains(&registry);
        let config = ClientConfig {
            protocol: if plain_http {
                ClientProtocol::HttpsExcept(vec![registry.clone()])
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(300)),
            ..Default::default()
        };
        let creds = creds.or_else(|| auth::from_docker_config(reference.registry()));
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Registry {
            client: Client::new(config),
            reference,
            auth,
            rt: Some(rt),
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives until drop")
    }

    fn pull_manifest(&self, reference: &Reference) -> Result<Vec<u8>, ErrorKind> {
        let (bytes, _digest) = self
            .rt()
            .block_on(self.client.pull_manifest_raw(
                reference,
                &self.auth,
                manifest::ACCEPTED_MANIFEST_TYPES,
            ))
            .map_err(map_err)?;
        Ok(bytes.to_vec())
    }
}

impl Backend for Registry {
    fn root(&self) -> Result<Root, ErrorKind> {
        let bytes = self.pull_manifest(&self.reference)?;
        let expected = match self.reference.digest() {
            Some(d) => Some((Digest::parse(d)?, bytes.len() as u64)),
            None => None,
        };
        Ok(Root {
            bytes,
            expected,
            declared_type: None,
        })
    }

    fn fetch(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>, ErrorKind> {
        if manifest::ACCEPTED_MANIFEST_TYPES.contains(&desc.media_type.as_str()) {
            let r = self.reference.clone_with_digest(desc.digest.to_string());
            return Ok(Box::new(io::Cursor::new(self.pull_manifest(&r)?)));
        }
        // Authenticate first (a no-op when a token is cached): blob requests
        // carry whatever auth the client holds for this registry.
        self.rt().block_on(
            self.client
                .store_auth_if_needed(self.reference.resolve_registry(), &self.auth),
        );
        let digest = desc.digest.to_string();
        let stream = self
            .rt()
            .block_on(
                self.client
                    .pull_blob_stream(&self.reference, digest.as_str()),
            )
            .map_err(map_err)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(16);
        let mut stream = stream.stream;
        self.rt().spawn(async move {
            while let Some(chunk) = stream.next().await {
                let item = chunk.map_err(normalize_stream_error);
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Box::new(ChannelReader {
            rx,
            buf: Bytes::new(),
            pos: 0,
        }))
    }
}

/// oci-client verifies blob digests itself and reports a mismatch in its own
/// words; report it as the same rule every other source reports.
fn normalize_stream_error(e: io::Error) -> io::Error {
    use oci_client::errors::DigestError;
    if let Some(DigestError::VerificationError { actual, .. }) =
        e.get_ref().and_then(|i| i.downcast_ref::<DigestError>())
        && let Ok(actual) = Digest::parse(actual)
    {
        return io::Error::new(
            io::ErrorKind::InvalidData,
            crate::digest::VerifyError::DigestMismatch { actual },
        );
    }
    e
}

/// A blocking `Read` over chunks sent by the async side.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    buf: Bytes,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
