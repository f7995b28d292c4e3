//! Beam search, as HF `generate(num_beams=K)` (transformers 5's vectorised
//! `_beam_search`, greedy: no beam sampling).
//!
//! Per prompt, K running beams. Each step takes the log-softmax of every beam's next
//! logits (processors applied to the log-probabilities, as HF does: repetition
//! penalty, no-repeat n-grams, min-new-tokens), adds the beam's running score, and
//! keeps the top 2K (K x (1 + stop ids) in HF) continuations over all K x vocab.
//! Those ending in a stop id, or reaching max_new_tokens, are finished hypotheses if
//! they rank among the top K, scored sum / length^length_penalty (the length counts
//! the stop token); the best K finished are kept. The best K unfinished continue, the
//! KV cache's rows following their source beams. A prompt is done when no running
//! beam can beat its K finished ones (`EarlyStopping`), or at max_new_tokens; its
//! answer is the best finished hypothesis.
//!
//! The log-softmax, the scores' sum and the top-2K run on the device, in f32, with
//! libtorch's own kernels, as HF's do; the bookkeeping of a few candidates per prompt
//! runs on the host, with HF's f32 arithmetic (its -1e9 "masked" scores become
//! candidates left out, which cannot change what is kept). Each prompt's beams are
//! independent of the other prompts in the batch (HF keeps stepping a finished
//! prompt whose finished set can no longer change; here it leaves the batch).
//!
//! One difference, shared with the greedy path: the processors see each prompt
//! without the left padding of the batch (HF's see the pad ids too).

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::generate::{
    ContinuousReport, EarlyStopping, Generation, GenerationRequest, LeftPadded, SamplingConfig,
    repeated_ngram_endings,
};
use crate::model::{KvCache, Llama};

/// HF's score for "not a candidate".
const MASKED: f32 = -1.0e9;

/// A sequence that ended (a stop id or max_new_tokens), with its length-normalised score.
#[derive(Debug, Clone)]
struct Hypothesis {
    score: f32,
    /// Generated ids, the stop id included when one ended it.
    tokens: Vec<u32>,
}

/// One prompt's search.
struct Search {
    request: usize,
    /// The running beams' ids so far and their summed log-probabilities (best first).
    running: Vec<Vec<u32>>,
    running_scores: Vec<f32>,
    /// Up to K finished hypotheses, best first.
    finished: Vec<Hypothesis>,
    /// HF's is_early_stop_heuristic_unsatisfied: a running beam may still beat the
    /// worst finished one.
    improvable: bool,
    /// The running beams' source beams of the last step (where their cache rows are).
    sources: Vec<usize>,
}

/// A continuation among a prompt's top 2K: its source beam, token and summed score.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    beam: usize,
    token: u32,
    score: f32,
}

/// Beam search for a batch of prompts; one answer per prompt, in order.
pub fn beam_search(
    model: &Llama,
    requests: &[GenerationRequest],
    stop_ids: &[u32],
    config: &SamplingConfig,
) -> Result<Vec<Generation>> {
    let (answers, _) = searched(model, requests, stop_ids, config)?;
    Ok(answers)
}

/// `beam_search`, with the decoding steps it ran.
fn searched(
    model: &Llama,
    requests: &[GenerationRequest],
    stop_ids: &[u32],
    config: &SamplingConfig,
) -> Result<(Vec<Generation>, usize)> {
    anyhow::ensure!(config.num_beams >= 2, "beam search needs at least 2 beams");
    anyhow::ensure!(
        config.is_greedy(),
        "beam search with sampling (HF's beam sampling) is not built"
    );
    tch::no_grad(|| search_batch(model, requests, stop_ids, config))
}

