//! The agent's credentials over the tunnel. Certificate renewal: at two
//! thirds of its certificate's lifetime, or when a rotation is requested,
//! it makes a new key pair, sends a certificate request over a tunnel
//! session, stores what comes back and presents it from its next
//! connection on; the private key never leaves this process and its
//! credentials store. Token rotation: a new token from the server is
//! stored, then used to reconnect.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::AgentMetrics;
use crate::credentials::Message;
use crate::mux::Session;
use crate::pki::{AgentRequest, CertInfo, certificate_matches_key};

/// The first wait after a failed renewal; doubled per failure.
const FIRST_RETRY: Duration = Duration::from_secs(10);
const MAX_RETRY: Duration = Duration::from_secs(600);
/// How long to wait for the signed certificate (the server waits up to
/// its `--signing-timeout`, 2 minutes by default).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest single sleep: waits are re-measured against the wall clock, so
/// a clock step or a suspended machine delays a renewal by at most this.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// The wall clock, shifted and driven by tokio's clock in tests (a paused
/// tokio clock does not move `SystemTime`).
#[derive(Clone)]
pub(super) enum Clock {
    System,
    #[cfg(test)]
    Test {
        base: SystemTime,
        start: tokio::time::Instant,
    },
}

impl Clock {
    pub(super) fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            #[cfg(test)]
            Clock::Test { base, start } => *base + start.elapsed(),
        }
    }

    /// Sleeps until `at` by this clock.
    async fn sleep_until(&self, at: SystemTime) {
        loop {
            let Ok(left) = at.duration_since(self.now()) else {
                return;
            };
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(MAX_SLEEP)).await;
        }
    }
}

