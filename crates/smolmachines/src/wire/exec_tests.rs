use std::time::Duration;

use serde_json::json;

use super::*;

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_command_body_is_the_python_clients() {
    // CLOUD-CLIENTS.md §4: what the client sent for exec(["sh","-c",...]) without options
    let body = CommandBody::new(
        &argv(&["sh", "-c", "echo hi; echo err >&2; exit 3"]),
        &ExecOptions::default(),
    )
    .unwrap();
    assert_eq!(
        serde_json::to_string(&body).unwrap(),
        r#"{"command":["sh","-c","echo hi; echo err >&2; exit 3"],"env":{},"cwd":null,"timeoutSeconds":null}"#
    );
    // the user probe of SPEC §9.7, timeout rounded up to whole seconds, and the only-if-set
    // fields
    let opts = ExecOptions {
        timeout: Some(Duration::from_millis(29_001)),
        user: Some("app".into()),
        ..Default::default()
    };
    let body = CommandBody::new(&argv(&["true"]), &opts).unwrap();
    assert_eq!(
        serde_json::to_value(&body).unwrap(),
        json!({"command": ["true"], "env": {}, "cwd": null, "timeoutSeconds": 30, "user": "app"})
    );
    let opts = ExecOptions {
        stdin: Some(b"in".to_vec()),
        workdir: Some("/w".into()),
        background: false,
        ..Default::default()
    };
    let v = serde_json::to_value(CommandBody::new(&argv(&["cat"]), &opts).unwrap()).unwrap();
    assert_eq!(v["stdin"], "in");
    assert_eq!(v["cwd"], "/w");
    assert!(v.get("background").is_none());
    let bg = ExecOptions {
        background: true,
        ..Default::default()
    };
    let v = serde_json::to_value(CommandBody::new(&argv(&["sleep", "9"]), &bg).unwrap()).unwrap();
    assert_eq!(v["background"], true);
    // the wire carries text
    let bad = ExecOptions {
        stdin: Some(vec![0xff]),
        ..Default::default()
    };
    assert_eq!(
        CommandBody::new(&argv(&["cat"]), &bad).unwrap_err().code(),
        "INVALID_CONFIG"
    );
}

#[test]
fn a_server_reads_command_bodies() {
    // Node sends the raw float; a shell string runs with sh -c; null env is fine
    let body: CommandBody = serde_json::from_str(
        r#"{"command": "echo $A", "env": null, "cwd": "/tmp", "timeoutSeconds": 1.2,
            "stdin": "x", "unknown": true}"#,
    )
    .unwrap();
    assert_eq!(body.timeout_seconds, Some(2));
    let (a, o) = body.into_exec(Some(ExecOutput::Text)).unwrap();
    assert_eq!(a, argv(&["sh", "-c", "echo $A"]));
    assert_eq!(o.timeout, Some(Duration::from_secs(2)));
    assert_eq!(o.stdin.as_deref(), Some(&b"x"[..]));
    assert_eq!(o.workdir.as_deref(), Some("/tmp"));
    assert_eq!(o.output, Some(ExecOutput::Text));
    // round trip
    let opts = ExecOptions {
        env: [("A".to_string(), "1".to_string())].into(),
        timeout: Some(Duration::from_secs(5)),
        user: Some("u".into()),
        ..Default::default()
    };
    let json = serde_json::to_string(&CommandBody::new(&argv(&["env"]), &opts).unwrap()).unwrap();
    let (a, o) = serde_json::from_str::<CommandBody>(&json)
        .unwrap()
        .into_exec(None)
        .unwrap();
    assert_eq!(a, argv(&["env"]));
    assert_eq!(
        (o.env, o.timeout, o.user),
        (opts.env, opts.timeout, opts.user)
    );
    // the core's checks hold for wire bodies
    for bad in [
        json!({"command": []}),
        json!({"command": ["ls"], "cwd": "relative"}),
        json!({"command": ["ls"], "background": true, "stdin": "x"}),
        json!({"command": ["ls"], "user": ""}),
    ] {
        let body: CommandBody = serde_json::from_value(bad.clone()).unwrap();
        assert_eq!(
            body.into_exec(None).unwrap_err().code(),
            "INVALID_CONFIG",
            "{bad}"
        );
    }
    assert!(
        serde_json::from_value::<CommandBody>(json!({"command": ["x"], "timeoutSeconds": -1}))
            .is_err()
    );
    assert!(serde_json::from_value::<CommandBody>(json!({"env": {}})).is_err());
}

