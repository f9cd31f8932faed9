//! Skein's shared vocabulary: the configuration model (plain serde data that can later be
//! replicated through Raft without a rewrite), its validation, and the small error-code
//! vocabulary every boundary maps to an HTTP status.
//!
//! This crate owns no I/O: it must not depend on tokio, axum, reqwest or any storage.

pub mod catalog;
pub mod config;
pub mod control;
pub mod duration;
pub mod error_code;
pub mod provider_kind;
pub mod validate;

pub use config::{
    BreakerSpec, CredentialRef, DeploymentSpec, KeySpec, ProviderSpec, RetrySpec, RouteSpec,
    ServerSpec, SkeinConfig, Strategy,
};
pub use error_code::ErrorCode;
pub use provider_kind::{ProviderKind, WireProtocol};
pub use validate::{ConfigError, ValidatedConfig, is_path_segment};

/// Wall-clock milliseconds since the Unix epoch (key expiry, budget periods, spend sequences,
/// gossip generations are all wall-clock time).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Append the low `digits` hex digits of `value` (lower case, zero-padded) to `out`: ids are
/// made of these on every request, and `format!("{:016x}")` costs several times more.
pub fn push_hex(out: &mut String, value: u64, digits: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = digits.min(16);
    let mut buffer = [b'0'; 16];
    for (index, slot) in buffer[..digits].iter_mut().enumerate() {
        *slot = HEX[((value >> ((digits - 1 - index) * 4)) & 0xf) as usize];
    }
    // Hex digits are ASCII: this never fails.
    if let Ok(text) = std::str::from_utf8(&buffer[..digits]) {
        out.push_str(text);
    }
}

#[cfg(test)]
#[test]
fn push_hex_pads_and_truncates_as_format_does() {
    for value in [0u64, 1, 0xabc, u64::MAX, 0x0123_4567_89ab_cdef] {
        let mut out = String::new();
        push_hex(&mut out, value, 16);
        assert_eq!(out, format!("{value:016x}"));
        let mut short = String::new();
        push_hex(&mut short, value, 2);
        assert_eq!(short, format!("{:02x}", value & 0xff));
    }
}

/// The token of an `authorization` header value: the credentials after a `Bearer` scheme (in
/// any case, as the scheme name is case-insensitive), or the whole value when it names no
/// scheme. One rule for the proxy and the admin API.
pub fn bearer_token(value: &str) -> &str {
    let value = value.trim();
    match value.split_once(char::is_whitespace) {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => value,
    }
}

#[cfg(test)]
mod bearer_tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_taken_in_any_case_and_is_optional() {
        assert_eq!(bearer_token("Bearer abc"), "abc");
        assert_eq!(bearer_token("bearer abc"), "abc");
        assert_eq!(bearer_token("BEARER   abc "), "abc");
        assert_eq!(bearer_token(" abc "), "abc");
        assert_eq!(bearer_token("Basic abc"), "Basic abc");
    }
}
