use super::*;

fn rewrite(body: &str, to: &str) -> String {
    let bytes = Bytes::copy_from_slice(body.as_bytes());
    let info = inspect(&bytes).unwrap();
    String::from_utf8(rewrite_model(bytes, &info, to).to_vec()).unwrap()
}

#[test]
fn replaces_only_the_model_value() {
    let body = r#"{ "messages" : [{"role":"user","content":"hi"}],  "model" : "qwen" , "temperature":0.70}"#;
    assert_eq!(
        rewrite(body, "qwen3-30b.gguf"),
        r#"{ "messages" : [{"role":"user","content":"hi"}],  "model" : "qwen3-30b.gguf" , "temperature":0.70}"#
    );
}

#[test]
fn nested_model_keys_are_left_alone() {
    let body = r#"{"tools":[{"model":"x"}],"metadata":{"model":"y"},"model":"a"}"#;
    assert_eq!(
        rewrite(body, "b"),
        r#"{"tools":[{"model":"x"}],"metadata":{"model":"y"},"model":"b"}"#
    );
}

#[test]
fn missing_model_is_inserted() {
    assert_eq!(
        rewrite(r#"{"messages":[]}"#, "m"),
        r#"{"model":"m","messages":[]}"#
    );
    assert_eq!(rewrite("  {}", "m"), r#"  {"model":"m"}"#);
    assert_eq!(rewrite("{ }", "m"), r#"{"model":"m" }"#);
}

#[test]
fn unchanged_name_is_not_copied() {
    let bytes = Bytes::from_static(br#"{"model":"same"}"#);
    let info = inspect(&bytes).unwrap();
    let out = rewrite_model(bytes.clone(), &info, "same");
    assert_eq!(out.as_ptr(), bytes.as_ptr());
}

#[test]
fn escaped_and_unicode_names() {
    let body = r#"{"model":"mod\u00e8le-ü","x":"日本語"}"#;
    let info = inspect(body.as_bytes()).unwrap();
    assert_eq!(info.model.as_ref().unwrap().name, "modèle-ü");
    assert_eq!(rewrite(body, "ñ\"q"), r#"{"model":"ñ\"q","x":"日本語"}"#);
    // an escaped key is still the top-level model key
    let info = inspect(br#"{"mod\u0065l":"a"}"#).unwrap();
    assert_eq!(info.model.unwrap().name, "a");
}

#[test]
fn same_name_spelled_with_escapes_is_left_alone() {
    let bytes = Bytes::from_static(br#"{"model":"m\u0061","messages":[]}"#);
    let info = inspect(&bytes).unwrap();
    let out = rewrite_model(bytes.clone(), &info, "ma");
    assert_eq!(out.as_ptr(), bytes.as_ptr());
    // a different name is still spliced in
    assert_eq!(rewrite(r#"{"model":"m\u0061"}"#, "mb"), r#"{"model":"mb"}"#);
}

#[test]
fn invalid_utf8_anywhere_is_400() {
    for body in [
        &b"{\"messages\":\"R\xff\xfe\"}"[..],
        b"{\"a\":{\"\xc3\":1}}",
        b"{\"model\":\"m\",\"messages\":[{\"content\":\"\xed\xa0\x80\"}]}",
        b"{\"model\":\"m\"}  \x80",
    ] {
        let err = inspect(body).unwrap_err();
        assert_eq!(err.status(), 400, "{:?}", String::from_utf8_lossy(body));
        assert_eq!(err.code(), "invalid_request");
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }
    let err = inspect(b"{\"messages\":\"R\xff\"}").unwrap_err();
    assert!(err.to_string().contains("at byte offset 14"), "{err}");
}

#[test]
fn duplicate_model_is_rejected() {
    let err = inspect(br#"{"model":"a","messages":[],"model":"b"}"#).unwrap_err();
    assert_eq!(err.status(), 400);
    assert_eq!(err.param(), Some("model"));
}

#[test]
fn bad_bodies_are_400() {
    for body in [
        &b""[..],
        b"   ",
        b"[1,2]",
        b"\"model\"",
        b"{\"model\":",
        b"{\"model\":\"a\"} trailing",
        b"{\"model\":\"a\"}{}",
        b"\xff\xfe",
        b"{\"model\":\"\xff\"}",
    ] {
        let err = inspect(body).unwrap_err();
        assert_eq!(err.status(), 400, "{:?}", String::from_utf8_lossy(body));
    }
}

#[test]
fn non_string_model_is_400_naming_the_param() {
    for body in [
        &br#"{"model":42}"#[..],
        br#"{"model":null}"#,
        br#"{"model":["a"]}"#,
    ] {
        let err = inspect(body).unwrap_err();
        assert_eq!(err.param(), Some("model"));
        assert!(err.to_string().contains("must be a string"));
    }
}

#[test]
fn stream_flag() {
    assert!(inspect(br#"{"stream":true}"#).unwrap().stream);
    assert!(!inspect(br#"{"stream":false}"#).unwrap().stream);
    assert!(!inspect(br#"{"stream":"true"}"#).unwrap().stream);
    assert!(!inspect(br#"{}"#).unwrap().stream);
}

fn capped(body: &str, cap: u64) -> String {
    capped_as(body, cap, InsertAs::MaxTokens)
}

fn capped_as(body: &str, cap: u64, insert_as: InsertAs) -> String {
    let bytes = Bytes::copy_from_slice(body.as_bytes());
    let info = inspect(&bytes).unwrap();
    let rw = Rewrite {
        upstream_model: "m",
        max_tokens: Some(cap),
        insert_as,
    };
    String::from_utf8(super::rewrite(bytes, &info, &rw).to_vec()).unwrap()
}

#[test]
fn every_length_field_is_read_and_capped() {
    for name in TOKEN_LIMIT_FIELDS {
        let body = format!(r#"{{"model":"m", "{name}" : 5000 ,"x":[1]}}"#);
        let info = inspect(body.as_bytes()).unwrap();
        assert_eq!(info.token_limits.len(), 1, "{name}");
        assert_eq!(info.token_limits[0].name, name);
        assert_eq!(info.requested_max_tokens(), Some(5000), "{name}");
        for insert_as in [
            InsertAs::MaxTokens,
            InsertAs::AnthropicMaxTokens,
            InsertAs::MaxOutputTokens,
        ] {
            let out = capped_as(&body, 16, insert_as);
            let expected = format!(r#"{{"model":"m", "{name}" : 16 ,"x":[1]}}"#);
            if insert_as.read_by_upstream().contains(&name) {
                assert_eq!(out, expected, "{name} {insert_as:?}");
            } else {
                // the route does not read this name: its own is inserted too
                let field = insert_as.field();
                assert_eq!(
                    out,
                    format!(r#"{{"{field}":16,{}"#, &expected[1..]),
                    "{name} {insert_as:?}"
                );
            }
        }
    }
}

#[test]
fn insertion_follows_the_dialect() {
    use InsertAs::*;
    let cases: [(&str, InsertAs, &str); 12] = [
        (
            r#"{"model":"m"}"#,
            MaxTokens,
            r#"{"max_tokens":7,"model":"m"}"#,
        ),
        (
            r#"{"model":"m"}"#,
            AnthropicMaxTokens,
            r#"{"max_tokens":7,"model":"m"}"#,
        ),
        (
            r#"{"model":"m"}"#,
            MaxOutputTokens,
            r#"{"max_output_tokens":7,"model":"m"}"#,
        ),
        // chat and completions read the llama.cpp names: nothing to insert
        (
            r#"{"model":"m","n_predict":5}"#,
            MaxTokens,
            r#"{"model":"m","n_predict":5}"#,
        ),
        (
            r#"{"model":"m","max_completion_tokens":-1}"#,
            MaxTokens,
            r#"{"model":"m","max_completion_tokens":7}"#,
        ),
        // ... but not max_output_tokens, which only the Responses converter reads
        (
            r#"{"model":"m","max_output_tokens":5}"#,
            MaxTokens,
            r#"{"max_tokens":7,"model":"m","max_output_tokens":5}"#,
        ),
        // Anthropic: the converter keeps max_tokens only (4096 without it)
        (
            r#"{"model":"m","n_predict":5}"#,
            AnthropicMaxTokens,
            r#"{"max_tokens":7,"model":"m","n_predict":5}"#,
        ),
        (
            r#"{"model":"m","max_tokens":5}"#,
            AnthropicMaxTokens,
            r#"{"model":"m","max_tokens":5}"#,
        ),
        (
            r#"{"model":"m","max_tokens":null}"#,
            AnthropicMaxTokens,
            r#"{"model":"m","max_tokens":7}"#,
        ),
        // Responses: max_tokens and n_predict pass through the converter
        (
            r#"{"model":"m","max_tokens":5}"#,
            MaxOutputTokens,
            r#"{"model":"m","max_tokens":5}"#,
        ),
        (
            r#"{"model":"m","max_output_tokens":100000}"#,
            MaxOutputTokens,
            r#"{"model":"m","max_output_tokens":7}"#,
        ),
        (
            r#"{ }"#,
            MaxOutputTokens,
            r#"{"model":"m","max_output_tokens":7 }"#,
        ),
    ];
    for (body, insert_as, expected) in cases {
        assert_eq!(
            capped_as(body, 7, insert_as),
            expected,
            "{body} {insert_as:?}"
        );
    }
}

fn choices_of(body: &str) -> u64 {
    inspect(body.as_bytes()).unwrap().choices
}

fn counts(body: &str) -> Vec<(&'static str, Option<u64>)> {
    inspect(body.as_bytes())
        .unwrap()
        .multipliers
        .iter()
        .map(|m| (m.name, m.count))
        .collect()
}

#[test]
fn n_is_read_as_llama_server_reads_it() {
    for (value, count) in [
        ("8", Some(8)),
        ("1", Some(1)),
        ("2.0", Some(2)),
        ("2.9", Some(2)),
        ("1e1", Some(10)),
        ("0", Some(1)),
        ("0.5", Some(1)),
        ("4294967298", Some(4294967298)),
        ("18446744073709551615", Some(u64::MAX)),
        // llama-server refuses these ("type must be number"): one generation at most
        (r#""8""#, Some(1)),
        ("[8]", Some(1)),
        (r#"{"n":8}"#, Some(1)),
        ("true", Some(1)),
        ("false", Some(1)),
        ("null", Some(1)),
        // negative or huge: an int32 cast could land anywhere (-4294967294 is 2)
        ("-1", None),
        ("-4294967294", None),
        ("-0", None),
        ("-2.5", None),
        ("3e9", None),
        ("18446744073709551616", None),
        ("1e400", None),
    ] {
        for name in CHOICE_FIELDS {
            let body = format!(r#"{{"{name}":{value}}}"#);
            assert_eq!(counts(&body), [(name, count)], "{body}");
            let choices = count.unwrap_or(u64::MAX);
            assert_eq!(choices_of(&body), choices, "{body}");
        }
    }
    assert_eq!(counts(r#"{"x":1}"#), []);
    assert_eq!(
        choices_of(r#"{"x":{"n":8},"y":[{"n":8}]}"#),
        1,
        "top level only"
    );
}

#[test]
fn prompt_arrays_are_counted_as_llama_server_splits_them() {
    for (prompt, count) in [
        (r#""one""#, 1),
        (r#"["a","b","c"]"#, 3),
        (r#"["a"]"#, 1),
        (r#"[[1,2],[3,4],[5]]"#, 3),
        (r#"[[1,"a"],"b"]"#, 2),
        (r#"[{"prompt_string":"a"},"b"]"#, 2),
        // an array holding an integer is one (tokenized or mixed) prompt
        (r#"[1,2,3]"#, 1),
        (r#"["a",1,"b"]"#, 1),
        (r#"["a",-5,"b"]"#, 1),
        // floats are not integers to nlohmann: elements again
        (r#"[1.5,"a"]"#, 2),
        (r#"[1e2,2.0,"x"]"#, 3),
        (r#"[18446744073709551616,"x"]"#, 2),
        // when unsure (-0), more prompts rather than fewer
        (r#"[-0,"x"]"#, 2),
        ("[]", 1),
        (r#"{"prompt_string":"a"}"#, 1),
        ("42", 1),
        ("1e400", 1),
        ("null", 1),
    ] {
        let body = format!(r#"{{"model":"m","prompt":{prompt}}}"#);
        assert_eq!(counts(&body), [("prompt", Some(count))], "{body}");
        assert_eq!(choices_of(&body), count, "{body}");
    }
}

#[test]
fn multipliers_combine() {
    // prompts multiply the generations per prompt
    assert_eq!(choices_of(r#"{"prompt":["a","b","c"],"n":4}"#), 12);
    assert_eq!(choices_of(r#"{"n_cmpl":2,"prompt":[[1],[2]]}"#), 4);
    // n and n_cmpl are one parameter, best_of includes n: the largest
    assert_eq!(choices_of(r#"{"n":2,"n_cmpl":3}"#), 3);
    assert_eq!(choices_of(r#"{"n_cmpl":null,"n":5}"#), 5);
    assert_eq!(choices_of(r#"{"n":2,"best_of":6}"#), 6);
    assert_eq!(choices_of(r#"{"best_of":2,"n":3}"#), 3);
    // a repeated key counts with its largest value (llama-server keeps the last)
    assert_eq!(choices_of(r#"{"n":8,"n":1}"#), 8);
    assert_eq!(choices_of(r#"{"prompt":["a","b"],"prompt":"c"}"#), 2);
    // saturates; an unreadable count is u64::MAX
    assert_eq!(
        choices_of(r#"{"n":18446744073709551615,"prompt":["a","b"]}"#),
        u64::MAX
    );
    assert_eq!(choices_of(r#"{"n":-3,"prompt":["a","b"]}"#), u64::MAX);
    assert_eq!(choices_of(r#"{"model":"m"}"#), 1);
}

#[test]
fn multipliers_and_other_bytes_are_left_as_sent() {
    let body = "{\"n\" : 4,\r\n \"model\":\"a\",\"prompt\":[\"x\",\"y\"],\t\"best_of\":2.0,\"max_tokens\": 900 ,\"n_predict\":1e3,\"temperature\":0.70}";
    let info = inspect(body.as_bytes()).unwrap();
    assert_eq!(info.choices, 8);
    assert_eq!(
        capped(body, 2),
        "{\"n\" : 4,\r\n \"model\":\"m\",\"prompt\":[\"x\",\"y\"],\t\"best_of\":2.0,\"max_tokens\": 2 ,\"n_predict\":2,\"temperature\":0.70}"
    );
    // within the cap: not even copied
    let bytes = Bytes::from_static(br#"{"model":"m","n":3,"max_tokens":2}"#);
    let info = inspect(&bytes).unwrap();
    let out = super::rewrite(
        bytes.clone(),
        &info,
        &Rewrite {
            upstream_model: "m",
            max_tokens: Some(2),
            insert_as: InsertAs::MaxTokens,
        },
    );
    assert_eq!(out.as_ptr(), bytes.as_ptr());
}

#[test]
fn max_tokens_is_read_and_capped() {
    let info = inspect(br#"{"model":"m","max_tokens":50}"#).unwrap();
    assert_eq!(info.requested_max_tokens(), Some(50));
    assert_eq!(
        inspect(br#"{"model":"m"}"#).unwrap().requested_max_tokens(),
        None
    );
    assert_eq!(
        inspect(br#"{"n_predict":-1}"#)
            .unwrap()
            .requested_max_tokens(),
        None
    );
    assert_eq!(
        capped(r#"{"model":"m","max_tokens":5000}"#, 100),
        r#"{"model":"m","max_tokens":100}"#
    );
    assert_eq!(
        capped(r#"{"model":"m","max_tokens":5}"#, 100),
        r#"{"model":"m","max_tokens":5}"#
    );
    assert_eq!(
        capped(r#"{"model":"m","n_predict":-1}"#, 100),
        r#"{"model":"m","n_predict":100}"#
    );
    assert_eq!(
        capped(r#"{"model":"m","x":1}"#, 100),
        r#"{"max_tokens":100,"model":"m","x":1}"#
    );
    assert_eq!(
        capped(r#"{"x":1}"#, 7),
        r#"{"model":"m","max_tokens":7,"x":1}"#
    );
    assert_eq!(capped(r#"{}"#, 7), r#"{"model":"m","max_tokens":7}"#);
    assert_eq!(
        capped(
            r#"{"max_completion_tokens":900,"model":"q","max_tokens":null}"#,
            10
        ),
        r#"{"max_completion_tokens":10,"model":"m","max_tokens":10}"#
    );
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let mut body = String::from(r#"{"model":"a","x":"#);
    body.push_str(&"[".repeat(100_000));
    let err = inspect(body.as_bytes()).unwrap_err();
    assert_eq!(err.status(), 400);
}

fn body_of_size(size: usize) -> Vec<u8> {
    let prefix = br#"{"model":"alias","messages":[{"role":"user","content":""#;
    let suffix = br#""}],"stream":true}"#;
    let fill = size - prefix.len() - suffix.len();
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(prefix);
    body.extend(std::iter::repeat_n(b'x', fill));
    body.extend_from_slice(suffix);
    assert_eq!(body.len(), size);
    body
}

#[test]
fn sizes_from_one_kib_to_32_mib() {
    for size in [1024, 64 * 1024, 64 * 1024 + 1, 1 << 20, 32 << 20] {
        let body = Bytes::from(body_of_size(size));
        let info = inspect(&body).unwrap();
        assert!(info.stream);
        let out = rewrite_model(body.clone(), &info, "upstream-name");
        assert_eq!(out.len(), size + "upstream-name".len() - "alias".len());
        assert_eq!(&out[out.len() - 100..], &body[body.len() - 100..]);
        assert!(out.starts_with(br#"{"model":"upstream-name","messages""#));
    }
}
