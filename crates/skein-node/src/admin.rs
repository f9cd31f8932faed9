//! The admin gRPC service (`proto/skein/admin/v1/admin.proto`), served on the internal port
//! next to the Raft service. Writes are proposed through the leader; reads come from this
//! node's applied state after waiting for the caller's `min_version`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use skein_control::{ControlError, ControlPlane, LeaderReply, LeaderRequest};
use skein_core::auth::{display_prefix, generate_secret, hash_secret, tokens_match};
use skein_proto::admin::v1::admin_server::{Admin, AdminServer};
use skein_proto::admin::v1::{
    AddLearnerRequest, BudgetLease, BudgetStatus, BudgetStatusRequest, ClusterMember,
    ClusterStatusRequest, ClusterStatusResponse, ConfigChange, CreateKeyRequest, CreateKeyResponse,
    CreateKeysRequest, CreateKeysResponse, CreatedKey, DeleteRequest, ExportConfigRequest,
    ExportConfigResponse, GetRequest, GetResponse, GetStatusRequest, GetStatusResponse,
    GossipMember, ImportConfigRequest, KeyRequest, KeyStatus, Kind, ListRequest, ListResponse,
    NodeRequest, ProviderStatus, Resource, TargetVotersRequest, TriggerSnapshotRequest,
    TriggerSnapshotResponse, UsageRequest, UsageResponse, UsageRow, WatchRequest, WriteRequest,
    WriteResponse,
};
use skein_proxy::AppState;
use skein_types::control::{
    Budget, Command, ConfigExport, ControlState, Customer, Limits, MAX_BULK_KEYS, Outcome, Price,
    RejectCode, StageMode, Team, VirtualKey,
};
use skein_types::{ProviderSpec, RouteSpec};
use tonic::{Request, Response, Status};

/// The largest admin request or answer (a bulk create of the most keys fits many times).
pub const ADMIN_MESSAGE_LIMIT: usize = 128 << 20;

/// Entities per staged part of a bulk write: small log entries replicate within openraft's
/// append timeout (its heartbeat interval) even to a follower that is behind.
const STAGE_PART: usize = 500;

/// How long a read waits for this node to apply the caller's `min_version`.
const READ_WAIT: Duration = Duration::from_secs(5);

/// Answers admin calls from the node's live state and its control plane.
pub struct AdminService {
    state: Arc<AppState>,
    control: ControlPlane,
    http_addr: SocketAddr,
    token: Option<String>,
    gossip: Option<Arc<skein_cluster::Gossip>>,
}

impl AdminService {
    pub fn new(
        state: Arc<AppState>,
        control: ControlPlane,
        http_addr: SocketAddr,
        token: Option<String>,
        gossip: Option<Arc<skein_cluster::Gossip>>,
    ) -> AdminService {
        AdminService {
            state,
            control,
            http_addr,
            token,
            gossip,
        }
    }

    /// The admin service (behind the token check) and the Raft service, as an axum router to
    /// serve on the gRPC listener.
    pub fn into_router(self) -> axum::Router {
        self.into_router_with(None, None)
    }

