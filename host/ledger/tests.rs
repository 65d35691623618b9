//! The rules can fail: each test breaks one and finds it reported.

use super::*;
use crate::model_config::Devices;

fn config(decoupled: bool) -> Arc<ModelConfig> {
    let text = format!(
        r#"backend: "b" max_batch_size: 1
           model_transaction_policy {{ decoupled: {decoupled} }}
           input [ {{ name: "text_input" data_type: TYPE_STRING dims: [1] }} ]
           output [ {{ name: "text_output" data_type: TYPE_STRING dims: [-1] }},
                    {{ name: "n" data_type: TYPE_INT32 dims: [1] }} ]
           instance_group [ {{ kind: KIND_CPU }} ]"#
    );
    Arc::new(ModelConfig::from_pbtxt(&text, "m", &Devices::default()).unwrap())
}

/// A ledger with `n` requests, all submitted to instance 0.
fn ledger(n: usize) -> (Ledger, Vec<usize>) {
    let specs = (0..n)
        .map(|i| RequestSpec {
            id: format!("r{i}"),
            ..RequestSpec::default()
        })
        .collect();
    let mut l = Ledger::new(config(true), specs, Options::default());
    let inp = EncodedInput {
        name: "text_input".into(),
        datatype: 13,
        shape: vec![1, 1],
        buffers: vec![vec![2, 0, 0, 0, b'h', b'i']],
        memory_type: 0,
    };
    let hs = (0..n).map(|r| l.submit(r, vec![inp.clone()], 0)).collect();
    (l, hs)
}

const F: &str = "test";

fn has(l: &Ledger, rule: &str, text: &str) -> bool {
    l.violations()
        .iter()
        .any(|v| v.starts_with(&format!("{rule}:")) && v.contains(text))
}

fn inst() -> usize {
    handle(Kind::Instance, 0)
}

fn t4() -> [u64; 4] {
    let t = now_ns();
    [t, t, t, t]
}

/// The well-behaved decoupled flow: factory, two responses, FINAL, stats, release, delete.
fn good_flow(l: &mut Ledger, h: usize) {
    let f = l.factory_new(F, h).unwrap();
    for last in [false, true] {
        let resp = l.response_new(F, f, true).unwrap();
        let o = l
            .response_output(F, resp, "text_output", 13, vec![1, 1])
            .unwrap();
        let p = l.output_buffer(F, o, 6).unwrap();
        // SAFETY: the ledger just allocated 6 bytes at p.
        unsafe { std::ptr::copy_nonoverlapping(b"\x02\0\0\0ok".as_ptr(), p.cast(), 6) };
        l.response_send(F, resp, if last { FLAG_FINAL } else { 0 }, 0)
            .unwrap();
    }
    l.report_statistics(F, inst(), h, true, t4()).unwrap();
    l.request_release(F, h, RELEASE_ALL).unwrap();
    l.factory_delete(F, f).unwrap();
}

#[test]
fn handles_round_trip() {
    for k in KINDS {
        assert_eq!(decode(handle(k, 41)), Some((k, 41)));
    }
    assert_eq!(decode(0), None);
    assert_eq!(decode(0x7fff_0000_1000), None);
}

#[test]
fn a_correct_backend_leaves_no_violation() {
    let (mut l, hs) = ledger(1);
    good_flow(&mut l, hs[0]);
    l.final_checks();
    assert_eq!(l.violations(), &[] as &[String]);
    let rep = l.report();
    assert_eq!(rep["requests"][0]["text_output"], "okok");
    assert_eq!(rep["requests"][0]["final_count"], 1);
    assert_eq!(rep["requests"][0]["responses"][1]["final"], true);
}

#[test]
fn double_release_is_reported() {
    let (mut l, hs) = ledger(1);
    good_flow(&mut l, hs[0]);
    assert!(l.request_release(F, hs[0], RELEASE_ALL).is_err());
    assert!(
        has(&l, "use-after-release", "request 'r0'"),
        "{:?}",
        l.violations()
    );
}

#[test]
fn use_after_release_is_reported_for_requests_and_inputs() {
    let (mut l, hs) = ledger(1);
    let input = l.request_input(F, hs[0], "text_input").unwrap();
    good_flow(&mut l, hs[0]);
    assert!(l.request_id("TRITONBACKEND_RequestId", hs[0]).is_err());
    assert!(has(
        &l,
        "use-after-release",
        "TRITONBACKEND_RequestId on request 'r0'"
    ));
    assert!(l
        .input_buffer("TRITONBACKEND_InputBuffer", input, 0)
        .is_err());
    assert!(has(
        &l,
        "use-after-release",
        "input 'text_input' of request 'r0'"
    ));
}

