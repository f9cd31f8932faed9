//! `Idempotency-Key`: a request retried with the same key (per virtual key, within
//! `server.idempotency_window`) runs once, is charged once, and every retry gets the first
//! attempt's answer (409 while the first attempt is still running, 422 if the key comes back
//! with a different request).
//!
//! Where keys are kept is the [`IdempotencyStore`]: this node's memory ([`MemoryStore`]) for
//! a proxy on its own; in a cluster, the node owning the key (see `skein-node`), so that a
//! retry sent to any node finds the first attempt. The first attempt's answer is kept when
//! it succeeded (2xx) and came out whole; a failed attempt frees the key, so the retry runs
//! (a failure charges nothing).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use skein_types::ErrorCode;

use crate::error::ApiError;
use crate::state::AppState;

/// The header a client names its attempt with.
pub const HEADER: &str = "idempotency-key";

/// Answers larger than this are given once and not kept (a retry is told so).
pub const MAX_ANSWER_BYTES: usize = 4 << 20;

/// An answer as the client first got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
    /// Too large to keep: given once, not again.
    pub dropped: bool,
}

/// What a claim on a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller runs the request, and reports with this token.
    Claimed(String),
    /// Another attempt with the key is still running.
    Running,
    /// The key has its answer.
    Done(Answer),
    /// The key was used with a different request.
    Mismatch,
}

/// Why a key could not be claimed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ClaimError(pub String);

/// Where idempotency keys are kept.
#[async_trait::async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Claim `key` for a request with `fingerprint`; a claim not reported within
    /// `running_ms` lapses (its node died).
    async fn claim(
        &self,
        key: &str,
        fingerprint: [u8; 32],
        running_ms: u64,
    ) -> Result<Claim, ClaimError>;
    /// Keep `answer` for `key` for `window_ms` (the claim `token` made).
    async fn complete(&self, key: &str, token: &str, answer: Answer, window_ms: u64);
    /// Free `key` (claimed with `token`): its request left no answer to keep.
    async fn release(&self, key: &str, token: &str);
}

#[derive(Debug)]
enum Entry {
    Running { token: String },
    Done(Answer),
}

#[derive(Debug)]
struct Record {
    fingerprint: [u8; 32],
    expires_at_ms: u64,
    entry: Entry,
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<String, Record>,
    /// `(expires_at_ms, key)`: the sweep and the eviction order.
    expiry: BTreeSet<(u64, String)>,
    bytes: usize,
}

impl Inner {
    fn remove(&mut self, key: &str) -> Option<Record> {
        let record = self.records.remove(key)?;
        self.expiry.remove(&(record.expires_at_ms, key.to_owned()));
        if let Entry::Done(answer) = &record.entry {
            self.bytes = self.bytes.saturating_sub(answer.body.len());
        }
        Some(record)
    }

    fn sweep(&mut self, now_ms: u64) {
        while let Some((expires, key)) = self.expiry.first().cloned() {
            if expires > now_ms {
                break;
            }
            self.remove(&key);
        }
    }
}

/// Keys kept in this process's memory, at most `max_bytes` of answers (the soonest to expire
/// go first, counted in [`MemoryStore::evicted`]).
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_bytes: usize,
    evicted: std::sync::atomic::AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(256 << 20)
    }
}

impl MemoryStore {
    pub fn new(max_bytes: usize) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            max_bytes,
            evicted: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Answers dropped to stay within the size bound.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// [`IdempotencyStore::claim`], as of `now_ms`.
    pub fn claim_at(
        &self,
        key: &str,
        fingerprint: [u8; 32],
        running_ms: u64,
        now_ms: u64,
    ) -> Claim {
        let mut inner = self.lock();
        inner.sweep(now_ms);
        if let Some(record) = inner.records.get(key) {
            if record.fingerprint != fingerprint {
                return Claim::Mismatch;
            }
            return match &record.entry {
                Entry::Running { .. } => Claim::Running,
                Entry::Done(answer) => Claim::Done(answer.clone()),
            };
        }
        let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let expires_at_ms = now_ms.saturating_add(running_ms);
        inner.expiry.insert((expires_at_ms, key.to_owned()));
        inner.records.insert(
            key.to_owned(),
            Record {
                fingerprint,
                expires_at_ms,
                entry: Entry::Running {
                    token: token.clone(),
                },
            },
        );
        Claim::Claimed(token)
    }

