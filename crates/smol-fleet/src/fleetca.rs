//! The fleet's certificate authority (`smolfleet init`), join tokens and the TLS of the node
//! door (issue 15): control replicas sign each joining node's CSR (its key never leaves it),
//! nodes then speak to the control plane over mutual TLS only.
//!
//! The CA's certificate and key live in the store (table `fleet_ca`): every control replica
//! over the same database signs with it, and nodes hold no database credentials. Each replica
//! makes its own server certificate for its node door at start, signed by the CA.
//!
//! A join token is `smoljoin_` + 43 characters of base64url (32 random bytes) + `_` + the
//! SHA-256 hex of the CA certificate: the node pins the CA with it on its first connection
//! (it has no CA yet), as `kubeadm join --discovery-token-ca-cert-hash` does. Only the SHA-256
//! of the whole token is stored; it is redeemed once, before it expires.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::error::FleetError;

/// Every join token starts with this.
pub const TOKEN_PREFIX: &str = "smoljoin_";

/// How long a node's certificate is valid (`smolfleet serve --node-cert-validity`); a node
/// renews it past two thirds of that ([`renewal_due`]).
pub const DEFAULT_NODE_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// How long the certificates a replica makes for itself in memory at start (its node door's,
/// its client certificate for nodes' APIs) are valid.
pub const REPLICA_CERT_VALIDITY: Duration = Duration::from_secs(366 * 24 * 3600);

/// A certificate is valid from this long before it is signed (the clocks of nodes and
/// replicas differ a little).
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Sets `params` valid from now (less [`CLOCK_SKEW`]) for `valid_for`.
fn valid_for(params: &mut CertificateParams, valid_for: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + valid_for;
}

/// When certificate `pem` was signed and when it expires, Unix seconds.
pub fn cert_validity(pem: &str) -> Result<(i64, i64), FleetError> {
    let der = first_cert(pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| ca_error("read a certificate", e))?;
    let v = cert.validity();
    let skew = i64::try_from(CLOCK_SKEW.as_secs()).unwrap_or(0);
    Ok((v.not_before.timestamp() + skew, v.not_after.timestamp()))
}

/// Whether certificate `pem` is past two thirds of its life at `now` (Unix seconds): time
/// to renew it.
pub fn renewal_due(pem: &str, now: i64) -> Result<bool, FleetError> {
    let (signed, expires) = cert_validity(pem)?;
    Ok(now >= signed + (expires - signed) * 2 / 3)
}

