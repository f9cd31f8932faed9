//! The admin API's typed entities (`skein.admin.v1.Entity`) and the config file's schema, each
//! way. A typed write becomes the entity's JSON in the config file's schema, which then goes
//! through the same parsing, defaults and validation as the file and the CLI's `--json`; a
//! read turns the stored entity into its message.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value, json};
use skein_proto::admin::v1 as pb;
use skein_proto::admin::v1::entity::Entity as Typed;
use skein_types::config::{ProviderSpec, RouteSpec};
use skein_types::control::{
    Budget, BudgetPeriod, CalendarUnit, Customer, Limits, Price, Scope, Team, VirtualKey,
};
use tonic::Status;

use pb::Kind;

fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("entity.{field}: {message}"))
}

/// The kind of a typed entity.
pub fn kind_of(entity: &pb::Entity) -> Result<Kind, Status> {
    Ok(match &entity.entity {
        Some(Typed::Provider(_)) => Kind::Provider,
        Some(Typed::Route(_)) => Kind::Route,
        Some(Typed::Key(_)) => Kind::Key,
        Some(Typed::Team(_)) => Kind::Team,
        Some(Typed::Customer(_)) => Kind::Customer,
        Some(Typed::Budget(_)) => Kind::Budget,
        Some(Typed::Price(_)) => Kind::Price,
        None => return Err(Status::invalid_argument("entity: must hold one entity")),
    })
}

fn limits_json(limits: Option<&pb::Limits>) -> Value {
    let mut out = Map::new();
    if let Some(limits) = limits {
        if let Some(rpm) = limits.rpm {
            out.insert("rpm".into(), rpm.into());
        }
        if let Some(tpm) = limits.tpm {
            out.insert("tpm".into(), tpm.into());
        }
        if let Some(parallel) = limits.max_parallel {
            out.insert("max_parallel".into(), parallel.into());
        }
    }
    Value::Object(out)
}

fn metadata_json(metadata: &HashMap<String, String>) -> Value {
    let sorted: BTreeMap<&String, &String> = metadata.iter().collect();
    json!(sorted)
}

