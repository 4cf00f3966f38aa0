//! The forward pass of the real models against llama.cpp: greedy tokens and
//! last-position logits.

mod common;

use std::sync::Arc;

use realm_models::arch::Model;
use realm_models::gguf::GgufFile;

fn top(logits: &[f32], n: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    ids.truncate(n);
    ids
}

#[test]
fn greedy_decoding_matches_llama_cpp() {
    for (name, key) in common::MODELS {
        let Some(path) = common::model(name) else {
            continue;
        };
        let model =
            Model::load(Arc::new(GgufFile::open(&path).unwrap()), common::device()).unwrap();
        let reference = common::reference(key);
        for case in reference["cases"].as_array().unwrap() {
            let prompt = common::ids(&case["prompt_ids"]);
            let expected = common::ids(&case["greedy_output_ids"]);
            let margins: Vec<f64> = case["top2_margins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_f64().unwrap())
                .collect();
            let mut seq = model.new_sequence(prompt.len() + expected.len());
            let mut logits = model.forward(&mut seq, &prompt).unwrap();
            for (step, &want) in expected.iter().enumerate() {
                let got = common::argmax(&logits);
                if margins[step] < 0.5 {
                    // llama.cpp itself was nearly undecided here; rounding may pick either.
                    break;
                }
                assert_eq!(
                    got, want,
                    "{name} {:?}: step {step} (margin {})",
                    case["prompt"], margins[step]
                );
                logits = model.forward(&mut seq, &[got]).unwrap();
            }
        }
    }
}

#[test]
fn last_position_logits_match_llama_cpp() {
    for (name, key) in common::MODELS {
        let Some(path) = common::model(name) else {
            continue;
        };
        let model =
            Model::load(Arc::new(GgufFile::open(&path).unwrap()), common::device()).unwrap();
        let case = &common::reference(key)["logits_case"];
        let prompt = common::ids(&case["prompt_ids"]);
        let mut seq = model.new_sequence(prompt.len());
        // Token by token here (the greedy test prefills in one batch): both paths are checked.
        let mut logits = Vec::new();
        for &t in &prompt {
            logits = model.forward(&mut seq, &[t]).unwrap();
        }
        let expected: Vec<u32> = case["top5_last"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_u64().unwrap() as u32)
            .collect();
        let ours = top(&logits, 5);
        assert_eq!(
            ours[0], expected[0],
            "{name}: top-1 (ours {ours:?}, llama.cpp {expected:?})"
        );
        let shared = ours.iter().filter(|id| expected.contains(id)).count();
        assert!(
            shared >= 4,
            "{name}: top-5 share {shared} ids (ours {ours:?}, llama.cpp {expected:?})"
        );
        for e in case["top5_last"].as_array().unwrap() {
            let id = e["id"].as_u64().unwrap() as usize;
            let want = e["logit"].as_f64().unwrap() as f32;
            eprintln!(
                "{name}: token {id}: ours {:.3}, llama.cpp {want:.3}",
                logits[id]
            );
        }
    }
}

/// Every reference case decoded together, as the batcher runs them: one
/// `Model::step` per token for all cases at once (prompts of different
/// lengths, so different positions), each checked against llama.cpp.
#[test]
fn batched_greedy_decoding_matches_llama_cpp() {
    use realm_models::arch::BatchItem;
    for (name, key) in common::MODELS {
        let Some(path) = common::model(name) else {
            continue;
        };
        let model =
            Model::load(Arc::new(GgufFile::open(&path).unwrap()), common::device()).unwrap();
        let reference = common::reference(key);
        let cases: Vec<(Vec<u32>, Vec<u32>, Vec<f64>)> = reference["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|case| {
                let margins = case["top2_margins"].as_array().unwrap();
                (
                    common::ids(&case["prompt_ids"]),
                    common::ids(&case["greedy_output_ids"]),
                    margins.iter().map(|m| m.as_f64().unwrap()).collect(),
                )
            })
            .collect();
        assert!(cases.len() > 1, "{name}: several cases to batch");
        let mut seqs: Vec<_> = cases
            .iter()
            .map(|(prompt, expected, _)| model.new_sequence(prompt.len() + expected.len()))
            .collect();
        // Step 0 runs every prompt as one batch; later steps one token each.
        let mut inputs: Vec<Vec<u32>> = cases.iter().map(|(p, _, _)| p.clone()).collect();
        let mut live: Vec<bool> = vec![true; cases.len()];
        for step in 0.. {
            let mut batch: Vec<BatchItem<'_>> = seqs
                .iter_mut()
                .zip(&inputs)
                .zip(&live)
                .filter(|(_, live)| **live)
                .map(|((seq, tokens), _)| BatchItem {
                    seq,
                    tokens,
                    logits: true,
                })
                .collect();
            if batch.is_empty() {
                break;
            }
            let logits = model.step(&mut batch).unwrap();
            let running: Vec<usize> = (0..cases.len()).filter(|&i| live[i]).collect();
            for (i, logits) in running.into_iter().zip(logits) {
                let (_, expected, margins) = &cases[i];
                let got = common::argmax(&logits.unwrap());
                if step >= expected.len() || margins[step] < 0.5 {
                    live[i] = false;
                    continue;
                }
                assert_eq!(got, expected[step], "{name} case {i}: step {step}");
                inputs[i] = vec![got];
            }
        }
    }
}
