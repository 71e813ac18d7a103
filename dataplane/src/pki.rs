//! Certificates with rcgen: a CA (ECDSA P-256) and the leaf certificates
//! it issues for tether-server, agents and ArgoCD.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Agent certificates carry their cluster as a URI SAN with this prefix
/// (and as the common name), so tether-server can bind cert to token.
pub const CLUSTER_URI_PREFIX: &str = "spiffe://tether/cluster/";

/// tether-server's certificates carry this URI SAN: replicas present them
/// to each other as client certificates too.
pub const SERVER_URI: &str = "spiffe://tether/server";

/// Issued certificates start a little in the past to tolerate clock skew.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("validity {0:?} is out of range")]
    Validity(Duration),
    #[error("certificate is not valid DER X.509")]
    Parse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server (tether-server).
    Server,
    /// TLS client (agents, ArgoCD).
    Client,
}

/// What a leaf certificate should say.
#[derive(Debug, Clone)]
pub struct LeafRequest {
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub uris: Vec<String>,
    pub usage: Usage,
    pub validity: Duration,
}

impl LeafRequest {
    pub fn server(
        common_name: &str,
        dns_names: &[&str],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Self {
        Self {
            common_name: common_name.to_owned(),
            dns_names: dns_names.iter().map(|s| (*s).to_owned()).collect(),
            ip_addresses: ips.to_vec(),
            uris: vec![SERVER_URI.to_owned()],
            usage: Usage::Server,
            validity,
        }
    }

    /// A client certificate naming a cluster's agent.
    pub fn agent(cluster_id: &str, validity: Duration) -> Self {
        Self {
            common_name: cluster_id.to_owned(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            uris: vec![format!("{CLUSTER_URI_PREFIX}{cluster_id}")],
            usage: Usage::Client,
            validity,
        }
    }

    pub fn client(common_name: &str, validity: Duration) -> Self {
        Self {
            common_name: common_name.to_owned(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            uris: Vec::new(),
            usage: Usage::Client,
            validity,
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    /// Secret: never log it.
    pub key_pem: String,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn validity_window(
    validity: Duration,
) -> Result<(OffsetDateTime, OffsetDateTime, SystemTime), PkiError> {
    let now = SystemTime::now();
    let not_before = now - BACKDATE;
    let not_after = now
        .checked_add(validity)
        .ok_or(PkiError::Validity(validity))?;
    Ok((not_before.into(), not_after.into(), not_after))
}

impl CertificateAuthority {
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, common_name);
        name.push(DnType::OrganizationName, "tether");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (not_before, not_after, _) = validity_window(validity)?;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA kept elsewhere (a Secret, a directory).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Secret: never log it.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn issue(&self, request: &LeafRequest) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, request.common_name.as_str());
        params.distinguished_name = name;
        let mut sans = Vec::new();
        for dns in &request.dns_names {
            sans.push(SanType::DnsName(dns.as_str().try_into()?));
        }
        for ip in &request.ip_addresses {
            sans.push(SanType::IpAddress(*ip));
        }
        for uri in &request.uris {
            sans.push(SanType::URI(uri.as_str().try_into()?));
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match request.usage {
            // Replicas of tether-server authenticate to each other with
            // their server certificate (peer forwarding).
            Usage::Server => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let (not_before, not_after, not_after_system) = validity_window(request.validity)?;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after: not_after_system,
        })
    }
}

/// A certificate's validity window and the cluster it names, read from PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub cluster: Option<String>,
}

impl CertInfo {
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::Parse)?;
        let (_, parsed) = X509Certificate::from_der(der.as_ref()).map_err(|_| PkiError::Parse)?;
        let to_system = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        Ok(Self {
            not_before: to_system(parsed.validity().not_before),
            not_after: to_system(parsed.validity().not_after),
            cluster: cluster_identity(&der)?,
        })
    }

    /// When the certificate should be replaced: two thirds into its life.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life.mul_f64(2.0 / 3.0)
    }

    pub fn due(&self, now: SystemTime) -> bool {
        now >= self.renew_at()
    }
}

