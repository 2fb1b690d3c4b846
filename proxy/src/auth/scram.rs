//! SCRAM-SHA-256 on the server side (RFC 5802/7677, as PostgreSQL speaks
//! it), written here because no maintained crate offers PostgreSQL's server
//! side; the verifier format and the client side used towards backends
//! come from `postgres-protocol`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{constant_time_eq, AuthError};

type HmacSha256 = Hmac<Sha256>;

/// A parsed SCRAM-SHA-256 verifier (`SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`,
/// the format of `pg_authid.rolpassword`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Derive a verifier (random salt) from a plaintext password.
    pub fn from_password(password: &str) -> Option<ScramVerifier> {
        ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(
            password.as_bytes(),
        ))
    }

    /// Parse the textual form.
    pub fn parse(text: &str) -> Option<ScramVerifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramVerifier {
            iterations: iterations.parse().ok()?,
            salt: BASE64.decode(salt).ok()?,
            stored_key: BASE64.decode(stored).ok()?.try_into().ok()?,
            server_key: BASE64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

/// The server side of one SCRAM-SHA-256 exchange (no channel binding).
pub struct ScramServer {
    verifier: ScramVerifier,
    nonce: String,
    client_first_bare: String,
    server_first: String,
}

impl ScramServer {
    /// Handle the client-first message (the data of SASLInitialResponse);
    /// returns the server-first message to send.
    pub fn start(verifier: ScramVerifier, client_first: &[u8]) -> Result<ScramServer, AuthError> {
        let client_first =
            std::str::from_utf8(client_first).map_err(|_| AuthError::Scram("not UTF-8"))?;
        // gs2-header: "n,," (no binding) or "y,," (client could bind, server
        // did not offer). "p=…" asks for binding we never offered.
        let bare = if let Some(rest) = client_first.strip_prefix("n,") {
            rest
        } else if let Some(rest) = client_first.strip_prefix("y,") {
            rest
        } else {
            return Err(AuthError::Scram("unsupported channel binding"));
        };
        // Skip the optional authzid ("a=…") up to the next comma.
        let (_, bare) = bare
            .split_once(',')
            .ok_or(AuthError::Scram("missing gs2 header"))?;
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|nonce| !nonce.is_empty())
            .ok_or(AuthError::Scram("missing client nonce"))?;
        let mut random = [0u8; 18];
        rand::rng().fill_bytes(&mut random);
        let nonce = format!("{client_nonce}{}", BASE64.encode(random));
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok(ScramServer {
            verifier,
            nonce,
            client_first_bare: bare.to_owned(),
            server_first,
        })
    }

    /// The server-first message.
    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// Verify the client-final message; returns the server-final message.
    pub fn finish(&self, client_final: &[u8]) -> Result<String, AuthError> {
        let client_final =
            std::str::from_utf8(client_final).map_err(|_| AuthError::Scram("not UTF-8"))?;
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or(AuthError::Scram("missing proof"))?;
        let mut binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                binding = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        // "biws" is base64("n,,"), "eSws" base64("y,,").
        if !matches!(binding, Some("biws") | Some("eSws")) {
            return Err(AuthError::Scram("unexpected channel binding"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(AuthError::Scram("nonce mismatch"));
        }
        let proof = BASE64
            .decode(proof)
            .map_err(|_| AuthError::Scram("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(AuthError::Scram("proof length"));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature.iter())
            .map(|(p, s)| p ^ s)
            .collect();
        let stored_key = Sha256::digest(&client_key);
        if !constant_time_eq(stored_key.as_slice(), &self.verifier.stored_key) {
            return Err(AuthError::Scram("proof mismatch"));
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", BASE64.encode(server_signature)))
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return [0u8; 32],
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    #[test]
    fn scram_exchange_with_the_postgres_client_implementation() {
        let verifier = ScramVerifier::from_password("s3cret").unwrap();
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let server = ScramServer::start(verifier, client.message()).unwrap();
        client.update(server.server_first().as_bytes()).unwrap();
        let server_final = server.finish(client.message()).unwrap();
        client.finish(server_final.as_bytes()).unwrap();
    }

    #[test]
    fn scram_rejects_a_wrong_password() {
        let verifier = ScramVerifier::from_password("s3cret").unwrap();
        let mut client = ScramSha256::new(b"wrong", ChannelBinding::unsupported());
        let server = ScramServer::start(verifier, client.message()).unwrap();
        client.update(server.server_first().as_bytes()).unwrap();
        assert!(server.finish(client.message()).is_err());
    }

    #[test]
    fn scram_rejects_garbage() {
        let verifier = ScramVerifier::from_password("x").unwrap();
        assert!(ScramServer::start(verifier.clone(), b"p=tls-server-end-point,,n=,r=abc").is_err());
        assert!(ScramServer::start(verifier.clone(), b"n,,n=").is_err());
        let server = ScramServer::start(verifier, b"n,,n=,r=abc").unwrap();
        assert!(server.finish(b"c=biws,r=abc").is_err());
        assert!(server.finish(b"c=biws,r=wrong,p=AAAA").is_err());
        assert!(server.finish(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn verifier_parses_postgres_format() {
        let v = ScramVerifier::parse(
            "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$\
             qnTu4TqfOPKN/k5BhPvq4tZQ8ySS0cN0Bu6xuckfZKQ=:\
             OgbV0i7KSbJVcm8Hj7RkaVcGMDwbqrJQUNTrAN+hUfE=",
        )
        .unwrap();
        assert_eq!(v.iterations, 4096);
        assert_eq!(v.salt, b"saltsaltsalt");
        assert!(ScramVerifier::parse("md5abc").is_none());
    }
}
