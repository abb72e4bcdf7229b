use super::*;
use crate::config::Secret;

fn upstream(key: Option<&str>) -> UpstreamServer {
    UpstreamServer {
        name: "gpu".into(),
        authority: "127.0.0.1:8080".into(),
        addr: "127.0.0.1:8080".parse().unwrap(),
        api_key: key.map(Secret::from),
        max_in_flight: 0,
        context: 8192,
    }
}

fn client_request() -> RequestHeader {
    let mut req = RequestHeader::build("POST", b"/v1/chat/completions?x=1", None).unwrap();
    req.insert_header("Authorization", "Bearer sk-client")
        .unwrap();
    req.insert_header("Accept-Encoding", "gzip").unwrap();
    req.insert_header("Content-Length", "999").unwrap();
    req.insert_header("Connection", "keep-alive").unwrap();
    req.insert_header("Expect", "100-continue").unwrap();
    req.insert_header("Host", "edge.example.com").unwrap();
    req.insert_header("Content-Type", "application/json")
        .unwrap();
    req.insert_header("X-Custom", "kept").unwrap();
    req
}

fn fwd<'a>(body_len: usize, request_id: Option<&'a HeaderValue>) -> Forwarding<'a> {
    Forwarding {
        path: "/v1/chat/completions",
        query: Some("x=1"),
        body_len: Some(body_len),
        request_id,
        client_ip: None,
    }
}

#[test]
fn client_key_is_replaced_by_the_upstream_key() {
    let id = HeaderValue::from_static("r1");
    let mut req = upstream_request(&client_request(), &fwd(42, Some(&id))).unwrap();
    address_to(&mut req, &upstream(Some("up-secret"))).unwrap();
    assert_eq!(req.headers["authorization"], "Bearer up-secret");
    assert_eq!(req.headers["content-length"], "42");
    assert_eq!(req.headers["host"], "127.0.0.1:8080");
    assert_eq!(req.headers["x-custom"], "kept");
    assert_eq!(req.headers["x-request-id"], "r1");
    assert_eq!(req.uri.to_string(), "/v1/chat/completions?x=1");
    for gone in ["accept-encoding", "connection", "expect"] {
        assert!(!req.headers.contains_key(gone), "{gone}");
    }
}

#[test]
fn without_upstream_key_no_authorization_is_sent() {
    let mut req = upstream_request(&client_request(), &fwd(1, None)).unwrap();
    address_to(&mut req, &upstream(None)).unwrap();
    assert!(!req.headers.contains_key("authorization"));
}

#[test]
fn connection_named_and_forwarding_headers_stay_behind() {
    let mut client = client_request();
    client
        .insert_header("Connection", "keep-alive, X-Secret-Hop")
        .unwrap();
    client.insert_header("X-Secret-Hop", "1").unwrap();
    client.insert_header("Upgrade", "websocket").unwrap();
    client.insert_header("X-Forwarded-For", "6.6.6.6").unwrap();
    client.insert_header("Forwarded", "for=6.6.6.6").unwrap();
    client.insert_header("X-Api-Key", "sk-client").unwrap();
    client.insert_header("X-Conversation-Id", "conv1").unwrap();
    let f = Forwarding {
        client_ip: Some("203.0.113.7".parse().unwrap()),
        ..fwd(1, None)
    };
    let req = upstream_request(&client, &f).unwrap();
    for gone in [
        "x-secret-hop",
        "upgrade",
        "forwarded",
        "x-api-key",
        "connection",
        "x-conversation-id",
    ] {
        assert!(!req.headers.contains_key(gone), "{gone}");
    }
    assert_eq!(req.headers["x-forwarded-for"], "203.0.113.7");
    assert_eq!(req.headers.get_all("x-forwarded-for").iter().count(), 1);

    let mut up = ResponseHeader::build(200, None).unwrap();
    up.insert_header("Connection", "keep-alive, X-Hop").unwrap();
    up.insert_header("X-Hop", "1").unwrap();
    up.insert_header("Keep-Alive", "timeout=5").unwrap();
    up.insert_header("Content-Length", "2").unwrap();
    let down = downstream_response(&up, false, false).unwrap();
    for gone in ["x-hop", "keep-alive", "connection"] {
        assert!(!down.headers.contains_key(gone), "{gone}");
    }
}

#[test]
fn key_like_query_parameters_are_dropped() {
    assert_eq!(filter_query("a=1&api_key=s&b=2"), Some("a=1&b=2".into()));
    assert_eq!(filter_query("KEY=s&Token=t&access_token=u"), None);
    assert_eq!(filter_query("api%5Fkey=s&x"), Some("x".into()));
    assert_eq!(filter_query("monkey=1"), Some("monkey=1".into()));
    let f = Forwarding {
        query: Some("api_key=sk-secret&stream=1"),
        ..fwd(1, None)
    };
    let req = upstream_request(&client_request(), &f).unwrap();
    assert_eq!(req.uri.to_string(), "/v1/chat/completions?stream=1");
}

#[test]
fn http10_clients_get_no_chunked_coding() {
    let mut up = ResponseHeader::build(200, None).unwrap();
    up.insert_header("Content-Type", "text/event-stream")
        .unwrap();
    let down = downstream_response(&up, true, true).unwrap();
    assert!(!down.headers.contains_key("transfer-encoding"));
    assert!(!down.headers.contains_key("content-length"));
}

#[test]
fn streams_are_chunked_and_unbuffered() {
    let mut up = ResponseHeader::build(200, None).unwrap();
    up.insert_header("Content-Type", "text/event-stream")
        .unwrap();
    up.insert_header("Content-Length", "100").unwrap();
    up.insert_header("Keep-Alive", "timeout=5, max=100")
        .unwrap();
    assert!(is_event_stream(&up));
    let down = downstream_response(&up, true, false).unwrap();
    assert!(!down.headers.contains_key("content-length"));
    assert!(!down.headers.contains_key("keep-alive"));
    assert_eq!(down.headers["transfer-encoding"], "chunked");
    assert_eq!(down.headers["x-accel-buffering"], "no");
}

#[test]
fn sized_responses_keep_their_length() {
    let mut up = ResponseHeader::build(400, None).unwrap();
    up.insert_header("Content-Type", "application/json")
        .unwrap();
    up.insert_header("Content-Length", "12").unwrap();
    let mut down = downstream_response(&up, false, false).unwrap();
    assert_eq!(down.status.as_u16(), 400);
    assert_eq!(down.headers["content-length"], "12");
    assert!(!down.headers.contains_key("transfer-encoding"));
    let id = HeaderValue::from_static("r");
    finish_client_response(&mut down, Some(&id), &CorsPolicy::default(), None).unwrap();
    assert_eq!(down.headers["x-request-id"], "r");
}

#[test]
fn chunked_is_found_in_any_spelling_and_list() {
    let mut h = http::HeaderMap::new();
    assert!(!is_chunked(&h));
    h.insert("transfer-encoding", "gzip, Chunked".parse().unwrap());
    assert!(is_chunked(&h));
    h.insert("transfer-encoding", "gzip".parse().unwrap());
    assert!(!is_chunked(&h));
}