    /// [`into_router`](Self::into_router) with the stored-responses peer service beside the
    /// Raft service (behind the same token check).
    pub fn into_router_with(
        self,
        responses: Option<
            skein_proto::responses::v1::response_peer_server::ResponsePeerServer<
                crate::responses::PeerService,
            >,
        >,
        idempotency: Option<
            skein_proto::idempotency::v1::idempotency_peer_server::IdempotencyPeerServer<
                crate::idempotency::PeerService,
            >,
        >,
    ) -> axum::Router {
        let token = self.token.clone();
        // Raft RPCs carry the same token: a node without it cannot join or vote.
        let raft_token = self.token.clone();
        let token_for_peers = self.token.clone();
        let raft = tonic::service::interceptor::InterceptedService::new(
            self.control.service(),
            move |request: Request<()>| {
                check_token(raft_token.as_deref(), &request)?;
                Ok(request)
            },
        );
        // Bulk creates and imports carry up to 100,000 keys.
        let admin = tonic::service::interceptor::InterceptedService::new(
            AdminServer::new(self)
                .max_decoding_message_size(ADMIN_MESSAGE_LIMIT)
                .max_encoding_message_size(ADMIN_MESSAGE_LIMIT),
            move |request: Request<()>| {
                check_token(token.as_deref(), &request)?;
                Ok(request)
            },
        );
        let mut routes = tonic::service::Routes::new(admin).add_service(raft);
        // Server reflection (both versions: grpcurl asks for v1, older tools for v1alpha).
        // Open like the probes: it describes the API, and every call still needs the token.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(skein_proto::FILE_DESCRIPTOR_SET)
        };
        match (reflection().build_v1(), reflection().build_v1alpha()) {
            (Ok(v1), Ok(v1alpha)) => routes = routes.add_service(v1).add_service(v1alpha),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%error, "gRPC server reflection is off: its descriptors do not load");
            }
        }
        if let Some(idempotency) = idempotency {
            let peer_token = token_for_peers.clone();
            routes = routes.add_service(tonic::service::interceptor::InterceptedService::new(
                idempotency,
                move |request: Request<()>| {
                    check_token(peer_token.as_deref(), &request)?;
                    Ok(request)
                },
            ));
        }
        if let Some(responses) = responses {
            let peer_token = token_for_peers;
            routes = routes.add_service(tonic::service::interceptor::InterceptedService::new(
                responses,
                move |request: Request<()>| {
                    check_token(peer_token.as_deref(), &request)?;
                    Ok(request)
                },
            ));
        }
        routes.into_axum_router()
    }

    /// A typed update: the entity replaces the stored one whole (a key keeps its secret's
    /// hash and prefix, and when it was created).
    async fn replace(&self, request: &WriteRequest) -> Result<WriteResponse, Status> {
        let (kind, json) = written_entity(request)?;
        let id = serde_json::from_str::<serde_json::Value>(&json)
            .ok()
            .and_then(|value| value[id_field(kind)].as_str().map(str::to_owned))
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "entity.{}: required to say which {} to update",
                    id_field(kind),
                    kind_name(kind)
                ))
            })?;
        let state = self.control.state();
        if entity(&state, kind, &id)?.is_none() {
            return Err(Status::not_found(format!(
                "{} `{id}` does not exist",
                kind_name(kind)
            )));
        }
        let json = if kind == Kind::Key {
            let current = &state.keys[&id];
            let mut key: VirtualKey = parse(kind, &json)?;
            key.hash = current.hash.clone();
            key.prefix = current.prefix.clone();
            key.created_at_ms = current.created_at_ms;
            to_json(&key)?
        } else {
            json
        };
        let (_, command) = put_command(kind, &json)?;
        self.write(command).await
    }

    async fn read(&self, min_version: u64) -> Result<Arc<ControlState>, Status> {
        if min_version > 0 {
            self.control
                .wait_for_version(min_version, READ_WAIT)
                .await
                .map_err(control_status)?;
        }
        Ok(self.control.state())
    }

    /// A bulk write too large for one log entry: staged in parts of `STAGE_PART` entities,
    /// then committed in one entry that applies all of them or none.
    async fn write_staged(
        &self,
        config: ConfigExport,
        mode: StageMode,
    ) -> Result<WriteResponse, Status> {
        let stage = random_id("bulk-")?;
        let parts = config.split(STAGE_PART);
        let count = parts.len() as u64;
        for part in parts {
            self.write(Command::Stage {
                stage: stage.clone(),
                part,
            })
            .await?;
        }
        self.write(Command::CommitStage {
            stage,
            parts: count,
            mode,
        })
        .await
    }

    async fn write(&self, command: Command) -> Result<WriteResponse, Status> {
        self.write_with(command, false).await
    }

    async fn write_with(&self, command: Command, create: bool) -> Result<WriteResponse, Status> {
        if !matches!(command, Command::Import { .. }) {
            self.await_bootstrap().await?;
        }
        let retried = command.clone();
        let proposed = if create {
            self.control.propose_create("admin", command).await
        } else {
            self.control.propose("admin", command).await
        };
        let response = proposed.map_err(control_status)?;
        match response.outcome {
            Outcome::Applied | Outcome::Duplicate | Outcome::AlreadyBootstrapped => {
                Ok(WriteResponse {
                    version: response.version,
                })
            }
            Outcome::Rejected(rejection)
                if rejection.code == RejectCode::AlreadyExists
                    && already_applied(&self.control.state(), &retried) =>
            {
                // A retry after a lost answer: the first attempt went through.
                Ok(WriteResponse {
                    version: self.control.state().version,
                })
            }
            Outcome::Rejected(rejection) => {
                let message = rejection.to_string();
                Err(match rejection.code {
                    RejectCode::NotFound => Status::not_found(message),
                    RejectCode::AlreadyExists => Status::already_exists(message),
                    RejectCode::InvalidArgument => Status::invalid_argument(message),
                    RejectCode::FailedPrecondition => Status::failed_precondition(message),
                })
            }
        }
    }

    /// Writes wait (briefly) for the group's bootstrap config, so an early write is checked
    /// against the config the node serves, not an empty one.
    async fn await_bootstrap(&self) -> Result<(), Status> {
        let mut versions = self.control.versions();
        let control = self.control.clone();
        let ready = tokio::time::timeout(
            READ_WAIT,
            versions.wait_for(move |_| control.state().bootstrapped),
        )
        .await;
        match ready {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Status::unavailable(
                "the cluster has not applied its bootstrap config yet; retry shortly",
            )),
        }
    }

    async fn membership(&self, request: LeaderRequest) -> Result<WriteResponse, Status> {
        match self
            .control
            .to_leader(request)
            .await
            .map_err(control_status)?
        {
            LeaderReply::Membership { version }
            | LeaderReply::Applied(skein_control::ApplyResponse { version, .. }) => {
                Ok(WriteResponse { version })
            }
        }
    }
}

