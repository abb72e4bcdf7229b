//! Typed labels: every bounded value that names something in a metric or a
//! log line. Each is an enum with `as_str()` and an `ALL` list, so metrics
//! can create their series up front and write their HELP text from the same
//! list the code emits, and a new variant cannot be forgotten in either.
//!
//! Pure data: imports nothing from the crate.

/// Defines a label enum with its `as_str`, `ALL` and a `", "`-joined list.
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// Its position in `ALL`, for arrays of metric handles.
            pub fn index(self) -> usize {
                self as usize
            }

            /// Every value, for HELP texts.
            pub fn list() -> String {
                Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
            }
        }
    };
}

label_enum! {
    /// `llm_edge_upstream_errors_total{kind}`: how talking to llama-server failed.
    UpstreamErrorKind {
        /// Nothing listens at the tunnel's end.
        Refused => "refused",
        ConnectTimeout => "connect_timeout",
        /// The connection closed or broke before or during the response.
        Reset => "reset",
        /// No response (or no next chunk) in time.
        Timeout => "timeout",
        /// Something answered, but not with valid HTTP or the route's format.
        InvalidResponse => "invalid_response",
        /// llama-server answered with a 5xx status.
        Status5xx => "5xx",
    }
}

label_enum! {
    /// `llm_edge_rate_limited_total{reason}`: which limit refused a request.
    LimitReason {
        KeyRate => "key_rate",
        KeyConcurrency => "key_concurrency",
        GlobalConcurrency => "global_concurrency",
        QueueFull => "queue_full",
        QueueTimeout => "queue_timeout",
        IpAuthFailures => "ip_auth_failures",
        IpConcurrency => "ip_concurrency",
        KeyUploads => "key_uploads",
        IpUploads => "ip_uploads",
        KeyTokensPerMinute => "key_tokens_per_minute",
        KeyTokensPerDay => "key_tokens_per_day",
        KeyTokensPerMonth => "key_tokens_per_month",
        /// The shared store did not answer and `state.on_error` is `deny`.
        StoreUnavailable => "store_unavailable",
    }
}

label_enum! {
    /// `llm_edge_store_calls_total{op}` and `llm_edge_store_errors_total{op}`:
    /// what the edge asked the shared store (`state.redis`), one round trip each.
    StoreOp {
        /// Per-key limits and the token reservation of one request, with
        /// the lease of an upstream slot pipelined when it needs one.
        Admit => "admit",
        /// Settling a request's tokens and ending its lease.
        Settle => "settle",
        /// An upstream slot lease on its own: a request without key limits,
        /// or one waiting while other edges hold every slot.
        Slot => "slot",
        /// Giving an upstream slot back.
        Release => "release",
        /// Renewing the leases of requests in flight.
        Renew => "renew",
        /// The periodic check that tells `/health` the store is back.
        Ping => "ping",
        /// Writing or reading the fleet's usage ledger.
        Ledger => "ledger",
    }
}

label_enum! {
    /// `llm_edge_store_fallbacks_total{policy}`: requests decided without
    /// the store, by `state.on_error`.
    StoreFallback {
        /// Checked against this edge's share of the limits.
        Local => "local",
        /// Refused.
        Deny => "deny",
    }
}

label_enum! {
    /// `llm_edge_auth_failures_total{reason}`: why a key was refused.
    AuthFailure {
        MissingKey => "missing_api_key",
        InvalidKey => "invalid_api_key",
        ModelNotAllowed => "model_not_allowed",
    }
}

label_enum! {
    /// `llm_edge_client_disconnects_total{phase}`: when the client left.
    DisconnectPhase {
        BeforeFirstToken => "before_first_token",
        Streaming => "streaming",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_listed() {
        for list in [
            UpstreamErrorKind::ALL
                .iter()
                .map(|v| v.as_str())
                .collect::<Vec<_>>(),
            LimitReason::ALL.iter().map(|v| v.as_str()).collect(),
            AuthFailure::ALL.iter().map(|v| v.as_str()).collect(),
            DisconnectPhase::ALL.iter().map(|v| v.as_str()).collect(),
            StoreOp::ALL.iter().map(|v| v.as_str()).collect(),
            StoreFallback::ALL.iter().map(|v| v.as_str()).collect(),
        ] {
            let mut sorted = list.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), list.len(), "{list:?}");
        }
        assert_eq!(LimitReason::ALL.len(), 13);
        for (i, reason) in LimitReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
        for (i, phase) in DisconnectPhase::ALL.iter().enumerate() {
            assert_eq!(phase.index(), i);
        }
        assert!(LimitReason::list().contains("store_unavailable"));
        assert!(LimitReason::list().contains("ip_uploads"));
    }
}

label_enum! {
    /// `llm_edge_routing_total{outcome}`: how cache-affinity routing chose a server.
    RoutingOutcome {
        /// The server holding the longest prefix of the prompt (or its session).
        Hit => "hit",
        /// No server held any of it: the least-loaded one.
        Miss => "miss",
        /// The server holding it was above the load bound: the least-loaded one.
        Fallback => "fallback",
    }
}

label_enum! {
    /// `llm_edge_upstream_prompt_tokens_total{kind}`: prompt tokens by server.
    PromptTokenKind {
        /// Every prompt token the server read (cached or not).
        Prompt => "prompt",
        /// Tokens the gateway predicted the server would reuse from its cache.
        Predicted => "predicted_cached",
        /// Tokens the server reported reusing (`cache_n`, `cached_tokens`).
        Cached => "cached",
    }
}
