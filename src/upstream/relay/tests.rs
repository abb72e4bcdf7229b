use super::*;

#[test]
fn non_json_answers_become_errors_with_their_status() {
    let e = check_whole(Dialect::OpenAi, 500, b"<html><h1>500</h1></html>", "up").unwrap_err();
    assert_eq!((e.status(), e.code()), (500, "invalid_response"));
    assert!(e.to_string().contains("<html><h1>500</h1></html>"), "{e}");
    let e = check_whole(Dialect::OpenAi, 502, b"", "up").unwrap_err();
    assert_eq!(e.status(), 502);
    assert!(e.to_string().contains("an empty body"), "{e}");
    let e = check_whole(Dialect::OpenAi, 200, b"not json", "up").unwrap_err();
    assert_eq!((e.status(), e.code()), (502, "invalid_response"));
    let e = check_whole(Dialect::OpenAi, 200, br#"{"choices": ["#, "up").unwrap_err();
    assert_eq!(e.status(), 502);
    let long = "x".repeat(10_000);
    let e = check_whole(Dialect::OpenAi, 503, long.as_bytes(), "up").unwrap_err();
    assert!(e.to_string().len() < 400);
}

#[test]
fn json_passes_and_anthropic_errors_are_reshaped() {
    assert_eq!(
        check_whole(Dialect::OpenAi, 200, br#"{"a":1}"#, "up"),
        Ok(None)
    );
    assert_eq!(
        check_whole(Dialect::OpenAi, 400, br#"{"error":{}}"#, "up"),
        Ok(None)
    );
    let llama = br#"{"error":{"code":400,"message":"the prompt is too long","type":"invalid_request_error"}}"#;
    let out = check_whole(Dialect::Anthropic, 400, llama, "up")
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["message"], "the prompt is too long");
    let anthropic = br#"{"type":"error","error":{"type":"x","message":"y"}}"#;
    assert_eq!(
        check_whole(Dialect::Anthropic, 400, anthropic, "up"),
        Ok(None)
    );
}