/// Whether the state already holds exactly what `command` writes (so an `AlreadyExists`
/// answers a retry of a write that went through).
fn already_applied(state: &ControlState, command: &Command) -> bool {
    match command {
        Command::CreateKey { key } => state
            .keys
            .get(&key.id)
            .is_some_and(|stored| stored.hash == key.hash),
        Command::CreateKeys { keys } => keys.iter().all(|key| {
            state
                .keys
                .get(&key.id)
                .is_some_and(|stored| stored.hash == key.hash)
        }),
        Command::RotateKey { id, hash, .. } => state
            .keys
            .get(id)
            .is_some_and(|stored| &stored.hash == hash),
        Command::PutProvider { provider } => state.providers.get(&provider.name) == Some(provider),
        Command::PutRoute { route } => state.routes.get(&route.name) == Some(route),
        Command::PutTeam { team } => state.teams.get(&team.id).map(AsRef::as_ref) == Some(team),
        Command::PutCustomer { customer } => {
            state.customers.get(&customer.id).map(AsRef::as_ref) == Some(customer)
        }
        Command::PutBudget { budget } => {
            state.budgets.get(&budget.id).map(AsRef::as_ref) == Some(budget)
        }
        Command::PutPrice { price } => state.prices.get(&price.model) == Some(price),
        _ => false,
    }
}

/// A new key from a create request, and its secret.
fn new_key(request: CreateKeyRequest) -> Result<(VirtualKey, String), Status> {
    let secret = generate_secret().map_err(Status::internal)?;
    let id = match non_empty(request.id) {
        Some(id) => id,
        None => random_id("key-")?,
    };
    let name = non_empty(request.name).unwrap_or_else(|| id.clone());
    let key = VirtualKey {
        id,
        name,
        hash: hash_secret(&secret),
        prefix: display_prefix(&secret),
        owner: non_empty(request.owner),
        team: non_empty(request.team),
        models: request.models,
        limits: Limits {
            rpm: non_zero(request.rpm),
            tpm: non_zero(request.tpm),
            max_parallel: non_zero(request.max_parallel),
        },
        expires_at_ms: non_zero(request.expires_at_ms),
        revoked: false,
        metadata: request.metadata.into_iter().collect(),
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    Ok((key, secret))
}

/// Check `authorization: Bearer <token>` when the node has an admin token.
/// The config as plain YAML: enums as one-key maps (`period: {calendar: …}`), not custom tags
/// (`!calendar`) that other YAML parsers refuse.
fn export_yaml(config: &ConfigExport) -> Result<String, String> {
    let plain = serde_json::to_value(config).map_err(|error| error.to_string())?;
    serde_norway::to_string(&plain).map_err(|error| error.to_string())
}

/// Read an export: plain YAML, or the tagged form earlier versions wrote.
fn import_yaml(yaml: &str) -> Result<ConfigExport, String> {
    let tagged_error = match serde_norway::from_str::<ConfigExport>(yaml) {
        Ok(config) => return Ok(config),
        Err(error) => error,
    };
    let Ok(plain) = serde_norway::from_str::<serde_json::Value>(yaml) else {
        return Err(tagged_error.to_string());
    };
    serde_json::from_value(plain).map_err(|_| tagged_error.to_string())
}

fn check_token(expected: Option<&str>, request: &Request<()>) -> Result<(), Status> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let given = request
        .metadata()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .map(skein_types::bearer_token);
    match given {
        Some(given) if tokens_match(given, expected) => Ok(()),
        Some(_) => Err(Status::unauthenticated("invalid admin token")),
        None => Err(Status::unauthenticated(
            "missing admin token: send `authorization: Bearer <token>`",
        )),
    }
}

