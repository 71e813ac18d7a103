//! Credentials over the tunnel: the messages an agent and tether-server
//! exchange to renew the agent's client certificate (carried in
//! `Credentials` frames on stream 0), and the agent's credentials
//! directory, rewritten atomically.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One credentials message. The agent sends only `CertificateRequest`;
/// the server sends the others. The cluster a request is for is the
/// session's, never something the message says; unknown fields are
/// ignored, so a newer peer may add some.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Message {
    /// A PKCS#10 request (PEM) for a new client certificate; the key that
    /// signed it never leaves the agent.
    CertificateRequest { csr: String },
    /// The signed certificate (PEM) for the last request.
    Certificate { certificate: String },
    /// The last request was refused; why, for the agent's log.
    Refused { reason: String },
    /// Renew now: a certificate rotation was requested (`rotation` names
    /// it, so an agent renews once per rotation however many replicas ask).
    Renew { rotation: String },
    /// The cluster's new token: use it from now on (the one presented is
    /// accepted only for a while longer).
    Token { token: String },
}

/// Never prints a token: only its kind, and the fields that are public.
impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Token { .. } => f.write_str("Token { .. }"),
            Message::Refused { reason } => {
                f.debug_struct("Refused").field("reason", reason).finish()
            }
            Message::Renew { rotation } => {
                f.debug_struct("Renew").field("rotation", rotation).finish()
            }
            other => write!(f, "{} {{ .. }}", other.kind()),
        }
    }
}

impl Message {
    pub fn encode(&self) -> Bytes {
        // Serialising these plain strings cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn decode(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
    }

    /// The message's kind, for logs (the contents may be long).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::CertificateRequest { .. } => "certificateRequest",
            Message::Certificate { .. } => "certificate",
            Message::Refused { .. } => "refused",
            Message::Renew { .. } => "renew",
            Message::Token { .. } => "token",
        }
    }
}

/// The files of a credentials directory.
pub const TOKEN_FILE: &str = "token";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const CA_FILE: &str = "ca.crt";
const FILES: [&str; 4] = [TOKEN_FILE, CERT_FILE, KEY_FILE, CA_FILE];
/// The symbolic link naming the current version, as in a Secret volume.
const CURRENT: &str = "..data";

/// An agent's credentials directory (`--credentials-dir`): `token`,
/// `tls.crt`, `tls.key`, `ca.crt`. Written the way the kubelet writes a
/// Secret volume: each version in its own directory, the files links
/// through `..data`, and a new version made current by renaming one link.
/// So a reader, and a crash at any moment, sees the old set or the new set
/// whole, never a new certificate with the old key.
#[derive(Debug, Clone)]
pub struct CredentialsDir {
    dir: PathBuf,
}

