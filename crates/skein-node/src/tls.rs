//! TLS, and optionally mutual TLS, on the gRPC port (admin API and Raft). With mTLS, every
//! client (peers and the CLI) must present a certificate signed by the cluster's CA, and the
//! node presents its own certificate to its peers.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The gRPC port's TLS settings.
#[derive(Debug, Clone)]
pub struct GrpcTls {
    /// The node's certificate chain (PEM).
    pub cert: PathBuf,
    /// The node's private key (PEM).
    pub key: PathBuf,
    /// The CA that signed the nodes' (and clients') certificates (PEM). Peers are verified
    /// against it.
    pub ca: Option<PathBuf>,
    /// Require clients to present a certificate signed by `ca` (mutual TLS).
    pub require_client_cert: bool,
}

fn read(path: &PathBuf, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

impl GrpcTls {
    /// The acceptor for the gRPC listener.
    pub fn acceptor(&self) -> anyhow::Result<TlsAcceptor> {
        let certs = CertificateDer::pem_slice_iter(&read(&self.cert, "TLS certificate")?)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", self.cert.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key, "TLS key")?)
            .with_context(|| format!("parsing {}", self.key.display()))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = if self.require_client_cert {
            let Some(ca) = &self.ca else {
                anyhow::bail!("--grpc-tls-require-client-cert needs --grpc-tls-ca");
            };
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read(ca, "TLS CA")?) {
                roots
                    .add(cert.with_context(|| format!("parsing {}", ca.display()))?)
                    .context("adding the CA certificate")?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .context("the TLS certificate and key do not match")?;
        // gRPC clients only speak HTTP/2 and insist on negotiating it.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// How this node connects to its peers: verifying them against the CA, and presenting its
    /// own certificate.
    pub fn peer_client(&self) -> anyhow::Result<ClientTlsConfig> {
        client_tls(self.ca.as_ref(), Some((&self.cert, &self.key)))
    }
}

/// A client TLS config: trust `ca` (else the platform's roots are not used: a CA is needed),
/// and present `identity` (certificate, key) when given.
pub fn client_tls(
    ca: Option<&PathBuf>,
    identity: Option<(&PathBuf, &PathBuf)>,
) -> anyhow::Result<ClientTlsConfig> {
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = ca {
        config = config.ca_certificate(Certificate::from_pem(read(ca, "TLS CA")?));
    }
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(
            read(cert, "TLS certificate")?,
            read(key, "TLS key")?,
        ));
    }
    Ok(config)
}

/// The TLS handshake of the gRPC port, for [`skein_proxy::listener::serve`].
#[derive(Clone)]
pub struct TlsHandshake(pub TlsAcceptor);

impl skein_proxy::listener::Handshake for TlsHandshake {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

    async fn handshake(&self, stream: tokio::net::TcpStream) -> std::io::Result<Self::Io> {
        self.0.accept(stream).await
    }
}
