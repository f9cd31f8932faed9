//! Validation of a [`SkeinConfig`]. A [`ValidatedConfig`] can only be built here, so code that
//! holds one may rely on every reference resolving and every number being in range.

use std::collections::BTreeSet;
use std::fmt;

use crate::config::{CONFIG_VERSION, SkeinConfig};

/// One problem found in a config, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: `routes[1].deployments[0].provider`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.path, self.message)
    }
}

/// A config that passed [`ValidatedConfig::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedConfig(SkeinConfig);

impl ValidatedConfig {
    /// Check every rule and return all problems at once.
    pub fn validate(config: SkeinConfig) -> Result<ValidatedConfig, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut report = |path: String, message: String| errors.push(ConfigError { path, message });

        if config.version != CONFIG_VERSION {
            report(
                "version".to_owned(),
                format!(
                    "unsupported config version {}, this build reads version {CONFIG_VERSION}",
                    config.version
                ),
            );
        }
        if config.server.max_body_bytes == 0 {
            report(
                "server.max_body_bytes".to_owned(),
                "must be above zero".to_owned(),
            );
        }
        if config.server.request_timeout_ms == 0 {
            report(
                "server.request_timeout".to_owned(),
                "must be above zero".to_owned(),
            );
        }

        let mut provider_names = BTreeSet::new();
        // Providers whose request paths carry the deployment's model name.
        let mut models_in_path = BTreeSet::new();
        for (index, provider) in config.providers.iter().enumerate() {
            let path = format!("providers[{index}]");
            if !is_valid_name(&provider.name) {
                report(
                    format!("{path}.name"),
                    format!(
                        "{:?} is not a valid name (letters, digits, `-`, `_`, `.`; no `/`)",
                        provider.name
                    ),
                );
            }
            if provider.kind.model_in_path() {
                models_in_path.insert(provider.name.as_str());
            }
            if !provider_names.insert(provider.name.as_str()) {
                report(
                    format!("{path}.name"),
                    format!("provider {:?} is declared twice", provider.name),
                );
            }
            match &provider.base_url {
                Some(url) => {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        report(
                            format!("{path}.base_url"),
                            format!("{url:?} must start with http:// or https://"),
                        );
                    } else if let Some(problem) = base_url_problem(url) {
                        report(format!("{path}.base_url"), format!("{url:?} {problem}"));
                    }
                }
                None => {
                    if provider.kind.default_base_url().is_none() {
                        report(
                            format!("{path}.base_url"),
                            format!(
                                "providers of kind {} need a base_url",
                                provider.kind.as_str()
                            ),
                        );
                    }
                }
            }
            if provider.keys.is_empty() && !provider.kind.key_optional() {
                report(
                    format!("{path}.keys"),
                    format!(
                        "providers of kind {} need at least one key",
                        provider.kind.as_str()
                    ),
                );
            }
            for (key_index, key) in provider.keys.iter().enumerate() {
                if key.weight == 0 {
                    report(
                        format!("{path}.keys[{key_index}].weight"),
                        "must be above zero".to_owned(),
                    );
                }
            }
            let breaker = &provider.circuit_breaker;
            if breaker.after_failures == 0 {
                report(
                    format!("{path}.circuit_breaker.after_failures"),
                    "must be above zero".to_owned(),
                );
            }
            if breaker.cooldown_ms == 0 || breaker.cooldown_ms > breaker.max_cooldown_ms {
                report(
                    format!("{path}.circuit_breaker.cooldown"),
                    "must be above zero and at most max_cooldown".to_owned(),
                );
            }
            for header in provider.headers.keys() {
                if header.is_empty() || !header.bytes().all(is_header_name_byte) {
                    report(
                        format!("{path}.headers"),
                        format!("{header:?} is not a valid header name"),
                    );
                }
            }
        }

        let route_names: BTreeSet<&str> = config
            .routes
            .iter()
            .map(|route| route.name.as_str())
            .collect();
        let mut seen_routes = BTreeSet::new();
        for (index, route) in config.routes.iter().enumerate() {
            let path = format!("routes[{index}]");
            if route.name.trim().is_empty() {
                report(format!("{path}.name"), "must not be empty".to_owned());
            }
            if !seen_routes.insert(route.name.as_str()) {
                report(
                    format!("{path}.name"),
                    format!("route {:?} is declared twice", route.name),
                );
            }
            if route.deployments.is_empty() {
                report(
                    format!("{path}.deployments"),
                    "needs at least one deployment".to_owned(),
                );
            }
            for (deployment_index, deployment) in route.deployments.iter().enumerate() {
                let deployment_path = format!("{path}.deployments[{deployment_index}]");
                if !provider_names.contains(deployment.provider.as_str()) {
                    report(
                        format!("{deployment_path}.provider"),
                        format!("no provider named {:?}", deployment.provider),
                    );
                }
                if deployment.model.trim().is_empty() {
                    report(
                        format!("{deployment_path}.model"),
                        "must not be empty".to_owned(),
                    );
                } else if models_in_path.contains(deployment.provider.as_str())
                    && !is_path_segment(&deployment.model)
                {
                    report(
                        format!("{deployment_path}.model"),
                        format!(
                            "{:?} goes into the provider's request path, so it may only hold \
                             letters, digits and -._~!$&'()*+,;=:@ (and not be . or ..)",
                            deployment.model
                        ),
                    );
                }
                if deployment.weight == 0 {
                    report(
                        format!("{deployment_path}.weight"),
                        "must be above zero".to_owned(),
                    );
                }
            }
            for (fallback_index, fallback) in route.fallbacks.iter().enumerate() {
                let fallback_path = format!("{path}.fallbacks[{fallback_index}]");
                if fallback == &route.name {
                    report(
                        fallback_path,
                        "a route cannot fall back to itself".to_owned(),
                    );
                } else if !route_names.contains(fallback.as_str()) {
                    report(fallback_path, format!("no route named {fallback:?}"));
                }
            }
            if route.attempt_timeout_ms == Some(0) {
                report(format!("{path}.timeout"), "must be above zero".to_owned());
            }
            if !(1..=10).contains(&route.retry.max_attempts) {
                report(
                    format!("{path}.retry.max_attempts"),
                    "must be between 1 and 10".to_owned(),
                );
            }
            if route.retry.initial_backoff_ms > route.retry.max_backoff_ms {
                report(
                    format!("{path}.retry.initial_backoff"),
                    "must not exceed max_backoff".to_owned(),
                );
            }
        }

        if errors.is_empty() {
            Ok(ValidatedConfig(config))
        } else {
            Err(errors)
        }
    }

    /// The validated config.
    pub fn config(&self) -> &SkeinConfig {
        &self.0
    }

    /// Give the config back, e.g. to serialize it.
    pub fn into_inner(self) -> SkeinConfig {
        self.0
    }
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

