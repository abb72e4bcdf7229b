//! The environment: the seed's variables (`LLAMA_BASE_URL`, `DEFAULT_MODEL`,
//! `API_KEYS`), `LISTEN` and systemd's `STATE_DIRECTORY` laid over the file
//! before validation.
//!
//! It only edits the file schema; it must not import the runtime types or the
//! validation, and it reads the process environment only through
//! [`process_env`], passed in as an [`Env`] so tests can pass their own.

use super::schema::{FileConfig, KeyLimitsSection, KeySection, ModelSection};
use crate::policy::auth;

/// Reads the environment; a parameter so tests can pass their own.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The seed's variables (`LLAMA_BASE_URL`, `DEFAULT_MODEL`, `API_KEYS`)
/// and `LISTEN`.
pub fn apply_env(mut file: FileConfig, env: Env) -> FileConfig {
    // systemd's StateDirectory= sets STATE_DIRECTORY; the file's own
    // state_dir wins.
    if file.state_dir.is_none() {
        if let Some(dir) = env("STATE_DIRECTORY") {
            // Several directories are separated by ':'; the first is ours.
            let first = dir.split(':').next().unwrap_or_default().trim();
            file.state_dir = Some(first.into());
        }
    }
    if let Some(listen) = env("LISTEN") {
        file.listen = listen.trim().to_string();
    }
    if let Some(url) = env("LLAMA_BASE_URL") {
        file.upstream.url = Some(url.trim().to_string());
    }
    if let Some(model) = env("DEFAULT_MODEL") {
        let model = model.trim().to_string();
        let known = file
            .models
            .iter()
            .any(|m| m.name == model || m.aliases.contains(&model));
        if !known {
            file.models.push(ModelSection {
                name: model.clone(),
                aliases: vec![],
                upstream_name: None,
                owned_by: None,
                upstreams: Vec::new(),
            });
        }
        file.default_model = Some(model);
    }
    if let Some(keys) = env("API_KEYS") {
        let secrets = keys.split(',').map(str::trim).filter(|k| !k.is_empty());
        for (i, secret) in secrets.enumerate() {
            file.keys.push(KeySection {
                id: format!("env-{}", i + 1),
                sha256: auth::digest_hex(secret),
                models: None,
                limits: KeyLimitsSection::default(),
            });
        }
    }
    file
}

/// Warnings about `API_KEYS` values that look like placeholders. Only the
/// key's log id is named, never its value.
pub fn env_warnings(env: Env) -> Vec<String> {
    let Some(keys) = env("API_KEYS") else {
        return Vec::new();
    };
    keys.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .enumerate()
        .filter_map(|(i, secret)| {
            auth::placeholder_reason(secret).map(|why| {
                format!(
                    "API_KEYS: key env-{} looks like a placeholder ({why}); anyone may guess it: make a real one with `llm-edge gen-key`",
                    i + 1
                )
            })
        })
        .collect()
}