#[test]
fn missing_final_and_unreleased_request_are_reported() {
    let (mut l, hs) = ledger(1);
    let f = l.factory_new(F, hs[0]).unwrap();
    let resp = l.response_new(F, f, true).unwrap();
    l.response_send(F, resp, 0, 0).unwrap();
    l.factory_delete(F, f).unwrap();
    l.final_checks();
    assert!(has(&l, "missing-final", "request 'r0'"));
    assert!(has(&l, "unreleased-request", "request 'r0'"));
}

#[test]
fn second_final_and_response_after_final_are_reported() {
    let (mut l, hs) = ledger(1);
    let f = l.factory_new(F, hs[0]).unwrap();
    l.factory_send_flags(F, f, FLAG_FINAL).unwrap();
    let resp = l.response_new(F, f, true).unwrap();
    l.response_send(F, resp, 0, 0).unwrap();
    l.factory_send_flags(F, f, FLAG_FINAL).unwrap();
    assert!(has(&l, "response-after-final", "request 'r0'"));
    assert!(has(&l, "multiple-final", "request 'r0'"));
}

#[test]
fn undeleted_and_double_deleted_errors_are_reported() {
    let (mut l, hs) = ledger(1);
    let e = l.new_error(
        code::INVALID_ARG,
        "bad input",
        "TRITONSERVER_ErrorNew".into(),
    );
    let f = l.factory_new(F, hs[0]).unwrap();
    let resp = l.response_new(F, f, true).unwrap();
    // The error passed to ResponseSend stays the caller's: it must still delete it.
    l.response_send(F, resp, FLAG_FINAL, e).unwrap();
    // An error a server function returned is the backend's too.
    let ret = l.fail_to_error("TRITONBACKEND_RequestInput", fail(code::INVALID_ARG, "x"));
    l.error_delete(F, ret);
    l.error_delete(F, ret);
    assert!(has(&l, "use-after-delete", "TRITONBACKEND_RequestInput"));
    l.report_statistics(F, inst(), hs[0], false, [0; 4])
        .unwrap();
    l.request_release(F, hs[0], RELEASE_ALL).unwrap();
    l.factory_delete(F, f).unwrap();
    l.final_checks();
    assert!(has(&l, "leaked-error", "bad input"), "{:?}", l.violations());
    let rep = l.report();
    assert_eq!(
        rep["requests"][0]["responses"][0]["error"]["code"],
        "INVALID_ARG"
    );
}

#[test]
fn use_after_send_delete_and_factory_delete() {
    let (mut l, hs) = ledger(1);
    let f = l.factory_new(F, hs[0]).unwrap();
    let resp = l.response_new(F, f, true).unwrap();
    l.response_send(F, resp, FLAG_FINAL, 0).unwrap();
    assert!(l.response_output(F, resp, "n", 8, vec![1]).is_err());
    assert!(has(&l, "use-after-send", "response #1 of request 'r0'"));
    assert!(l.response_delete(F, resp).is_err());
    l.factory_delete(F, f).unwrap();
    assert!(l.factory_is_cancelled(F, f).is_err());
    assert!(has(
        &l,
        "use-after-delete",
        "response factory of request 'r0'"
    ));
}

#[test]
fn statistics_rules() {
    let (mut l, hs) = ledger(2);
    let f = l.factory_new(F, hs[0]).unwrap();
    l.factory_send_flags(F, f, FLAG_FINAL).unwrap();
    l.request_release(F, hs[0], RELEASE_ALL).unwrap();
    assert!(has(&l, "statistics", "released without"));
    assert!(l.report_statistics(F, inst(), hs[0], true, t4()).is_err());
    assert!(has(&l, "use-after-release", "request 'r0'"));
    let t = now_ns();
    l.report_statistics(F, inst(), hs[1], true, [t, t - 1, t, t])
        .unwrap();
    assert!(has(&l, "statistics", "not in order"));
    l.report_statistics(F, inst(), hs[1], true, [1, 2, 3, 4])
        .unwrap();
    assert!(has(&l, "statistics", "reported twice"));
    assert!(has(&l, "statistics", "outside the run"));
}