fn is_header_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Whether a byte may stand unescaped in one URL path segment (RFC 3986 `pchar`).
fn is_path_segment_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&byte)
}

/// Whether a model name can go into a request path as it is (for the provider kinds whose
/// [`ProviderKind::model_in_path`] holds): one non-empty path segment, not `.` or `..`.
pub fn is_path_segment(text: &str) -> bool {
    !text.is_empty() && text != "." && text != ".." && text.bytes().all(is_path_segment_byte)
}

/// Why a base URL that starts with a scheme cannot serve as one, if it cannot: request paths
/// are appended to it, so it must parse as a URL with a host, and have no query or fragment.
fn base_url_problem(url: &str) -> Option<&'static str> {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return Some("is not a valid URL");
    };
    if uri.host().is_none_or(str::is_empty) {
        return Some("has no host");
    }
    if uri.query().is_some() || url.contains('#') {
        return Some("must not have a query or fragment: request paths are appended to it");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeploymentSpec, KeySpec, ProviderSpec, RouteSpec};
    use crate::{CredentialRef, ProviderKind};

    fn provider(name: &str) -> ProviderSpec {
        ProviderSpec {
            name: name.to_owned(),
            kind: ProviderKind::OpenAi,
            base_url: None,
            headers: Default::default(),
            keys: vec![KeySpec {
                key: CredentialRef::Env("KEY".to_owned()),
                weight: 1,
                name: None,
                rpm: None,
                tpm: None,
            }],
            api_version: None,
            models: vec![],
            circuit_breaker: Default::default(),
        }
    }

    fn route(name: &str, provider: &str, fallbacks: &[&str]) -> RouteSpec {
        RouteSpec {
            name: name.to_owned(),
            strategy: Default::default(),
            deployments: vec![DeploymentSpec {
                provider: provider.to_owned(),
                model: "m".to_owned(),
                weight: 1,
                max_output_tokens: None,
            }],
            fallbacks: fallbacks.iter().map(|name| (*name).to_owned()).collect(),
            attempt_timeout_ms: None,
            retry: Default::default(),
        }
    }

    #[test]
    fn accepts_a_consistent_config() {
        let config = SkeinConfig {
            version: 1,
            server: Default::default(),
            providers: vec![provider("a")],
            routes: vec![route("x", "a", &["y"]), route("y", "a", &[])],
        };
        assert!(ValidatedConfig::validate(config).is_ok());
    }

    #[test]
    fn a_base_url_must_parse_with_a_host_and_no_query() {
        for (url, ok) in [
            ("http://127.0.0.1:8080/v1", true),
            ("https://api.example.test", true),
            ("https://api.example.test/openai/", true),
            ("http://", false),
            ("https://exa mple.test/v1", false),
            ("https://api.example.test/v1?key=1", false),
            ("https://api.example.test/v1#top", false),
            ("ftp://api.example.test", false),
        ] {
            let mut with_url = provider("a");
            with_url.base_url = Some(url.to_owned());
            let config = SkeinConfig {
                version: CONFIG_VERSION,
                server: Default::default(),
                providers: vec![with_url],
                routes: vec![route("x", "a", &[])],
            };
            let result = ValidatedConfig::validate(config);
            assert_eq!(result.is_ok(), ok, "{url}: {result:?}");
            if let Err(errors) = result {
                assert_eq!(errors[0].path, "providers[0].base_url", "{url}");
                assert!(errors[0].message.contains(url), "{errors:?}");
            }
        }
    }

    #[test]
    fn a_model_in_a_request_path_must_be_one_path_segment() {
        for (kind, model, ok) in [
            (ProviderKind::Gemini, "gemini-2.5-flash", true),
            (ProviderKind::Azure, "gpt-4o_prod.v2", true),
            (ProviderKind::Gemini, "gemini 2.5", false),
            (ProviderKind::Azure, "gpt-4o/../x", false),
            (ProviderKind::Azure, "gpt?x", false),
            (ProviderKind::Gemini, "..", false),
            // Other kinds send the model in the body, where anything goes.
            (ProviderKind::OpenAi, "my model/with slash", true),
        ] {
            let mut with_kind = provider("a");
            with_kind.kind = kind;
            with_kind.base_url = Some("https://api.example.test".to_owned());
            let mut in_route = route("x", "a", &[]);
            in_route.deployments[0].model = model.to_owned();
            let config = SkeinConfig {
                version: CONFIG_VERSION,
                server: Default::default(),
                providers: vec![with_kind],
                routes: vec![in_route],
            };
            let result = ValidatedConfig::validate(config);
            assert_eq!(result.is_ok(), ok, "{model}: {result:?}");
            if let Err(errors) = result {
                assert_eq!(errors[0].path, "routes[0].deployments[0].model", "{model}");
            }
        }
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let mut bad_provider = provider("a/b");
        bad_provider.kind = ProviderKind::Azure;
        let config = SkeinConfig {
            version: 2,
            server: Default::default(),
            providers: vec![bad_provider, provider("ok"), provider("ok")],
            routes: vec![route("x", "missing", &["x", "nowhere"])],
        };
        let errors = ValidatedConfig::validate(config).expect_err("invalid");
        let paths: Vec<&str> = errors.iter().map(|error| error.path.as_str()).collect();
        assert!(paths.contains(&"version"), "{paths:?}");
        assert!(paths.contains(&"providers[0].name"), "{paths:?}");
        assert!(paths.contains(&"providers[0].base_url"), "{paths:?}");
        assert!(paths.contains(&"providers[2].name"), "{paths:?}");
        assert!(
            paths.contains(&"routes[0].deployments[0].provider"),
            "{paths:?}"
        );
        assert!(paths.contains(&"routes[0].fallbacks[0]"), "{paths:?}");
        assert!(paths.contains(&"routes[0].fallbacks[1]"), "{paths:?}");
    }
}
