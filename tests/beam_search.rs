//! Beam search (`evaluate --num-beams`) equals transformers' `generate(num_beams=K)`
//! on the tiny Llama (goldens from scripts/golden/make_beam_golden.py): every length
//! penalty and stopping rule, with the n-gram, repetition and min-new-tokens
//! processors, one prompt at a time and batched.

mod common;

use amthal::beam_search::beam_search;
use amthal::generate::{EarlyStopping, GenerationRequest, SamplingConfig, generate_batch};
use amthal::model::{Llama, LoadOptions, load_llama};
use amthal::model_source::ModelSource;
use common::*;

fn tiny() -> Llama {
    load_llama(
        &ModelSource::HfFolder(fixture("tiny-llama")),
        LoadOptions::default(),
    )
    .unwrap()
}

fn config_of(case: &serde_json::Value, max_new_tokens: usize) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens,
        num_beams: case["num_beams"].as_u64().unwrap() as usize,
        length_penalty: case["length_penalty"].as_f64().unwrap(),
        early_stopping: match case["early_stopping"].as_str().unwrap() {
            "false" => EarlyStopping::Heuristic,
            "true" => EarlyStopping::WhenFull,
            "never" => EarlyStopping::Never,
            other => panic!("{other}"),
        },
        no_repeat_ngram_size: case["no_repeat_ngram_size"].as_u64().unwrap() as usize,
        repetition_penalty: case["repetition_penalty"].as_f64().unwrap(),
        min_new_tokens: case["min_new_tokens"].as_u64().unwrap() as usize,
        ..SamplingConfig::default()
    }
}

/// Ours as transformers lists it: the stop id kept at the end when one ended it.
fn as_transformers(generation: &amthal::generate::Generation, stop: u32) -> Vec<u32> {
    let mut tokens = generation.tokens.clone();
    if generation.stopped {
        tokens.push(stop);
    }
    tokens
}

#[test]
fn beam_search_equals_transformers_on_each_setting() {
    let golden = golden("beam_search.json");
    let max_new_tokens = golden["max_new_tokens"].as_u64().unwrap() as usize;
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let model = tiny();
    let mut differs_from_greedy = 0;
    for (i, case) in cases.iter().enumerate() {
        let stop = case["stop_id"].as_u64().unwrap() as u32;
        let config = config_of(case, max_new_tokens);
        let request = GenerationRequest {
            prompt_ids: ids(&case["prompt_ids"]),
            row_number: 0,
        };
        let ours = beam_search(&model, std::slice::from_ref(&request), &[stop], &config).unwrap();
        assert_eq!(
            as_transformers(&ours[0], stop),
            ids(&case["generated"]),
            "case {i}: {case}"
        );
        let greedy = SamplingConfig {
            num_beams: 1,
            ..config.clone()
        };
        let greedy = generate_batch(&model, std::slice::from_ref(&request), &[stop], &greedy);
        differs_from_greedy += usize::from(greedy.unwrap()[0] != ours[0]);
    }
    // The goldens exercise the search, not only its first beam.
    assert!(
        differs_from_greedy * 4 >= cases.len(),
        "{differs_from_greedy}"
    );
    // Ended by the stop id and by the length limit, both present.
    let stopped = cases
        .iter()
        .filter(|c| ids(&c["generated"]).last() == Some(&(c["stop_id"].as_u64().unwrap() as u32)))
        .count();
    assert!(stopped > 0 && stopped < cases.len(), "{stopped}");
}

/// Prompts of different lengths searched together (left-padded; prompts leave the
/// batch as their searches end, first or last in it) give each prompt's answer alone,
/// as transformers gives it.
#[test]
fn batched_beam_search_equals_transformers_one_prompt_at_a_time() {
    let golden = golden("beam_search.json");
    let max_new_tokens = golden["max_new_tokens"].as_u64().unwrap() as usize;
    let batch = &golden["batch"];
    let stop = batch["stop_id"].as_u64().unwrap() as u32;
    let config = config_of(&batch["setting"], max_new_tokens);
    let mut cases: Vec<&serde_json::Value> = batch["cases"].as_array().unwrap().iter().collect();
    assert!(cases.len() >= 6, "{}", cases.len());
    let lengths: Vec<usize> = cases
        .iter()
        .map(|c| c["generated"].as_array().unwrap().len())
        .collect();
    assert!(lengths.iter().any(|&l| l < max_new_tokens) && lengths.contains(&max_new_tokens));
    assert!(
        cases
            .iter()
            .any(|c| c["prompt_ids"] != cases[0]["prompt_ids"])
    );
    let model = tiny();
    // In the goldens' order, then with the shortest answers last (the last prompts
    // leave the batch while the first ones go on).
    for order in ["as written", "shortest last"] {
        if order == "shortest last" {
            cases.sort_by_key(|c| std::cmp::Reverse(c["generated"].as_array().unwrap().len()));
        }
        let requests: Vec<GenerationRequest> = cases
            .iter()
            .map(|c| GenerationRequest {
                prompt_ids: ids(&c["prompt_ids"]),
                row_number: 0,
            })
            .collect();
        let batched = beam_search(&model, &requests, &[stop], &config).unwrap();
        for (case, generation) in cases.iter().zip(&batched) {
            assert_eq!(
                as_transformers(generation, stop),
                ids(&case["generated"]),
                "{order}: {case}"
            );
        }
    }
}

#[test]
fn beam_search_refuses_sampling_and_one_beam() {
    let model = tiny();
    let request = GenerationRequest {
        prompt_ids: vec![1, 17, 250],
        row_number: 0,
    };
    let sampling = SamplingConfig {
        num_beams: 2,
        temperature: 0.7,
        ..SamplingConfig::default()
    };
    let error = beam_search(&model, std::slice::from_ref(&request), &[2], &sampling)
        .unwrap_err()
        .to_string();
    assert!(error.contains("sampling"), "{error}");
    let one = SamplingConfig::default();
    assert!(beam_search(&model, std::slice::from_ref(&request), &[2], &one).is_err());
}