#[test]
fn release_flags_and_execute_error_ownership() {
    let (mut l, hs) = ledger(2);
    assert!(l.request_release(F, hs[0], RELEASE_RESCHEDULE).is_err());
    assert!(has(&l, "release-flags", "RESCHEDULE"));
    // Execute fails after releasing one of its requests.
    l.report_statistics(F, inst(), hs[0], false, [0; 4])
        .unwrap();
    l.request_release(F, hs[0], RELEASE_ALL).unwrap();
    let e = l.new_error(code::UNSUPPORTED, "no", "TRITONSERVER_ErrorNew".into());
    l.end_execute(&[0, 1], e);
    assert!(has(
        &l,
        "execute-error-ownership",
        "request 'r0' was released"
    ));
    assert!(l.request_id(F, hs[1]).is_err());
    assert!(has(
        &l,
        "execute-error-ownership",
        "Triton kept the request"
    ));
    // The host answered both; the error is Triton's now.
    let rep = l.report();
    assert_eq!(rep["requests"][1]["responses"][0]["source"], "host");
    assert_eq!(
        rep["requests"][1]["responses"][0]["error"]["code"],
        "UNSUPPORTED"
    );
    l.error_delete(F, e);
    assert!(has(
        &l,
        "error-ownership",
        "which TRITONBACKEND_ModelInstanceExecute returned"
    ));
}

#[test]
fn output_rules() {
    let (mut l, hs) = ledger(1);
    let r1 = l.response_new(F, hs[0], false).unwrap();
    let o = l.response_output(F, r1, "n", 8, vec![1, 2]).unwrap();
    assert!(l.response_output(F, r1, "n", 8, vec![1]).is_err());
    assert!(has(&l, "duplicate-output", "'n'"));
    let err = l
        .response_output(F, r1, "undeclared", 8, vec![1])
        .unwrap_err();
    assert!(err.msg.contains("unexpected inference output 'undeclared'"));
    // A second response before the first one's buffers exist.
    let r2 = l.response_new(F, hs[0], false).unwrap();
    assert!(has(
        &l,
        "response-order",
        "output(s) [\"n\"] of its response #1"
    ));
    l.response_output(F, r1, "text_output", 13, vec![1, 1])
        .unwrap();
    assert!(has(&l, "response-order", "after a newer response"));
    // Size must match shape x element size.
    l.output_buffer(F, o, 4).unwrap();
    assert!(has(&l, "output-size", "asks for 4 bytes"));
    assert_eq!(
        l.output_buffer(F, o, 8).unwrap_err().code,
        code::ALREADY_EXISTS
    );
    l.response_delete(F, r1).unwrap();
    let o2 = l
        .response_output(F, r2, "text_output", 13, vec![1, 2])
        .unwrap();
    let p = l.output_buffer(F, o2, 5).unwrap();
    // SAFETY: 5 bytes were allocated at p: one element of 1 byte where 2 were declared.
    unsafe { std::ptr::copy_nonoverlapping(b"\x01\0\0\0a".as_ptr(), p.cast(), 5) };
    l.response_send(F, r2, FLAG_FINAL, 0).unwrap();
    assert!(has(
        &l,
        "output-content",
        "holds 1 elements, shape [1, 2] says 2"
    ));
}

#[test]
fn messages_ownership() {
    let (mut l, _) = ledger(0);
    let backend = handle(Kind::Backend, 0);
    let model = handle(Kind::Model, 0);
    let bc = l.backend_config(F, backend).unwrap();
    l.message_delete(F, bc).unwrap();
    assert!(has(&l, "message-ownership", "backend configuration"));
    let mc = l.model_config(F, model, 1).unwrap();
    let (p, n) = l.message_json(F, mc).unwrap();
    // SAFETY: the ledger keeps n bytes at p alive.
    let text = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), n) };
    let j: Json = serde_json::from_slice(text).unwrap();
    assert_eq!(j["name"], "m");
    let rep = l.report();
    assert_eq!(
        rep["backend_config"]["cmdline"]["default-max-batch-size"],
        "4"
    );
    l.final_checks();
    assert!(has(&l, "leaked-message", "model configuration"));
}