fn ca_error(what: &str, e: impl std::fmt::Display) -> FleetError {
    FleetError::Ca {
        message: format!("{what}: {e}"),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Lower-case hex of the SHA-256 of `der` (a certificate's fingerprint).
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The DER of the first certificate of `pem`.
pub fn first_cert(pem: &str) -> Result<CertificateDer<'static>, FleetError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| ca_error("not a PEM certificate", e))
}

/// A new CA: `(certificate PEM, private key PEM)`.
pub fn generate_ca() -> Result<(String, String), FleetError> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| ca_error("CA parameters", e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "smol fleet CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(|e| ca_error("generate the CA key", e))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| ca_error("sign the CA certificate", e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The fleet CA, loaded from the store.
pub struct FleetCa {
    cert_pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl FleetCa {
    /// The CA of `cert_pem` and `key_pem` (as [`generate_ca`] made them).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<FleetCa, FleetError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| ca_error("the CA key", e))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| ca_error("the CA certificate", e))?;
        Ok(FleetCa {
            cert_pem: cert_pem.to_owned(),
            der: first_cert(cert_pem)?,
            issuer,
        })
    }

    /// Its certificate (PEM), what nodes trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The SHA-256 hex of its certificate, as join tokens carry it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.der)
    }

    /// A new join token pinning this CA (the caller stores its [`crate::keys::hash`]).
    pub fn new_token(&self) -> String {
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        format!(
            "{TOKEN_PREFIX}{}_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw),
            self.fingerprint()
        )
    }

    /// The client certificate (PEM) of node `node_id` for the public key of `csr_pem`: the
    /// request's signature is checked; only its key is taken (subject, usages and names are
    /// ours).
    pub fn sign_node(
        &self,
        csr_pem: &str,
        node_id: &str,
        validity: Duration,
    ) -> Result<String, FleetError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| ca_error("the node's certificate request", e))?;
        // its id as its DNS name: a control replica reaching the node's API checks it is the
        // node the store names (the node serves that API with this certificate)
        let mut params =
            CertificateParams::new(vec![node_id.to_owned()]).map_err(|e| ca_error("node id", e))?;
        params.distinguished_name.push(DnType::CommonName, node_id);
        params.is_ca = IsCa::ExplicitNoCa;
        valid_for(&mut params, validity);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| ca_error("sign the node's certificate", e))?;
        Ok(cert.pem())
    }

    /// The server config of a control replica's node door: a fresh server certificate for
    /// `names` (IP addresses or DNS names) signed by the CA, the chain sent with the CA (a
    /// joining node pins it), client certificates of the CA verified when given (a joining
    /// node has none yet; every other route requires one).
    pub fn node_door_config(&self, names: &[String]) -> Result<Arc<ServerConfig>, FleetError> {
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(|e| ca_error("--node-san", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "smolfleet control");
        params.is_ca = IsCa::ExplicitNoCa;
        valid_for(&mut params, REPLICA_CERT_VALIDITY);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(|e| ca_error("generate a server key", e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| ca_error("sign the server certificate", e))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(self.der.clone())
            .map_err(|e| ca_error("trust the CA", e))?;
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| ca_error("the client verifier", e))?;
        let key_der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| ca_error("the server key", e))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ca_error("TLS versions", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.der().clone(), self.der.clone()], key_der)
            .map_err(|e| ca_error("the server certificate", e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        no_resumption(&mut config);
        Ok(Arc::new(config))
    }

    /// The client config a control replica reaches nodes' APIs with: a fresh client
    /// certificate of the CA whose subject is [`CONTROL_SUBJECT`] (the CA gives nodes their
    /// id as subject, never this), the CA as the only root.
    pub fn control_client_config(&self) -> Result<Arc<ClientConfig>, FleetError> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| ca_error("control parameters", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, CONTROL_SUBJECT);
        params.is_ca = IsCa::ExplicitNoCa;
        valid_for(&mut params, REPLICA_CERT_VALIDITY);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(|e| ca_error("generate a control key", e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| ca_error("sign the control certificate", e))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(self.der.clone())
            .map_err(|e| ca_error("trust the CA", e))?;
        let key_der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| ca_error("the control key", e))?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ca_error("TLS versions", e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert.der().clone()], key_der)
            .map_err(|e| ca_error("the control certificate", e))?;
        Ok(Arc::new(config))
    }
}

/// The subject (common name) of a control replica's client certificate.
pub const CONTROL_SUBJECT: &str = "smolfleet control replica";

/// Whether `der` (a client certificate the CA verified) is a control replica's: its subject
/// is [`CONTROL_SUBJECT`]. The CA writes every subject itself (a node's is its id), so a node's
/// certificate never carries it.
pub fn is_control_cert(der: &[u8]) -> bool {
    let marker = CONTROL_SUBJECT.as_bytes();
    der.windows(marker.len()).any(|w| w == marker)
}

/// A node's certificate for its API, replaced in place when the node renews it (each
/// handshake takes the current one).
#[derive(Debug)]
pub struct NodeCert(std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>);

impl NodeCert {
    fn certified(
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Arc<rustls::sign::CertifiedKey>, FleetError> {
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| ca_error("the node key", e))?;
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| ca_error("the node key", e))?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            vec![first_cert(cert_pem)?],
            signing,
        )))
    }

    /// The certificate of `cert_pem` with its key `key_pem`.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Arc<NodeCert>, FleetError> {
        Ok(Arc::new(NodeCert(std::sync::RwLock::new(Self::certified(
            cert_pem, key_pem,
        )?))))
    }

    /// Serves `cert_pem` (key `key_pem`) from the next handshake on.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), FleetError> {
        let new = Self::certified(cert_pem, key_pem)?;
        match self.0.write() {
            Ok(mut k) => *k = new,
            Err(p) => *p.into_inner() = new,
        }
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for NodeCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        match self.0.read() {
            Ok(k) => Some(k.clone()),
            Err(p) => Some(p.into_inner().clone()),
        }
    }
}

