//! How the agent's connection to tether-server leaves the customer network:
//! directly, or through a corporate HTTP proxy with `CONNECT`. The tunnel's
//! own TLS (mTLS to tether-server) runs end to end inside the CONNECT
//! tunnel, so the proxy sees the server's host and port and nothing else.
//! Proxy credentials go in the CONNECT request only. The agent's other
//! connection, to its own kube-apiserver, never uses a proxy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use http::header::{self, HeaderValue};
use http::{Request, StatusCode, Uri};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

use super::no_proxy::NoProxy;
use crate::tls::{self, TlsError};

/// A connection towards tether-server, before its TLS.
pub type Transport = Either<TcpStream, TokioIo<Upgraded>>;

#[derive(Debug, Clone, Default, Args)]
pub struct ProxyArgs {
    /// HTTP proxy to reach tether-server through, with CONNECT:
    /// `http://[user:password@]host:port`, or `https://…` for TLS to the
    /// proxy. Default: HTTPS_PROXY/https_proxy (HTTP_PROXY/http_proxy for a
    /// ws:// server), then ALL_PROXY/all_proxy.
    #[arg(long, env = "TETHER_PROXY")]
    pub proxy: Option<String>,
    /// Hosts reached without the proxy: names, .domains, IPs, CIDRs,
    /// host:port, or `*` (Go's NO_PROXY rules). Default: NO_PROXY/no_proxy.
    #[arg(long, env = "TETHER_NO_PROXY")]
    pub no_proxy: Option<String>,
    /// CA of an https:// proxy's certificate (default: the public web roots).
    #[arg(long, env = "TETHER_PROXY_CA_CERT")]
    pub proxy_ca_cert: Option<PathBuf>,
    /// File holding the proxy's `user:password`, read at every connection
    /// attempt (a mounted Secret may change). A missing file means no
    /// credentials.
    #[arg(long, env = "TETHER_PROXY_CREDENTIALS_FILE")]
    pub proxy_credentials_file: Option<PathBuf>,
}

/// Everything that can go wrong on the way to tether-server, before its
/// TLS handshake. Messages name the proxy without its credentials.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("proxy URL {0:?} is not http://host:port or https://host:port")]
    BadProxyUrl(String),
    #[error(
        "proxy URL scheme {0:?} is not supported: tether-agent speaks HTTP CONNECT to http:// and https:// proxies"
    )]
    UnsupportedProxyScheme(String),
    #[error("proxy credentials are given twice: in the proxy URL and in --proxy-credentials-file")]
    CredentialsTwice,
    #[error("proxy CA: {0}")]
    ProxyCa(TlsError),
    #[error("cannot read proxy credentials from {path}: {source}")]
    CredentialsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("proxy credentials in {0} are not `user:password`")]
    BadCredentials(PathBuf),
    #[error("cannot connect to {target}: {source}")]
    Unreachable {
        target: String,
        source: std::io::Error,
    },
    #[error("connecting to {0} timed out")]
    Timeout(String),
    #[error("cannot reach proxy {proxy}: {source}")]
    ProxyUnreachable {
        proxy: String,
        source: std::io::Error,
    },
    #[error(
        "TLS to proxy {proxy} failed: {source} (is --proxy-ca-cert the CA of the proxy's certificate?)"
    )]
    ProxyTls {
        proxy: String,
        source: std::io::Error,
    },
    #[error("proxy {proxy} did not answer CONNECT within {CONNECT_TIMEOUT:?}")]
    ProxyTimeout { proxy: String },
    #[error("proxy {proxy} closed the connection during CONNECT ({detail})")]
    ProxyClosed { proxy: String, detail: String },
    #[error("proxy {proxy} requires authentication (407 {reason}): {advice}")]
    ProxyAuthRequired {
        proxy: String,
        reason: String,
        advice: &'static str,
    },
    #[error("proxy {proxy} refused CONNECT to {target}: {status} {reason}")]
    ProxyRefused {
        proxy: String,
        target: String,
        status: u16,
        reason: String,
    },
}