#[test]
fn exec_responses_both_ways() {
    let r = ExecResult::from_bytes(3, false, b"hi\n\xff".to_vec(), b"err\n".to_vec());
    let v = serde_json::to_value(ExecResponse::from(&r)).unwrap();
    assert_eq!(
        v,
        json!({"stdout": "hi\n\u{fffd}", "stderr": "err\n", "exitCode": 3,
               "stdoutTruncated": false, "stderrTruncated": false,
               "stdoutB64": "aGkK/w==", "stderrB64": "ZXJyCg=="})
    );
    // what the client reads back: byte-exact from b64
    let back: ExecResult = serde_json::from_value::<ExecResponse>(v).unwrap().into();
    assert_eq!(back.stdout_bytes, b"hi\n\xff");
    assert_eq!(back.exit_code, 3);
    // ?output=text drops b64, ?output=b64 empties the text
    let t = serde_json::to_value(ExecResponse::from_result(&r, Some(ExecOutput::Text))).unwrap();
    assert!(t.get("stdoutB64").is_none());
    let b = ExecResponse::from_result(&r, Some(ExecOutput::B64));
    assert_eq!(b.stdout, "");
    assert_eq!(b.into_result(false).stdout_bytes, b"hi\n\xff");
    // text capped at 1 MiB on a char boundary, b64 complete
    let big = "é".repeat(TEXT_CAP); // 2 bytes each
    let r = ExecResult::from_bytes(0, false, big.clone().into_bytes(), Vec::new());
    let resp = ExecResponse::from(&r);
    assert!(resp.stdout_truncated && !resp.stderr_truncated);
    assert_eq!(resp.stdout.len(), TEXT_CAP);
    assert_eq!(resp.into_result(false).stdout_bytes.len(), big.len());

    // the clients' fallbacks: no exitCode is 0; missing or empty b64 with text uses the text;
    // a background command's pid comes from stdout
    let r: ExecResult = serde_json::from_str::<ExecResponse>(r#"{"stdout":"ok"}"#)
        .unwrap()
        .into();
    assert_eq!((r.exit_code, r.stdout_bytes.as_slice()), (0, &b"ok"[..]));
    let r = serde_json::from_str::<ExecResponse>(
        r#"{"stdout":"pid=4242\n","stderr":"","exitCode":0,"stdoutB64":"","user":"app"}"#,
    )
    .unwrap();
    assert_eq!(r.user.as_deref(), Some("app"));
    let r = r.into_result(true);
    assert_eq!(r.pid, Some(4242));
    assert_eq!(r.stdout_bytes, b"pid=4242\n");
    let r = serde_json::from_str::<ExecResponse>(r#"{"stdout":"x","stdoutB64":"%%"}"#).unwrap();
    assert_eq!(r.into_result(false).stdout_bytes, b"x");
}

#[test]
fn sse_events_as_the_clients_parse_them() {
    // CLOUD-CLIENTS.md §5: "a\n" is `data: a` + `data: `
    let ev = StreamEvent::Stdout("a\n".into());
    assert_eq!(ev.to_sse(), "event: stdout\ndata: a\ndata: \n\n");
    assert_eq!(
        StreamEvent::Exit(3).to_sse(),
        "event: exit\ndata: {\"exitCode\":3}\n\n"
    );
    let events = [
        StreamEvent::Stdout("line1\nline2".into()),
        StreamEvent::Stderr("e\n".into()),
        StreamEvent::Stdout(String::new()),
        StreamEvent::Error("boom".into()),
        StreamEvent::Exit(0),
    ];
    let text: String = events.iter().map(StreamEvent::to_sse).collect();
    // fed byte by byte, the events come back as they went
    let mut d = SseDecoder::new();
    let mut got = Vec::new();
    for b in text.as_bytes() {
        got.extend(d.push(std::slice::from_ref(b)));
    }
    assert_eq!(got, events);
    assert_eq!(d.finish(), None);

    // CRLF, comments, id/retry lines, unknown kinds, no space after the colon, bad exit data,
    // and a last event without its blank line
    let mut d = SseDecoder::new();
    let got = d.push(
        b": keepalive\r\nid: 7\r\nretry: 10\r\nevent: progress\r\ndata: x\r\n\r\n\
          event:stdout\r\ndata:raw\r\n\r\nevent: exit\ndata: nope\n\nevent: stderr\ndata: tail",
    );
    assert_eq!(
        got,
        vec![StreamEvent::Stdout("raw".into()), StreamEvent::Exit(0)]
    );
    assert_eq!(d.finish(), Some(StreamEvent::Stderr("tail".into())));
}

#[test]
fn stream_events_convert_to_and_from_the_cores() {
    let e = ExecEvent::Stdout(b"a\xffb".to_vec());
    assert_eq!(
        StreamEvent::from(&e),
        StreamEvent::Stdout("a\u{fffd}b".into())
    );
    assert_eq!(
        StreamEvent::from(&ExecEvent::Exit(124)),
        StreamEvent::Exit(124)
    );
    assert_eq!(
        ExecEvent::from(StreamEvent::Stderr("x".into())),
        ExecEvent::Stderr(b"x".to_vec())
    );
    assert_eq!(ExecEvent::from(StreamEvent::Exit(2)), ExecEvent::Exit(2));
}
