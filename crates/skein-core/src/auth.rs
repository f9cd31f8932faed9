//! Virtual key secrets: how they are made, hashed, shown and checked. Only the hash and a short
//! display prefix are ever stored or replicated.

use sha2::{Digest, Sha256};

/// Every virtual key secret starts with this.
pub const SECRET_PREFIX: &str = "sk-skein-";

/// Random characters after the prefix (base62, about 238 bits).
const SECRET_LENGTH: usize = 40;

/// Characters of the secret kept for display.
const DISPLAY_LENGTH: usize = SECRET_PREFIX.len() + 6;

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A new secret from the operating system's random source.
pub fn generate_secret() -> Result<String, String> {
    let mut secret = String::with_capacity(SECRET_PREFIX.len() + SECRET_LENGTH);
    secret.push_str(SECRET_PREFIX);
    let mut bytes = [0u8; 64];
    while secret.len() < SECRET_PREFIX.len() + SECRET_LENGTH {
        getrandom::fill(&mut bytes).map_err(|error| format!("no randomness: {error}"))?;
        for byte in bytes {
            // Rejection sampling keeps the characters uniform: 248 = 4 × 62.
            if byte < 248 && secret.len() < SECRET_PREFIX.len() + SECRET_LENGTH {
                secret.push(char::from(ALPHABET[usize::from(byte % 62)]));
            }
        }
    }
    Ok(secret)
}

/// The lower-case hex SHA-256 of a secret: what is stored and looked up. Secrets carry enough
/// randomness that a fast hash is safe here.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    hex
}

const HEX: &[u8] = b"0123456789abcdef";

/// The part of a secret that may be shown (`sk-skein-Ab12cd…`).
pub fn display_prefix(secret: &str) -> String {
    let end = secret
        .char_indices()
        .nth(DISPLAY_LENGTH)
        .map_or(secret.len(), |(index, _)| index);
    format!("{}…", &secret[..end])
}

/// Compare two tokens in constant time (for the admin token).
pub fn tokens_match(given: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    // Hashing first makes the comparison length-independent too.
    let given = Sha256::digest(given.as_bytes());
    let expected = Sha256::digest(expected.as_bytes());
    given.ct_eq(&expected).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_prefixed_and_hash_stably() {
        let first = generate_secret().expect("secret");
        let second = generate_secret().expect("secret");
        assert!(first.starts_with(SECRET_PREFIX));
        assert_eq!(first.len(), SECRET_PREFIX.len() + SECRET_LENGTH);
        assert_ne!(first, second);
        assert_eq!(hash_secret(&first), hash_secret(&first));
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(display_prefix(&first).chars().count(), DISPLAY_LENGTH + 1);
        assert!(tokens_match("token", "token"));
        assert!(!tokens_match("token", "tokem"));
        assert!(!tokens_match("token", "token-longer"));
    }
}
