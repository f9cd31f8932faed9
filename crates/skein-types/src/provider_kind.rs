//! The kinds of upstream provider Skein knows, with their wire protocol, default base URL and
//! the environment variable their official SDKs read the key from.

use serde::{Deserialize, Serialize};

/// How a provider is spoken to on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireProtocol {
    /// OpenAI's REST API, `Authorization: Bearer`.
    OpenAi,
    /// Azure OpenAI: deployment names in the path, `api-version` query, `api-key` header.
    Azure,
    /// Anthropic's Messages API, `x-api-key` and `anthropic-version`.
    Anthropic,
    /// Google Gemini `generateContent` / `streamGenerateContent`, `x-goog-api-key`.
    Gemini,
}

/// A provider kind, as written in config (`kind: openai`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProviderKind {
    #[serde(rename = "openai")]
    OpenAi,
    #[serde(rename = "azure")]
    Azure,
    #[serde(rename = "anthropic")]
    Anthropic,
    #[serde(rename = "gemini")]
    Gemini,
    #[serde(rename = "mistral")]
    Mistral,
    #[serde(rename = "groq")]
    Groq,
    #[serde(rename = "deepseek")]
    DeepSeek,
    #[serde(rename = "xai")]
    Xai,
    #[serde(rename = "openrouter")]
    OpenRouter,
    #[serde(rename = "together")]
    Together,
    #[serde(rename = "fireworks")]
    Fireworks,
    #[serde(rename = "cerebras")]
    Cerebras,
    #[serde(rename = "ollama")]
    Ollama,
    #[serde(rename = "vllm")]
    Vllm,
    /// Any other server that speaks the OpenAI API; needs a `base_url`.
    #[serde(rename = "openai_compatible")]
    OpenAiCompatible,
}

/// Every kind, for discovery from the environment and for docs.
pub const ALL_PROVIDER_KINDS: [ProviderKind; 15] = [
    ProviderKind::OpenAi,
    ProviderKind::Azure,
    ProviderKind::Anthropic,
    ProviderKind::Gemini,
    ProviderKind::Mistral,
    ProviderKind::Groq,
    ProviderKind::DeepSeek,
    ProviderKind::Xai,
    ProviderKind::OpenRouter,
    ProviderKind::Together,
    ProviderKind::Fireworks,
    ProviderKind::Cerebras,
    ProviderKind::Ollama,
    ProviderKind::Vllm,
    ProviderKind::OpenAiCompatible,
];

impl ProviderKind {
    /// Whether this kind's request paths carry the deployment's model name (Azure's
    /// deployment, Gemini's model), so the name must be one URL path segment.
    pub fn model_in_path(self) -> bool {
        matches!(self, ProviderKind::Azure | ProviderKind::Gemini)
    }

    /// The protocol this kind speaks.
    pub fn wire_protocol(self) -> WireProtocol {
        match self {
            ProviderKind::Azure => WireProtocol::Azure,
            ProviderKind::Anthropic => WireProtocol::Anthropic,
            ProviderKind::Gemini => WireProtocol::Gemini,
            _ => WireProtocol::OpenAi,
        }
    }

    /// The config spelling of this kind, also the default provider name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Azure => "azure",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Mistral => "mistral",
            ProviderKind::Groq => "groq",
            ProviderKind::DeepSeek => "deepseek",
            ProviderKind::Xai => "xai",
            ProviderKind::OpenRouter => "openrouter",
            ProviderKind::Together => "together",
            ProviderKind::Fireworks => "fireworks",
            ProviderKind::Cerebras => "cerebras",
            ProviderKind::Ollama => "ollama",
            ProviderKind::Vllm => "vllm",
            ProviderKind::OpenAiCompatible => "openai_compatible",
        }
    }

    /// The base URL used when config gives none. `None` where the user must say (Azure,
    /// custom servers).
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::OpenAi => Some("https://api.openai.com/v1"),
            ProviderKind::Anthropic => Some("https://api.anthropic.com"),
            ProviderKind::Gemini => Some("https://generativelanguage.googleapis.com"),
            ProviderKind::Mistral => Some("https://api.mistral.ai/v1"),
            ProviderKind::Groq => Some("https://api.groq.com/openai/v1"),
            ProviderKind::DeepSeek => Some("https://api.deepseek.com/v1"),
            ProviderKind::Xai => Some("https://api.x.ai/v1"),
            ProviderKind::OpenRouter => Some("https://openrouter.ai/api/v1"),
            ProviderKind::Together => Some("https://api.together.xyz/v1"),
            ProviderKind::Fireworks => Some("https://api.fireworks.ai/inference/v1"),
            ProviderKind::Cerebras => Some("https://api.cerebras.ai/v1"),
            ProviderKind::Ollama => Some("http://127.0.0.1:11434/v1"),
            ProviderKind::Vllm => Some("http://127.0.0.1:8000/v1"),
            ProviderKind::Azure | ProviderKind::OpenAiCompatible => None,
        }
    }

    /// The environment variable the official SDKs read this provider's key from.
    pub fn api_key_env(self) -> Option<&'static str> {
        match self {
            ProviderKind::OpenAi => Some("OPENAI_API_KEY"),
            ProviderKind::Azure => Some("AZURE_OPENAI_API_KEY"),
            ProviderKind::Anthropic => Some("ANTHROPIC_API_KEY"),
            ProviderKind::Gemini => Some("GEMINI_API_KEY"),
            ProviderKind::Mistral => Some("MISTRAL_API_KEY"),
            ProviderKind::Groq => Some("GROQ_API_KEY"),
            ProviderKind::DeepSeek => Some("DEEPSEEK_API_KEY"),
            ProviderKind::Xai => Some("XAI_API_KEY"),
            ProviderKind::OpenRouter => Some("OPENROUTER_API_KEY"),
            ProviderKind::Together => Some("TOGETHER_API_KEY"),
            ProviderKind::Fireworks => Some("FIREWORKS_API_KEY"),
            ProviderKind::Cerebras => Some("CEREBRAS_API_KEY"),
            ProviderKind::Ollama | ProviderKind::Vllm | ProviderKind::OpenAiCompatible => None,
        }
    }

    /// The environment variable that overrides the base URL, as the official SDKs honour it.
    pub fn base_url_env(self) -> Option<&'static str> {
        match self {
            ProviderKind::OpenAi => Some("OPENAI_BASE_URL"),
            ProviderKind::Anthropic => Some("ANTHROPIC_BASE_URL"),
            ProviderKind::Azure => Some("AZURE_OPENAI_ENDPOINT"),
            _ => None,
        }
    }

    /// Whether keys are optional (local servers usually run without one).
    pub fn key_optional(self) -> bool {
        matches!(
            self,
            ProviderKind::Ollama | ProviderKind::Vllm | ProviderKind::OpenAiCompatible
        )
    }
}
