//! TLS for mesh connections: every node presents a self-signed certificate for its ed25519
//! identity, and accepts any peer certificate whose handshake signature is valid.
//!
//! Certificates are not what makes a peer a member: the membership proof (see
//! [`mesh_proto::wire`]) is, and it is bound to this TLS session's exporter, so a
//! man in the middle who terminates TLS cannot forward it.

use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
};

/// Accepts any certificate, but checks that the peer holds its key.
#[derive(Debug)]
struct AnyCertHoldingItsKey(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertHoldingItsKey {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for AnyCertHoldingItsKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
    }
}

/// The rustls configs for one node identity.
pub(crate) struct TlsConfigs {
    pub(crate) client: rustls::ClientConfig,
    pub(crate) server: rustls::ServerConfig,
    /// The node's certificate (DER), as peers see it.
    pub(crate) cert: Vec<u8>,
}

/// Builds client and server TLS 1.3 configs from the node's PKCS#8 ed25519 key.
pub(crate) fn configs(key_der: &[u8]) -> Result<TlsConfigs, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rcgen::KeyPair::try_from(key_der)
        .map_err(|e| rustls::Error::General(format!("identity key: {e}")))?;
    let cert = rcgen::CertificateParams::new(vec!["mesh".to_string()])
        .and_then(|params| params.self_signed(&key))
        .map_err(|e| rustls::Error::General(format!("certificate: {e}")))?;
    let cert = cert.der().clone();
    let cert_der = cert.to_vec();
    let private = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.to_vec()));
    let verifier = Arc::new(AnyCertHoldingItsKey(provider.clone()));
    let alpn = vec![mesh_proto::wire::ALPN.to_vec()];

    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(vec![cert.clone()], private())?;
    client.alpn_protocols = alpn.clone();

    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], private())?;
    server.alpn_protocols = alpn;
    Ok(TlsConfigs {
        client,
        server,
        cert: cert_der,
    })
}
