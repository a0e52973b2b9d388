//! Server-to-server publishing: bearer tokens read from a credential file.
//!
//! Tokens never come from the configuration file or the command line (both
//! are readable by anyone on the host, and the command line shows in `ps`).
//! Under systemd the unit passes the file as a credential
//! (`LoadCredential=publish-tokens:/etc/chat-ha/publish-tokens`), readable
//! only by the service; elsewhere `backend.publish_tokens_file` names it.
//! One token per line; blank lines and `#` comments are ignored.
//!
//! Tokens are kept as SHA-256 digests and a presented token is compared with
//! every one of them in constant time, so neither a token nor its length can
//! be guessed from response times.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The credential name the systemd unit loads the tokens under.
pub const CREDENTIAL: &str = "publish-tokens";
/// Shorter tokens are refused at start: they could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: a token must be at least {MIN_TOKEN_LEN} characters")]
    Short { path: PathBuf, line: usize },
}

/// The tokens allowed to publish; empty means publishing is off.
#[derive(Default)]
pub struct PublishTokens {
    digests: Vec<[u8; 32]>,
}

impl PublishTokens {
    /// Reads the tokens from the systemd credential if there is one, else
    /// from `configured` if set; no file means publishing is off.
    pub fn load(configured: Option<&Path>) -> Result<Self, TokenError> {
        let path = match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => Some(Path::new(&dir).join(CREDENTIAL)),
            None => configured.map(Path::to_owned),
        };
        match path {
            Some(path) if path.exists() || configured.is_some() => Self::read(&path),
            _ => Ok(Self::default()),
        }
    }

    fn read(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut digests = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(TokenError::Short {
                    path: path.to_owned(),
                    line: index + 1,
                });
            }
            digests.push(Sha256::digest(token.as_bytes()).into());
        }
        Ok(PublishTokens { digests })
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `token` is one of the tokens. Compares with all of them, in
    /// constant time.
    pub fn allows(&self, token: &str) -> bool {
        self.check(token).is_some()
    }

    /// Who `token` is, if it is one of the tokens. Compares with all of
    /// them, in constant time.
    pub fn check(&self, token: &str) -> Option<TokenId> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        for digest in &self.digests {
            found |= digest.ct_eq(&presented);
        }
        bool::from(found).then_some(TokenId(presented))
    }
}

/// Which publish token a request holds: the token's SHA-256, never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenId([u8; 32]);

impl TokenId {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_from_a_file_with_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(
            &path,
            "# ops\n\n  first-token-0123456789  \nsecond-token-0123456789\n",
        )
        .unwrap();
        let tokens = PublishTokens::read(&path).unwrap();
        assert!(tokens.allows("first-token-0123456789"));
        assert!(tokens.allows("second-token-0123456789"));
        assert!(!tokens.allows("first-token-012345678"));
        assert!(!tokens.allows(""));
        assert!(!tokens.allows("# ops"));
        let first = tokens.check("first-token-0123456789").unwrap();
        let second = tokens.check("second-token-0123456789").unwrap();
        assert_ne!(first, second, "each token is told apart");
    }

    #[test]
    fn short_tokens_are_refused_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "long-enough-token-000\nshort\n").unwrap();
        let err = PublishTokens::read(&path).err().unwrap().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn no_file_means_publishing_is_off() {
        let tokens = PublishTokens::default();
        assert!(tokens.is_empty());
        assert!(!tokens.allows("anything-at-all-0000"));
    }
}
