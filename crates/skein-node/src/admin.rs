//! The admin gRPC service (`proto/skein/admin/v1/admin.proto`), served on the internal port.

use std::net::SocketAddr;
use std::sync::Arc;

use skein_proto::admin::v1::admin_server::{Admin, AdminServer};
use skein_proto::admin::v1::{GetStatusRequest, GetStatusResponse, KeyStatus, ProviderStatus};
use skein_proxy::AppState;

/// Answers admin calls from the node's live state.
pub struct AdminService {
    state: Arc<AppState>,
    http_addr: SocketAddr,
}

impl AdminService {
    pub fn new(state: Arc<AppState>, http_addr: SocketAddr) -> AdminService {
        AdminService { state, http_addr }
    }

    /// The service as an axum router, to serve on the gRPC listener.
    pub fn into_router(self) -> axum::Router {
        tonic::service::Routes::new(AdminServer::new(self)).into_axum_router()
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(
        &self,
        _request: tonic::Request<GetStatusRequest>,
    ) -> Result<tonic::Response<GetStatusResponse>, tonic::Status> {
        let snapshot = self.state.config.load();
        let now_ms = self.state.clock_ms();
        let mut providers: Vec<ProviderStatus> = snapshot
            .providers()
            .map(|provider| ProviderStatus {
                name: provider.name.clone(),
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
        let mut routes: Vec<String> = snapshot.routes().map(|route| route.name.clone()).collect();
        routes.sort();
        Ok(tonic::Response::new(GetStatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: self.state.is_ready(),
            http_addr: self.http_addr.to_string(),
            providers,
            routes,
            uptime_ms: now_ms,
        }))
    }
}
