//! Certificates with rcgen: a CA (ECDSA P-256) and the leaf certificates
//! it issues for tether-server, agents and ArgoCD.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::CertificateDer;
use sha2::Digest;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Agent certificates carry their cluster as a URI SAN with this prefix
/// (and as the common name), so tether-server can bind cert to token.
pub const CLUSTER_URI_PREFIX: &str = "spiffe://tether/cluster/";

/// tether-server's certificates carry this URI SAN: replicas present them
/// to each other as client certificates too.
pub const SERVER_URI: &str = "spiffe://tether/server";

/// Issued certificates start a little in the past to tolerate clock skew.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

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
        let (params, not_after) = leaf_params(request)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    /// Signs an agent's request for `cluster_id`, checked by
    /// [`AgentRequest::check`]: the certificate says what
    /// [`LeafRequest::agent`] says, whatever else the request asked for;
    /// only the public key is the agent's.
    pub fn sign_agent_request(
        &self,
        request: &AgentRequest,
        validity: Duration,
    ) -> Result<String, PkiError> {
        let (params, _) = leaf_params(&LeafRequest::agent(&request.cluster_id, validity))?;
        let signed = rcgen::CertificateSigningRequestParams {
            params,
            public_key: request.parsed.public_key.clone(),
        }
        .signed_by(&self.issuer)?;
        Ok(signed.pem())
    }
}

/// The parameters of a leaf certificate and when it expires.
fn leaf_params(request: &LeafRequest) -> Result<(CertificateParams, SystemTime), PkiError> {
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
    Ok((params, not_after_system))
}

/// Why an agent's certificate request is refused. Says what was wrong,
/// never echoes more than the identity asked for.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestRefusal {
    #[error("not a PKCS#10 request with a valid signature")]
    Malformed,
    #[error("asks for identity {asked:?}, but the session is cluster {cluster:?}")]
    WrongIdentity { asked: String, cluster: String },
    #[error("asks for names other than the cluster's identity")]
    ExtraNames,
    #[error("asks to be a certificate authority")]
    CertificateAuthority,
    #[error("asks for a usage other than TLS client authentication")]
    Usage,
}

/// An agent's certificate request that names exactly one cluster and asks
/// for nothing an agent must not have.
pub struct AgentRequest {
    pub cluster_id: String,
    parsed: rcgen::CertificateSigningRequestParams,
}

impl std::fmt::Debug for AgentRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRequest")
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

impl AgentRequest {
    /// Makes a new key pair and a request for `cluster_id`'s identity.
    /// Returns the request and the private key (secret: it never leaves
    /// the agent), both PEM.
    pub fn create(cluster_id: &str) -> Result<(String, String), PkiError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, cluster_id);
        params.distinguished_name = name;
        params.subject_alt_names = vec![SanType::URI(
            format!("{CLUSTER_URI_PREFIX}{cluster_id}").try_into()?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let request = params.serialize_request(&key)?;
        Ok((request.pem()?, key.serialize_pem()))
    }

    /// Accepts `pem` only if its signature holds and it asks for exactly
    /// `cluster_id`'s identity (CN and URI SAN), no CA, and no usage but
    /// client authentication.
    pub fn check(pem: &str, cluster_id: &str) -> Result<Self, RequestRefusal> {
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(pem)
            .map_err(|_| RequestRefusal::Malformed)?;
        let params = &parsed.params;
        let wrong = |asked: String| RequestRefusal::WrongIdentity {
            asked: asked.chars().take(80).collect(),
            cluster: cluster_id.to_owned(),
        };
        let common_names: Vec<String> = params
            .distinguished_name
            .iter()
            .filter(|(kind, _)| **kind == DnType::CommonName)
            .map(|(_, value)| dn_text(value))
            .collect();
        if params.distinguished_name.iter().count() != 1 || common_names.len() != 1 {
            return Err(wrong(common_names.join(",")));
        }
        if common_names[0] != cluster_id {
            return Err(wrong(common_names[0].clone()));
        }
        let expected_uri = format!("{CLUSTER_URI_PREFIX}{cluster_id}");
        match params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] if uri.as_str() == expected_uri => {}
            [SanType::URI(uri)] => return Err(wrong(uri.as_str().to_owned())),
            _ => return Err(RequestRefusal::ExtraNames),
        }
        if matches!(params.is_ca, IsCa::Ca(_)) {
            return Err(RequestRefusal::CertificateAuthority);
        }
        if params
            .extended_key_usages
            .iter()
            .any(|usage| *usage != ExtendedKeyUsagePurpose::ClientAuth)
            || params.key_usages.iter().any(|usage| {
                !matches!(
                    usage,
                    KeyUsagePurpose::DigitalSignature | KeyUsagePurpose::KeyEncipherment
                )
            })
        {
            return Err(RequestRefusal::Usage);
        }
        Ok(Self {
            cluster_id: cluster_id.to_owned(),
            parsed,
        })
    }
}

