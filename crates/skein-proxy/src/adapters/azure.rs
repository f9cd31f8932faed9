//! Azure OpenAI: OpenAI's API with the deployment in the path and an `api-version` query.

use axum::http::{HeaderName, HeaderValue};
use skein_core::{Candidate, Secret};

use super::ProviderAdapter;
use crate::error::ApiError;
use crate::inbound::Call;
use crate::translate::ResponseTranslation;
use crate::upstream::PreparedRequest;

/// Azure's `api-version` when the provider sets none.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

/// Azure's `api-version` for the Responses API when the provider sets none.
pub const DEFAULT_AZURE_RESPONSES_API_VERSION: &str = "2025-04-01-preview";

pub struct Azure;

impl ProviderAdapter for Azure {
    fn prepare(&self, call: &Call<'_>, candidate: &Candidate) -> Result<PreparedRequest, ApiError> {
        super::openai::prepare(call, candidate, |path| {
            let provider = &candidate.deployment.provider;
            if path == "/responses" {
                // The Responses API names the deployment in the body, not the path.
                let api_version = provider
                    .api_version
                    .as_deref()
                    .unwrap_or(DEFAULT_AZURE_RESPONSES_API_VERSION);
                return format!(
                    "{}/openai/responses?api-version={api_version}",
                    provider.base_url
                );
            }
            let api_version = provider
                .api_version
                .as_deref()
                .unwrap_or(DEFAULT_AZURE_API_VERSION);
            format!(
                "{}/openai/deployments/{}{path}?api-version={api_version}",
                provider.base_url, candidate.deployment.model,
            )
        })
    }

    /// Azure OpenAI takes the key in `api-key`.
    fn auth_header(&self, secret: &Secret) -> Option<(HeaderName, HeaderValue)> {
        super::secret_header(
            HeaderName::from_static("api-key"),
            secret.expose().to_owned(),
        )
    }

    fn translation(&self, call: &Call<'_>, candidate: &Candidate) -> Box<dyn ResponseTranslation> {
        super::openai::translation(call, candidate)
    }
}
