//! Beam search (`evaluate --num-beams`) equals transformers' `generate(num_beams=K)`
//! on the tiny Llama (goldens from scripts/golden/make_beam_golden.py): every length
//! penalty and stopping rule, with the n-gram, repetition and min-new-tokens
//! processors, one prompt at a time and batched; and the CLI writes its answers.

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
fn beam_search_equals_transformers_alone_and_batched() {
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

    // Batched: left-padded prompts of different lengths, same setting and stop id.
    let first = &cases[0];
    let same: Vec<&serde_json::Value> = cases
        .iter()
        .filter(|c| {
            let keys = [
                "num_beams",
                "length_penalty",
                "early_stopping",
                "no_repeat_ngram_size",
                "repetition_penalty",
                "min_new_tokens",
                "stop_id",
            ];
            keys.iter().all(|k| c[k] == first[k])
        })
        .collect();
    let stop = first["stop_id"].as_u64().unwrap() as u32;
    // Every prompt of the goldens in one batch, with the first case's setting and stop
    // id; each answer must equal that prompt's search alone, and the golden where one
    // exists for that prompt, setting and stop id.
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    for case in cases {
        let prompt = ids(&case["prompt_ids"]);
        if !prompts.contains(&prompt) {
            prompts.push(prompt);
        }
    }
    assert!(prompts.iter().any(|p| p.len() != prompts[0].len()));
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .map(|prompt| GenerationRequest {
            prompt_ids: prompt.clone(),
            row_number: 0,
        })
        .collect();
    let config = config_of(first, max_new_tokens);
    let batched = beam_search(&model, &requests, &[stop], &config).unwrap();
    for (i, (request, batched)) in requests.iter().zip(&batched).enumerate() {
        let alone = beam_search(&model, std::slice::from_ref(request), &[stop], &config).unwrap();
        assert_eq!(batched, &alone[0], "prompt {i} batched");
    }
    for case in same {
        let at = prompts
            .iter()
            .position(|p| *p == ids(&case["prompt_ids"]))
            .unwrap();
        assert_eq!(as_transformers(&batched[at], stop), ids(&case["generated"]));
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
