//! The Responses API's conversation state: stored responses, bound to the virtual key that made
//! them, found again by `previous_response_id` and by `GET`/`DELETE /v1/responses/{id}`.
//!
//! Where they live is the node's business ([`ResponseStore`]): a node of a cluster keeps each
//! response on itself and on one replica (see `skein-node`'s store); the proxy alone, as in its
//! own tests, keeps them in memory ([`MemoryStore`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use skein_types::ErrorCode;

use crate::auth::authenticate;
use crate::error::ApiError;
use crate::state::AppState;

/// At most this many responses are followed back through `previous_response_id`.
pub const MAX_CHAIN: usize = 1_000;

/// One stored response: what the client sent in its turn and what it got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredResponse {
    pub id: String,
    /// The virtual key that made it (none in open mode); only that key may read it.
    pub key_id: Option<String>,
    /// The key's team when it made it.
    #[serde(default)]
    pub team_id: Option<String>,
    /// Milliseconds since the epoch after which it is gone.
    pub expires_at_ms: u64,
    pub previous_response_id: Option<String>,
    /// This turn's input items (a string input as one user message), each with an id.
    pub input: Vec<Value>,
    /// The response object as the client got it (its JSON, kept as it was written).
    pub response: Box<RawValue>,
}

impl StoredResponse {
    /// The conversation up to and including this turn, as input items: its input, then its
    /// output.
    fn into_turn(self) -> Vec<Value> {
        #[derive(Deserialize)]
        struct Output {
            #[serde(default)]
            output: Vec<Value>,
        }
        let output = serde_json::from_str::<Output>(self.response.get())
            .map(|response| response.output)
            .unwrap_or_default();
        let mut items = self.input;
        items.extend(output);
        items
    }

    /// Whether `key_id` may see it.
    pub fn visible_to(&self, key_id: Option<&str>) -> bool {
        self.key_id.as_deref() == key_id
    }
}

/// Why the store could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Where stored responses live.
#[async_trait::async_trait]
pub trait ResponseStore: Send + Sync {
    /// A new response id (it may say where the response will be kept).
    fn new_id(&self) -> String;
    /// How long a stored response is kept, in milliseconds.
    fn ttl_ms(&self) -> u64;
    /// Keep a finished response, durably enough to survive the loss of one node, before the
    /// client is told it finished.
    async fn put(&self, record: StoredResponse) -> Result<(), StoreError>;
    /// A stored response that has not expired.
    async fn get(&self, id: &str) -> Result<Option<StoredResponse>, StoreError>;
    /// Forget a stored response; whether there was one.
    async fn delete(&self, id: &str) -> Result<bool, StoreError>;
}

/// Responses in this process's memory, bounded by count (the oldest go first).
pub struct MemoryStore {
    entries: Mutex<(
        HashMap<String, StoredResponse>,
        std::collections::VecDeque<String>,
    )>,
    capacity: usize,
    ttl_ms: u64,
}

impl MemoryStore {
    pub fn new(capacity: usize, ttl_ms: u64) -> MemoryStore {
        MemoryStore {
            entries: Mutex::default(),
            capacity: capacity.max(1),
            ttl_ms,
        }
    }
}

impl Default for MemoryStore {
    fn default() -> MemoryStore {
        MemoryStore::new(10_000, 30 * 24 * 3_600 * 1_000)
    }
}

/// A fresh response id: `resp_` and 48 random hex digits.
pub fn random_id() -> String {
    format!(
        "resp_{:016x}{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..),
        fastrand::u64(..)
    )
}

#[async_trait::async_trait]
impl ResponseStore for MemoryStore {
    fn new_id(&self) -> String {
        random_id()
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    async fn put(&self, record: StoredResponse) -> Result<(), StoreError> {
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *guard;
        order.push_back(record.id.clone());
        map.insert(record.id.clone(), record);
        while map.len() > self.capacity {
            match order.pop_front() {
                Some(oldest) => {
                    map.remove(&oldest);
                }
                None => break,
            }
        }
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<StoredResponse>, StoreError> {
        let guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        Ok(guard
            .0
            .get(id)
            .filter(|record| record.expires_at_ms > skein_types::now_ms())
            .cloned())
    }

    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        Ok(guard.0.remove(id).is_some())
    }
}

/// The conversation before a response, oldest item first: every turn from the first one up
/// to and including `previous`. `None` when `previous` (or a turn before it) is not found
/// or not `key_id`'s.
pub async fn history(
    store: &dyn ResponseStore,
    previous: &str,
    key_id: Option<&str>,
) -> Result<Option<Vec<Value>>, StoreError> {
    let mut turns = Vec::new();
    let mut next = Some(previous.to_owned());
    while let Some(id) = next {
        if turns.len() >= MAX_CHAIN {
            break;
        }
        let Some(record) = store.get(&id).await? else {
            return Ok(None);
        };
        if !record.visible_to(key_id) {
            return Ok(None);
        }
        next = record.previous_response_id.clone();
        turns.push(record);
    }
    let mut items = Vec::new();
    for record in turns.into_iter().rev() {
        items.extend(record.into_turn());
    }
    Ok(Some(items))
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("Response with id '{id}' not found."),
    )
    .with_detail_code("response_not_found")
}

fn unavailable(error: StoreError) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!("the response store could not answer: {error}"),
    )
    .with_detail_code("response_store_unavailable")
}

/// The stored response `id`, if the caller may see it.
async fn visible(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
) -> Result<StoredResponse, ApiError> {
    let caller = authenticate(state, headers)?;
    let key_id = caller.as_ref().map(|caller| caller.key_id.as_str());
    match state.responses().get(id).await.map_err(unavailable)? {
        Some(record) if record.visible_to(key_id) => Ok(record),
        _ => Err(not_found(id)),
    }
}

