//! Azure OpenAI: OpenAI's API with the deployment in the path and an `api-version` query.

use skein_core::Candidate;

use super::ProviderAdapter;
use crate::error::ApiError;
use crate::inbound::Call;
use crate::translate::ResponseTranslation;
use crate::upstream::PreparedRequest;

/// Azure's `api-version` when the provider sets none.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

pub struct Azure;

impl ProviderAdapter for Azure {
    fn prepare(&self, call: &Call<'_>, candidate: &Candidate) -> Result<PreparedRequest, ApiError> {
        super::openai::prepare(call, candidate, |path| {
            let provider = &candidate.deployment.provider;
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

    fn translation(&self, call: &Call<'_>, _candidate: &Candidate) -> Box<dyn ResponseTranslation> {
        call.from_openai_chat()
    }
}