/// The server config of a node's API (`smolfleet node --api-listen`): its own certificate
/// (its id as DNS name; `cert`, renewed in place) and client certificates of the CA required.
pub fn node_api_config(ca_pem: &str, cert: Arc<NodeCert>) -> Result<Arc<ServerConfig>, FleetError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(first_cert(ca_pem)?)
        .map_err(|e| ca_error("trust the CA", e))?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| ca_error("the client verifier", e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ca_error("TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    no_resumption(&mut config);
    Ok(Arc::new(config))
}

/// Every connection does a full handshake: a resumed TLS session carries the client
/// certificate it began with unverified, so a certificate that expired (or was renewed and
/// refused) would go on being taken through the tickets of its sessions.
fn no_resumption(config: &mut ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.ticketer = Arc::new(NoTickets);
}

/// A ticketer that issues none.
#[derive(Debug)]
struct NoTickets;

impl rustls::server::ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }

    fn lifetime(&self) -> u32 {
        0
    }

    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// The CA fingerprint a join token pins, if `token` has a token's shape.
pub fn token_ca(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (secret, fp) = rest.split_at_checked(43)?;
    let fp = fp.strip_prefix('_')?;
    let ok = secret
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && fp.len() == 64
        && fp.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then_some(fp)
}

/// A node's new key and its certificate request: `(key PEM, CSR PEM)`.
pub fn node_key_and_csr(name: &str) -> Result<(String, String), FleetError> {
    let key = KeyPair::generate().map_err(|e| ca_error("generate the node key", e))?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| ca_error("CSR parameters", e))?;
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| ca_error("the certificate request", e))?;
    Ok((key.serialize_pem(), csr))
}

/// Trusts a server whose chain carries the CA of fingerprint `ca` (a join token's) and whose
/// certificate that CA signed, for `ServerName`.
#[derive(Debug)]
struct PinnedCa {
    ca: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| fingerprint(c) == self.ca) else {
            return Err(rustls::Error::General(format!(
                "the server did not present the CA of the join token ({})",
                self.ca
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client config of a join: no client certificate, the server pinned by the CA
/// fingerprint `ca` of the token.
pub fn join_client_config(ca: &str) -> Result<Arc<ClientConfig>, FleetError> {
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ca_error("TLS versions", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            ca: ca.to_owned(),
            provider,
        }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The client config of a joined node: the fleet CA as its only root, its certificate.
pub fn node_client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>, FleetError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(first_cert(ca_pem)?)
        .map_err(|e| ca_error("trust the CA", e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| ca_error("the node key", e))?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ca_error("TLS versions", e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![first_cert(cert_pem)?], key)
        .map_err(|e| ca_error("the node certificate", e))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_pin_the_ca_and_nodes_get_certificates_of_it() {
        let (cert, key) = generate_ca().unwrap();
        let ca = FleetCa::from_pem(&cert, &key).unwrap();
        let token = ca.new_token();
        assert_eq!(token_ca(&token), Some(ca.fingerprint().as_str()));
        assert_ne!(token, ca.new_token());
        for bad in ["", "smoljoin_", "smk_x", &token[..token.len() - 1]] {
            assert_eq!(token_ca(bad), None, "{bad:?}");
        }
        let (node_key, csr) = node_key_and_csr("host-a").unwrap();
        let node_cert = ca
            .sign_node(&csr, "node-1", DEFAULT_NODE_CERT_VALIDITY)
            .unwrap();
        node_client_config(&cert, &node_cert, &node_key).unwrap();
        assert!(ca
            .sign_node("not a csr", "node-1", DEFAULT_NODE_CERT_VALIDITY)
            .is_err());
        ca.node_door_config(&["127.0.0.1".into(), "localhost".into()])
            .unwrap();
    }
}