fn control_status(error: ControlError) -> Status {
    match error {
        ControlError::Unavailable(message) => Status::unavailable(message),
        ControlError::NotLeader => Status::unavailable("no leader could take the write"),
        ControlError::InvalidArgument(message) => Status::invalid_argument(message),
        ControlError::Timeout(message) => Status::deadline_exceeded(message),
        ControlError::Internal(message) => Status::internal(message),
    }
}

fn kind_of(raw: i32) -> Result<Kind, Status> {
    match Kind::try_from(raw) {
        Ok(Kind::Unspecified) | Err(_) => Err(Status::invalid_argument(
            "kind: must be one of provider, route, key, team, customer, budget, price",
        )),
        Ok(kind) => Ok(kind),
    }
}

fn parse<T: DeserializeOwned>(kind: Kind, json: &str) -> Result<T, Status> {
    serde_json::from_str(json).map_err(|error| {
        Status::invalid_argument(format!("json: not a valid {}: {error}", kind_name(kind)))
    })
}

/// The member that names an entity of `kind`.
pub(crate) fn id_field(kind: Kind) -> &'static str {
    match kind {
        Kind::Provider | Kind::Route => "name",
        Kind::Price => "model",
        _ => "id",
    }
}

/// The entity a write carries, as JSON in the config file's schema: the typed `entity`, or
/// (from clients that predate it) `json`.
fn written_entity(request: &WriteRequest) -> Result<(Kind, String), Status> {
    match &request.entity {
        Some(entity) => {
            let (kind, value) = crate::typed::to_config_json(entity)?;
            if request.kind != Kind::Unspecified as i32 && request.kind != kind as i32 {
                return Err(Status::invalid_argument(
                    "kind: does not match the entity given",
                ));
            }
            Ok((kind, value.to_string()))
        }
        None => Ok((kind_of(request.kind)?, request.json.clone())),
    }
}

pub(crate) fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Unspecified => "entity",
        Kind::Provider => "provider",
        Kind::Route => "route",
        Kind::Key => "key",
        Kind::Team => "team",
        Kind::Customer => "customer",
        Kind::Budget => "budget",
        Kind::Price => "price",
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<String, Status> {
    serde_json::to_string(value).map_err(|error| Status::internal(error.to_string()))
}

/// Every entity of `kind` in `state` as `(id, json)`, ordered by id.
fn entities(state: &ControlState, kind: Kind) -> Result<Vec<(String, String)>, Status> {
    fn all<T: Serialize + Clone>(
        map: &skein_types::control::StateMap<String, T>,
    ) -> Result<Vec<(String, String)>, Status> {
        map.iter()
            .map(|(id, value)| Ok((id.clone(), to_json(value)?)))
            .collect()
    }
    match kind {
        Kind::Unspecified => Err(Status::invalid_argument("kind: must be given")),
        Kind::Provider => all(&state.providers),
        Kind::Route => all(&state.routes),
        Kind::Key => all(&state.keys),
        Kind::Team => all(&state.teams),
        Kind::Customer => all(&state.customers),
        Kind::Budget => all(&state.budgets),
        Kind::Price => all(&state.prices),
    }
}

fn entity(state: &ControlState, kind: Kind, id: &str) -> Result<Option<String>, Status> {
    let found = match kind {
        Kind::Unspecified => return Err(Status::invalid_argument("kind: must be given")),
        Kind::Provider => state.providers.get(id).map(to_json),
        Kind::Route => state.routes.get(id).map(to_json),
        Kind::Key => state.keys.get(id).map(to_json),
        Kind::Team => state.teams.get(id).map(to_json),
        Kind::Customer => state.customers.get(id).map(to_json),
        Kind::Budget => state.budgets.get(id).map(to_json),
        Kind::Price => state.prices.get(id).map(to_json),
    };
    found.transpose()
}

/// The command that stores `json` as an entity of `kind`, and the entity's id.
fn put_command(kind: Kind, json: &str) -> Result<(String, Command), Status> {
    Ok(match kind {
        Kind::Unspecified => return Err(Status::invalid_argument("kind: must be given")),
        Kind::Provider => {
            let provider: ProviderSpec = parse(kind, json)?;
            (provider.name.clone(), Command::PutProvider { provider })
        }
        Kind::Route => {
            let route: RouteSpec = parse(kind, json)?;
            (route.name.clone(), Command::PutRoute { route })
        }
        Kind::Key => {
            let key: VirtualKey = parse(kind, json)?;
            (key.id.clone(), Command::UpdateKey { key })
        }
        Kind::Team => {
            let team: Team = parse(kind, json)?;
            (team.id.clone(), Command::PutTeam { team })
        }
        Kind::Customer => {
            let customer: Customer = parse(kind, json)?;
            (customer.id.clone(), Command::PutCustomer { customer })
        }
        Kind::Budget => {
            let budget: Budget = parse(kind, json)?;
            (budget.id.clone(), Command::PutBudget { budget })
        }
        Kind::Price => {
            let price: Price = parse(kind, json)?;
            (price.model.clone(), Command::PutPrice { price })
        }
    })
}

