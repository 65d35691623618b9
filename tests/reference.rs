//! The CPU engine against an independent implementation: Hugging Face transformers (PyTorch,
//! float32, eager attention) run by `scripts/hf_reference.py` on the same BF16 checkpoint, whose
//! results are committed in `tests/fixtures/smollm2_reference.json`.
//!
//! For every prompt of the fixture: the tokenizer gives the same ids (chat prompts through the
//! model's own chat template), greedy decoding gives the same tokens for at least 32 tokens (or
//! up to eos), and the top-k logits at every position agree within 1e-3 relative.
//!
//! Needs the real model (`unweight fetch-test-model --out .cache/smollm2`, which `make test`
//! runs first). Without it the tests print "skipped" loudly, and fail instead when
//! UNWEIGHT_REQUIRE_TEST_MODEL=1 (as `make test` and CI set it).

use std::path::{Path, PathBuf};

use serde_json::Value;
use triton_unweight::device::cpu::{CpuBackend, CpuOptions};
use triton_unweight::device::{Backend, DecodeItem};
use triton_unweight::engine::sampler::argmax;
use triton_unweight::engine::text::{ChatMessage, TextTokenizer};
use triton_unweight::model::weights::WeightMode;

const REL_TOL: f64 = 1e-3;
const MIN_GREEDY: usize = 32;

fn model_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/smollm2");
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    if std::env::var_os("UNWEIGHT_REQUIRE_TEST_MODEL").is_some_and(|v| v == "1") {
        panic!(
            "the test model is required (UNWEIGHT_REQUIRE_TEST_MODEL=1) but {} is missing",
            dir.display()
        );
    }
    println!("*** skipped: test model not fetched (run `unweight fetch-test-model --out .cache/smollm2`) ***");
    None
}

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_matches_transformers() {
    let Some(dir) = model_dir() else { return };
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    for case in fixture()["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let text = if case["chat"].as_bool().unwrap() {
            tok.apply_chat_template(&[ChatMessage::user(prompt)], true)
                .unwrap()
        } else {
            prompt.to_string()
        };
        assert_eq!(
            text,
            case["prompt_text"].as_str().unwrap(),
            "{}: rendered prompt",
            case["name"]
        );
        assert_eq!(
            tok.encode(&text, false).unwrap(),
            ids(&case["prompt_ids"]),
            "{}: prompt ids",
            case["name"]
        );
    }
}

/// Greedy decoding with the engine's backend, teacher-forced on the reference's tokens so that
/// every position's logits can be compared even after a divergence.
fn check_against_reference(mode: WeightMode, dir: &Path) {
    let mut backend = CpuBackend::load(
        dir,
        mode,
        &CpuOptions {
            max_sequences: 1,
            ..CpuOptions::default()
        },
    )
    .unwrap();
    let mut worst = 0.0f64;
    for case in fixture()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["prompt_ids"]);
        let reference = ids(&case["greedy_ids"]);
        let steps = case["steps"].as_array().unwrap();
        let seq = backend.new_sequence().unwrap();
        let mut logits = backend.prefill(seq, &prompt).unwrap();
        let mut ours = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            for (id, want) in ids(&step["top_ids"])
                .iter()
                .zip(step["top_logits"].as_array().unwrap())
            {
                let want = want.as_f64().unwrap();
                let got = logits[*id as usize] as f64;
                let rel = (got - want).abs() / want.abs().max(1.0);
                worst = worst.max(rel);
                assert!(rel <= REL_TOL, "{name}: step {i}, token {id}: logit {got} vs reference {want} ({rel:.2e} relative)");
            }
            ours.push(argmax(&logits));
            let next = reference[i];
            if i + 1 < steps.len() {
                let out = backend
                    .decode(&[DecodeItem {
                        seq,
                        token: next,
                        pos: prompt.len() + i,
                    }])
                    .unwrap();
                logits = out.row(0).to_vec();
            }
        }
        backend.free_sequence(seq);
        let ended_on_eos = reference.last() == Some(&2);
        assert!(
            reference.len() >= MIN_GREEDY || ended_on_eos,
            "{name}: fixture too short"
        );
        assert_eq!(
            ours, reference,
            "{name}: greedy tokens differ from transformers"
        );
    }
    println!(
        "{}: worst relative logit difference {worst:.2e}",
        mode.as_str()
    );
}

#[test]
fn greedy_tokens_and_logits_match_transformers() {
    let Some(dir) = model_dir() else { return };
    check_against_reference(WeightMode::Decoded, &dir);
}

#[test]
fn compressed_checkpoint_matches_transformers_too() {
    let Some(dir) = model_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let comp = tmp.path().join("c");
    let opts = triton_unweight::container::CompressOptions {
        progress: false,
        ..Default::default()
    };
    triton_unweight::container::compress_dir(&dir, &comp, &opts).unwrap();
    check_against_reference(WeightMode::OnTheFly, &comp);
}