/// Whether `cert_pem` certifies the public half of `key_pem`.
pub fn certificate_matches_key(cert_pem: &str, key_pem: &str) -> bool {
    use rcgen::PublicKeyData;
    use rustls::pki_types::pem::PemObject;
    let Ok(der) = CertificateDer::from_pem_slice(cert_pem.as_bytes()) else {
        return false;
    };
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
        return false;
    };
    KeyPair::from_pem(key_pem)
        .is_ok_and(|key| key.subject_public_key_info() == cert.tbs_certificate.subject_pki.raw)
}

fn dn_text(value: &rcgen::DnValue) -> String {
    match value {
        rcgen::DnValue::Utf8String(s) => s.clone(),
        rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
        rcgen::DnValue::Ia5String(s) => s.as_str().to_owned(),
        rcgen::DnValue::TeletexString(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

/// A certificate's validity window and the cluster it names, read from PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub cluster: Option<String>,
    /// SHA-256 of the DER: tells two certificates apart (validity times
    /// have one-second resolution).
    pub fingerprint: [u8; 32],
}

impl CertInfo {
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::Parse)?;
        Self::from_der(&der)
    }

    pub fn from_der(der: &CertificateDer<'_>) -> Result<Self, PkiError> {
        let (_, parsed) = X509Certificate::from_der(der.as_ref()).map_err(|_| PkiError::Parse)?;
        let to_system = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        Ok(Self {
            not_before: to_system(parsed.validity().not_before),
            not_after: to_system(parsed.validity().not_after),
            cluster: identity_of(&parsed),
            fingerprint: sha2::Sha256::digest(der.as_ref()).into(),
        })
    }

    /// When the certificate should be replaced: two thirds into its life,
    /// counted from its issue (tether's certificates start [`BACKDATE`]
    /// early for clock skew; counting that in would renew short-lived
    /// certificates at once, again and again).
    pub fn renew_at(&self) -> SystemTime {
        let issued = (self.not_before + BACKDATE).min(self.not_after);
        let life = self.not_after.duration_since(issued).unwrap_or_default();
        issued + life.mul_f64(2.0 / 3.0)
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
    Ok(identity_of(&parsed))
}

/// [`cluster_identity`] of a parsed certificate.
fn identity_of(parsed: &X509Certificate<'_>) -> Option<String> {
    if let Ok(Some(sans)) = parsed.subject_alternative_name()
        && let Some(id) = sans.value.general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(CLUSTER_URI_PREFIX).map(str::to_owned),
            _ => None,
        })
    {
        return Some(id);
    }
    parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
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

    fn request_with(params: impl FnOnce(&mut CertificateParams)) -> String {
        let mut p = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "dev");
        p.distinguished_name = name;
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://tether/cluster/dev".try_into().expect("uri"),
        )];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params(&mut p);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        p.serialize_request(&key).expect("csr").pem().expect("pem")
    }

    #[test]
    fn agent_requests_are_signed_for_exactly_their_cluster() {
        let ca = CertificateAuthority::generate("test CA", Duration::from_secs(3600)).expect("ca");
        let (csr, key) = AgentRequest::create("dev").expect("request");
        assert!(!csr.contains("PRIVATE KEY"), "the request carries no key");
        let request = AgentRequest::check(&csr, "dev").expect("accepted");
        let cert = ca
            .sign_agent_request(&request, Duration::from_secs(600))
            .expect("signed");
        assert!(certificate_matches_key(&cert, &key), "the agent's own key");
        let info = CertInfo::from_pem(&cert).expect("parses");
        assert_eq!(info.cluster.as_deref(), Some("dev"));
        let life = info
            .not_after
            .duration_since(info.not_before)
            .expect("window");
        assert_eq!(life, Duration::from_secs(600) + BACKDATE);
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).expect("pem");
        assert!(!is_server_identity(&der), "a client certificate only");
        let (other, other_key) = AgentRequest::create("dev").expect("request");
        assert!(!other.is_empty() && !certificate_matches_key(&cert, &other_key));
    }

    #[test]
    fn agent_requests_asking_for_more_are_refused() {
        let (csr, _) = AgentRequest::create("dev").expect("request");
        assert!(matches!(
            AgentRequest::check(&csr, "prod"),
            Err(RequestRefusal::WrongIdentity { asked, cluster }) if asked == "dev" && cluster == "prod"
        ));
        let cases: Vec<(RequestRefusal, String)> = vec![
            (
                RequestRefusal::ExtraNames,
                request_with(|p| {
                    p.subject_alt_names
                        .push(SanType::DnsName("tether.example".try_into().expect("dns")))
                }),
            ),
            (
                RequestRefusal::CertificateAuthority,
                request_with(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
            ),
            (
                RequestRefusal::Usage,
                request_with(|p| {
                    p.extended_key_usages
                        .push(ExtendedKeyUsagePurpose::ServerAuth)
                }),
            ),
            (
                RequestRefusal::Usage,
                request_with(|p| p.key_usages = vec![KeyUsagePurpose::KeyCertSign]),
            ),
            (
                RequestRefusal::WrongIdentity {
                    asked: "spiffe://tether/cluster/prod".into(),
                    cluster: "dev".into(),
                },
                request_with(|p| {
                    p.subject_alt_names = vec![SanType::URI(
                        "spiffe://tether/cluster/prod".try_into().expect("uri"),
                    )]
                }),
            ),
            (
                RequestRefusal::Malformed,
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
            ),
            (RequestRefusal::Malformed, "not pem".into()),
        ];
        for (expected, csr) in cases {
            assert_eq!(
                AgentRequest::check(&csr, "dev").err(),
                Some(expected.clone()),
                "{expected}"
            );
        }
        // A valid request whose signature was tampered with.
        let good = request_with(|_| {});
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
            .expect("pem");
        let mut bytes = der.as_ref().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let pem = pem_encode("CERTIFICATE REQUEST", &bytes);
        assert_eq!(
            AgentRequest::check(&pem, "dev").err(),
            Some(RequestRefusal::Malformed)
        );
    }

    fn pem_encode(label: &str, der: &[u8]) -> String {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

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
        // Two thirds of the 3000 s asked for, whatever the back-dating.
        let renew_in = info
            .renew_at()
            .duration_since(SystemTime::now())
            .expect("future")
            .as_secs();
        assert!((1990..=2000).contains(&renew_in), "{renew_in}");
        let short = ca
            .issue(&LeafRequest::agent("a", Duration::from_secs(90)))
            .expect("leaf");
        let short = CertInfo::from_pem(&short.cert_pem).expect("parses");
        let renew_in = short
            .renew_at()
            .duration_since(SystemTime::now())
            .expect("a short-lived certificate is not due at once")
            .as_secs();
        assert!((55..=60).contains(&renew_in), "{renew_in}");
        assert!(!info.due(SystemTime::now()));
        assert!(info.due(SystemTime::now() + Duration::from_secs(2001)));
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