impl EgressError {
    /// The `result` label of `agent_proxy_connects_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ProxyUnreachable { .. } | Self::Unreachable { .. } => "unreachable",
            Self::Timeout(_) | Self::ProxyTimeout { .. } => "timeout",
            Self::ProxyTls { .. } => "proxy_tls",
            Self::ProxyClosed { .. } => "closed",
            Self::ProxyAuthRequired { .. } => "auth_required",
            Self::ProxyRefused { .. } => "refused",
            _ => "config",
        }
    }

    /// Failures that will not go away by retrying soon (credentials or
    /// policy): the agent backs off fully, never in its quick-retry window.
    pub fn is_persistent(&self) -> bool {
        matches!(
            self,
            Self::ProxyAuthRequired { .. }
                | Self::ProxyRefused { .. }
                | Self::CredentialsFile { .. }
                | Self::BadCredentials(_)
        )
    }
}

/// How long reaching the proxy, its TLS and its answer to CONNECT may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks a proxy URL as the agent will read it (for the operator, before
/// it renders one into a bundle); the URL without credentials.
pub fn check_proxy_url(url: &str) -> Result<String, EgressError> {
    HttpProxy::parse(url, &ProxyArgs::default()).map(|proxy| proxy.display)
}

/// Where the agent's connections to tether-server go.
pub enum Route {
    Direct,
    Proxy(HttpProxy),
}

/// An HTTP CONNECT proxy.
pub struct HttpProxy {
    /// `scheme://host:port`, without credentials: safe to log and show.
    pub display: String,
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    credentials: Credentials,
}

/// Names the proxy only: its credentials never reach a log.
impl std::fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HttpProxy").field(&self.display).finish()
    }
}

enum Credentials {
    None,
    /// From the proxy URL's userinfo: a ready `Basic` header value.
    Url(HeaderValue),
    File(PathBuf),
}

impl Route {
    /// The route to `server_host:server_port` that the flags, else the
    /// environment (`env`), ask for; and a line saying why, for the log.
    pub fn choose(
        args: &ProxyArgs,
        secure: bool,
        server_host: &str,
        server_port: u16,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Self, String), EgressError> {
        let env_any = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| env(name).filter(|v| !v.trim().is_empty()))
        };
        let scheme_vars: &[&str] = if secure {
            &["HTTPS_PROXY", "https_proxy"]
        } else {
            &["HTTP_PROXY", "http_proxy"]
        };
        let proxy = args
            .proxy
            .clone()
            .filter(|v| !v.trim().is_empty())
            .or_else(|| env_any(scheme_vars))
            .or_else(|| env_any(&["ALL_PROXY", "all_proxy"]));
        let Some(proxy) = proxy else {
            return Ok((Self::Direct, "no proxy configured".to_owned()));
        };
        let proxy = HttpProxy::parse(proxy.trim(), args)?;
        let no_proxy = args
            .no_proxy
            .clone()
            .or_else(|| env_any(&["NO_PROXY", "no_proxy"]))
            .unwrap_or_default();
        let (no_proxy, ignored) = NoProxy::parse(&no_proxy);
        if !ignored.is_empty() {
            tracing::warn!(entries = ?ignored, "ignoring NO_PROXY entries that match nothing");
        }
        if no_proxy.matches(server_host, server_port) {
            return Ok((
                Self::Direct,
                format!(
                    "{server_host}:{server_port} is excluded from proxy {} by NO_PROXY (or is local)",
                    proxy.display
                ),
            ));
        }
        let why = format!("through proxy {}", proxy.display);
        Ok((Self::Proxy(proxy), why))
    }

    /// The proxy, if any, for metrics and probes.
    pub fn proxy(&self) -> Option<&HttpProxy> {
        match self {
            Self::Direct => None,
            Self::Proxy(proxy) => Some(proxy),
        }
    }

    /// A connection to `host:port`: directly, or a CONNECT tunnel.
    pub async fn connect(&self, host: &str, port: u16) -> Result<Transport, EgressError> {
        match self {
            Self::Direct => {
                let target = authority(host, port);
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
                    .await
                    .map_err(|_| EgressError::Timeout(target.clone()))?
                    .map_err(|source| EgressError::Unreachable { target, source })?;
                let _ = tcp.set_nodelay(true);
                Ok(Either::Left(tcp))
            }
            Self::Proxy(proxy) => proxy.tunnel(host, port).await.map(Either::Right),
        }
    }
}