impl CredentialsDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Makes `updates` (file name, contents) current, keeping the other
    /// files as they are. Files are mode 0600.
    pub fn save(&self, updates: &[(&str, &[u8])]) -> std::io::Result<()> {
        let version = self.stage(
            |name| match updates.iter().find(|(file, _)| *file == name) {
                Some((_, contents)) => Ok(Some(contents.to_vec())),
                None => self.read(name),
            },
        )?;
        // First save into a directory of plain files: turn each into a link
        // to a copy of itself, one by one, so every moment holds one
        // consistent set; then switch versions.
        if std::fs::read_link(self.dir.join(CURRENT)).is_err() {
            let copy = self.stage(|name| self.read(name))?;
            self.make_current(&copy)?;
        }
        let previous = std::fs::read_link(self.dir.join(CURRENT)).ok();
        self.make_current(&version)?;
        sync_dir(&self.dir)?;
        if let Some(previous) = previous.filter(|p| p.as_os_str() != version.as_str()) {
            let _ = std::fs::remove_dir_all(self.dir.join(previous));
        }
        Ok(())
    }

    /// A file's contents as they are now; `None` when there is no such file.
    fn read(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(name)) {
            Ok(contents) => Ok(Some(contents)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Writes a new version directory holding what `contents` gives for
    /// each file (`None`: left out), synced; returns its name.
    fn stage(
        &self,
        contents: impl Fn(&str) -> std::io::Result<Option<Vec<u8>>>,
    ) -> std::io::Result<String> {
        let version = format!("..{}", hex::encode(rand::random::<[u8; 8]>()));
        let staged = self.dir.join(&version);
        std::fs::create_dir(&staged)?;
        for name in FILES {
            if let Some(contents) = contents(name)? {
                write_private(&staged.join(name), &contents)?;
            }
        }
        sync_dir(&staged)?;
        Ok(version)
    }

    /// Points `..data` at `version` (one rename), then links each file it
    /// holds that is not a link yet.
    fn make_current(&self, version: &str) -> std::io::Result<()> {
        let link = self.dir.join(format!("{CURRENT}_tmp"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(version, &link)?;
        std::fs::rename(&link, self.dir.join(CURRENT))?;
        for name in FILES {
            if self.dir.join(version).join(name).exists() && !self.is_link(name) {
                self.link(name)?;
            }
        }
        Ok(())
    }

    fn is_link(&self, name: &str) -> bool {
        std::fs::symlink_metadata(self.path(name)).is_ok_and(|m| m.file_type().is_symlink())
    }

    /// Replaces `name` by a link through `..data`, atomically.
    fn link(&self, name: &str) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("..{name}_tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new(CURRENT).join(name), &tmp)?;
        std::fs::rename(&tmp, self.path(name))
    }
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_refuse_strangers() {
        for message in [
            Message::CertificateRequest { csr: "pem".into() },
            Message::Certificate {
                certificate: "pem".into(),
            },
            Message::Refused {
                reason: "no".into(),
            },
            Message::Renew {
                rotation: "r1".into(),
            },
            Message::Token {
                token: "secret".into(),
            },
        ] {
            assert_eq!(
                Message::decode(&message.encode()).expect("decodes"),
                message
            );
        }
        assert_eq!(
            &Message::Renew {
                rotation: "r1".into()
            }
            .encode()[..],
            br#"{"kind":"renew","rotation":"r1"}"#,
            "the wire form docs/protocol.md shows"
        );
        let token = Message::Token {
            token: "secret-token".into(),
        };
        assert!(!format!("{token:?}").contains("secret-token"));
        for bad in [
            &b"{}"[..],
            br#"{"kind":"certificateRequest"}"#,
            br#"{"kind":"rotateCa"}"#,
            b"\xff",
        ] {
            assert!(Message::decode(bad).is_err(), "{bad:?}");
        }
    }

    fn read(dir: &CredentialsDir, name: &str) -> String {
        std::fs::read_to_string(dir.path(name)).expect("readable")
    }

    #[test]
    fn saves_replace_files_as_one_set() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        for (name, contents) in [
            (TOKEN_FILE, "t1"),
            (CERT_FILE, "c1"),
            (KEY_FILE, "k1"),
            (CA_FILE, "ca"),
        ] {
            std::fs::write(tmp.path().join(name), contents).expect("write");
        }
        let dir = CredentialsDir::new(tmp.path());
        dir.save(&[(CERT_FILE, b"c2"), (KEY_FILE, b"k2")])
            .expect("first save");
        assert_eq!(
            [TOKEN_FILE, CERT_FILE, KEY_FILE, CA_FILE].map(|f| read(&dir, f)),
            ["t1", "c2", "k2", "ca"]
        );
        dir.save(&[(TOKEN_FILE, b"t2")]).expect("second save");
        assert_eq!(read(&dir, TOKEN_FILE), "t2");
        assert_eq!(read(&dir, KEY_FILE), "k2");
        let mode = std::fs::metadata(dir.path(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let versions = std::fs::read_dir(tmp.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .count();
        assert_eq!(versions, 1, "old versions are removed");
    }

    /// A crash can stop a save anywhere: every prefix of its steps leaves a
    /// matching certificate and key. Simulated by staging a version and
    /// stopping before the switch.
    #[test]
    fn a_save_stopped_before_the_switch_leaves_the_old_set() {
        let tmp = tempfile::tempdir().expect("tmp");
        for (name, contents) in [(CERT_FILE, "c1"), (KEY_FILE, "k1")] {
            std::fs::write(tmp.path().join(name), contents).expect("write");
        }
        let dir = CredentialsDir::new(tmp.path());
        dir.save(&[(CERT_FILE, b"c2"), (KEY_FILE, b"k2")])
            .expect("save");
        // A staged version that never became current.
        let staged = tmp.path().join("..staged");
        std::fs::create_dir(&staged).expect("dir");
        std::fs::write(staged.join(CERT_FILE), "c3").expect("write");
        assert_eq!([read(&dir, CERT_FILE), read(&dir, KEY_FILE)], ["c2", "k2"]);
        dir.save(&[(CERT_FILE, b"c4"), (KEY_FILE, b"k4")])
            .expect("a later save still works");
        assert_eq!([read(&dir, CERT_FILE), read(&dir, KEY_FILE)], ["c4", "k4"]);
    }
}