#[test]
fn leaks_at_unload() {
    let (mut l, hs) = ledger(1);
    let _f = l.factory_new(F, hs[0]).unwrap();
    let _r = l.response_new(F, hs[0], false).unwrap();
    let _a = l.alloc(F, 0, 16).unwrap();
    l.final_checks();
    assert!(has(&l, "leaked-factory", "request 'r0'"));
    assert!(has(&l, "leaked-response", "response #1 of request 'r0'"));
    assert!(has(&l, "leaked-allocation", "16 bytes"));
    assert!(has(&l, "unreleased-request", "request 'r0'"));
}

#[test]
fn use_after_finalize_and_wrong_handles() {
    let (mut l, _) = ledger(0);
    l.set_life_instance(0, Life::Finalized);
    assert!(l.instance_name_ptr(F, inst()).is_err());
    assert!(has(&l, "use-after-finalize", "instance m_0"));
    assert!(l.request_id(F, handle(Kind::Response, 0)).is_err());
    assert!(has(&l, "wrong-handle", "Response handle where a Request"));
    assert!(l.request_id(F, 0x1234).is_err());
    assert!(has(&l, "wrong-handle", "0x1234"));
    assert!(l.request_id(F, 0).is_err());
    assert!(has(&l, "null-handle", "null Request"));
}

#[test]
fn cancellation_after_responses() {
    let specs = vec![RequestSpec {
        id: "c".into(),
        cancel_after_responses: Some(2),
        ..RequestSpec::default()
    }];
    let mut l = Ledger::new(config(true), specs, Options::default());
    let h = l.submit(0, vec![], 0);
    let f = l.factory_new(F, h).unwrap();
    for _ in 0..2 {
        assert!(!l.factory_is_cancelled(F, f).unwrap());
        let r = l.response_new(F, f, true).unwrap();
        l.response_send(F, r, 0, 0).unwrap();
    }
    assert!(l.factory_is_cancelled(F, f).unwrap());
    assert!(l.request_is_cancelled(F, h).unwrap());
}

#[test]
fn non_decoupled_models_send_exactly_one_response() {
    let mut l = Ledger::new(
        config(false),
        vec![RequestSpec {
            id: "a".into(),
            ..RequestSpec::default()
        }],
        Options::default(),
    );
    let h = l.submit(0, vec![], 0);
    for _ in 0..2 {
        let r = l.response_new(F, h, false).unwrap();
        l.response_send(F, r, FLAG_FINAL, 0).unwrap();
    }
    l.report_statistics(F, inst(), h, false, [0; 4]).unwrap();
    l.request_release(F, h, RELEASE_ALL).unwrap();
    l.final_checks();
    assert!(has(&l, "non-decoupled", "got 2 responses"));
}

#[test]
fn metrics_rules() {
    let (mut l, _) = ledger(0);
    let fam = l.family_new(0, "requests_total".into()).unwrap();
    let label = l.parameter_new("model".into(), json!("m"));
    let m = l.metric_new(F, fam, vec![label], 0).unwrap();
    l.parameter_delete(F, label);
    l.metric_op(F, m, 1, 2.0).unwrap();
    assert_eq!(l.metric_op(F, m, 0, 0.0).unwrap(), 2.0);
    assert_eq!(
        l.metric_op(F, m, 1, -1.0).unwrap_err().code,
        code::INVALID_ARG
    );
    assert_eq!(
        l.metric_op(F, m, 2, 1.0).unwrap_err().code,
        code::UNSUPPORTED
    );
    // A family deleted before its metrics.
    assert!(l.family_delete(F, fam).is_err());
    assert!(has(&l, "metric-order", "requests_total"));
    let hist = l.family_new(2, "latency".into()).unwrap();
    assert!(l.metric_new(F, hist, vec![], 0).is_err());
    let args = l.args_new();
    l.args_set_histogram(F, args, vec![1.0, 10.0]).unwrap();
    let h = l.metric_new(F, hist, vec![], args).unwrap();
    l.metric_op(F, h, 3, 5.0).unwrap();
    let rep = l.report();
    assert_eq!(rep["metrics"][0]["value"], 2.0);
    assert_eq!(rep["metrics"][1]["observations"], 1);
    l.metric_delete(F, m).unwrap();
    l.family_delete(F, fam).unwrap();
    assert!(l.metric_op(F, m, 0, 0.0).is_err());
    assert!(has(
        &l,
        "use-after-delete",
        "after TRITONSERVER_MetricDelete"
    ));
    l.final_checks();
    assert!(has(&l, "leaked-metric", "family 'latency'"));
    assert!(has(&l, "leaked-metric", "metric args"));
}