/// Lay the top-level members of `patch` over `existing` (both JSON objects).
/// `patch`'s top-level members over `existing` (both JSON objects).
pub(crate) fn merge(existing: &str, patch: &str) -> Result<String, Status> {
    let mut base: serde_json::Value =
        serde_json::from_str(existing).map_err(|error| Status::internal(error.to_string()))?;
    let patch: serde_json::Value = serde_json::from_str(patch)
        .map_err(|error| Status::invalid_argument(format!("json: {error}")))?;
    let (Some(base_object), Some(patch_object)) = (base.as_object_mut(), patch.as_object()) else {
        return Err(Status::invalid_argument("json: must be an object"));
    };
    for (name, value) in patch_object {
        base_object.insert(name.clone(), value.clone());
    }
    to_json(&base)
}

fn random_id(prefix: &str) -> Result<String, Status> {
    let secret = generate_secret().map_err(Status::internal)?;
    let random = &secret[skein_core::auth::SECRET_PREFIX.len()..];
    Ok(format!("{prefix}{}", &random[..12]))
}

fn non_zero<T: PartialEq + Default>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<ConfigChange, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let snapshot = self.state.config.load();
        let now_ms = self.state.clock_ms();
        let mut providers: Vec<ProviderStatus> = snapshot
            .providers()
            .map(|provider| ProviderStatus {
                name: provider.name.to_string(),
                kind: provider.kind.as_str().to_owned(),
                base_url: provider.base_url.clone(),
                keys: provider
                    .keys
                    .iter()
                    .map(|key| KeyStatus {
                        name: key.name.clone(),
                        weight: key.weight,
                        cooling_down_ms: key.health.cooldown_until_ms().saturating_sub(now_ms),
                    })
                    .collect(),
            })
            .collect();
        providers.sort_by(|left, right| left.name.cmp(&right.name));
        let mut routes: Vec<String> = snapshot
            .routes()
            .map(|route| route.name.to_string())
            .collect();
        routes.sort();
        Ok(Response::new(GetStatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: self.state.is_ready(),
            http_addr: self.http_addr.to_string(),
            providers,
            routes,
            uptime_ms: now_ms,
            config_version: self.control.state().version,
        }))
    }

    async fn create(
        &self,
        request: Request<WriteRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let request = request.into_inner();
        let (kind, json) = written_entity(&request)?;
        if kind == Kind::Key {
            return Err(Status::invalid_argument(
                "kind: keys are created with CreateKey, which makes their secret",
            ));
        }
        let (id, command) = put_command(kind, &json)?;
        if entity(&self.control.state(), kind, &id)?.is_some() {
            return Err(Status::already_exists(format!(
                "{} `{id}` already exists",
                kind_name(kind)
            )));
        }
        // Checked again at apply: of two racing creates, one wins.
        Ok(Response::new(self.write_with(command, true).await?))
    }

    async fn update(
        &self,
        request: Request<WriteRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let request = request.into_inner();
        if request.entity.is_some() {
            return Ok(Response::new(self.replace(&request).await?));
        }
        let kind = kind_of(request.kind)?;
        let patch: serde_json::Value = serde_json::from_str(&request.json)
            .map_err(|error| Status::invalid_argument(format!("json: {error}")))?;
        let id_field = id_field(kind);
        let Some(id) = patch.get(id_field).and_then(|id| id.as_str()) else {
            return Err(Status::invalid_argument(format!(
                "json.{id_field}: required to say which {} to update",
                kind_name(kind)
            )));
        };
        let state = self.control.state();
        let Some(existing) = entity(&state, kind, id)? else {
            return Err(Status::not_found(format!(
                "{} `{id}` does not exist",
                kind_name(kind)
            )));
        };
        let mut merged = merge(&existing, &request.json)?;
        if kind == Kind::Key {
            // The secret's hash and prefix only change through RotateKey.
            let current = &state.keys[id];
            let mut key: VirtualKey = parse(kind, &merged)?;
            key.hash = current.hash.clone();
            key.prefix = current.prefix.clone();
            merged = to_json(&key)?;
        }
        let (_, command) = put_command(kind, &merged)?;
        Ok(Response::new(self.write(command).await?))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let request = request.into_inner();
        let kind = kind_of(request.kind)?;
        let state = self.read(request.min_version).await?;
        let Some(json) = entity(&state, kind, &request.id)? else {
            return Err(Status::not_found(format!(
                "{} `{}` does not exist",
                kind_name(kind),
                request.id
            )));
        };
        Ok(Response::new(GetResponse {
            resource: Some(crate::typed::resource(kind, request.id, json)?),
            version: state.version,
        }))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let request = request.into_inner();
        let kind = kind_of(request.kind)?;
        let page_size = match request.page_size {
            0 => 100,
            size => size.min(1000) as usize,
        };
        let state = self.read(request.min_version).await?;
        let all = entities(&state, kind)?;
        let start = if request.page_token.is_empty() {
            0
        } else {
            all.partition_point(|(id, _)| id.as_str() <= request.page_token.as_str())
        };
        let page: Vec<Resource> = all[start..]
            .iter()
            .take(page_size)
            .map(|(id, json)| crate::typed::resource(kind, id.clone(), json.clone()))
            .collect::<Result<_, Status>>()?;
        let next_page_token = if start + page.len() < all.len() {
            page.last().map(|last| last.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListResponse {
            items: page,
            next_page_token,
            version: state.version,
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let request = request.into_inner();
        let id = request.id;
        let command = match kind_of(request.kind)? {
            Kind::Unspecified => return Err(Status::invalid_argument("kind: must be given")),
            Kind::Provider => Command::DeleteProvider { name: id },
            Kind::Route => Command::DeleteRoute { name: id },
            Kind::Key => Command::DeleteKey { id },
            Kind::Team => Command::DeleteTeam { id },
            Kind::Customer => Command::DeleteCustomer { id },
            Kind::Budget => Command::DeleteBudget { id },
            Kind::Price => Command::DeletePrice { model: id },
        };
        Ok(Response::new(self.write(command).await?))
    }

    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<CreateKeyResponse>, Status> {
        let (key, secret) = new_key(request.into_inner())?;
        let id = key.id.clone();
        let written = self.write(Command::CreateKey { key }).await?;
        let state = self.control.state();
        let json = entity(&state, Kind::Key, &id)?.unwrap_or_default();
        Ok(Response::new(CreateKeyResponse {
            secret,
            key: Some(crate::typed::resource(Kind::Key, id, json)?),
            version: written.version,
        }))
    }

    async fn create_keys(
        &self,
        request: Request<CreateKeysRequest>,
    ) -> Result<Response<CreateKeysResponse>, Status> {
        let requests = request.into_inner().keys;
        if requests.is_empty() || requests.len() > MAX_BULK_KEYS {
            return Err(Status::invalid_argument(format!(
                "keys: must hold 1 to {MAX_BULK_KEYS} keys (got {})",
                requests.len()
            )));
        }
        let mut keys = Vec::with_capacity(requests.len());
        let mut created = Vec::with_capacity(requests.len());
        for request in requests {
            let (key, secret) = new_key(request)?;
            created.push(CreatedKey {
                id: key.id.clone(),
                secret,
            });
            keys.push(key);
        }
        let written = if keys.len() <= STAGE_PART {
            self.write(Command::CreateKeys { keys }).await?
        } else {
            let config = ConfigExport {
                keys,
                ..ConfigExport::default()
            };
            self.write_staged(config, StageMode::CreateKeys).await?
        };
        Ok(Response::new(CreateKeysResponse {
            keys: created,
            version: written.version,
        }))
    }

    async fn rotate_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<CreateKeyResponse>, Status> {
        let id = request.into_inner().id;
        let secret = generate_secret().map_err(Status::internal)?;
        let written = self
            .write(Command::RotateKey {
                id: id.clone(),
                hash: hash_secret(&secret),
                prefix: display_prefix(&secret),
            })
            .await?;
        let json = entity(&self.control.state(), Kind::Key, &id)?.unwrap_or_default();
        Ok(Response::new(CreateKeyResponse {
            secret,
            key: Some(crate::typed::resource(Kind::Key, id, json)?),
            version: written.version,
        }))
    }

    async fn revoke_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let id = request.into_inner().id;
        Ok(Response::new(self.write(Command::RevokeKey { id }).await?))
    }

    async fn get_budget_status(
        &self,
        request: Request<BudgetStatusRequest>,
    ) -> Result<Response<BudgetStatus>, Status> {
        let request = request.into_inner();
        let state = self.read(request.min_version).await?;
        let Some(budget) = state.budgets.get(&request.id) else {
            return Err(Status::not_found(format!(
                "budget `{}` does not exist",
                request.id
            )));
        };
        let clock = state.clock_ms;
        let spent_nanos = state.budget_spent(&budget.id, skein_types::now_ms().max(clock));
        let leases: Vec<BudgetLease> = state
            .ledgers
            .get(&budget.id)
            .map(|ledger| {
                ledger
                    .leases
                    .iter()
                    .map(|(node, lease)| {
                        let lapsed = lease.lapsed(clock);
                        BudgetLease {
                            node_id: *node,
                            granted_nanos: lease.granted_nanos,
                            used_nanos: lease.used_nanos,
                            outstanding_nanos: if lapsed { 0 } else { lease.outstanding() },
                            until_ms: lease.until_ms,
                            lapsed,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let leased_nanos = leases
            .iter()
            .map(|lease| lease.outstanding_nanos)
            .fold(0u64, u64::saturating_add);
        Ok(Response::new(BudgetStatus {
            id: budget.id.clone(),
            hard: budget.hard,
            limit_nanos: budget.limit_nanos,
            spent_nanos,
            leased_nanos,
            free_nanos: budget
                .limit_nanos
                .saturating_sub(spent_nanos)
                .saturating_sub(leased_nanos),
            leases,
            version: state.version,
        }))
    }

    async fn get_usage(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        let request = request.into_inner();
        let state = self.read(request.min_version).await?;
        let history = self.control.history();
        let query = skein_control::UsageQuery {
            key_id: request.key_id.clone(),
            model: request.model.clone(),
            since_ms: request.since_ms,
            until_ms: request.until_ms,
        };
        let team_matches = |key_id: &str| {
            request.team.is_empty()
                || state.keys.get(key_id).and_then(|key| key.team.as_deref())
                    == Some(request.team.as_str())
        };
        let history_error =
            |error: sled::Error| Status::internal(format!("usage history: {error}"));
        let totals = history.query(&query, team_matches).map_err(history_error)?;
        let complete_from_ms = history.complete_from_ms().map_err(history_error)?;
        let cost_in_period_nanos = totals
            .values()
            .map(|usage| usage.cost_nanos)
            .fold(0u64, u64::saturating_add);
        let rows = totals
            .into_iter()
            .map(|((key_id, model), usage)| UsageRow {
                key_id,
                model,
                requests: usage.requests,
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
                cost_nanos: usage.cost_nanos,
            })
            .collect();
        Ok(Response::new(UsageResponse {
            rows,
            cost_in_period_nanos,
            version: state.version,
            complete_from_ms,
            retention_days: history.retention_days(),
        }))
    }

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let metrics = self.control.metrics();
        let membership = metrics.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let matched = metrics.replication.clone().unwrap_or_default();
        let members = membership
            .nodes()
            .map(|(id, node)| ClusterMember {
                id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
                matched_index: matched
                    .get(id)
                    .and_then(|log_id| log_id.map(|log_id| log_id.index))
                    .unwrap_or(0),
            })
            .collect();
        let role = self.control.role();
        Ok(Response::new(ClusterStatusResponse {
            node_id: metrics.id,
            role: role.to_owned(),
            leader_id: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            commit_index: self.control.committed_index(),
            applied_index: metrics.last_applied.map(|id| id.index).unwrap_or(0),
            snapshot_index: metrics.snapshot.map(|id| id.index).unwrap_or(0),
            cluster_id: self.control.state().cluster.id.clone(),
            incarnation: format!("{:016x}", self.control.identity().incarnation()),
            target_voters: self.control.state().cluster.target_voters,
            members,
            gossip: match &self.gossip {
                Some(gossip) => gossip
                    .members()
                    .await
                    .into_iter()
                    .map(|member| {
                        let info = member.info.unwrap_or_else(|| skein_cluster::NodeInfo {
                            node_id: 0,
                            http_addr: String::new(),
                            grpc_addr: String::new(),
                            version: String::new(),
                            ready: false,
                            raft_role: String::new(),
                            applied_index: 0,
                        });
                        GossipMember {
                            gossip_addr: member.gossip_addr.to_string(),
                            live: member.live,
                            node_id: info.node_id,
                            http_addr: info.http_addr,
                            grpc_addr: info.grpc_addr,
                            version: info.version,
                            ready: info.ready,
                            raft_role: info.raft_role,
                            applied_index: info.applied_index,
                        }
                    })
                    .collect(),
                None => Vec::new(),
            },
        }))
    }

    async fn add_learner(
        &self,
        request: Request<AddLearnerRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let request = request.into_inner();
        if request.id == 0 || request.addr.is_empty() {
            return Err(Status::invalid_argument(
                "id and addr: a node id above zero and its gRPC address are required",
            ));
        }
        Ok(Response::new(
            self.membership(LeaderRequest::AddLearner {
                incarnation: None,
                id: request.id,
                addr: request.addr,
            })
            .await?,
        ))
    }

    async fn promote_voter(
        &self,
        request: Request<NodeRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let id = request.into_inner().id;
        let metrics = self.control.metrics();
        let membership = metrics.membership_config.membership();
        if membership.get_node(&id).is_none() {
            return Err(Status::failed_precondition(format!(
                "id: node {id} is not a member; add it as a learner first"
            )));
        }
        let mut voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        voters.insert(id);
        Ok(Response::new(
            self.membership(LeaderRequest::ChangeVoters { voters })
                .await?,
        ))
    }

    async fn set_target_voters(
        &self,
        request: Request<TargetVotersRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let voters = request.into_inner().voters;
        if voters == 0 || voters.is_multiple_of(2) {
            return Err(Status::invalid_argument(format!(
                "voters: must be an odd number, at least 1 (got {voters})"
            )));
        }
        Ok(Response::new(
            self.write(Command::SetTargetVoters { voters }).await?,
        ))
    }

    async fn remove_node(
        &self,
        request: Request<NodeRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let id = request.into_inner().id;
        Ok(Response::new(
            self.membership(LeaderRequest::RemoveNode { id }).await?,
        ))
    }

    async fn trigger_snapshot(
        &self,
        _request: Request<TriggerSnapshotRequest>,
    ) -> Result<Response<TriggerSnapshotResponse>, Status> {
        let index = self.control.snapshot().await.map_err(control_status)?;
        Ok(Response::new(TriggerSnapshotResponse { index }))
    }

    async fn export_config(
        &self,
        request: Request<ExportConfigRequest>,
    ) -> Result<Response<ExportConfigResponse>, Status> {
        let state = self.read(request.into_inner().min_version).await?;
        let yaml = export_yaml(&state.export()).map_err(Status::internal)?;
        Ok(Response::new(ExportConfigResponse {
            yaml,
            version: state.version,
        }))
    }

    async fn import_config(
        &self,
        request: Request<ImportConfigRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let config = import_yaml(&request.into_inner().yaml)
            .map_err(|error| Status::invalid_argument(format!("yaml: {error}")))?;
        if config.len() <= STAGE_PART {
            Ok(Response::new(self.write(Command::Import { config }).await?))
        } else {
            Ok(Response::new(
                self.write_staged(config, StageMode::Import).await?,
            ))
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let from = request.into_inner().from_version;
        let control = self.control.clone();
        let versions = control.versions();
        let stream = futures_util::stream::unfold(
            (control, versions, from, VecDeque::<ConfigChange>::new()),
            |(control, mut versions, mut last, mut pending)| async move {
                loop {
                    if let Some(change) = pending.pop_front() {
                        return Some((Ok(change), (control, versions, last, pending)));
                    }
                    let state = control.state();
                    for entry in state.audit.iter().filter(|entry| entry.version > last) {
                        pending.push_back(ConfigChange {
                            version: entry.version,
                            at_ms: entry.at_ms,
                            actor: entry.actor.clone(),
                            action: entry.action.clone(),
                            target: entry.target.clone(),
                        });
                    }
                    last = last.max(state.version);
                    if pending.is_empty() && versions.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_types::control::{Budget, BudgetPeriod, CalendarUnit, Scope};

    #[test]
    fn exports_are_plain_yaml_and_import_back() {
        let config = ConfigExport {
            budgets: vec![Budget {
                id: "b".to_owned(),
                scope: Scope::Team("t".to_owned()),
                limit_nanos: 5,
                period: BudgetPeriod::Calendar {
                    unit: CalendarUnit::Month,
                    time_zone: "Europe/Paris".to_owned(),
                },
                hard: true,
            }],
            ..Default::default()
        };
        let yaml = export_yaml(&config).expect("export");
        assert!(!yaml.contains('!'), "no custom tags:\n{yaml}");
        assert!(yaml.contains("calendar:"), "{yaml}");
        assert_eq!(import_yaml(&yaml).expect("import"), config);
        // What earlier versions wrote still imports.
        let tagged = serde_norway::to_string(&config).expect("tagged");
        assert!(tagged.contains('!'), "{tagged}");
        assert_eq!(import_yaml(&tagged).expect("import tagged"), config);
        assert!(import_yaml("budgets: 3").is_err());
    }
}