    /// [`IdempotencyStore::complete`], as of `now_ms`.
    pub fn complete_at(
        &self,
        key: &str,
        token: &str,
        mut answer: Answer,
        window_ms: u64,
        now_ms: u64,
    ) {
        let mut inner = self.lock();
        let claimed = inner.records.get(key).is_some_and(
            |record| matches!(&record.entry, Entry::Running { token: held } if held == token),
        );
        if !claimed {
            return;
        }
        let Some(record) = inner.remove(key) else {
            return;
        };
        if answer.body.len() > MAX_ANSWER_BYTES.min(self.max_bytes) {
            answer.body = Bytes::new();
            answer.dropped = true;
        }
        let expires_at_ms = now_ms.saturating_add(window_ms);
        inner.bytes += answer.body.len();
        inner.expiry.insert((expires_at_ms, key.to_owned()));
        inner.records.insert(
            key.to_owned(),
            Record {
                fingerprint: record.fingerprint,
                expires_at_ms,
                entry: Entry::Done(answer),
            },
        );
        while inner.bytes > self.max_bytes {
            let oldest = inner
                .expiry
                .iter()
                .find(|(_, candidate)| {
                    inner
                        .records
                        .get(candidate)
                        .is_some_and(|record| matches!(record.entry, Entry::Done(_)))
                })
                .map(|(_, candidate)| candidate.clone());
            let Some(oldest) = oldest else {
                break;
            };
            inner.remove(&oldest);
            self.evicted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// [`IdempotencyStore::release`].
    pub fn release_now(&self, key: &str, token: &str) {
        let mut inner = self.lock();
        let claimed = inner.records.get(key).is_some_and(
            |record| matches!(&record.entry, Entry::Running { token: held } if held == token),
        );
        if claimed {
            inner.remove(key);
        }
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim(
        &self,
        key: &str,
        fingerprint: [u8; 32],
        running_ms: u64,
    ) -> Result<Claim, ClaimError> {
        Ok(self.claim_at(key, fingerprint, running_ms, skein_types::now_ms()))
    }

    async fn complete(&self, key: &str, token: &str, answer: Answer, window_ms: u64) {
        self.complete_at(key, token, answer, window_ms, skein_types::now_ms());
    }

    async fn release(&self, key: &str, token: &str) {
        self.release_now(key, token);
    }
}

/// A claimed key: the request runs, and its answer is kept (or the key freed) as it ends.
pub struct Pending {
    store: Arc<dyn IdempotencyStore>,
    key: String,
    token: String,
    window_ms: u64,
}

/// What [`begin`] decided.
pub enum Begin {
    /// No `Idempotency-Key`: run as usual.
    None,
    /// Run, then [`Pending::finish`] the response.
    Run(Pending),
    /// Answer with this at once (the kept answer, 409, 422 or 400).
    Answer(Result<Response, ApiError>),
}

/// Look at a request's `Idempotency-Key`: claim it, or answer from what its first attempt
/// left.
pub async fn begin(
    app: &AppState,
    key_id: Option<&str>,
    headers: &HeaderMap,
    endpoint: &str,
    body: &[u8],
    window_ms: u64,
    running_ms: u64,
) -> Begin {
    let Some(value) = headers.get(HEADER) else {
        return Begin::None;
    };
    // Without virtual keys (open mode), every caller shares one scope.
    let key_id = key_id.unwrap_or("");
    let Some(client_key) = value
        .to_str()
        .ok()
        .filter(|text| !text.is_empty() && text.len() <= 255)
    else {
        return Begin::Answer(Err(ApiError::invalid(
            "`Idempotency-Key` must be 1 to 255 visible ASCII characters",
        )
        .with_param("Idempotency-Key")));
    };
    let key = format!("{key_id}\u{0}{client_key}");
    let mut hasher = Sha256::new();
    hasher.update(endpoint.as_bytes());
    hasher.update([0]);
    hasher.update(body);
    let fingerprint: [u8; 32] = hasher.finalize().into();
    let store = app.idempotency();
    match store.claim(&key, fingerprint, running_ms).await {
        Ok(Claim::Claimed(token)) => Begin::Run(Pending {
            store,
            key,
            token,
            window_ms,
        }),
        Ok(Claim::Done(answer)) if answer.dropped => Begin::Answer(Err(ApiError::new(
            ErrorCode::Conflict,
            "this Idempotency-Key's request was answered, but its answer was too large to keep \
             for retries",
        )
        .with_detail_code("idempotency_answer_not_kept"))),
        Ok(Claim::Done(answer)) => Begin::Answer(Ok(replay(answer))),
        Ok(Claim::Running) => Begin::Answer(Err(ApiError::new(
            ErrorCode::Conflict,
            "a request with this Idempotency-Key is still running; retry when it has finished",
        )
        .with_detail_code("idempotency_key_in_use")
        .with_retry_after(1))),
        Ok(Claim::Mismatch) => Begin::Answer(Err(ApiError::new(
            ErrorCode::Unprocessable,
            "this Idempotency-Key was used with a different request; use a new key for a new \
             request",
        )
        .with_detail_code("idempotency_key_reused"))),
        Err(error) => Begin::Answer(Err(ApiError::new(
            ErrorCode::Unavailable,
            format!("the Idempotency-Key cannot be checked now: {error}"),
        )
        .with_detail_code("idempotency_unavailable")
        .with_retry_after(1))),
    }
}

/// A kept answer, given again.
fn replay(answer: Answer) -> Response {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    if let Ok(value) = HeaderValue::from_str(&answer.content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

impl Pending {
    /// Keep the answer `response` carries once its body has gone out whole (a 2xx only);
    /// free the key otherwise, or when the client leaves before the end.
    pub fn finish(self, response: Response) -> Response {
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let Pending {
                store, key, token, ..
            } = self;
            tokio::spawn(async move { store.release(&key, &token).await });
            return response;
        }
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("application/json")
            .to_owned();
        let (parts, body) = response.into_parts();
        // A body of known length is not polled past its last byte: it is kept as that byte
        // goes out.
        let expected = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.parse::<usize>().ok());
        let keeper = Keeper {
            pending: Some(self),
            status,
            content_type,
            kept: BytesMut::new(),
            seen: 0,
            expected,
            overflow: false,
        };
        let stream = futures_util::stream::unfold(
            (body.into_data_stream(), keeper),
            |(mut body, mut keeper)| async move {
                use futures_util::StreamExt;
                match body.next().await {
                    Some(Ok(chunk)) => {
                        keeper.push(&chunk);
                        if keeper
                            .expected
                            .is_some_and(|expected| keeper.seen >= expected)
                        {
                            keeper.keep().await;
                        }
                        Some((Ok(chunk), (body, keeper)))
                    }
                    Some(Err(error)) => Some((Err(error), (body, keeper))),
                    None => {
                        // Kept before the client sees the end: a retry sent the moment this
                        // one ends finds the answer.
                        keeper.keep().await;
                        None
                    }
                }
            },
        );
        Response::from_parts(parts, Body::from_stream(stream))
    }
}

/// Gathers an answer's body as it goes out.
struct Keeper {
    pending: Option<Pending>,
    status: u16,
    content_type: String,
    kept: BytesMut,
    /// Bytes gone out, and how many the body declared.
    seen: usize,
    expected: Option<usize>,
    overflow: bool,
}

impl Keeper {
    fn push(&mut self, chunk: &Bytes) {
        self.seen += chunk.len();
        if self.overflow {
            return;
        }
        if self.kept.len() + chunk.len() > MAX_ANSWER_BYTES {
            self.overflow = true;
            self.kept = BytesMut::new();
            return;
        }
        self.kept.extend_from_slice(chunk);
    }

    async fn keep(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let answer = Answer {
            status: self.status,
            content_type: std::mem::take(&mut self.content_type),
            body: std::mem::take(&mut self.kept).freeze(),
            dropped: self.overflow,
        };
        pending
            .store
            .complete(&pending.key, &pending.token, answer, pending.window_ms)
            .await;
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // The client left before the end: nothing whole to keep; the key is free again.
        if let Some(Pending {
            store, key, token, ..
        }) = self.pending.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move { store.release(&key, &token).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &str) -> Answer {
        Answer {
            status: 200,
            content_type: "application/json".into(),
            body: Bytes::from(body.to_owned()),
            dropped: false,
        }
    }

    #[test]
    fn a_key_runs_once_keeps_its_answer_for_its_window_and_refuses_another_request() {
        let store = MemoryStore::new(1 << 20);
        let Claim::Claimed(token) = store.claim_at("k", [1; 32], 1_000, 0) else {
            panic!("the first claim runs");
        };
        assert_eq!(store.claim_at("k", [1; 32], 1_000, 10), Claim::Running);
        assert_eq!(store.claim_at("k", [2; 32], 1_000, 10), Claim::Mismatch);
        store.complete_at("k", "not-the-token", answer("{}"), 5_000, 20);
        assert_eq!(store.claim_at("k", [1; 32], 1_000, 30), Claim::Running);
        store.complete_at("k", &token, answer("{\"a\":1}"), 5_000, 40);
        assert_eq!(
            store.claim_at("k", [1; 32], 1_000, 50),
            Claim::Done(answer("{\"a\":1}"))
        );
        // After the window, the key is new again.
        assert!(matches!(
            store.claim_at("k", [2; 32], 1_000, 5_041),
            Claim::Claimed(_)
        ));
    }

    #[test]
    fn a_released_or_lapsed_claim_frees_the_key_and_answers_stay_within_the_bound() {
        let store = MemoryStore::new(10);
        let Claim::Claimed(token) = store.claim_at("k", [1; 32], 1_000, 0) else {
            panic!("claimed");
        };
        store.release_now("k", &token);
        assert!(matches!(
            store.claim_at("k", [1; 32], 1_000, 1),
            Claim::Claimed(_)
        ));
        // That claim's node died: it lapses.
        assert!(matches!(
            store.claim_at("k", [1; 32], 1_000, 1_002),
            Claim::Claimed(_)
        ));
        // Two answers of 6 bytes do not fit in 10: the sooner-expiring goes.
        for (key, at) in [("a", 0), ("b", 1)] {
            let Claim::Claimed(token) = store.claim_at(key, [1; 32], 1_000, at) else {
                panic!("claimed");
            };
            store.complete_at(key, &token, answer("123456"), 100, at);
        }
        assert!(matches!(
            store.claim_at("a", [1; 32], 1_000, 2),
            Claim::Claimed(_)
        ));
        assert_eq!(store.evicted(), 1);
        assert!(matches!(
            store.claim_at("b", [1; 32], 1_000, 2),
            Claim::Done(_)
        ));
        // An answer larger than the store is given once, not kept.
        let Claim::Claimed(token) = store.claim_at("big", [1; 32], 1_000, 3) else {
            panic!("claimed");
        };
        store.complete_at("big", &token, answer("0123456789abc"), 100, 3);
        let Claim::Done(kept) = store.claim_at("big", [1; 32], 1_000, 4) else {
            panic!("done");
        };
        assert!(kept.dropped && kept.body.is_empty());
    }
}
