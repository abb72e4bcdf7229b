//! Settings: the gateway's address and everything else a run needs,
//! resolved from the flags, then `LLM_*`, then the seed's `TEST_*` variables.
//! Pure; a bad value here is a usage error (exit code 2).

use std::time::Duration;

use crate::cli::CheckArgs;

const MAX_TIMEOUT_SECS: u64 = 86_400;

/// The gateway's address, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// Without `/v1` and without a trailing slash: `/health` lives here.
    pub root: String,
    /// `root` + `/v1`: the OpenAI API.
    pub api: String,
    pub host: String,
    pub port: u16,
    pub https: bool,
}

/// Accepts the URL with or without `/v1` and with or without a trailing slash.
pub fn normalize_base_url(raw: &str) -> Result<BaseUrl, String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err("the base URL is empty".into());
    }
    let url = reqwest::Url::parse(trimmed).map_err(|e| {
        format!("invalid base URL '{trimmed}': {e} (expected e.g. http://HOST:8000/v1)")
    })?;
    let https = match url.scheme() {
        "http" => false,
        "https" => true,
        other => {
            return Err(format!(
                "invalid base URL '{trimmed}': scheme '{other}' (use http:// or https://)"
            ))
        }
    };
    let host = match url.host_str() {
        Some(h) if !h.is_empty() => h.to_string(),
        _ => return Err(format!("invalid base URL '{trimmed}': no host")),
    };
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "invalid base URL '{trimmed}': no query or fragment allowed"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "invalid base URL '{trimmed}': credentials in the URL are not supported (use --api-key)"
        ));
    }
    let port = url
        .port_or_known_default()
        .unwrap_or(if https { 443 } else { 80 });
    let mut path = url.path().trim_end_matches('/');
    if let Some(p) = path.strip_suffix("/v1") {
        path = p.trim_end_matches('/');
    }
    let root = format!("{}{path}", url.origin().ascii_serialization());
    Ok(BaseUrl {
        api: format!("{root}/v1"),
        root,
        host,
        port,
        https,
    })
}

/// Everything a check run needs, resolved from the flags and the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub base: BaseUrl,
    pub api_key: Option<String>,
    /// Where the key came from (`--api-key` or the variable's name).
    pub key_source: Option<&'static str>,
    pub model: Option<String>,
    pub json: bool,
    pub timeout: Duration,
}

/// The flag, else the first non-empty variable of `vars`.
fn pick(
    flag: Option<&str>,
    flag_name: &'static str,
    vars: [&'static str; 2],
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<(String, &'static str)> {
    let non_empty = |v: String| {
        let t = v.trim();
        (!t.is_empty()).then(|| t.to_string())
    };
    if let Some(v) = flag.map(str::to_string).and_then(non_empty) {
        return Some((v, flag_name));
    }
    vars.iter()
        .find_map(|name| env(name).and_then(non_empty).map(|v| (v, *name)))
}

/// Flags first, then `LLM_*`, then the seed's `TEST_*` variables.
pub fn resolve_settings(
    args: &CheckArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, String> {
    let Some((raw_url, _)) = pick(
        args.base_url.as_deref(),
        "--base-url",
        ["LLM_BASE_URL", "TEST_BASE_URL"],
        env,
    ) else {
        return Err(
            "no gateway URL: pass --base-url http://HOST:8000/v1 or set LLM_BASE_URL".into(),
        );
    };
    let base = normalize_base_url(&raw_url)?;
    if args.timeout == 0 || args.timeout > MAX_TIMEOUT_SECS {
        return Err(format!(
            "--timeout must be between 1 and {MAX_TIMEOUT_SECS} seconds"
        ));
    }
    let key = pick(
        args.api_key.as_deref(),
        "--api-key",
        ["LLM_API_KEY", "TEST_API_KEY"],
        env,
    );
    let model = pick(
        args.model.as_deref(),
        "--model",
        ["LLM_MODEL", "TEST_MODEL"],
        env,
    );
    Ok(Settings {
        base,
        key_source: key.as_ref().map(|(_, source)| *source),
        api_key: key.map(|(k, _)| k),
        model: model.map(|(m, _)| m),
        json: args.json,
        timeout: Duration::from_secs(args.timeout),
    })
}
