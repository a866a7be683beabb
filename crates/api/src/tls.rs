//! Native TLS on the TCP listener: the server's certificate and, with `[server] tls.client_ca`,
//! the client certificates every TCP client must present (mTLS). Both are re-read together by
//! [`TlsCerts::reload`].

use basphere_config::TlsFiles;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// A certificate that cannot be used, with the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {0}: {1} (a PEM file with the certificate chain, leaf first)")]
    Cert(PathBuf, String),
    #[error("TLS key {0}: {1} (a PEM file with one PKCS#8, PKCS#1 or SEC1 private key)")]
    Key(PathBuf, String),
    #[error("TLS key {key} does not belong to certificate {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error(
        "server.tls.client_ca {0}: {1} (a PEM file with the CA certificate(s) client \
         certificates must chain to)"
    )]
    ClientCa(PathBuf, String),
}

/// The TCP listener's TLS settings, swapped whole by [`TlsCerts::reload`]: connections made
/// after a reload see the new certificate and client CA, the listener and open connections stay.
#[derive(Clone)]
pub struct TlsCerts {
    files: TlsFiles,
    current: Arc<RwLock<Loaded>>,
}

struct Loaded {
    acceptor: tokio_rustls::TlsAcceptor,
    fingerprint: String,
}

impl std::fmt::Debug for TlsCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCerts")
            .field("files", &self.files)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl TlsCerts {
    /// Reads the certificate chain, key and client CA.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            files: files.clone(),
            current: Arc::new(RwLock::new(build(files)?)),
        })
    }

    /// Re-reads the files; on any error the old settings stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let new = build(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = new;
        Ok(())
    }

    /// SHA-256 of the leaf certificate (DER), as colon-separated hex.
    pub fn fingerprint(&self) -> String {
        self.loaded(|l| l.fingerprint.clone())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// What accepts a new connection now.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.loaded(|l| l.acceptor.clone())
    }

    fn loaded<T>(&self, f: impl FnOnce(&Loaded) -> T) -> T {
        f(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// SHA-256 of a DER certificate as `AB:CD:…`.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn build(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let ck = read_pair(files)?;
    let fingerprint = fingerprint(ck.cert[0].as_ref());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = match &files.client_ca {
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, provider)?),
        None => builder.with_no_client_auth(),
    };
    let mut sc = builder.with_cert_resolver(Arc::new(Fixed(Arc::new(ck))));
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Loaded {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(sc)),
        fingerprint,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// Requires a client certificate that chains to a CA in `ca`.
fn client_verifier(
    ca: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let err = |e: String| TlsError::ClientCa(ca.to_path_buf(), e);
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca).map_err(err)? {
        roots.add(c).map_err(|e| err(e.to_string()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| err(e.to_string()))
}

fn read_pair(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let certs = read_certs(&files.cert).map_err(|e| TlsError::Cert(files.cert.clone(), e))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError::Key(files.key.clone(), e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key(files.key.clone(), e.to_string()))?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match().map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(ck)
}
