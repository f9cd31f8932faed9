//! Who is calling: the virtual key from `Authorization: Bearer`, `x-api-key` or `api-key`,
//! checked against the replicated state (hash lookup in an immutable snapshot; no I/O).

use std::sync::Arc;

use axum::http::HeaderMap;
use skein_core::auth::hash_secret;
use skein_types::ErrorCode;
use skein_types::control::{ControlState, VirtualKey};

use crate::error::ApiError;
use crate::state::AppState;

/// An authenticated caller: the key, in the state snapshot it was found in.
pub struct Caller {
    pub state: Arc<ControlState>,
    pub key_id: String,
}

impl Caller {
    pub fn key(&self) -> Option<&VirtualKey> {
        self.state.keys.get(&self.key_id).map(AsRef::as_ref)
    }

    /// Whether the key (and its team) may call `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        let Some(key) = self.key() else {
            return false;
        };
        let team_allows = key
            .team
            .as_ref()
            .and_then(|team| self.state.teams.get(team))
            .is_none_or(|team| team.models.is_empty() || team.models.iter().any(|m| m == model));
        key.allows_model(model) && team_allows
    }
}

/// The secret the client sent, if any.
fn presented_secret(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let token = skein_types::bearer_token(value);
        if !token.is_empty() {
            return Some(token);
        }
    }
    ["x-api-key", "api-key"].iter().find_map(|name| {
        headers
            .get(*name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|token| !token.is_empty())
    })
}

/// Authenticate a request. `Ok(None)`: the node is open (no virtual key exists and no admin
/// token is set), so anyone may call.
pub fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
    let control = state.control();
    if !state.auth_required() {
        return Ok(None);
    }
    let Some(secret) = presented_secret(headers) else {
        return Err(ApiError::new(
            ErrorCode::Unauthenticated,
            "missing API key: send a Skein virtual key as `Authorization: Bearer <key>` or `x-api-key`",
        )
        .with_detail_code("missing_api_key"));
    };
    let hash = hash_secret(secret);
    let Some(key) = control.key_by_hash(&hash) else {
        return Err(ApiError::new(ErrorCode::Unauthenticated, "invalid API key")
            .with_detail_code("invalid_api_key"));
    };
    if key.revoked {
        return Err(
            ApiError::new(ErrorCode::Unauthenticated, "this API key has been revoked")
                .with_detail_code("invalid_api_key"),
        );
    }
    if !key.is_active(skein_types::now_ms()) {
        return Err(
            ApiError::new(ErrorCode::Unauthenticated, "this API key has expired")
                .with_detail_code("expired_api_key"),
        );
    }
    let key_id = key.id.clone();
    Ok(Some(Caller {
        state: control,
        key_id,
    }))
}