fn non_empty(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// A typed entity as JSON in the config file's schema (what `Create` and `Update` store).
pub fn to_config_json(entity: &pb::Entity) -> Result<(Kind, Value), Status> {
    let kind = kind_of(entity)?;
    let value = match &entity.entity {
        Some(Typed::Provider(provider)) => {
            let keys: Vec<Value> = provider
                .keys
                .iter()
                .map(|key| {
                    let mut out = json!({"key": key.key});
                    if let Some(weight) = key.weight {
                        out["weight"] = weight.into();
                    }
                    if let Some(name) = non_empty(&key.name) {
                        out["name"] = name.into();
                    }
                    if let Some(rpm) = key.rpm {
                        out["rpm"] = rpm.into();
                    }
                    if let Some(tpm) = key.tpm {
                        out["tpm"] = tpm.into();
                    }
                    out
                })
                .collect();
            let mut out = json!({"name": provider.name, "kind": provider.kind, "keys": keys});
            if let Some(base_url) = non_empty(&provider.base_url) {
                out["base_url"] = base_url.into();
            }
            if !provider.headers.is_empty() {
                out["headers"] = metadata_json(&provider.headers);
            }
            if let Some(version) = non_empty(&provider.api_version) {
                out["api_version"] = version.into();
            }
            if !provider.models.is_empty() {
                out["models"] = json!(provider.models);
            }
            if let Some(breaker) = &provider.circuit_breaker {
                let mut spec = Map::new();
                if let Some(after) = breaker.after_failures {
                    spec.insert("after_failures".into(), after.into());
                }
                if let Some(cooldown) = breaker.cooldown_ms {
                    spec.insert("cooldown".into(), format!("{cooldown}ms").into());
                }
                if let Some(most) = breaker.max_cooldown_ms {
                    spec.insert("max_cooldown".into(), format!("{most}ms").into());
                }
                out["circuit_breaker"] = Value::Object(spec);
            }
            out
        }
        Some(Typed::Route(route)) => {
            let deployments: Vec<Value> = route
                .deployments
                .iter()
                .map(|deployment| {
                    let mut out =
                        json!({"provider": deployment.provider, "model": deployment.model});
                    if let Some(weight) = deployment.weight {
                        out["weight"] = weight.into();
                    }
                    if let Some(most) = deployment.max_output_tokens {
                        out["max_output_tokens"] = most.into();
                    }
                    out
                })
                .collect();
            let mut out = json!({"name": route.name, "deployments": deployments});
            if let Some(strategy) = non_empty(&route.strategy) {
                out["strategy"] = strategy.into();
            }
            if !route.fallbacks.is_empty() {
                out["fallbacks"] = json!(route.fallbacks);
            }
            if let Some(timeout) = route.timeout_ms {
                out["timeout"] = format!("{timeout}ms").into();
            }
            if let Some(retry) = &route.retry {
                let mut spec = Map::new();
                if let Some(attempts) = retry.max_attempts {
                    spec.insert("max_attempts".into(), attempts.into());
                }
                if let Some(initial) = retry.initial_backoff_ms {
                    spec.insert("initial_backoff".into(), format!("{initial}ms").into());
                }
                if let Some(most) = retry.max_backoff_ms {
                    spec.insert("max_backoff".into(), format!("{most}ms").into());
                }
                out["retry"] = Value::Object(spec);
            }
            out
        }
        Some(Typed::Key(key)) => {
            // The hash and prefix are the stored key's (the caller fills them in).
            let mut out = json!({
                "id": key.id, "name": key.name, "hash": "", "prefix": key.prefix,
                "models": key.models, "limits": limits_json(key.limits.as_ref()),
                "revoked": key.revoked, "metadata": metadata_json(&key.metadata),
            });
            if let Some(owner) = non_empty(&key.owner) {
                out["owner"] = owner.into();
            }
            if let Some(team) = non_empty(&key.team) {
                out["team"] = team.into();
            }
            if let Some(expires) = key.expires_at_ms {
                out["expires_at_ms"] = expires.into();
            }
            out
        }
        Some(Typed::Team(team)) => {
            let mut out = json!({
                "id": team.id, "name": team.name, "models": team.models,
                "limits": limits_json(team.limits.as_ref()), "metadata": metadata_json(&team.metadata),
            });
            if let Some(customer) = non_empty(&team.customer) {
                out["customer"] = customer.into();
            }
            out
        }
        Some(Typed::Customer(customer)) => json!({
            "id": customer.id, "name": customer.name,
            "limits": limits_json(customer.limits.as_ref()), "metadata": metadata_json(&customer.metadata),
        }),
        Some(Typed::Budget(budget)) => {
            let scope = budget
                .scope
                .as_ref()
                .ok_or_else(|| invalid("budget.scope", "required"))?;
            let level = match scope.level() {
                pb::scope::Level::Key => "key",
                pb::scope::Level::Team => "team",
                pb::scope::Level::Customer => "customer",
                pb::scope::Level::Unspecified => {
                    return Err(invalid("budget.scope.level", "key, team or customer"));
                }
            };
            let period = match budget
                .period
                .as_ref()
                .and_then(|period| period.period.as_ref())
            {
                Some(pb::budget_period::Period::Calendar(calendar)) => {
                    let unit = match calendar.unit() {
                        pb::calendar_period::Unit::Day => "day",
                        pb::calendar_period::Unit::Week => "week",
                        pb::calendar_period::Unit::Month => "month",
                        pb::calendar_period::Unit::Unspecified => {
                            return Err(invalid(
                                "budget.period.calendar.unit",
                                "day, week or month",
                            ));
                        }
                    };
                    let zone = non_empty(&calendar.time_zone).unwrap_or("UTC");
                    json!({"calendar": {"unit": unit, "time_zone": zone}})
                }
                Some(pb::budget_period::Period::Rolling(rolling)) => {
                    json!({"rolling": {"window_ms": rolling.window_ms}})
                }
                Some(pb::budget_period::Period::Lifetime(_)) => json!("lifetime"),
                None => return Err(invalid("budget.period", "required")),
            };
            json!({
                "id": budget.id, "scope": {"kind": level, "id": scope.id},
                "limit_nanos": budget.limit_nanos, "period": period,
                "hard": budget.hard.unwrap_or(true),
            })
        }
        Some(Typed::Price(price)) => {
            let mut out = json!({
                "model": price.model, "input_nanos_per_token": price.input_nanos_per_token,
                "output_nanos_per_token": price.output_nanos_per_token,
            });
            if let Some(cached) = price.cached_input_nanos_per_token {
                out["cached_input_nanos_per_token"] = cached.into();
            }
            out
        }
        None => return Err(Status::invalid_argument("entity: must hold one entity")),
    };
    Ok((kind, value))
}

fn limits_pb(limits: &Limits) -> pb::Limits {
    pb::Limits {
        rpm: limits.rpm,
        tpm: limits.tpm,
        max_parallel: limits.max_parallel,
    }
}

fn metadata_pb(metadata: &BTreeMap<String, String>) -> HashMap<String, String> {
    metadata
        .iter()
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// The label serde gives a unit enum variant (`"openai_compatible"`).
fn label<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A stored entity (its JSON in the config file's schema) as its message.
pub fn entity_of(kind: Kind, json: &str) -> Result<pb::Entity, Status> {
    let name = crate::admin::kind_name(kind);
    let internal = |error: serde_json::Error| {
        Status::invalid_argument(format!("json: not a valid {name}: {error}"))
    };
    let entity = match kind {
        Kind::Unspecified => return Err(Status::invalid_argument("kind: must be given")),
        Kind::Provider => {
            let provider: ProviderSpec = serde_json::from_str(json).map_err(internal)?;
            Typed::Provider(pb::Provider {
                name: provider.name.clone(),
                kind: label(&provider.kind),
                base_url: provider.base_url.clone().unwrap_or_default(),
                headers: metadata_pb(&provider.headers),
                keys: provider
                    .keys
                    .iter()
                    .map(|key| pb::ProviderKey {
                        key: label(&key.key),
                        weight: Some(key.weight),
                        name: key.name.clone().unwrap_or_default(),
                        rpm: key.rpm,
                        tpm: key.tpm,
                    })
                    .collect(),
                api_version: provider.api_version.clone().unwrap_or_default(),
                models: provider.models.clone(),
                circuit_breaker: Some(pb::CircuitBreaker {
                    after_failures: Some(provider.circuit_breaker.after_failures),
                    cooldown_ms: Some(provider.circuit_breaker.cooldown_ms),
                    max_cooldown_ms: Some(provider.circuit_breaker.max_cooldown_ms),
                }),
            })
        }
        Kind::Route => {
            let route: RouteSpec = serde_json::from_str(json).map_err(internal)?;
            Typed::Route(pb::Route {
                name: route.name.clone(),
                strategy: label(&route.strategy),
                deployments: route
                    .deployments
                    .iter()
                    .map(|deployment| pb::Deployment {
                        provider: deployment.provider.clone(),
                        model: deployment.model.clone(),
                        weight: Some(deployment.weight),
                        max_output_tokens: deployment.max_output_tokens,
                    })
                    .collect(),
                fallbacks: route.fallbacks.clone(),
                timeout_ms: route.attempt_timeout_ms,
                retry: Some(pb::Retry {
                    max_attempts: Some(route.retry.max_attempts),
                    initial_backoff_ms: Some(route.retry.initial_backoff_ms),
                    max_backoff_ms: Some(route.retry.max_backoff_ms),
                }),
            })
        }
        Kind::Key => {
            let key: VirtualKey = serde_json::from_str(json).map_err(internal)?;
            Typed::Key(pb::VirtualKey {
                id: key.id,
                name: key.name,
                prefix: key.prefix,
                owner: key.owner.unwrap_or_default(),
                team: key.team.unwrap_or_default(),
                models: key.models,
                limits: Some(limits_pb(&key.limits)),
                expires_at_ms: key.expires_at_ms,
                revoked: key.revoked,
                metadata: metadata_pb(&key.metadata),
                created_at_ms: key.created_at_ms,
                updated_at_ms: key.updated_at_ms,
            })
        }
        Kind::Team => {
            let team: Team = serde_json::from_str(json).map_err(internal)?;
            Typed::Team(pb::Team {
                id: team.id,
                name: team.name,
                customer: team.customer.unwrap_or_default(),
                models: team.models,
                limits: Some(limits_pb(&team.limits)),
                metadata: metadata_pb(&team.metadata),
            })
        }
        Kind::Customer => {
            let customer: Customer = serde_json::from_str(json).map_err(internal)?;
            Typed::Customer(pb::Customer {
                id: customer.id,
                name: customer.name,
                limits: Some(limits_pb(&customer.limits)),
                metadata: metadata_pb(&customer.metadata),
            })
        }
        Kind::Budget => {
            let budget: Budget = serde_json::from_str(json).map_err(internal)?;
            let (level, id) = match budget.scope {
                Scope::Key(id) => (pb::scope::Level::Key, id),
                Scope::Team(id) => (pb::scope::Level::Team, id),
                Scope::Customer(id) => (pb::scope::Level::Customer, id),
            };
            let period = match budget.period {
                BudgetPeriod::Calendar { unit, time_zone } => {
                    let unit = match unit {
                        CalendarUnit::Day => pb::calendar_period::Unit::Day,
                        CalendarUnit::Week => pb::calendar_period::Unit::Week,
                        CalendarUnit::Month => pb::calendar_period::Unit::Month,
                    };
                    pb::budget_period::Period::Calendar(pb::CalendarPeriod {
                        unit: unit as i32,
                        time_zone,
                    })
                }
                BudgetPeriod::Rolling { window_ms } => {
                    pb::budget_period::Period::Rolling(pb::RollingPeriod { window_ms })
                }
                BudgetPeriod::Lifetime => {
                    pb::budget_period::Period::Lifetime(pb::LifetimePeriod {})
                }
            };
            Typed::Budget(pb::Budget {
                id: budget.id,
                scope: Some(pb::Scope {
                    level: level as i32,
                    id,
                }),
                limit_nanos: budget.limit_nanos,
                period: Some(pb::BudgetPeriod {
                    period: Some(period),
                }),
                hard: Some(budget.hard),
            })
        }
        Kind::Price => {
            let price: Price = serde_json::from_str(json).map_err(internal)?;
            Typed::Price(pb::Price {
                model: price.model,
                input_nanos_per_token: price.input_nanos_per_token,
                output_nanos_per_token: price.output_nanos_per_token,
                cached_input_nanos_per_token: price.cached_input_nanos_per_token,
            })
        }
    };
    Ok(pb::Entity {
        entity: Some(entity),
    })
}

/// A resource as reads return it: the entity typed, and as JSON.
pub fn resource(kind: Kind, id: String, json: String) -> Result<pb::Resource, Status> {
    let entity = entity_of(kind, &json)?;
    Ok(pb::Resource {
        kind: kind as i32,
        id,
        json,
        entity: Some(entity),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind: config JSON → message → config JSON → the same entity.
    #[test]
    fn every_entity_survives_the_trip_through_its_message() {
        let cases = [
            (
                Kind::Provider,
                r#"{"name":"p","kind":"openai_compatible","base_url":"http://127.0.0.1:1/v1","headers":{"x-a":"b"},"keys":[{"key":"env:K","weight":2,"name":"k1","rpm":10}],"models":["m"],"circuit_breaker":{"after_failures":4,"cooldown":"3s","max_cooldown":"1m"}}"#,
            ),
            (
                Kind::Route,
                r#"{"name":"r","strategy":"ordered","deployments":[{"provider":"p","model":"m","weight":3,"max_output_tokens":100}],"fallbacks":["other"],"timeout":"20s","retry":{"max_attempts":2,"initial_backoff":"50ms","max_backoff":"2s"}}"#,
            ),
            (
                Kind::Team,
                r#"{"id":"t","name":"Team","customer":"c","models":["m"],"limits":{"rpm":5},"metadata":{"a":"b"}}"#,
            ),
            (
                Kind::Customer,
                r#"{"id":"c","name":"C","limits":{"tpm":7,"max_parallel":2}}"#,
            ),
            (
                Kind::Budget,
                r#"{"id":"b","scope":{"kind":"team","id":"t"},"limit_nanos":5,"period":{"calendar":{"unit":"week","time_zone":"Europe/Paris"}},"hard":false}"#,
            ),
            (
                Kind::Budget,
                r#"{"id":"b2","scope":{"kind":"key","id":"k"},"limit_nanos":5,"period":{"rolling":{"window_ms":60000}}}"#,
            ),
            (
                Kind::Price,
                r#"{"model":"m","input_nanos_per_token":1,"output_nanos_per_token":2,"cached_input_nanos_per_token":0}"#,
            ),
        ];
        for (kind, json) in cases {
            let typed = entity_of(kind, json).expect("typed");
            let (back_kind, back) = to_config_json(&typed).expect("json");
            assert_eq!(back_kind, kind);
            let again = entity_of(kind, &back.to_string()).expect("typed again");
            assert_eq!(again, typed, "{json}");
        }
    }

    #[test]
    fn a_typed_entity_missing_what_it_needs_is_refused_with_the_field() {
        let budget = pb::Entity {
            entity: Some(Typed::Budget(pb::Budget {
                id: "b".into(),
                ..Default::default()
            })),
        };
        let error = to_config_json(&budget).expect_err("no scope");
        assert!(error.message().contains("entity.budget.scope"), "{error}");
        let empty = pb::Entity { entity: None };
        assert!(to_config_json(&empty).is_err());
    }
}
