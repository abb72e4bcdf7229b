//! The model catalogue: public names, aliases and the name llama-server expects.
//!
//! Clients see only public names and aliases (never llama.cpp's file path);
//! `/v1/models` is answered from here so it works, and stays consistent with
//! the allow-lists, even while the upstream is down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::json;

/// One public model and how to reach it upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRoute {
    pub name: Arc<str>,
    pub aliases: Vec<String>,
    pub upstream_name: String,
    pub owned_by: String,
    /// Indices into `upstream.servers` that serve it; empty: all of them.
    pub upstreams: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Catalogue {
    routes: Vec<ModelRoute>,
    /// Public names and aliases -> index into `routes`.
    index: HashMap<String, usize>,
    default: usize,
    created: u64,
    /// `/v1/models` bodies, rendered once rather than per request: the
    /// whole list (keys without an allow-list) when the catalogue is built,
    /// an allow-list's on its first request. A reload builds a new
    /// catalogue, so they never outlive the models they list.
    all: Bytes,
    restricted: Arc<Mutex<HashMap<Box<[String]>, Bytes>>>,
}

impl Catalogue {
    /// `routes` must be non-empty with unique names and aliases, and `default`
    /// must name one of them (config validation guarantees both).
    pub fn new(routes: Vec<ModelRoute>, default: &str, created: u64) -> Option<Catalogue> {
        let mut index = HashMap::new();
        for (i, route) in routes.iter().enumerate() {
            let aliases = route.aliases.iter().map(String::as_str);
            for name in std::iter::once(&*route.name).chain(aliases) {
                if index.insert(name.to_string(), i).is_some() {
                    return None;
                }
            }
        }
        let default = *index.get(default)?;
        let mut catalogue = Catalogue {
            routes,
            index,
            default,
            created,
            all: Bytes::new(),
            restricted: Arc::default(),
        };
        catalogue.all = Bytes::from(catalogue.list_json(|_| true));
        Some(catalogue)
    }

    /// Looks up a public name or alias; `None` means the default model.
    pub fn resolve(&self, requested: Option<&str>) -> Option<&ModelRoute> {
        match requested {
            None => self.routes.get(self.default),
            Some(name) => self.index.get(name).map(|&i| &self.routes[i]),
        }
    }

    pub fn default_route(&self) -> &ModelRoute {
        &self.routes[self.default]
    }

    pub fn routes(&self) -> &[ModelRoute] {
        &self.routes
    }

    /// Every name a client may send, public names first, then aliases.
    fn listed_names(&self) -> impl Iterator<Item = (&str, &ModelRoute)> {
        let names = self.routes.iter().map(|r| (&*r.name, r));
        let aliases = self
            .routes
            .iter()
            .flat_map(|r| r.aliases.iter().map(move |a| (a.as_str(), r)));
        names.chain(aliases)
    }

    fn model_object(&self, id: &str, route: &ModelRoute) -> serde_json::Value {
        json!({
            "id": id,
            "object": "model",
            "created": self.created,
            "owned_by": route.owned_by,
        })
    }

    /// `GET /v1/models`, limited to the models `allowed` accepts.
    pub fn list_json(&self, allowed: impl Fn(&ModelRoute) -> bool) -> String {
        let data: Vec<_> = self
            .listed_names()
            .filter(|(_, r)| allowed(r))
            .map(|(id, r)| self.model_object(id, r))
            .collect();
        json!({ "object": "list", "data": data }).to_string()
    }

    /// The `GET /v1/models` body for a key with `allowed_models` (`None`:
    /// every model), from the catalogue's cache.
    pub fn list_body(&self, allowed_models: Option<&[String]>) -> Bytes {
        let Some(allowed) = allowed_models else {
            return self.all.clone();
        };
        let mut cache = match self.restricted.lock() {
            Ok(cache) => cache,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(body) = cache.get(allowed) {
            return body.clone();
        }
        let body = Bytes::from(self.list_json(|r| allowed.iter().any(|m| **m == *r.name)));
        cache.insert(allowed.into(), body.clone());
        body
    }

    /// `GET /v1/models/{id}`.
    pub fn model_json(&self, id: &str) -> Option<String> {
        let route = self.index.get(id).map(|&i| &self.routes[i])?;
        Some(self.model_object(id, route).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn route(name: &str, aliases: &[&str], upstream: &str) -> ModelRoute {
        ModelRoute {
            name: name.into(),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
            upstream_name: upstream.into(),
            owned_by: "llm-edge".into(),
            upstreams: Vec::new(),
        }
    }

    #[test]
    fn cached_lists_are_the_rendered_ones() {
        let c = catalogue();
        assert_eq!(c.list_body(None), c.list_json(|_| true).as_bytes());
        let only = vec!["llama".to_string()];
        for _ in 0..2 {
            assert_eq!(
                c.list_body(Some(&only)),
                c.list_json(|r| &*r.name == "llama").as_bytes()
            );
        }
    }

    fn catalogue() -> Catalogue {
        Catalogue::new(
            vec![
                route("qwen3", &["qwen", "default"], "/models/qwen3.gguf"),
                route("llama", &[], "llama"),
            ],
            "qwen3",
            1700000000,
        )
        .unwrap()
    }

    #[test]
    fn resolves_names_aliases_and_default() {
        let c = catalogue();
        assert_eq!(c.resolve(Some("qwen")).unwrap().name.as_ref(), "qwen3");
        assert_eq!(c.resolve(Some("llama")).unwrap().upstream_name, "llama");
        assert_eq!(c.resolve(None).unwrap().name.as_ref(), "qwen3");
        assert!(c.resolve(Some("gpt-4")).is_none());
        assert!(c.resolve(Some("/models/qwen3.gguf")).is_none());
    }

    #[test]
    fn rejects_duplicate_names_and_unknown_default() {
        assert!(
            Catalogue::new(vec![route("a", &["b"], "x"), route("b", &[], "y")], "a", 0).is_none()
        );
        assert!(Catalogue::new(vec![route("a", &[], "x")], "zzz", 0).is_none());
    }

    #[test]
    fn list_shows_public_names_and_aliases_not_upstream_names() {
        let c = catalogue();
        let v: Value = serde_json::from_str(&c.list_json(|_| true)).unwrap();
        assert_eq!(v["object"], "list");
        let ids: Vec<_> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["qwen3", "llama", "qwen", "default"]);
        assert!(v["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["object"] == "model"));
        let only_llama: Value =
            serde_json::from_str(&c.list_json(|r| &*r.name == "llama")).unwrap();
        assert_eq!(only_llama["data"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn single_model_lookup() {
        let c = catalogue();
        let v: Value = serde_json::from_str(&c.model_json("qwen").unwrap()).unwrap();
        assert_eq!(v["id"], "qwen");
        assert!(c.model_json("nope").is_none());
    }
}
