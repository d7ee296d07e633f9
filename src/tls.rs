//! TLS for both listeners (rustls), and client certificates whose subject names a tenant.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::control::validate_tenant;

/// The tenant a verified client certificate names, attached to every request of its connection.
#[derive(Debug, Clone, Default)]
pub struct PeerTenant(pub Option<String>);

/// The node's certificate, key and (optionally) the CA that client certificates must chain to.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// What both listeners need to speak TLS.
#[derive(Clone)]
pub struct TlsSetup {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
    /// For the HTTP listener.
    pub http: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// The bytes of the file `what` (a config key or a flag) names.
pub fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// The certificates of a PEM file read from `path`; one that holds none is refused, naming it,
/// rather than found out at a handshake.
pub fn certificates(pem: &[u8], path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: not PEM certificates: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{what} {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certificates)
}

/// The private key of a PEM file read from `path`.
pub fn private_key(pem: &[u8], path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("{what} {}: not a PEM private key: {e}", path.display()))
}

impl TlsSetup {
    /// Loads and checks the files; errors name the file and what is wrong with it.
    pub fn load(files: &TlsFiles) -> Result<TlsSetup, String> {
        let cert_pem = read(&files.cert, "security.tls_cert")?;
        let key_pem = read(&files.key, "security.tls_key")?;
        let certs = certificates(&cert_pem, &files.cert, "security.tls_cert")?;
        let key = private_key(&key_pem, &files.key, "security.tls_key")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let client_ca_pem = match &files.client_ca {
            Some(path) => Some((read(path, "security.client_ca")?, path)),
            None => None,
        };
        let builder = match &client_ca_pem {
            Some((pem, path)) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates(pem, path, "security.client_ca")? {
                    roots.add(cert).map_err(|e| format!("security.client_ca: {e}"))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("security.client_ca: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut http = builder.with_single_cert(certs, key).map_err(|e| {
            format!(
                "security.tls_cert and tls_key do not make a usable pair: {}",
                unusable_pair(&e)
            )
        })?;
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsSetup {
            cert_pem,
            key_pem,
            client_ca_pem: client_ca_pem.map(|(pem, _)| pem),
            http: Arc::new(http),
        })
    }

    /// The same identity for tonic.
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        let identity = tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem);
        let config = tonic::transport::ServerTlsConfig::new().identity(identity);
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(tonic::transport::Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// The tenant named by a (verified) client certificate: its subject's common name, if that is
/// a valid tenant name.
pub fn certificate_tenant(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    validate_tenant(&name).ok().map(|()| name)
}
/// Why a certificate and its key make no usable pair, in words. rustls names an X.509 version 1
/// certificate (what `openssl x509 -req` signs without `-extfile`) only by webpki's variant,
/// which reads as if the pair did not match.
pub fn unusable_pair(error: &rustls::Error) -> String {
    if format!("{error:?}").contains("UnsupportedCertVersion") {
        "the certificate is X.509 version 1 (signed without extensions, as `openssl x509 -req` does \
         without -extfile); TLS takes version 3 only"
            .to_string()
    } else {
        error.to_string()
    }
}