/// `GET /v1/responses/{id}`
pub async fn get_response(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match visible(&state, &headers, &id).await {
        Ok(record) => axum::Json(record.response).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `DELETE /v1/responses/{id}`
pub async fn delete_response(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(error) = visible(&state, &headers, &id).await {
        return error.into_response();
    }
    match state.responses().delete(&id).await {
        Ok(_) => {
            axum::Json(json!({"id": id, "object": "response", "deleted": true})).into_response()
        }
        Err(error) => unavailable(error).into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    order: Option<String>,
    #[serde(default)]
    after: Option<String>,
}

/// `GET /v1/responses/{id}/input_items`: the items the response was made from (the whole
/// conversation before it, as OpenAI lists them), newest first unless `order=asc`.
pub async fn input_items(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    let record = match visible(&state, &headers, &id).await {
        Ok(record) => record,
        Err(error) => return error.into_response(),
    };
    let mut items = match &record.previous_response_id {
        Some(previous) => {
            match history(
                state.responses().as_ref(),
                previous,
                record.key_id.as_deref(),
            )
            .await
            {
                Ok(Some(items)) => items,
                Ok(None) => Vec::new(),
                Err(error) => return unavailable(error).into_response(),
            }
        }
        None => Vec::new(),
    };
    items.extend(record.input.iter().cloned());
    if query.order.as_deref() != Some("asc") {
        items.reverse();
    }
    if let Some(after) = &query.after
        && let Some(position) = items.iter().position(|item| item["id"] == after.as_str())
    {
        items.drain(..=position);
    }
    let limit = query.limit.unwrap_or(20).clamp(1, 100);
    let has_more = items.len() > limit;
    items.truncate(limit);
    let first = items
        .first()
        .map(|item| item["id"].clone())
        .unwrap_or(Value::Null);
    let last = items
        .last()
        .map(|item| item["id"].clone())
        .unwrap_or(Value::Null);
    axum::Json(json!({
        "object": "list", "data": items, "first_id": first, "last_id": last, "has_more": has_more,
    }))
    .into_response()
}

/// `null`, for a record not filled in yet.
fn null_json() -> Box<RawValue> {
    RawValue::NULL.to_owned()
}

/// A finished response to keep, once the answer is whole.
pub struct Keep {
    store: Arc<dyn ResponseStore>,
    record: StoredResponse,
}

impl Keep {
    /// Store `response` (a failed one is not kept). Called before the client sees the end of
    /// the answer, so a `previous_response_id` it sends next is found.
    pub async fn keep(mut self, response: Box<RawValue>) {
        #[derive(Deserialize)]
        struct Status<'a> {
            #[serde(borrow, default)]
            status: Option<std::borrow::Cow<'a, str>>,
        }
        let status = serde_json::from_str::<Status<'_>>(response.get());
        if matches!(
            status.as_ref().map(|status| status.status.as_deref()),
            Ok(Some("failed"))
        ) {
            return;
        }
        self.record.response = response;
        let id = self.record.id.clone();
        if let Err(error) = self.store.put(self.record).await {
            tracing::warn!(response_id = %id, %error, "could not store a response");
        }
    }
}

/// Ready a Responses call: mint its id, read what it echoes, and fetch the conversation
/// before it (`previous_response_id`, which must be the caller's). Returns what to keep when
/// the answer is whole (nothing with `store: false`).
pub(crate) async fn open(
    state: &AppState,
    call: &mut crate::inbound::Call<'_>,
    caller: Option<&crate::auth::Caller>,
) -> Result<Option<Keep>, ApiError> {
    use skein_providers::responses as wire;
    let store = state.responses();
    let key_id = caller.map(|caller| caller.key_id.clone());
    let team_id = caller
        .and_then(|caller| caller.key())
        .and_then(|key| key.team.clone());
    let id = store.new_id();
    let echo = wire::Echo::from_raw(
        &call.request,
        id.clone(),
        call.requested_model,
        crate::translate::unix_now(),
    )
    // (Its one possible fault: a `previous_response_id` that is not a string.)
    .map_err(|error| {
        ApiError::invalid(error.message().to_owned()).with_param("previous_response_id")
    })?;
    let previous = echo.previous_response_id().map(str::to_owned);
    let wants_store = call.request.get("store").map(|value| value.get()) != Some("false");
    // The input items are kept only with the response (and checked again by the
    // translation): with `store: false` they are not made.
    let input = if wants_store {
        let stem = id.strip_prefix("resp_").unwrap_or(&id);
        wire::input_items_raw(&call.request, stem)
            .map_err(|error| ApiError::invalid(error.message().to_owned()).with_param("input"))?
    } else {
        Vec::new()
    };
    let dropped = echo.built_in_tools().to_vec();
    let history = match &previous {
        Some(previous) => history(store.as_ref(), previous, key_id.as_deref())
            .await
            .map_err(unavailable)?
            .ok_or_else(|| {
                ApiError::invalid(format!("Previous response with id '{previous}' not found."))
                    .with_param("previous_response_id")
                    .with_detail_code("previous_response_not_found")
            })?,
        None => Vec::new(),
    };
    call.responses = Some(Box::new(crate::inbound::ResponsesCall {
        echo: Arc::new(echo),
        history,
        dropped,
    }));
    let expires_at_ms = skein_types::now_ms().saturating_add(store.ttl_ms());
    Ok(wants_store.then(|| Keep {
        store,
        record: StoredResponse {
            id,
            key_id,
            team_id,
            expires_at_ms,
            previous_response_id: previous,
            input,
            response: null_json(),
        },
    }))
}