/// `host:port`, with an IPv6 host in brackets.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn basic(user: &str, password: &str) -> HeaderValue {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut value =
        HeaderValue::try_from(format!("Basic {encoded}")).unwrap_or(HeaderValue::from_static(""));
    // hyper leaves sensitive values out of its debug output.
    value.set_sensitive(true);
    value
}

impl HttpProxy {
    fn parse(url: &str, args: &ProxyArgs) -> Result<Self, EgressError> {
        let bad = || EgressError::BadProxyUrl(redact_userinfo(url));
        // `proxy:3128` is an http:// proxy, as in curl and Go.
        let with_scheme = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        let uri: Uri = with_scheme.parse().map_err(|_| bad())?;
        let secure = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => return Err(EgressError::UnsupportedProxyScheme(other.to_owned())),
            None => return Err(bad()),
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad());
        }
        let userinfo = uri
            .authority()
            .ok_or_else(bad)?
            .as_str()
            .rsplit_once('@')
            .map(|(userinfo, _)| userinfo);
        let host = uri
            .host()
            .ok_or_else(bad)?
            .trim_matches(['[', ']'])
            .to_owned();
        if host.is_empty() {
            return Err(bad());
        }
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let credentials = match (userinfo, &args.proxy_credentials_file) {
            (Some(_), Some(_)) => return Err(EgressError::CredentialsTwice),
            (Some(userinfo), None) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8()
                        .map(|s| s.into_owned())
                        .map_err(|_| bad())
                };
                Credentials::Url(basic(&decode(user)?, &decode(password)?))
            }
            (None, Some(path)) => Credentials::File(path.clone()),
            (None, None) => Credentials::None,
        };
        let tls = if secure {
            let roots = match &args.proxy_ca_cert {
                Some(path) => tls::load_roots(path).map_err(EgressError::ProxyCa)?,
                None => rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                },
            };
            let mut config = tls::client_config(roots, None).map_err(EgressError::ProxyCa)?;
            // CONNECT is HTTP/1.1.
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Self {
            display: format!(
                "{}://{}",
                if secure { "https" } else { "http" },
                authority(&host, port)
            ),
            host,
            port,
            tls,
            credentials,
        })
    }

    /// The `Proxy-Authorization` value for the next CONNECT, if any.
    fn authorization(&self) -> Result<Option<HeaderValue>, EgressError> {
        match &self.credentials {
            Credentials::None => Ok(None),
            Credentials::Url(value) => Ok(Some(value.clone())),
            Credentials::File(path) => match std::fs::read_to_string(path) {
                Ok(text) => {
                    let text = text.trim_end_matches(['\r', '\n']);
                    let (user, password) = text
                        .split_once(':')
                        .filter(|(user, _)| !user.is_empty())
                        .ok_or_else(|| EgressError::BadCredentials(path.clone()))?;
                    Ok(Some(basic(user, password)))
                }
                // The customer's Secret is optional in the bundle: until it
                // exists, the agent tries without credentials.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(EgressError::CredentialsFile {
                    path: path.clone(),
                    source,
                }),
            },
        }
    }

    async fn tunnel(&self, host: &str, port: u16) -> Result<TokioIo<Upgraded>, EgressError> {
        let authorization = self.authorization()?;
        let proxy = || self.display.clone();
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| EgressError::ProxyTimeout { proxy: proxy() })?
        .map_err(|source| EgressError::ProxyUnreachable {
            proxy: proxy(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let io = match &self.tls {
            Some((connector, name)) => {
                let tls =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| EgressError::ProxyTimeout { proxy: proxy() })?
                        .map_err(|source| EgressError::ProxyTls {
                            proxy: proxy(),
                            source,
                        })?;
                Either::Left(tls)
            }
            None => Either::Right(tcp),
        };
        let target = authority(host, port);
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.send_connect(io, &target, authorization),
        )
        .await
        .map_err(|_| EgressError::ProxyTimeout { proxy: proxy() })?
    }

    async fn send_connect<IO>(
        &self,
        io: IO,
        target: &str,
        authorization: Option<HeaderValue>,
    ) -> Result<TokioIo<Upgraded>, EgressError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let closed = |err: hyper::Error| EgressError::ProxyClosed {
            proxy: self.display.clone(),
            detail: err.to_string(),
        };
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, crate::http::Body>(TokioIo::new(io))
                .await
                .map_err(closed)?;
        let driver = tokio::spawn(connection.with_upgrades());
        let mut request = Request::connect(target)
            .header(header::HOST, target)
            .header(
                header::USER_AGENT,
                concat!("tether-agent/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(value) = authorization.clone() {
            request = request.header(header::PROXY_AUTHORIZATION, value);
        }
        let request = request
            .body(crate::http::empty())
            .map_err(|_| EgressError::BadProxyUrl(target.to_owned()))?;
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(err) => {
                driver.abort();
                return Err(closed(err));
            }
        };
        let status = response.status();
        if !status.is_success() {
            driver.abort();
            let reason = response
                .extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
                .or_else(|| status.canonical_reason().map(str::to_owned))
                .unwrap_or_default();
            return Err(if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
                EgressError::ProxyAuthRequired {
                    proxy: self.display.clone(),
                    reason,
                    advice: match (&self.credentials, authorization.is_some()) {
                        (_, true) => "the proxy refused the credentials sent; check them",
                        (Credentials::File(_), false) => {
                            "the proxy credentials file does not exist (is the customer's proxy Secret created?)"
                        }
                        _ => {
                            "no credentials configured: put them in the proxy URL or in --proxy-credentials-file"
                        }
                    },
                }
            } else {
                EgressError::ProxyRefused {
                    proxy: self.display.clone(),
                    target: target.to_owned(),
                    status: status.as_u16(),
                    reason,
                }
            });
        }
        hyper::upgrade::on(response)
            .await
            .map(TokioIo::new)
            .map_err(closed)
    }
}