/// The cluster an agent certificate names: its `spiffe://tether/cluster/`
/// URI SAN, or else its subject common name (certificates from other
/// issuers, such as cert-manager, often carry only a CN).
pub fn cluster_identity(cert: &CertificateDer<'_>) -> Result<Option<String>, PkiError> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).map_err(|_| PkiError::Parse)?;
    if let Ok(Some(sans)) = parsed.subject_alternative_name()
        && let Some(id) = sans.value.general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(CLUSTER_URI_PREFIX).map(str::to_owned),
            _ => None,
        })
    {
        return Ok(Some(id));
    }
    Ok(parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned))
}

/// The DNS names a certificate is valid for.
pub fn dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, PkiError> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).map_err(|_| PkiError::Parse)?;
    Ok(match parsed.subject_alternative_name() {
        Ok(Some(sans)) => sans
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    })
}

/// Whether a certificate is a tether-server's (its [`SERVER_URI`] SAN).
pub fn is_server_identity(cert: &CertificateDer<'_>) -> bool {
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return false;
    };
    matches!(parsed.subject_alternative_name(), Ok(Some(sans))
        if sans.value.general_names.iter().any(|n| matches!(n, GeneralName::URI(uri) if *uri == SERVER_URI)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn agent_certificates_name_their_cluster() {
        let ca = CertificateAuthority::generate("test CA", Duration::from_secs(3600)).expect("ca");
        let issued = ca
            .issue(&LeafRequest::agent("prod-eu", Duration::from_secs(600)))
            .expect("leaf");
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("pem");
        assert_eq!(
            cluster_identity(&der).expect("parses"),
            Some("prod-eu".to_owned())
        );
        let server = ca
            .issue(&LeafRequest::server(
                "s",
                &["localhost"],
                &[],
                Duration::from_secs(600),
            ))
            .expect("leaf");
        let der = CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).expect("pem");
        assert_eq!(
            cluster_identity(&der).expect("parses").as_deref(),
            Some("s"),
            "falls back to the CN"
        );
    }

    #[test]
    fn a_reloaded_ca_issues_certificates_that_chain_to_it() {
        let ca = CertificateAuthority::generate("test CA", Duration::from_secs(3600)).expect("ca");
        let again = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).expect("reload");
        let issued = again
            .issue(&LeafRequest::agent("a", Duration::from_secs(60)))
            .expect("leaf");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("pem"))
            .expect("root");
        crate::install_crypto_provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder(roots.into())
            .build()
            .expect("verifier");
        let leaf = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("pem");
        verifier
            .verify_client_cert(&leaf, &[], rustls::pki_types::UnixTime::now())
            .expect("agent cert chains to the CA");
    }

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime() {
        let ca = CertificateAuthority::generate("test CA", Duration::from_secs(3600)).expect("ca");
        let issued = ca
            .issue(&LeafRequest::agent("a", Duration::from_secs(3000)))
            .expect("leaf");
        let info = CertInfo::from_pem(&issued.cert_pem).expect("parses");
        assert_eq!(info.cluster.as_deref(), Some("a"));
        // Backdated by BACKDATE, so the life is 3000 s + 300 s.
        let renew_in = info
            .renew_at()
            .duration_since(SystemTime::now())
            .expect("future")
            .as_secs();
        assert!((1890..=1910).contains(&renew_in), "{renew_in}");
        assert!(!info.due(SystemTime::now()));
        assert!(info.due(SystemTime::now() + Duration::from_secs(2000)));
        assert!(CertInfo::from_pem("not a cert").is_err());
    }

    #[test]
    fn debug_never_prints_keys() {
        let ca = CertificateAuthority::generate("test CA", Duration::from_secs(3600)).expect("ca");
        let issued = ca
            .issue(&LeafRequest::client("argocd", Duration::from_secs(60)))
            .expect("leaf");
        assert!(!format!("{issued:?}").contains("PRIVATE KEY"));
    }
}