/// Where renewed credentials are kept, and how the connection loop starts
/// using them.
pub(super) trait Keeper: Send + Sync {
    /// Stores credentials files (`tls.crt`, `tls.key`, `token`) durably, as
    /// one change (a Secret, a credentials directory).
    fn save(
        &self,
        files: &[(&'static str, &str)],
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Makes the next connections present this certificate.
    fn install(&self, cert_pem: &str, key_pem: &str) -> Result<(), String>;
    /// Reconnects every session with this token.
    fn install_token(&self, token: &str);
    /// The token in use.
    fn token(&self) -> Option<String>;
}

/// What the agent says when its certificate has expired.
pub(super) const EXPIRED: &str = "the client certificate has EXPIRED: tether-server refuses this agent; apply a new install bundle to recover";

/// How often storing new credentials is tried before using them unstored.
const SAVE_TRIES: u32 = 3;

/// The wait before retry number `failures` (1-based): exponential with
/// jitter.
pub(super) fn retry_delay(failures: u32) -> Duration {
    let ceiling = FIRST_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(MAX_RETRY);
    rand::rng().random_range(ceiling / 2..=ceiling)
}

/// What a session sends us and where we send requests.
pub(super) struct Channel {
    /// Credentials messages from every session.
    pub messages: mpsc::Receiver<Message>,
    /// The sessions held now.
    pub sessions: watch::Receiver<Vec<Session>>,
}

impl Channel {
    /// Sends `message` on a live session, waiting for one if none is.
    async fn send(&mut self, message: &Message) -> Option<Session> {
        loop {
            let live = self
                .sessions
                .borrow_and_update()
                .iter()
                .find(|s| !s.is_draining() && !s.is_closed())
                .cloned();
            if let Some(session) = live {
                session.send_credentials(message.encode());
                return Some(session);
            }
            self.sessions.changed().await.ok()?;
        }
    }
}

/// Why one attempt did not give a usable certificate.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("cannot make a key pair and request: {0}")]
    Request(#[from] crate::pki::PkiError),
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the session ended before the answer")]
    SessionEnded,
    #[error("the signed certificate is unusable: {0}")]
    Unusable(&'static str),
}

impl AttemptError {
    fn result(&self) -> &'static str {
        match self {
            AttemptError::Refused(_) => "refused",
            _ => "failed",
        }
    }
}

pub(super) struct Renewal<K> {
    pub cluster: String,
    pub current: CertInfo,
    pub keeper: K,
    pub metrics: Arc<AgentMetrics>,
    pub clock: Clock,
    /// The rotation being made, and the last one made (a rotation asked by
    /// every replica is made once).
    pub rotation: Option<String>,
    pub rotated: Option<String>,
}

impl<K: Keeper> Renewal<K> {
    /// Renews for as long as the agent runs.
    pub(super) async fn run(mut self, mut channel: Channel, stop: CancellationToken) {
        let mut failures: u32 = 0;
        let mut renew_now = false;
        let mut retry_at: Option<SystemTime> = None;
        loop {
            self.show_current();
            let due = retry_at.unwrap_or_else(|| self.current.renew_at());
            if !renew_now {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.clock.sleep_until(due) => {}
                    message = channel.messages.recv() => match message {
                        Some(message) => {
                            if !self.handle(message).await {
                                continue;
                            }
                        }
                        None => return,
                    },
                }
            }
            renew_now = false;
            let attempt = tokio::select! {
                _ = stop.cancelled() => return,
                attempt = self.attempt(&mut channel, &mut renew_now) => attempt,
            };
            match attempt {
                Ok(()) => {
                    failures = 0;
                    retry_at = None;
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    self.metrics
                        .certificate_renewals
                        .with_label_values(&[err.result()])
                        .inc();
                    let wait = retry_delay(failures);
                    let now = self.clock.now();
                    if now >= self.current.not_after {
                        error!(error = %err, not_after = ?self.current.not_after, "{EXPIRED}");
                    } else {
                        warn!(error = %err, retry_in = ?wait, not_after = ?self.current.not_after,
                            "certificate renewal failed; the current certificate stays in use");
                    }
                    retry_at = Some(now + wait);
                }
            }
        }
    }

    /// Acts on a message that is not an answer to a request. Returns
    /// whether a renewal should start now.
    async fn handle(&mut self, message: Message) -> bool {
        match message {
            Message::Renew { rotation }
                if self.rotated.as_ref() != Some(&rotation)
                    && self.rotation.as_ref() != Some(&rotation) =>
            {
                info!(%rotation, "a certificate rotation was requested; renewing now");
                self.rotation = Some(rotation);
                true
            }
            Message::Renew { .. } => false,
            Message::Token { token } => {
                self.take_token(&token).await;
                false
            }
            other => {
                // A late answer to an attempt that timed out.
                warn!(
                    kind = other.kind(),
                    "unexpected credentials message; ignored"
                );
                false
            }
        }
    }

    /// Stores the cluster's new token, then reconnects with it: the one in
    /// use is accepted only until the rotation's overlap ends.
    async fn take_token(&self, token: &str) {
        if token.is_empty() || self.keeper.token().as_deref() == Some(token) {
            return;
        }
        self.save(&[(crate::credentials::TOKEN_FILE, token)]).await;
        self.keeper.install_token(token);
        self.metrics.token_rotations.inc();
        info!("received a new agent token over the tunnel; reconnecting with it");
    }

    /// Stores `files`, retrying a little: what cannot be stored is still
    /// used (a restart then starts from the old credentials, valid a while).
    async fn save(&self, files: &[(&'static str, &str)]) {
        for attempt in 1..=SAVE_TRIES {
            match self.keeper.save(files).await {
                Ok(()) => return,
                Err(err) => {
                    self.metrics
                        .certificate_renewals
                        .with_label_values(&["unsaved"])
                        .inc();
                    let wait = retry_delay(attempt);
                    warn!(error = %err, retry_in = ?wait, "cannot store the new credentials");
                    if attempt < SAVE_TRIES {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        error!(
            "new credentials are in use but not stored: a restart starts from the previous ones"
        );
    }

    fn show_current(&self) {
        let seconds = self
            .current
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.metrics
            .certificate_not_after
            .set(i64::try_from(seconds).unwrap_or(i64::MAX));
    }

    /// One renewal: request, answer, checks, then the certificate is kept
    /// and presented. A `Renew` arriving meanwhile sets `renew_now` for
    /// after this attempt.
    async fn attempt(
        &mut self,
        channel: &mut Channel,
        renew_now: &mut bool,
    ) -> Result<(), AttemptError> {
        let (csr, key_pem) = AgentRequest::create(&self.cluster)?;
        let request = Message::CertificateRequest { csr };
        let session = channel
            .send(&request)
            .await
            .ok_or(AttemptError::SessionEnded)?;
        info!("certificate renewal requested");
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        let cert_pem = loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Err(AttemptError::Timeout(ANSWER_TIMEOUT)),
                _ = session.closed() => return Err(AttemptError::SessionEnded),
                message = channel.messages.recv() => match message {
                    Some(Message::Certificate { certificate }) => break certificate,
                    Some(Message::Refused { reason }) => return Err(AttemptError::Refused(reason)),
                    Some(other) => *renew_now |= self.handle(other).await,
                    None => return Err(AttemptError::SessionEnded),
                },
            }
        };
        let info = CertInfo::from_pem(&cert_pem)
            .map_err(|_| AttemptError::Unusable("not a certificate"))?;
        if info.cluster.as_deref() != Some(self.cluster.as_str()) {
            return Err(AttemptError::Unusable("it names another cluster"));
        }
        if !certificate_matches_key(&cert_pem, &key_pem) {
            return Err(AttemptError::Unusable(
                "it is not for the key this agent made",
            ));
        }
        if info.not_after <= self.clock.now() {
            return Err(AttemptError::Unusable("it has already expired"));
        }
        // Never present a certificate before it is valid (clock skew
        // between the signer and this cluster).
        if info.not_before > self.clock.now() {
            info!(valid_from = ?info.not_before, "the new certificate is not valid yet; waiting");
            self.clock.sleep_until(info.not_before).await;
        }
        self.keeper
            .install(&cert_pem, &key_pem)
            .map_err(|_| AttemptError::Unusable("it does not load as a TLS identity"))?;
        self.current = info;
        self.rotated = self.rotation.take().or(self.rotated.take());
        self.metrics
            .certificate_renewals
            .with_label_values(&["renewed"])
            .inc();
        info!(not_after = ?self.current.not_after, "certificate renewed; sessions are replaced to present it");
        self.save(&[
            (crate::credentials::CERT_FILE, &cert_pem),
            (crate::credentials::KEY_FILE, &key_pem),
        ])
        .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertificateAuthority, LeafRequest};
    use std::sync::Mutex;

    #[derive(Default, Clone)]
    struct Recorded {
        /// What was stored: (file, contents).
        saved: Arc<Mutex<Vec<(String, String)>>>,
        installed: Arc<Mutex<Vec<(String, SystemTime)>>>,
        tokens: Arc<Mutex<Vec<String>>>,
        fail_saves: Arc<Mutex<u32>>,
        clock: Option<Arc<Clock>>,
    }

    impl Recorded {
        fn saved(&self, file: &str) -> Vec<String> {
            let saved = self.saved.lock().expect("lock");
            saved
                .iter()
                .filter(|(f, _)| f == file)
                .map(|(_, c)| c.clone())
                .collect()
        }
    }

    impl Keeper for Recorded {
        async fn save(&self, files: &[(&'static str, &str)]) -> Result<(), String> {
            {
                let mut fail = self.fail_saves.lock().expect("lock");
                if *fail > 0 {
                    *fail -= 1;
                    return Err("disk full".into());
                }
            }
            let mut saved = self.saved.lock().expect("lock");
            saved.extend(
                files
                    .iter()
                    .map(|(f, c)| ((*f).to_owned(), (*c).to_owned())),
            );
            Ok(())
        }
        fn install_token(&self, token: &str) {
            self.tokens.lock().expect("lock").push(token.to_owned());
        }
        fn token(&self) -> Option<String> {
            self.tokens.lock().expect("lock").last().cloned()
        }
        fn install(&self, cert_pem: &str, _key: &str) -> Result<(), String> {
            let now = self
                .clock
                .as_ref()
                .map_or(SystemTime::UNIX_EPOCH, |c| c.now());
            self.installed
                .lock()
                .expect("lock")
                .push((cert_pem.to_owned(), now));
            Ok(())
        }
    }

    /// A session on a WebSocket pair; the test plays the server's side.
    async fn session_pair() -> (Session, Session) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = async {
            let ws = tokio_tungstenite::accept_async(b).await.expect("accept");
            Session::start(
                ws,
                crate::mux::SessionConfig::new(
                    crate::protocol::Version::V2,
                    crate::mux::Role::Opener,
                    "s",
                ),
            )
            .0
        };
        let agent = async {
            let (ws, _) = tokio_tungstenite::client_async("ws://agent/connect", a)
                .await
                .expect("connect");
            Session::start(
                ws,
                crate::mux::SessionConfig::new(
                    crate::protocol::Version::V2,
                    crate::mux::Role::Acceptor,
                    "a",
                ),
            )
            .0
        };
        tokio::join!(server, agent)
    }

    /// A renewal running against a test CA; the test plays the server.
    struct Fixture {
        ca: CertificateAuthority,
        current: CertInfo,
        clock: Clock,
        keeper: Recorded,
        metrics: Arc<AgentMetrics>,
        to_renewal: mpsc::Sender<Message>,
        from_agent: crate::mux::CredentialsReceiver,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        _sessions: (Session, Session, watch::Sender<Vec<Session>>),
    }

    impl Fixture {
        /// `behind`: how far the agent's clock runs behind the CA's.
        async fn start(behind: Duration) -> Self {
            crate::install_crypto_provider();
            let ca = CertificateAuthority::generate("ca", Duration::from_secs(86400)).expect("ca");
            let first = ca
                .issue(&LeafRequest::agent("dev", Duration::from_secs(90 * 60)))
                .expect("leaf");
            let current = CertInfo::from_pem(&first.cert_pem).expect("info");
            let clock = Clock::Test {
                base: SystemTime::now() - behind,
                start: tokio::time::Instant::now(),
            };
            let keeper = Recorded {
                clock: Some(Arc::new(clock.clone())),
                ..Default::default()
            };
            let metrics = Arc::new(AgentMetrics::new().expect("metrics"));
            let (server, agent) = session_pair().await;
            let from_agent = server.take_credentials().expect("receiver");
            let (to_renewal, messages) = mpsc::channel(4);
            let (sessions_tx, sessions) = watch::channel(vec![agent.clone()]);
            let stop = CancellationToken::new();
            let renewal = Renewal {
                cluster: "dev".into(),
                current: current.clone(),
                keeper: keeper.clone(),
                metrics: metrics.clone(),
                clock: clock.clone(),
                rotation: None,
                rotated: None,
            };
            let task = tokio::spawn(renewal.run(Channel { messages, sessions }, stop.clone()));
            Self {
                ca,
                current,
                clock,
                keeper,
                metrics,
                to_renewal,
                from_agent,
                stop,
                task,
                _sessions: (server, agent, sessions_tx),
            }
        }

        async fn next_request(&mut self) -> AgentRequest {
            let payload = self.from_agent.recv().await.expect("a message");
            let Ok(Message::CertificateRequest { csr }) = Message::decode(&payload) else {
                panic!("a certificate request");
            };
            AgentRequest::check(&csr, "dev").expect("the agent asks for its own identity")
        }

        async fn answer(&self, message: Message) {
            self.to_renewal.send(message).await.expect("send");
        }

        fn sign(&self, request: &AgentRequest, lifetime: Duration) -> String {
            self.ca
                .sign_agent_request(request, lifetime)
                .expect("signed")
        }

        fn installed(&self) -> Vec<(String, SystemTime)> {
            self.keeper.installed.lock().expect("lock").clone()
        }

        async fn stop(self) {
            self.stop.cancel();
            self.task.await.expect("ends");
        }
    }

    /// Paused clock: nothing is asked before two thirds of the lifetime; a
    /// refusal is retried with backoff; storing failures are retried while
    /// the certificate is already in use; the next renewal is due at two
    /// thirds of the new certificate.
    #[tokio::test(start_paused = true)]
    async fn renews_at_two_thirds_and_retries_with_backoff() {
        let mut f = Fixture::start(Duration::ZERO).await;
        *f.keeper.fail_saves.lock().expect("lock") = 1;
        let wait = f
            .current
            .renew_at()
            .duration_since(f.clock.now())
            .expect("ahead");
        tokio::time::sleep(wait - Duration::from_secs(1)).await;
        assert!(
            f.from_agent.try_recv().is_none(),
            "nothing asked before two thirds"
        );
        let first = tokio::time::timeout(Duration::from_secs(5), f.next_request())
            .await
            .expect("asked at two thirds");
        drop(first);
        let refused_at = tokio::time::Instant::now();
        f.answer(Message::Refused {
            reason: "not today".into(),
        })
        .await;
        let request = f.next_request().await;
        let waited = refused_at.elapsed();
        assert!(
            waited >= FIRST_RETRY / 2 && waited <= FIRST_RETRY + Duration::from_secs(1),
            "retried after backoff: {waited:?}"
        );
        // Longer than the first: the test CA's clock stands still while the
        // agent's has moved on by two thirds of the first lifetime.
        let signed = f.sign(&request, Duration::from_secs(3 * 3600));
        let new_info = CertInfo::from_pem(&signed).expect("info");
        f.answer(Message::Certificate {
            certificate: signed.clone(),
        })
        .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(f.installed().len(), 1, "presented at once");
        assert_eq!(
            f.keeper.saved(crate::credentials::CERT_FILE),
            [signed],
            "stored after a failed try"
        );
        assert_eq!(
            f.metrics
                .certificate_renewals
                .with_label_values(&["refused"])
                .get(),
            1
        );
        assert_eq!(
            f.metrics
                .certificate_renewals
                .with_label_values(&["renewed"])
                .get(),
            1
        );
        assert_eq!(
            f.metrics
                .certificate_renewals
                .with_label_values(&["unsaved"])
                .get(),
            1
        );
        let expected = new_info
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("epoch");
        assert_eq!(
            f.metrics.certificate_not_after.get(),
            expected.as_secs() as i64
        );
        let next = new_info
            .renew_at()
            .duration_since(f.clock.now())
            .expect("ahead");
        tokio::time::sleep(next - Duration::from_secs(1)).await;
        assert!(
            f.from_agent.try_recv().is_none(),
            "the new certificate is not renewed early"
        );
        tokio::time::timeout(Duration::from_secs(5), f.next_request())
            .await
            .expect("renewed again at two thirds of the new one");
        f.stop().await;
    }

    /// `Renew` starts a renewal at once; a certificate that starts in the
    /// agent's future (clock skew) is presented only from its start; one
    /// for another key is never presented.
    #[tokio::test(start_paused = true)]
    async fn renews_on_demand_and_never_presents_a_certificate_early() {
        let mut f = Fixture::start(Duration::from_secs(600)).await;
        f.answer(Message::Renew {
            rotation: "r1".into(),
        })
        .await;
        let request = tokio::time::timeout(Duration::from_secs(1), f.next_request())
            .await
            .expect("asked at once");
        // A certificate for another key pair is refused.
        let (other_csr, _) = AgentRequest::create("dev").expect("csr");
        let other = f.sign(
            &AgentRequest::check(&other_csr, "dev").expect("ok"),
            Duration::from_secs(3600),
        );
        f.answer(Message::Certificate { certificate: other }).await;
        let request_again = f.next_request().await;
        assert!(f.installed().is_empty(), "never presented");
        assert_eq!(
            f.metrics
                .certificate_renewals
                .with_label_values(&["failed"])
                .get(),
            1
        );
        drop(request);
        let signed = f.sign(&request_again, Duration::from_secs(3600));
        let info = CertInfo::from_pem(&signed).expect("info");
        assert!(
            info.not_before > f.clock.now(),
            "starts in the agent's future"
        );
        f.answer(Message::Certificate {
            certificate: signed,
        })
        .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(f.installed().is_empty(), "not presented before it is valid");
        tokio::time::sleep(Duration::from_secs(600)).await;
        let installed = f.installed();
        assert_eq!(installed.len(), 1);
        assert!(installed[0].1 >= info.not_before, "presented once valid");
        // Every replica passes the same rotation on: it is made once.
        f.answer(Message::Renew {
            rotation: "r1".into(),
        })
        .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            f.from_agent.try_recv().is_none(),
            "no second renewal for r1"
        );
        f.stop().await;
    }

    /// A new token is stored, then used; the same token again changes
    /// nothing.
    #[tokio::test(start_paused = true)]
    async fn a_new_token_is_stored_then_used_once() {
        let f = Fixture::start(Duration::ZERO).await;
        for _ in 0..2 {
            f.answer(Message::Token {
                token: "token-2".into(),
            })
            .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(f.keeper.saved(crate::credentials::TOKEN_FILE), ["token-2"]);
        assert_eq!(f.keeper.tokens.lock().expect("lock").clone(), ["token-2"]);
        assert_eq!(f.metrics.token_rotations.get(), 1);
        f.stop().await;
    }
}