/// A proxy URL with its userinfo removed, for error messages.
fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(start), Some(at)) if at > start => format!("{}***{}", &url[..start + 3], &url[at..]),
        (None, Some(at)) => format!("***{}", &url[at..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choose(args: &ProxyArgs, env: &[(&str, &str)]) -> (Route, String) {
        Route::choose(args, true, "tether.example.com", 8443, |name| {
            env.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
        .expect("valid")
    }

    fn proxy_of(route: &Route) -> Option<&str> {
        route.proxy().map(|p| p.display.as_str())
    }

    #[test]
    fn the_flag_then_the_scheme_variable_then_all_proxy() {
        let none = ProxyArgs::default();
        assert!(proxy_of(&choose(&none, &[]).0).is_none());
        let env = [
            ("HTTPS_PROXY", "http://upper:3128"),
            ("https_proxy", "http://lower:3128"),
            ("HTTP_PROXY", "http://plain:3128"),
            ("ALL_PROXY", "http://all:3128"),
        ];
        assert_eq!(proxy_of(&choose(&none, &env).0), Some("http://upper:3128"));
        assert_eq!(
            proxy_of(&choose(&none, &env[1..]).0),
            Some("http://lower:3128")
        );
        assert_eq!(
            proxy_of(&choose(&none, &env[2..]).0),
            Some("http://all:3128"),
            "HTTP_PROXY is for ws:// servers"
        );
        let flag = ProxyArgs {
            proxy: Some("proxy.corp:8080".into()),
            ..Default::default()
        };
        assert_eq!(
            proxy_of(&choose(&flag, &env).0),
            Some("http://proxy.corp:8080")
        );
        let plain = Route::choose(&none, false, "tether.example.com", 80, |name| {
            env.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
        .expect("valid");
        assert_eq!(proxy_of(&plain.0), Some("http://plain:3128"));
    }

    #[test]
    fn no_proxy_sends_the_server_direct_and_says_why() {
        let env = [
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("NO_PROXY", ".example.com"),
        ];
        let (route, why) = choose(&ProxyArgs::default(), &env);
        assert!(route.proxy().is_none());
        assert!(why.contains("NO_PROXY"), "{why}");
        let flag = ProxyArgs {
            no_proxy: Some("other.org".into()),
            ..Default::default()
        };
        assert_eq!(
            proxy_of(&choose(&flag, &env).0),
            Some("http://proxy:3128"),
            "--no-proxy replaces NO_PROXY"
        );
    }

    #[test]
    fn proxy_urls_are_checked_and_never_shown_with_credentials() {
        let parse = |url: &str| HttpProxy::parse(url, &ProxyArgs::default());
        let proxy = parse("http://alice:p%40ss@proxy.corp:3128").expect("valid");
        assert_eq!(proxy.display, "http://proxy.corp:3128");
        let Credentials::Url(value) = &proxy.credentials else {
            panic!("credentials from the URL");
        };
        use base64::Engine;
        let expected = base64::engine::general_purpose::STANDARD.encode("alice:p@ss");
        assert_eq!(
            value.to_str().ok(),
            Some(format!("Basic {expected}").as_str())
        );
        assert!(value.is_sensitive());
        assert_eq!(
            parse("https://[2001:db8::1]").expect("v6").display,
            "https://[2001:db8::1]:443"
        );
        assert_eq!(parse("proxy").expect("bare").display, "http://proxy:80");
        for (url, expected) in [
            ("socks5://proxy:1080", "socks5"),
            ("http://user:secret@proxy:3128/path", "***"),
            ("http://", "not http"),
        ] {
            let err = parse(url).expect_err("refused").to_string();
            assert!(err.contains(expected), "{url}: {err}");
            assert!(!err.contains("secret"), "{err}");
        }
        let both = ProxyArgs {
            proxy_credentials_file: Some("/nonexistent".into()),
            ..Default::default()
        };
        assert!(matches!(
            HttpProxy::parse("http://a:b@proxy:3128", &both),
            Err(EgressError::CredentialsTwice)
        ));
    }

    #[test]
    fn the_credentials_file_is_read_at_each_attempt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("credentials");
        let args = ProxyArgs {
            proxy_credentials_file: Some(path.clone()),
            ..Default::default()
        };
        let proxy = HttpProxy::parse("http://proxy:3128", &args).expect("valid");
        assert!(proxy.authorization().expect("missing is fine").is_none());
        std::fs::write(&path, "bob:pw:with:colons\n").expect("write");
        use base64::Engine;
        let expected = base64::engine::general_purpose::STANDARD.encode("bob:pw:with:colons");
        assert_eq!(
            proxy
                .authorization()
                .expect("read")
                .map(|v| v.to_str().map(str::to_owned).ok()),
            Some(Some(format!("Basic {expected}")))
        );
        std::fs::write(&path, "no-colon").expect("write");
        let err = proxy.authorization().expect_err("malformed").to_string();
        assert!(
            !err.contains("no-colon"),
            "the file's content is not echoed: {err}"
        );
    }

    /// A one-connection proxy on loopback: reads the CONNECT head, hands it
    /// to the test, then answers as `reply` says.
    async fn fake_proxy(reply: Reply) -> (u16, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let (mut io, _) = listener.accept().await.expect("accept");
            if let Reply::Greet(text) = reply {
                // Not TLS, not waiting for a request.
                let _ = io.write_all(text.as_bytes()).await;
                return String::new();
            }
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && io.read_exact(&mut byte).await.is_ok() {
                head.push(byte[0]);
            }
            match reply {
                Reply::Answer(answer) => {
                    io.write_all(answer.as_bytes()).await.expect("answer");
                    // Echo what the tunnel carries.
                    let mut buf = [0u8; 64];
                    if let Ok(n) = io.read(&mut buf).await {
                        let _ = io.write_all(&buf[..n]).await;
                    }
                }
                Reply::Close | Reply::Greet(_) => drop(io),
                Reply::Silence => std::future::pending::<()>().await,
            }
            String::from_utf8_lossy(&head).into_owned()
        });
        (port, task)
    }

    enum Reply {
        Answer(&'static str),
        Greet(&'static str),
        Close,
        Silence,
    }

    fn proxy_route(url: &str, args: &ProxyArgs) -> Route {
        Route::Proxy(HttpProxy::parse(url, args).expect("valid"))
    }

    /// Why a connection to tether.test:8443 through the proxy at `url` failed.
    async fn failure(url: &str, args: &ProxyArgs) -> EgressError {
        proxy_route(url, args)
            .connect("tether.test", 8443)
            .await
            .expect_err("the connection fails")
    }

    #[tokio::test]
    async fn a_tunnel_carries_bytes_and_credentials_go_in_connect_only() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (port, head) =
            fake_proxy(Reply::Answer("HTTP/1.1 200 Connection established\r\n\r\n")).await;
        let route = proxy_route(
            &format!("http://alice:s3cret@127.0.0.1:{port}"),
            &ProxyArgs::default(),
        );
        let mut io = route.connect("tether.test", 8443).await.expect("tunnel");
        io.write_all(b"hello").await.expect("write");
        let mut echoed = [0u8; 5];
        io.read_exact(&mut echoed).await.expect("read");
        assert_eq!(&echoed, b"hello");
        let head = head.await.expect("proxy");
        assert!(
            head.starts_with("CONNECT tether.test:8443 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("host: tether.test:8443\r\n"),
            "{head}"
        );
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        assert!(
            head.contains(&format!("proxy-authorization: Basic {basic}\r\n")),
            "{head}"
        );
    }

    #[tokio::test]
    async fn each_refusal_says_what_happened() {
        let cases: [(Reply, &str, &str); 4] = [
            (
                Reply::Answer(
                    "HTTP/1.1 403 Forbidden by corporate policy\r\nContent-Length: 0\r\n\r\n",
                ),
                "refused",
                "refused CONNECT to tether.test:8443: 403 Forbidden by corporate policy",
            ),
            (
                Reply::Answer(
                    "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n",
                ),
                "auth_required",
                "requires authentication (407 Proxy Authentication Required): no credentials configured",
            ),
            (
                Reply::Answer("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"),
                "refused",
                "502 Bad Gateway",
            ),
            (
                Reply::Close,
                "closed",
                "closed the connection during CONNECT",
            ),
        ];
        for (reply, kind, message) in cases {
            let (port, _head) = fake_proxy(reply).await;
            let err = failure(&format!("http://127.0.0.1:{port}"), &ProxyArgs::default()).await;
            assert_eq!(err.kind(), kind, "{err}");
            assert!(err.to_string().contains(message), "{err}");
            assert_eq!(
                err.is_persistent(),
                matches!(kind, "refused" | "auth_required"),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn refused_credentials_are_told_apart_from_missing_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = ProxyArgs {
            proxy_credentials_file: Some(dir.path().join("credentials")),
            ..Default::default()
        };
        let answer = "HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n";
        let (port, _) = fake_proxy(Reply::Answer(answer)).await;
        let err = failure(&format!("http://127.0.0.1:{port}"), &args)
            .await
            .to_string();
        assert!(err.contains("credentials file does not exist"), "{err}");
        std::fs::write(dir.path().join("credentials"), "bob:wrong-password").expect("write");
        let (port, _) = fake_proxy(Reply::Answer(answer)).await;
        let err = failure(&format!("http://127.0.0.1:{port}"), &args)
            .await
            .to_string();
        assert!(err.contains("refused the credentials sent"), "{err}");
        assert!(!err.contains("wrong-password"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_proxy_times_out() {
        let (port, _) = fake_proxy(Reply::Silence).await;
        let err = failure(&format!("http://127.0.0.1:{port}"), &ProxyArgs::default()).await;
        assert_eq!(err.kind(), "timeout");
        assert!(
            err.to_string()
                .contains("did not answer CONNECT within 10s"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_or_untrusted_proxy_is_named() {
        let closed_port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let err = failure(
            &format!("http://127.0.0.1:{closed_port}"),
            &ProxyArgs::default(),
        )
        .await;
        assert_eq!(err.kind(), "unreachable");
        assert!(
            err.to_string().starts_with(&format!(
                "cannot reach proxy http://127.0.0.1:{closed_port}"
            )),
            "{err}"
        );

        // An https:// proxy whose certificate the public roots do not know.
        let (port, _) = fake_proxy(Reply::Greet("HTTP/1.1 400 Bad Request\r\n\r\n")).await;
        let err = failure(&format!("https://127.0.0.1:{port}"), &ProxyArgs::default()).await;
        assert_eq!(err.kind(), "proxy_tls");
        assert!(err.to_string().contains("--proxy-ca-cert"), "{err}");
    }
}
