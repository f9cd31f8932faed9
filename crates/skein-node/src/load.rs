//! Loading a config: from a YAML file (versioned, unknown keys rejected with their line), or,
//! with no file, from the providers' well-known environment variables. Credentials are
//! resolved last, from references only.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use skein_core::RuntimeConfig;
use skein_types::provider_kind::ALL_PROVIDER_KINDS;
use skein_types::{
    CredentialRef, KeySpec, ProviderKind, ProviderSpec, SkeinConfig, ValidatedConfig,
};

use crate::env::Environment;

/// Where the config came from, for the startup log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    Environment,
}

/// Parse and validate config text. Errors name the line (syntax, unknown keys) or the field
/// path (validation).
pub fn parse_config_text(text: &str, origin: &str) -> anyhow::Result<ValidatedConfig> {
    let config: SkeinConfig =
        serde_norway::from_str(text).map_err(|error| anyhow::anyhow!("{origin}: {error}"))?;
    ValidatedConfig::validate(config).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|error| format!("  - {error}")).collect();
        anyhow::anyhow!("{origin} is not valid:\n{}", lines.join("\n"))
    })
}

/// Load the config from `path`, or discover providers from the environment without one.
pub fn load_config(
    path: Option<&Path>,
    env: &dyn Environment,
) -> anyhow::Result<(ValidatedConfig, ConfigSource)> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let validated = parse_config_text(&text, &path.display().to_string())?;
            Ok((validated, ConfigSource::File(path.to_owned())))
        }
        None => {
            let config = SkeinConfig {
                version: skein_types::config::CONFIG_VERSION,
                server: Default::default(),
                providers: discover_providers(env),
                routes: Vec::new(),
            };
            let validated = ValidatedConfig::validate(config).map_err(|errors| {
                let lines: Vec<String> =
                    errors.iter().map(|error| format!("  - {error}")).collect();
                anyhow::anyhow!(
                    "providers discovered from the environment are not valid:\n{}",
                    lines.join("\n")
                )
            })?;
            Ok((validated, ConfigSource::Environment))
        }
    }
}

/// One provider per kind whose API key variable is set (`OPENAI_API_KEY`…), with the base URL
/// variables the official SDKs honour (`OPENAI_BASE_URL`, `ANTHROPIC_BASE_URL`).
pub fn discover_providers(env: &dyn Environment) -> Vec<ProviderSpec> {
    let mut providers = Vec::new();
    for kind in ALL_PROVIDER_KINDS {
        let Some(key_variable) = kind.api_key_env() else {
            continue;
        };
        if env.var(key_variable).is_none() {
            continue;
        }
        let base_url = kind.base_url_env().and_then(|variable| env.var(variable));
        if kind == ProviderKind::Azure && base_url.is_none() {
            tracing::warn!(
                "AZURE_OPENAI_API_KEY is set but AZURE_OPENAI_ENDPOINT is not; Azure is skipped"
            );
            continue;
        }
        providers.push(ProviderSpec {
            name: kind.as_str().to_owned(),
            kind,
            base_url: base_url.map(|url| url.trim_end_matches('/').to_owned()),
            headers: Default::default(),
            keys: vec![KeySpec {
                key: CredentialRef::Env(key_variable.to_owned()),
                weight: 1,
                name: None,
                rpm: None,
                tpm: None,
            }],
            api_version: if kind == ProviderKind::Azure {
                env.var("OPENAI_API_VERSION")
            } else {
                None
            },
            models: Vec::new(),
            circuit_breaker: Default::default(),
        });
    }
    providers
}

/// Read a credential reference.
pub fn resolve_credential(
    reference: &CredentialRef,
    env: &dyn Environment,
) -> Result<String, String> {
    match reference {
        CredentialRef::Env(name) => env
            .var(name)
            .map(|value| value.trim().to_owned())
            .ok_or_else(|| format!("environment variable {name} is not set")),
        CredentialRef::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|error| format!("cannot read {path}: {error}"))?;
            let value = text.trim_end_matches(['\n', '\r']).to_owned();
            if value.is_empty() {
                return Err(format!("{path} is empty"));
            }
            Ok(value)
        }
    }
}

/// Resolve credentials and build the runtime view.
pub fn build_runtime(
    validated: &ValidatedConfig,
    env: &dyn Environment,
) -> anyhow::Result<RuntimeConfig> {
    let resolve = |reference: &CredentialRef| resolve_credential(reference, env);
    match RuntimeConfig::build(validated, &resolve) {
        Ok(runtime) => Ok(runtime),
        Err(errors) => {
            let lines: Vec<String> = errors.iter().map(|error| format!("  - {error}")).collect();
            bail!("cannot resolve the config:\n{}", lines.join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MapEnvironment;

    #[test]
    fn discovers_providers_from_sdk_variables() {
        let env = MapEnvironment::from_pairs([
            ("OPENAI_API_KEY", "sk-1"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
            ("ANTHROPIC_API_KEY", "a-1"),
            ("GROQ_API_KEY", ""),
        ]);
        let providers = discover_providers(&env);
        let names: Vec<&str> = providers
            .iter()
            .map(|provider| provider.name.as_str())
            .collect();
        assert_eq!(names, vec!["openai", "anthropic"]);
        assert_eq!(
            providers[0].base_url.as_deref(),
            Some("http://127.0.0.1:9/v1")
        );
        let (validated, _) = load_config(None, &env).expect("valid");
        let runtime = build_runtime(&validated, &env).expect("resolves");
        assert!(
            runtime.resolve("gpt-4o").is_ok(),
            "bare OpenAI names route to the openai provider"
        );
        assert!(runtime.resolve("anthropic/claude-sonnet-4-5").is_ok());
    }

    #[test]
    fn missing_secrets_and_bad_files_are_named() {
        let text =
            "version: 1\nproviders:\n  - name: a\n    kind: openai\n    keys: [{key: env:NOPE}]\n";
        let validated = parse_config_text(text, "test.yaml").expect("valid");
        let error = build_runtime(&validated, &MapEnvironment::default()).expect_err("unresolved");
        assert!(
            error
                .to_string()
                .contains("providers[0].keys[0].key: environment variable NOPE is not set"),
            "{error}"
        );
        let error =
            parse_config_text("version: 1\nrouts: []\n", "test.yaml").expect_err("unknown key");
        assert!(
            error.to_string().contains("routs") && error.to_string().contains("line 2"),
            "{error}"
        );
        let error = parse_config_text("version: 7\n", "test.yaml").expect_err("version");
        assert!(
            error.to_string().contains("unsupported config version 7"),
            "{error}"
        );
    }
}
