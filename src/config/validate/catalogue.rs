//! Validation of `models` (the public catalogue, each model routed to some
//! of the upstream servers) and `keys` (each allowed some of those models,
//! with its own limits).
//!
//! Builds the [`Catalogue`], the [`KeyTable`] and the per-key limits from the
//! schema; must not import anything outside `config` but the policy and
//! catalogue types it builds.

use std::collections::HashSet;

use super::upstream::valid_model_name;
use crate::config::runtime::UpstreamServer;
use crate::config::schema::{KeySection, ModelSection};
use crate::config::{err, ConfigError, DEFAULT_MODEL};
use crate::openai::models::{Catalogue, ModelRoute};
use crate::policy::auth::{self, ApiKey, KeyTable};
use crate::policy::limits::KeyLimits;
use crate::policy::tokens::TokenLimits;

pub(super) fn validate_models(
    models: Vec<ModelSection>,
    default_model: Option<String>,
    servers: &[UpstreamServer],
) -> Result<Catalogue, ConfigError> {
    let mut models = models;
    if models.is_empty() {
        models.push(ModelSection {
            name: default_model
                .clone()
                .unwrap_or_else(|| DEFAULT_MODEL.into()),
            aliases: vec![],
            upstream_name: None,
            owned_by: None,
            upstreams: Vec::new(),
        });
    }
    let mut seen = HashSet::new();
    let mut routes = Vec::with_capacity(models.len());
    for (i, m) in models.into_iter().enumerate() {
        if !valid_model_name(&m.name) {
            return Err(err(
                format!("models[{i}].name"),
                format!(
                    "'{}' is not a valid model name (non-empty, no spaces or control characters)",
                    m.name
                ),
            ));
        }
        if !seen.insert(m.name.clone()) {
            return Err(err(
                format!("models[{i}].name"),
                format!("'{}' is listed twice", m.name),
            ));
        }
        for (j, alias) in m.aliases.iter().enumerate() {
            if !valid_model_name(alias) {
                return Err(err(
                    format!("models[{i}].aliases[{j}]"),
                    format!("'{alias}' is not a valid model name"),
                ));
            }
            if !seen.insert(alias.clone()) {
                return Err(err(
                    format!("models[{i}].aliases[{j}]"),
                    format!("'{alias}' is already used by another model or alias"),
                ));
            }
        }
        let upstream_name = m.upstream_name.unwrap_or_else(|| m.name.clone());
        if upstream_name.is_empty() {
            return Err(err(
                format!("models[{i}].upstream_name"),
                "must not be empty",
            ));
        }
        let mut upstreams = Vec::with_capacity(m.upstreams.len());
        for (j, wanted) in m.upstreams.iter().enumerate() {
            let index = servers
                .iter()
                .position(|s| &s.name == wanted)
                .ok_or_else(|| {
                    let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
                    err(
                        format!("models[{i}].upstreams[{j}]"),
                        format!(
                            "'{wanted}' is not one of upstream.servers: {}",
                            names.join(", ")
                        ),
                    )
                })?;
            if upstreams.contains(&index) {
                return Err(err(
                    format!("models[{i}].upstreams[{j}]"),
                    format!("'{wanted}' is listed twice"),
                ));
            }
            upstreams.push(index);
        }
        routes.push(ModelRoute {
            name: m.name.into(),
            aliases: m.aliases,
            upstream_name,
            owned_by: m.owned_by.unwrap_or_else(|| "llm-edge".into()),
            upstreams,
        });
    }
    let default = default_model.unwrap_or_else(|| routes[0].name.to_string());
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if !seen.contains(&default) {
        return Err(err(
            "default_model",
            format!("'{default}' is not one of the models or aliases listed under models"),
        ));
    }
    Catalogue::new(routes, &default, created)
        .ok_or_else(|| err("models", "names and aliases must be unique"))
}

pub(super) fn validate_keys(
    keys: Vec<KeySection>,
    catalogue: &Catalogue,
    allow_anonymous: bool,
) -> Result<KeyTable, ConfigError> {
    let mut ids = HashSet::new();
    let mut digests = HashSet::new();
    let mut table = Vec::with_capacity(keys.len());
    for (i, k) in keys.into_iter().enumerate() {
        if k.id.is_empty()
            || k.id.len() > 64
            || !k
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(err(
                format!("keys[{i}].id"),
                format!("'{}' must be 1-64 characters of letters, digits, '-', '_' or '.' (it appears in logs and metrics)", k.id),
            ));
        }
        if k.id == "anonymous" || k.id == "invalid" {
            return Err(err(
                format!("keys[{i}].id"),
                format!("'{}' is reserved for requests without a valid key", k.id),
            ));
        }
        if !ids.insert(k.id.clone()) {
            return Err(err(
                format!("keys[{i}].id"),
                format!("'{}' is used twice", k.id),
            ));
        }
        let digest = parse_digest(&k.sha256).ok_or_else(|| {
            err(
                format!("keys[{i}].sha256"),
                "must be 64 hex characters: the SHA-256 of the key, as printed by `llm-edge hash-key`",
            )
        })?;
        if let Some(example) = auth::example_key_for(&digest) {
            return Err(err(
                format!("keys[{i}].sha256"),
                format!("key '{}' is the example key \"{example}\" from llm-edge's documentation, which anyone can read; make a key of your own with `llm-edge gen-key --id {}`", k.id, k.id),
            ));
        }
        if !digests.insert(digest) {
            return Err(err(
                format!("keys[{i}].sha256"),
                "the same key is configured twice",
            ));
        }
        let allowed = match k.models {
            None => None,
            Some(list) => {
                let mut names = Vec::with_capacity(list.len());
                for (j, name) in list.iter().enumerate() {
                    let route = catalogue.resolve(Some(name)).ok_or_else(|| {
                        err(
                            format!("keys[{i}].models[{j}]"),
                            format!("'{name}' is not a configured model or alias"),
                        )
                    })?;
                    names.push(route.name.to_string());
                }
                Some(names)
            }
        };
        table.push(ApiKey::new(k.id, digest, allowed));
    }
    Ok(KeyTable::new(table, allow_anonymous))
}

pub(super) fn validate_key_limits(
    keys: &[KeySection],
) -> Result<Vec<(String, KeyLimits)>, ConfigError> {
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let l = &k.limits;
        for (field, value) in [
            ("requests_per_minute", l.requests_per_minute.map(u64::from)),
            ("max_concurrent", l.max_concurrent.map(u64::from)),
            ("max_tokens", l.max_tokens),
            ("tokens_per_minute", l.tokens_per_minute),
            ("tokens_per_day", l.tokens_per_day),
            ("tokens_per_month", l.tokens_per_month),
        ] {
            if value == Some(0) {
                return Err(err(
                    format!("keys[{i}].limits.{field}"),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
        }
        let limits = KeyLimits {
            requests_per_minute: l.requests_per_minute,
            max_concurrent: l.max_concurrent,
            max_tokens: l.max_tokens,
            over_max_tokens: l.over_max_tokens,
            tokens: TokenLimits {
                per_minute: l.tokens_per_minute,
                per_day: l.tokens_per_day,
                per_month: l.tokens_per_month,
            },
        };
        if limits != KeyLimits::default() {
            out.push((k.id.clone(), limits));
        }
    }
    Ok(out)
}

fn parse_digest(hex_digest: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(hex_digest.trim()).ok()?;
    bytes.try_into().ok()
}
