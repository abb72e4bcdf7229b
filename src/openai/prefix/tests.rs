use super::*;
use serde_json::json;

fn chat(messages: serde_json::Value) -> Vec<u8> {
    json!({"model": "m", "messages": messages})
        .to_string()
        .into_bytes()
}

/// The affinity key as API key `k` derives it.
fn derive(body: &[u8], model: &str, header_key: Option<&str>) -> Affinity {
    super::derive(body, model, header_key, "k")
}

fn hashes(a: &Affinity) -> Vec<u64> {
    a.blocks.iter().map(|b| b.hash).collect()
}

#[test]
fn a_longer_conversation_extends_the_chain() {
    let turn1 = chat(json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello"}
    ]));
    let turn2 = chat(json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "how are you?"}
    ]));
    let (a, b) = (derive(&turn1, "m", None), derive(&turn2, "m", None));
    assert_eq!(a.blocks.len(), 2);
    assert_eq!(b.blocks.len(), 4);
    assert_eq!(hashes(&a), hashes(&b)[..2]);
    assert!(b.tokens() > a.tokens());
    assert_eq!(a.explicit, None);
}

#[test]
fn a_different_message_changes_every_later_hash() {
    let a = derive(
        &chat(json!([{"role": "user", "content": "a"}, {"role": "user", "content": "x"}])),
        "m",
        None,
    );
    let b = derive(
        &chat(json!([{"role": "user", "content": "b"}, {"role": "user", "content": "x"}])),
        "m",
        None,
    );
    assert_ne!(a.blocks[0].hash, b.blocks[0].hash);
    assert_ne!(a.blocks[1].hash, b.blocks[1].hash);
}

#[test]
fn whitespace_between_tokens_does_not_matter_but_inside_strings_does() {
    let compact = br#"{"messages":[{"role":"user","content":"a b"}]}"#;
    let pretty = b"{ \"messages\" : [ {\n  \"role\": \"user\",\n  \"content\": \"a b\"\n} ] }";
    let other = br#"{"messages":[{"role":"user","content":"a  b"}]}"#;
    let escaped = br#"{"messages":[{"role":"user","content":"a\" b"}]}"#;
    let h = |b: &[u8]| hashes(&derive(b, "m", None));
    assert_eq!(h(compact), h(pretty));
    assert_ne!(h(compact), h(other));
    assert_ne!(h(compact), h(escaped));
    // A string ending in an escaped backslash ends at the next quote.
    let backslash = br#"{"messages":[{"content":"a\\","role":"user"}]}"#;
    let backslash_pretty = br#"{"messages":[{"content" : "a\\" , "role" : "user"}]}"#;
    assert_eq!(h(backslash), h(backslash_pretty));
    assert_ne!(h(backslash), h(compact));
}

#[test]
fn the_model_namespaces_the_hashes() {
    let body = chat(json!([{"role": "user", "content": "a"}]));
    assert_ne!(
        hashes(&derive(&body, "m1", None)),
        hashes(&derive(&body, "m2", None))
    );
}

#[test]
fn system_and_tools_come_first() {
    let with_tools = json!({"system": "s", "tools": [{"name": "t"}], "messages": [{"role": "user", "content": "a"}]});
    let without = json!({"system": "s", "messages": [{"role": "user", "content": "a"}]});
    let a = derive(with_tools.to_string().as_bytes(), "m", None);
    let b = derive(without.to_string().as_bytes(), "m", None);
    assert_eq!(a.blocks.len(), 2);
    assert_ne!(a.blocks[0].hash, b.blocks[0].hash);
    assert_ne!(a.blocks[1].hash, b.blocks[1].hash);
}

#[test]
fn explicit_keys_in_order_of_precedence() {
    let body = |extra: serde_json::Value| {
        let mut v = json!({"messages": [{"role": "user", "content": "a"}]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v.to_string().into_bytes()
    };
    let key = |k: &str| Some(explicit_hash("m", "k", k));
    assert_eq!(
        derive(&body(json!({"user": "u"})), "m", None).explicit,
        key("u")
    );
    assert_eq!(
        derive(
            &body(json!({"user": "u", "metadata": {"user_id": "md"}})),
            "m",
            None
        )
        .explicit,
        key("md")
    );
    assert_eq!(
        derive(
            &body(json!({"user": "u", "metadata": {"user_id": "md"}})),
            "m",
            Some("hdr")
        )
        .explicit,
        key("hdr")
    );
    assert_eq!(
        derive(
            &body(json!({"prompt_cache_key": "pck", "user": "u"})),
            "m",
            Some("hdr")
        )
        .explicit,
        key("pck")
    );
    // Empty or non-string values are no key.
    assert_eq!(
        derive(
            &body(json!({"user": "", "prompt_cache_key": 3})),
            "m",
            Some("")
        )
        .explicit,
        None
    );
    // The prefix is derived as well.
    assert_eq!(
        derive(&body(json!({"user": "u"})), "m", None).blocks.len(),
        1
    );
}

#[test]
fn responses_input_and_completion_prompts() {
    let items = json!({"instructions": "be brief", "input": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]});
    assert_eq!(
        derive(items.to_string().as_bytes(), "m", None).blocks.len(),
        3
    );
    let text = json!({"input": "just text"});
    assert_eq!(
        derive(text.to_string().as_bytes(), "m", None).blocks.len(),
        1
    );
    let long = "x".repeat(TEXT_BLOCK * 2 + 10);
    let longer = format!("{long}yyyy");
    let a = derive(json!({"prompt": long}).to_string().as_bytes(), "m", None);
    let b = derive(json!({"prompt": longer}).to_string().as_bytes(), "m", None);
    assert_eq!(a.blocks.len(), 3);
    assert_eq!(hashes(&a)[..2], hashes(&b)[..2]);
    assert_ne!(a.blocks[2].hash, b.blocks[2].hash);
}

#[test]
fn token_estimates_grow_with_the_text() {
    let a = derive(
        &chat(json!([{"role": "user", "content": "x".repeat(4000)}])),
        "m",
        None,
    );
    assert!((1000..1020).contains(&a.tokens()), "{}", a.tokens());
}

#[test]
fn nothing_to_hash() {
    assert!(derive(b"{}", "m", None).is_empty());
    assert!(derive(b"not json", "m", None).is_empty());
    assert!(derive(b"[1,2]", "m", None).is_empty());
}

#[test]
fn a_session_key_belongs_to_its_api_key_and_a_prefix_does_not() {
    let b = json!({"user": "1", "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
        .into_bytes();
    let (a, other) = (
        super::derive(&b, "m", None, "alice"),
        super::derive(&b, "m", None, "bob"),
    );
    assert_ne!(a.explicit, other.explicit);
    assert_eq!(hashes(&a), hashes(&other));
}

#[test]
fn many_tiny_messages_make_few_blocks_and_turns_keep_the_same_ones() {
    let turn = |n: usize| {
        let messages: Vec<_> = (0..n)
            .map(|i| json!({"role": "user", "content": i.to_string()}))
            .collect();
        derive(&chat(json!(messages)), "m", None)
    };
    let (a, b) = (turn(20_000), turn(20_002));
    assert!(
        a.blocks.len() <= 64 + 32 * 9 + 1,
        "{} blocks",
        a.blocks.len()
    );
    // The common prefix keeps the same blocks (all but a's last, which is
    // only kept as the last).
    let shared = a.blocks.len() - 1;
    assert_eq!(hashes(&a)[..shared], hashes(&b)[..shared]);
    // Short conversations keep every block.
    assert_eq!(turn(50).blocks.len(), 50);
}