/// The search; returns the answers and the decoding steps it ran.
fn search_batch(
    model: &Llama,
    requests: &[GenerationRequest],
    stop_ids: &[u32],
    config: &SamplingConfig,
) -> Result<(Vec<Generation>, usize)> {
    let mut outputs = vec![Generation::default(); requests.len()];
    if requests.is_empty() || config.max_new_tokens == 0 {
        return Ok((outputs, 0));
    }
    let device = model.device;
    let beams = config.num_beams;
    let prompts = LeftPadded::new(requests, device)?;
    let mut cache = KvCache::with_capacity((prompts.width + config.max_new_tokens) as i64);
    // Prefill each prompt once, then give every beam a copy of its rows.
    let prefill_logits = prompts.prefill(model, &mut cache);
    let expand = Tensor::arange(requests.len() as i64, (Kind::Int64, device))
        .repeat_interleave_self_int(beams as i64, 0, None);
    cache.select_rows(&expand);
    let mut key_mask = prompts.key_mask.index_select(0, &expand);
    let mut logits = prefill_logits.index_select(0, &expand);
    let mut searches: Vec<Search> = (0..requests.len())
        .map(|request| Search {
            request,
            running: vec![Vec::new(); beams],
            // Only the first beam counts at first: the K copies are the same beam.
            running_scores: std::iter::once(0.0)
                .chain(std::iter::repeat_n(MASKED, beams - 1))
                .collect(),
            finished: Vec::new(),
            improvable: true,
            sources: Vec::new(),
        })
        .collect();
    let keep = beams * (1 + stop_ids.len()).max(2);

    let mut steps_run = 0;
    for step in 0..config.max_new_tokens {
        steps_run = step + 1;
        let log_probs = processed_log_probs(&logits, &searches, requests, stop_ids, config, step);
        let candidates = top_candidates(&log_probs, &searches, keep)?;
        let generated = step + 1;
        // The cache rows (slot x K + beam) the next step's beams continue from.
        let mut sources = Vec::with_capacity(searches.len() * beams);
        let mut continuing = Vec::with_capacity(searches.len());
        for (slot, (mut search, candidates)) in searches.into_iter().zip(candidates).enumerate() {
            if advance(&mut search, &candidates, stop_ids, config, generated) {
                outputs[search.request] = answer(&search, stop_ids);
            } else {
                sources.extend(search.sources.iter().map(|beam| slot * beams + beam));
                continuing.push(search);
            }
        }
        searches = continuing;
        if searches.is_empty() {
            break;
        }
        // The cache rows follow the surviving beams' sources (a copy of the cache,
        // as HF's reorder_cache).
        let count = sources.len() as i64;
        if let Some(rows) = rows_to_select(key_mask.size()[0] as usize, &sources) {
            let rows = Tensor::from_slice(&rows).to_device(device);
            cache.select_rows(&rows);
            key_mask = key_mask.index_select(0, &rows);
        }
        key_mask = Tensor::cat(
            &[&key_mask, &Tensor::ones([count, 1], (Kind::Bool, device))],
            1,
        );
        let mut ids = Vec::with_capacity(sources.len());
        let mut positions = Vec::with_capacity(sources.len());
        for search in &searches {
            let position = (requests[search.request].prompt_ids.len() + step) as i64;
            for beam in &search.running {
                ids.push(*beam.last().expect("a running beam has a token") as i64);
                positions.push(position);
            }
        }
        let hidden = model.forward_hidden(
            &Tensor::from_slice(&ids).view([count, 1]).to_device(device),
            &Tensor::from_slice(&positions)
                .view([count, 1])
                .to_device(device),
            prompts.padded.then_some(&key_mask),
            Some(&mut cache),
            false,
        );
        logits = model.logits(&hidden.select(1, 0)).to_kind(Kind::Float);
    }
    debug_assert!(
        searches.is_empty(),
        "`advance` ends every search at max_new_tokens"
    );
    Ok((outputs, steps_run))
}

/// The cache rows to keep, in order, when the next step's beams continue from
/// `sources` out of `rows_now` rows; None when they are the rows as they are (every
/// beam continues itself and no prompt left the batch).
fn rows_to_select(rows_now: usize, sources: &[usize]) -> Option<Vec<i64>> {
    let unchanged =
        sources.len() == rows_now && sources.iter().enumerate().all(|(row, &s)| row == s);
    (!unchanged).then(|| sources.iter().map(|&row| row as i64).collect())
}

/// `beam_search` over any number of prompts, `prompts_at_once` at a time (each with
/// its K beams), calling `finished(index, generation)` for each prompt in order.
/// Returns how the decoding went, as continuous batching reports it: the steps the
/// searches ran, the answers' tokens (not the K rows decoded per prompt) and the
/// seconds, prefills included.
pub fn beam_search_all(
    model: &Llama,
    requests: &[GenerationRequest],
    stop_ids: &[u32],
    config: &SamplingConfig,
    prompts_at_once: usize,
    finished: &mut dyn FnMut(usize, Generation) -> Result<()>,
) -> Result<ContinuousReport> {
    let started = std::time::Instant::now();
    let mut report = ContinuousReport::default();
    for (chunk_index, chunk) in requests.chunks(prompts_at_once.max(1)).enumerate() {
        let (generations, steps) = searched(model, chunk, stop_ids, config)?;
        report.decode_steps += steps;
        for (offset, generation) in generations.into_iter().enumerate() {
            report.decode_tokens += generation.tokens.len();
            finished(chunk_index * prompts_at_once.max(1) + offset, generation)?;
        }
    }
    report.decode_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The rows' log-softmax [rows, vocab] with HF's processors applied to it.
fn processed_log_probs(
    logits: &Tensor,
    searches: &[Search],
    requests: &[GenerationRequest],
    stop_ids: &[u32],
    config: &SamplingConfig,
    step: usize,
) -> Tensor {
    let log_probs = logits.log_softmax(-1, Kind::Float);
    let vocab = log_probs.size()[1];
    let rows = searches.iter().flat_map(|search| {
        let prompt = &requests[search.request].prompt_ids;
        search.running.iter().map(move |beam| (prompt, beam))
    });
    let mut banned = Vec::new();
    let mut penalised = Vec::new();
    for (row, (prompt, beam)) in rows.enumerate() {
        let at = |id: u32| row as i64 * vocab + id as i64;
        if step < config.min_new_tokens {
            // A stop id outside the vocabulary cannot be chosen anyway.
            banned.extend(
                stop_ids
                    .iter()
                    .filter(|&&id| (id as i64) < vocab)
                    .map(|&id| at(id)),
            );
        }
        if config.no_repeat_ngram_size > 0 || config.repetition_penalty != 1.0 {
            let sequence: Vec<u32> = prompt.iter().chain(beam.iter()).copied().collect();
            banned.extend(
                repeated_ngram_endings(&sequence, config.no_repeat_ngram_size)
                    .into_iter()
                    .map(at),
            );
            if config.repetition_penalty != 1.0 {
                let mut seen = sequence;
                seen.sort_unstable();
                seen.dedup();
                penalised.extend(seen.into_iter().map(at));
            }
        }
    }
    let device = log_probs.device();
    // A flat view: the processors write into `log_probs` itself.
    let mut flat = log_probs.view([-1]);
    if !penalised.is_empty() {
        // HF's RepetitionPenaltyLogitsProcessor: negative scores (all of them, for
        // log-probabilities) are multiplied by the penalty, positive ones divided.
        let index = Tensor::from_slice(&penalised).to_device(device);
        let values = flat.index_select(0, &index);
        let penalty = config.repetition_penalty;
        let changed = values
            .multiply_scalar(penalty)
            .where_self(&values.lt(0.0), &values.divide_scalar(penalty));
        let _ = flat.index_copy_(0, &index, &changed);
    }
    if !banned.is_empty() {
        let index = Tensor::from_slice(&banned).to_device(device);
        let _ = flat.index_fill_(0, &index, f64::NEG_INFINITY);
    }
    log_probs
}

/// Each search's top `keep` continuations over all its beams x vocab, best first.
fn top_candidates(
    log_probs: &Tensor,
    searches: &[Search],
    keep: usize,
) -> Result<Vec<Vec<Candidate>>> {
    let beams = searches[0].running.len();
    let vocab = log_probs.size()[1];
    let device = log_probs.device();
    let scores: Vec<f32> = searches
        .iter()
        .flat_map(|search| search.running_scores.iter().copied())
        .collect();
    let running = Tensor::from_slice(&scores).to_device(device).view([
        searches.len() as i64,
        beams as i64,
        1,
    ]);
    let total = (log_probs.view([searches.len() as i64, beams as i64, vocab]) + running)
        .view([searches.len() as i64, beams as i64 * vocab]);
    let (values, indices) = total.topk(keep as i64, -1, true, true);
    let values = Vec::<f32>::try_from(values.to_device(Device::Cpu).view([-1]))?;
    let indices = Vec::<i64>::try_from(indices.to_device(Device::Cpu).view([-1]))?;
    Ok(values
        .chunks(keep)
        .zip(indices.chunks(keep))
        .map(|(values, indices)| {
            values
                .iter()
                .zip(indices)
                .map(|(&score, &index)| Candidate {
                    beam: (index / vocab) as usize,
                    token: (index % vocab) as u32,
                    score,
                })
                .collect()
        })
        .collect())
}

/// `length ** penalty` as HF computes it (a Python float), applied to an f32 score.
fn normalised(score: f32, length: usize, penalty: f64) -> f32 {
    score / (length as f64).powf(penalty) as f32
}

/// One step of a prompt's search from its top candidates: new finished hypotheses,
/// the next running beams (their source beams left in `search.sources`), and whether
/// the search is over.
fn advance(
    search: &mut Search,
    candidates: &[Candidate],
    stop_ids: &[u32],
    config: &SamplingConfig,
    generated: usize,
) -> bool {
    let beams = config.num_beams;
    let at_limit = generated >= config.max_new_tokens;
    let ends = |c: &Candidate| at_limit || stop_ids.contains(&c.token);
    // f. Finished hypotheses: only among the top K, and only while one can still
    // improve the set (HF adds -1e9 to the others, which keeps them out).
    let full = search.finished.len() == beams;
    let accepting =
        search.improvable && !(full && config.early_stopping == EarlyStopping::WhenFull);
    if accepting {
        for candidate in candidates[..beams].iter().filter(|c| ends(c)) {
            let mut tokens = search.running[candidate.beam].clone();
            tokens.push(candidate.token);
            search.finished.push(Hypothesis {
                score: normalised(candidate.score, generated, config.length_penalty),
                tokens,
            });
        }
        // Stable: on a tie the earlier-kept hypothesis stays ahead, as in HF's merge.
        search.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
        search.finished.truncate(beams);
    }
    // e. The best K continuations that did not end run on.
    let next: Vec<&Candidate> = candidates.iter().filter(|c| !ends(c)).take(beams).collect();
    if at_limit || next.len() < beams {
        return true;
    }
    search.sources = next.iter().map(|c| c.beam).collect();
    search.running = next
        .iter()
        .map(|c| {
            let mut tokens = search.running[c.beam].clone();
            tokens.push(c.token);
            tokens
        })
        .collect();
    search.running_scores = next.iter().map(|c| c.score).collect();
    // g. Can a running beam still beat the worst finished one?
    let hypothetical = match config.early_stopping {
        EarlyStopping::Never if config.length_penalty > 0.0 => config.max_new_tokens,
        _ => generated,
    };
    let best_possible = normalised(
        search.running_scores[0],
        hypothetical,
        config.length_penalty,
    );
    let worst_finished = if search.finished.len() == beams {
        search.finished.last().map_or(MASKED, |h| h.score)
    } else {
        MASKED
    };
    search.improvable &= best_possible > worst_finished;
    let full = search.finished.len() == beams;
    !search.improvable || (full && config.early_stopping == EarlyStopping::WhenFull)
}

/// The best finished hypothesis as a `Generation` (its stop id dropped).
fn answer(search: &Search, stop_ids: &[u32]) -> Generation {
    let Some(best) = search.finished.first() else {
        return Generation::default();
    };
    let mut tokens = best.tokens.clone();
    let stopped = tokens.last().is_some_and(|t| stop_ids.contains(t));
    if stopped {
        tokens.pop();
    }
    Generation { tokens, stopped }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A search of 2 beams with two finished hypotheses scoring -2.0 and -2.5 and
    /// running beams whose summed scores are -9.0 and -9.5, 3 tokens in.
    fn full_search() -> Search {
        Search {
            request: 0,
            running: vec![vec![5, 6, 7], vec![5, 6, 8]],
            running_scores: vec![-9.0, -9.5],
            finished: vec![
                Hypothesis {
                    score: -2.0,
                    tokens: vec![5, 2],
                },
                Hypothesis {
                    score: -2.5,
                    tokens: vec![5, 6, 2],
                },
            ],
            improvable: true,
            sources: Vec::new(),
        }
    }

    /// The 4th token's continuations: none ends, the best two go on.
    fn candidates(best: f32) -> Vec<Candidate> {
        vec![
            Candidate {
                beam: 0,
                token: 9,
                score: best,
            },
            Candidate {
                beam: 1,
                token: 9,
                score: best - 0.5,
            },
            Candidate {
                beam: 0,
                token: 10,
                score: best - 1.0,
            },
            Candidate {
                beam: 1,
                token: 10,
                score: best - 1.5,
            },
        ]
    }

    fn config(rule: EarlyStopping, length_penalty: f64) -> SamplingConfig {
        SamplingConfig {
            num_beams: 2,
            max_new_tokens: 20,
            length_penalty,
            early_stopping: rule,
            ..SamplingConfig::default()
        }
    }

    #[test]
    fn cache_rows_are_reselected_when_beams_move_or_prompts_leave() {
        // Every beam continues itself, nobody left: nothing to copy.
        assert_eq!(rows_to_select(4, &[0, 1, 2, 3]), None);
        // Beams swapped.
        assert_eq!(rows_to_select(4, &[1, 0, 2, 3]), Some(vec![1, 0, 2, 3]));
        // The last prompt (rows 2 and 3) finished while the first one's beams
        // continue themselves: the rows must still shrink.
        assert_eq!(rows_to_select(4, &[0, 1]), Some(vec![0, 1]));
        // The first prompt finished.
        assert_eq!(rows_to_select(4, &[2, 3]), Some(vec![2, 3]));
    }

    #[test]
    fn the_heuristic_stops_when_no_running_beam_can_beat_the_finished_ones() {
        // HF's False: the best running beam at its current length, -10 / 4 = -2.5, is
        // below the worst finished (-2.5 is not above -2.5): done.
        let mut search = full_search();
        assert!(advance(
            &mut search,
            &candidates(-10.0),
            &[2],
            &config(EarlyStopping::Heuristic, 1.0),
            4
        ));
        assert!(!search.improvable);
        // -9.6 / 4 = -2.4 beats -2.5: it goes on.
        let mut search = full_search();
        assert!(!advance(
            &mut search,
            &candidates(-9.6),
            &[2],
            &config(EarlyStopping::Heuristic, 1.0),
            4
        ));
        assert_eq!(search.running, [vec![5, 6, 7, 9], vec![5, 6, 8, 9]]);
        assert_eq!(search.sources, [0, 1]);
    }

    #[test]
    fn never_scores_a_running_beam_at_the_longest_length_with_a_positive_penalty() {
        // -10 / 20 = -0.5 beats -2.5: "never" goes on where "false" stops.
        let mut search = full_search();
        assert!(!advance(
            &mut search,
            &candidates(-10.0),
            &[2],
            &config(EarlyStopping::Never, 1.0),
            4
        ));
        // Without a positive penalty "never" is the heuristic (-10 / 4^0 = -10 < -2.5).
        let mut search = full_search();
        assert!(advance(
            &mut search,
            &candidates(-10.0),
            &[2],
            &config(EarlyStopping::Never, 0.0),
            4
        ));
    }

    #[test]
    fn open_finished_slots_keep_the_search_going_and_true_stops_when_full() {
        let mut search = full_search();
        search.finished.pop();
        assert!(!advance(
            &mut search,
            &candidates(-100.0),
            &[2],
            &config(EarlyStopping::Heuristic, 1.0),
            4
        ));
        let mut search = full_search();
        assert!(advance(
            &mut search,
            &candidates(-1.0),
            &[2],
            &config(EarlyStopping::WhenFull, 1.0),
            4
        ));
    }

    #[test]
    fn only_the_top_k_candidates_may_finish_and_score_by_length() {
        let mut search = full_search();
        search.finished.clear();
        let mut ending = candidates(-4.0);
        ending[1].token = 2; // second best ends: a hypothesis of 4 tokens
        ending[3].token = 2; // fourth ends too, but is not among the top 2
        assert!(!advance(
            &mut search,
            &ending,
            &[2],
            &config(EarlyStopping::Heuristic, 1.0),
            4
        ));
        assert_eq!(search.finished.len(), 1);
        assert_eq!(search.finished[0].tokens, [5, 6, 8, 2]);
        assert_eq!(search.finished[0].score, -4.5 / 4.0);
        // The running beams skip the one that ended.
        assert_eq!(search.running, [vec![5, 6, 7, 9], vec![5, 6, 7, 10]]);
        assert_eq!(search.running_scores, [-4.0, -5.0]);
    }
}
