//! Batched decoding with a static KV cache (allocated once for prompt + max new
//! tokens, written in place).
//!
//! Prompts are left-padded into one batch with per-row positions and a key mask, the
//! batch is prefilled once, then each step feeds one token per unfinished row. A row
//! stops at any stop id (EOS, the chat template's end-of-turn) or at max_new_tokens;
//! finished rows leave the batch (their cache rows are dropped), so they stop costing
//! compute. Greedy decoding takes the argmax on the device and copies back only the
//! chosen ids. Sampling (temperature, top-k, top-p, repetition penalty, HF's order and
//! semantics) draws from a ChaCha8 generator seeded per row from (seed, row number),
//! so the same seed gives the same text whatever the batch size.

use anyhow::Result;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use crate::decode_step::{DecodeMode, DecodeStep};
use crate::model::{KvCache, Llama};
use crate::prompt::PromptBuilder;
use crate::tokenizer::ModelTokenizer;

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// Stop ids are suppressed until this many tokens were generated (benchmarks force length).
    pub min_new_tokens: usize,
    /// 0 = greedy. Sampling's warpers (`logits_warpers.rs`) follow, in HF's order.
    pub temperature: f64,
    /// 1 = off (HF's top_p).
    pub top_p: f64,
    /// 0 = no top-k filter.
    pub top_k: usize,
    /// None = off; else HF's min_p: tokens below min_p x the top probability go.
    pub min_p: Option<f64>,
    /// 1 = off; else HF's typical_p (locally typical sampling's mass).
    pub typical_p: f64,
    /// 0 = off; else HF's epsilon_cutoff (a fixed probability floor).
    pub epsilon_cutoff: f64,
    /// 0 = off; else HF's eta_cutoff (a floor that falls as the entropy rises).
    pub eta_cutoff: f64,
    /// None = off; else HF's top_h (an entropy budget over the 100 top tokens).
    pub top_h: Option<f64>,
    /// 1.0 = off; HF semantics (divide positive logits, multiply negative ones).
    pub repetition_penalty: f64,
    /// 0 = off; else no n-gram of this size occurs twice in prompt + answer (HF's
    /// no_repeat_ngram_size).
    pub no_repeat_ngram_size: usize,
    pub seed: u64,
    /// 1 = no beam search; more: HF's beam search with this many beams
    /// (`beam_search.rs`), greedy only.
    pub num_beams: usize,
    /// Beam search: a finished beam scores its summed log-probabilities divided by its
    /// length to this power (HF's length_penalty; > 0 favours longer answers).
    pub length_penalty: f64,
    /// Beam search: when it stops (HF's early_stopping).
    pub early_stopping: EarlyStopping,
}

/// HF's `early_stopping` for beam search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
pub enum EarlyStopping {
    /// HF's default (False): stop once no running beam, scored at its current length,
    /// can beat the worst of `num_beams` finished ones.
    #[value(name = "false")]
    #[serde(rename = "false")]
    Heuristic,
    /// True: stop as soon as `num_beams` beams have finished.
    #[value(name = "true")]
    #[serde(rename = "true")]
    WhenFull,
    /// "never": as the heuristic, but with a positive length penalty a running beam is
    /// scored at the longest length it could reach (the canonical beam search).
    #[value(name = "never")]
    #[serde(rename = "never")]
    Never,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 256,
            min_new_tokens: 0,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: None,
            typical_p: 1.0,
            epsilon_cutoff: 0.0,
            eta_cutoff: 0.0,
            top_h: None,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            seed: 42,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
        }
    }
}

impl SamplingConfig {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether a token is the plain argmax of the logits (no processor needs the
    /// sequence so far), so it can be picked on the device.
    fn is_plain_argmax(&self) -> bool {
        self.is_greedy() && self.repetition_penalty == 1.0 && self.no_repeat_ngram_size == 0
    }
}

/// Ids that end an answer: the prompt format's end token, the tokenizer's EOS, the
/// config's EOS ids and the generation config's (`generation`: a generation_config.json
/// as read, the one `evaluate --generation-config` chose).
pub fn stop_ids(
    end_id: u32,
    tokenizer: &ModelTokenizer,
    model: &Llama,
    generation: Option<&serde_json::Value>,
) -> Vec<u32> {
    let mut ids = vec![end_id];
    ids.extend(tokenizer.eos.as_ref().map(|t| t.id));
    ids.extend(model.config.eos_token_ids.iter().copied());
    match generation.and_then(|g| g.get("eos_token_id")) {
        Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|v| v as u32)),
        Some(serde_json::Value::Array(items)) => {
            ids.extend(items.iter().filter_map(|v| v.as_u64().map(|v| v as u32)))
        }
        _ => {}
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Generated ids to the explanation text: special tokens dropped, cut at any
/// end-of-turn text the model spelled out, whitespace trimmed.
pub fn completion_text(
    tokenizer: &ModelTokenizer,
    prompts: &PromptBuilder,
    tokens: &[u32],
) -> Result<String> {
    let text = tokenizer
        .tokenizer
        .decode(tokens, true)
        .map_err(|e| anyhow::anyhow!("decoding failed: {e}"))?;
    let mut text = text.as_str();
    let ends = [
        prompts.text_after_answer().map(str::trim),
        tokenizer.eos.as_ref().map(|t| t.text.as_str()),
    ];
    for end in ends.into_iter().flatten().filter(|e| !e.is_empty()) {
        if let Some(at) = text.find(end) {
            text = &text[..at];
        }
    }
    Ok(text.trim().to_string())
}

/// `--batch-size N|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Auto,
    Fixed(usize),
}

impl std::str::FromStr for BatchSize {
    type Err = String;
    fn from_str(text: &str) -> Result<BatchSize, String> {
        match text {
            "auto" => Ok(BatchSize::Auto),
            _ => match text.parse::<usize>() {
                Ok(n) if n > 0 => Ok(BatchSize::Fixed(n)),
                _ => Err(format!("'{text}' is not a positive number or 'auto'")),
            },
        }
    }
}

/// Bytes one decoding slot needs: its row of the KV cache (every layer's keys and
/// values for `positions`) and its f32 logits, with the prefill's working set of one
/// prompt counted once on top by the caller's margin.
pub fn bytes_per_slot(model: &Llama, positions: usize) -> u64 {
    let config = &model.config;
    let element = model.kind.elt_size_in_bytes() as u64;
    let cache = 2
        * config.num_hidden_layers as u64
        * config.num_key_value_heads as u64
        * config.head_dim as u64
        * KvCache::slot_capacity(positions as i64) as u64
        * element;
    let logits = config.vocab_size as u64 * 4;
    cache + 2 * logits
}

/// How many slots `--batch-size auto` uses: what 90 % of the free memory holds after a
/// reserve for one prompt's prefill, at least 1, at most the number of prompts (and
/// 256, beyond which a step's latency grows with no gain in a memory-bound decode).
pub fn slots_that_fit(
    free_bytes: u64,
    per_slot: u64,
    prefill_reserve: u64,
    prompts: usize,
) -> usize {
    let usable = (free_bytes as f64 * 0.9) as u64;
    let fit = usable.saturating_sub(prefill_reserve) / per_slot.max(1);
    (fit as usize).clamp(1, prompts.clamp(1, 256))
}

impl BatchSize {
    /// The number of slots for `prompts` prompts of at most `positions` positions each
    /// (prompt + new tokens) on the model's device.
    pub fn resolve(self, model: &Llama, prompts: usize, positions: usize) -> usize {
        match self {
            BatchSize::Fixed(n) => n,
            BatchSize::Auto => match model.device {
                Device::Cuda(index) => {
                    let free = crate::cuda::devices()
                        .get(index)
                        .map_or(0, |d| d.free_bytes.max(0) as u64);
                    // One prefill of up to PREFILL_TOKENS positions (or one prompt's,
                    // if longer): hidden states and MLP activations per position, a
                    // few times over, and the keys and values it writes before they
                    // are copied into their slots.
                    let c = &model.config;
                    let tokens = PREFILL_TOKENS.max(positions) as u64;
                    let prefill = tokens
                        * ((8 * c.hidden_size as u64 + 4 * c.intermediate_size as u64) * 4
                            + bytes_per_slot(model, 1));
                    slots_that_fit(free, bytes_per_slot(model, positions), prefill, prompts)
                }
                _ => 8.min(prompts.max(1)),
            },
        }
    }
}

/// One prompt to continue, with the number that seeds its sampler.
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    /// Usually the row's index in the test file.
    pub row_number: u64,
}

/// What came out for one row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generation {
    /// Generated ids, without the stop token.
    pub tokens: Vec<u32>,
    /// True when a stop id ended it (false: max_new_tokens).
    pub stopped: bool,
}

/// Generates continuations for a batch of prompts.
pub fn generate_batch(
    model: &Llama,
    requests: &[GenerationRequest],
    stop_ids: &[u32],
    config: &SamplingConfig,
) -> Result<Vec<Generation>> {
    tch::no_grad(|| generate_batch_inner(model, requests, stop_ids, config))
}

fn generate_batch_inner(
    model: &Llama,
    requests: &[GenerationRequest],
    stop_ids: &[u32],
    config: &SamplingConfig,
) -> Result<Vec<Generation>> {
    let device = model.device;
    let batch = requests.len();
    let mut outputs: Vec<Generation> = (0..batch)
        .map(|_| Generation {
            tokens: Vec::new(),
            stopped: false,
        })
        .collect();
    if batch == 0 || config.max_new_tokens == 0 {
        return Ok(outputs);
    }
    let prompts = LeftPadded::new(requests, device)?;
    let (width, padded) = (prompts.width, prompts.padded);
    let mut key_mask = prompts.key_mask.shallow_clone();
    // Static: every position the batch can reach, allocated once and written in place.
    let mut cache = KvCache::with_capacity((width + config.max_new_tokens) as i64);
    let mut logits = prompts.prefill(model, &mut cache);

    let mut rngs: Vec<ChaCha8Rng> = requests
        .iter()
        .map(|r| row_rng(config.seed, r.row_number))
        .collect();
    let mut next_position: Vec<i64> = requests.iter().map(|r| r.prompt_ids.len() as i64).collect();
    // Rows still generating, as indices into `requests`.
    let mut active: Vec<usize> = (0..batch).collect();
    let stop_tensor = Tensor::from_slice(&stop_ids.iter().map(|&i| i as i64).collect::<Vec<_>>())
        .to_device(device);

    for step in 0..config.max_new_tokens {
        if step < config.min_new_tokens && !stop_ids.is_empty() {
            let _ = logits.index_fill_(1, &stop_tensor, f64::NEG_INFINITY);
        }
        let rows: Vec<(&[u32], &[u32], &mut ChaCha8Rng)> = rngs
            .iter_mut()
            .enumerate()
            .filter(|(row, _)| active.contains(row))
            .map(|(row, rng)| {
                (
                    requests[row].prompt_ids.as_slice(),
                    outputs[row].tokens.as_slice(),
                    rng,
                )
            })
            .collect();
        let chosen = next_tokens(&logits, rows, config)?;
        crate::profile::mark("sampling");
        let mut keep = Vec::with_capacity(active.len());
        for (slot, &row) in active.iter().enumerate() {
            let token = chosen[slot];
            if stop_ids.contains(&token) {
                outputs[row].stopped = true;
                continue;
            }
            outputs[row].tokens.push(token);
            if outputs[row].tokens.len() < config.max_new_tokens {
                keep.push(slot);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() != active.len() {
            let index = Tensor::from_slice(&keep.iter().map(|&s| s as i64).collect::<Vec<_>>())
                .to_device(device);
            cache.select_rows(&index);
            key_mask = key_mask.index_select(0, &index);
            active = keep.iter().map(|&s| active[s]).collect();
        }
        let step_ids: Vec<i64> = active
            .iter()
            .map(|&row| *outputs[row].tokens.last().unwrap() as i64)
            .collect();
        let step_positions: Vec<i64> = active.iter().map(|&row| next_position[row]).collect();
        for &row in &active {
            next_position[row] += 1;
        }
        let rows = active.len() as i64;
        key_mask = Tensor::cat(
            &[&key_mask, &Tensor::ones([rows, 1], (Kind::Bool, device))],
            1,
        );
        let hidden = model.forward_hidden(
            &Tensor::from_slice(&step_ids)
                .view([rows, 1])
                .to_device(device),
            &Tensor::from_slice(&step_positions)
                .view([rows, 1])
                .to_device(device),
            padded.then_some(&key_mask),
            Some(&mut cache),
            false,
        );
        logits = model.logits(&hidden.select(1, 0)).to_kind(Kind::Float);
    }
    Ok(outputs)
}

/// Prompts of different lengths left-padded into one batch: ids, positions (each
/// prompt's from 0) and the key mask that hides the padding, on the model's device.
pub(crate) struct LeftPadded {
    pub ids: Tensor,
    pub positions: Tensor,
    /// [batch, width]: true at real tokens.
    pub key_mask: Tensor,
    pub width: usize,
    /// Whether any prompt is shorter than the widest (else no mask is needed).
    pub padded: bool,
}

impl LeftPadded {
    pub fn new(requests: &[GenerationRequest], device: Device) -> Result<LeftPadded> {
        let width = requests
            .iter()
            .map(|r| r.prompt_ids.len())
            .max()
            .unwrap_or(0);
        anyhow::ensure!(width > 0, "empty prompt");
        let batch = requests.len();
        let mut ids = Vec::with_capacity(batch * width);
        let mut mask = Vec::with_capacity(batch * width);
        let mut positions = Vec::with_capacity(batch * width);
        for request in requests {
            let pad = width - request.prompt_ids.len();
            ids.extend(
                std::iter::repeat_n(0i64, pad).chain(request.prompt_ids.iter().map(|&i| i as i64)),
            );
            mask.extend(
                std::iter::repeat_n(false, pad)
                    .chain(std::iter::repeat_n(true, request.prompt_ids.len())),
            );
            positions
                .extend(std::iter::repeat_n(0i64, pad).chain(0..request.prompt_ids.len() as i64));
        }
        let shape = [batch as i64, width as i64];
        Ok(LeftPadded {
            ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            positions: Tensor::from_slice(&positions).view(shape).to_device(device),
            key_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
            width,
            padded: requests.iter().any(|r| r.prompt_ids.len() != width),
        })
    }

    /// Runs the prompts through the model into `cache`; returns the f32 logits of each
    /// prompt's last token, [batch, vocab].
    pub fn prefill(&self, model: &Llama, cache: &mut KvCache) -> Tensor {
        let hidden = model.forward_hidden(
            &self.ids,
            &self.positions,
            self.padded.then_some(&self.key_mask),
            Some(cache),
            false,
        );
        model
            .logits(&hidden.select(1, self.width as i64 - 1))
            .to_kind(Kind::Float)
    }
}

/// The next token of each row of `logits` [R, V]: the argmax on the device when no
/// processor needs the sequence so far (only the ids come back to the host), else
/// HF's processors on the host. `rows[r]`: row r's prompt, its tokens so far, its
/// sampler.
fn next_tokens(
    logits: &Tensor,
    rows: Vec<(&[u32], &[u32], &mut ChaCha8Rng)>,
    config: &SamplingConfig,
) -> Result<Vec<u32>> {
    if config.is_plain_argmax() {
        return Ok(
            Vec::<i64>::try_from(logits.argmax(-1, false).to_device(Device::Cpu))?
                .into_iter()
                .map(|t| t as u32)
                .collect(),
        );
    }
    let host = logits.to_device(Device::Cpu);
    rows.into_iter()
        .enumerate()
        .map(|(r, (prompt, tokens, rng))| {
            let mut row_logits = Vec::<f32>::try_from(host.get(r as i64))?;
            Ok(pick_token(
                &mut row_logits,
                prompt.iter().chain(tokens),
                config,
                rng,
            ))
        })
        .collect()
}

/// A row's sampler: seeded from (seed, row number), so the draws do not depend on the
/// batch or on the order rows are decoded in.
fn row_rng(seed: u64, row_number: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ row_number.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// One prompt in a decoding slot.
struct Slot {
    request: usize,
    generation: Generation,
    /// Where the last chosen token goes in the slot's cache row (= its position).
    position: i64,
    rng: ChaCha8Rng,
}

impl Slot {
    /// Takes a chosen token; returns whether the row is finished.
    fn take(&mut self, token: u32, stop_ids: &[u32], config: &SamplingConfig) -> bool {
        if stop_ids.contains(&token) {
            self.generation.stopped = true;
            return true;
        }
        self.generation.tokens.push(token);
        self.generation.tokens.len() >= config.max_new_tokens
    }
}

/// Generates continuations for any number of prompts with `slots` rows decoding at
/// once (continuous batching): when a row finishes, the next waiting prompt is
/// prefilled (together with any others admitted at the same time) into its slot of a
/// per-row KV cache (`KvCache::slots`), instead of the batch shrinking until its
/// longest row is done. Each row has its own length, so
/// no row is padded. `finished(index, generation)` is called as each row ends, in
/// whatever order they end; the outputs equal `generate_batch` on one prompt at a time.
pub fn generate_continuous(
    model: &Llama,
    requests: &[GenerationRequest],
    stop_ids: &[u32],
    config: &SamplingConfig,
    slots: usize,
    mode: DecodeMode,
    finished: &mut dyn FnMut(usize, Generation) -> Result<()>,
) -> Result<ContinuousReport> {
    tch::no_grad(|| continuous_inner(model, requests, stop_ids, config, slots, mode, finished))
}

/// How a continuous-batching run decoded.
#[derive(Debug, Clone, Copy, Default)]
pub struct ContinuousReport {
    /// The decode step was replayed from a CUDA graph.
    pub cuda_graph: bool,
    /// The decode steps alone (the step and choosing its tokens, which reads them back
    /// to the host, so the time includes the device's work), without prefills and
    /// without the step that recorded the graph: what a decode-speed target measures.
    pub decode_steps: usize,
    /// Tokens those steps produced (one per active slot and step).
    pub decode_tokens: usize,
    pub decode_seconds: f64,
}

/// Positions one batched prefill may hold (prompts x the longest of them): bounds the
/// prefill's activations and keys/values, which `--batch-size auto` reserves room for.
pub const PREFILL_TOKENS: usize = 2048;

/// The (slot, prompt) pairs prefilled together next: waiting prompts in order, one per
/// free slot, while `prompts x longest` stays within `PREFILL_TOKENS` (at least one).
fn admit(
    free: &[usize],
    waiting: &mut std::iter::Peekable<std::ops::Range<usize>>,
    length: impl Fn(usize) -> usize,
) -> Vec<(usize, usize)> {
    let mut admitted = Vec::new();
    let mut longest = 0;
    for &slot in free {
        let Some(&index) = waiting.peek() else { break };
        let widest = longest.max(length(index));
        if !admitted.is_empty() && widest * (admitted.len() + 1) > PREFILL_TOKENS {
            break;
        }
        waiting.next();
        longest = widest;
        admitted.push((slot, index));
    }
    admitted
}

/// Prefills `prompts` in one forward pass and copies each one's keys and values into
/// its slot (`admitted[i].0`) of the continuous-batching cache. The batch is padded on
/// the right, so plain causal attention is exact: a prompt's tokens never see the
/// padding after them, and no mask is needed (flash attention stays usable). Returns
/// the f32 logits of each prompt's last token, [prompts, vocab].
fn prefill_into_slots(
    model: &Llama,
    prompts: &[&[u32]],
    admitted: &[(usize, usize)],
    cache: &mut KvCache,
) -> Tensor {
    let device = model.device;
    let (count, longest) = (
        prompts.len() as i64,
        prompts.iter().map(|p| p.len()).max().unwrap_or(1) as i64,
    );
    let mut ids = vec![0i64; (count * longest) as usize];
    for (row, prompt) in prompts.iter().enumerate() {
        for (t, &id) in prompt.iter().enumerate() {
            ids[row * longest as usize + t] = id as i64;
        }
    }
    let mut prefilled = KvCache::with_capacity(longest);
    let hidden = model.forward_hidden(
        &Tensor::from_slice(&ids)
            .view([count, longest])
            .to_device(device),
        &Tensor::arange(longest, (Kind::Int64, device))
            .view([1, longest])
            .expand([count, longest], false),
        None,
        Some(&mut prefilled),
        false,
    );
    for (row, (&(slot, _), prompt)) in admitted.iter().zip(prompts).enumerate() {
        cache.adopt(slot as i64, &prefilled, row as i64, prompt.len() as i64);
    }
    let last: Vec<i64> = prompts
        .iter()
        .enumerate()
        .map(|(row, p)| row as i64 * longest + p.len() as i64 - 1)
        .collect();
    let last_hidden = hidden
        .view([count * longest, -1])
        .index_select(0, &Tensor::from_slice(&last).to_device(device));
    model.logits(&last_hidden).to_kind(Kind::Float)
}

fn continuous_inner(
    model: &Llama,
    requests: &[GenerationRequest],
    stop_ids: &[u32],
    config: &SamplingConfig,
    slots: usize,
    mode: DecodeMode,
    finished: &mut dyn FnMut(usize, Generation) -> Result<()>,
) -> Result<ContinuousReport> {
    let device = model.device;
    let mut decode = DecodeStep::new(mode);
    let Some(longest) = requests.iter().map(|r| r.prompt_ids.len()).max() else {
        return Ok(ContinuousReport::default());
    };
    anyhow::ensure!(
        requests.iter().all(|r| !r.prompt_ids.is_empty()),
        "empty prompt"
    );
    if config.max_new_tokens == 0 {
        for index in 0..requests.len() {
            finished(index, Generation::default())?;
        }
        return Ok(ContinuousReport::default());
    }
    let slots = slots.clamp(1, requests.len());
    let mut cache = KvCache::slots(
        model,
        slots as i64,
        (longest + config.max_new_tokens) as i64,
    );
    let stop_tensor = Tensor::from_slice(&stop_ids.iter().map(|&i| i as i64).collect::<Vec<_>>())
        .to_device(device);
    // Stop ids are suppressed in rows that have not reached min_new_tokens.
    let suppress_stops = |logits: &Tensor, row: i64, generated: usize| {
        if generated < config.min_new_tokens && !stop_ids.is_empty() {
            let _ = logits
                .get(row)
                .index_fill_(0, &stop_tensor, f64::NEG_INFINITY);
        }
    };
    let mut waiting = (0..requests.len()).peekable();
    let mut table: Vec<Option<Slot>> = (0..slots).map(|_| None).collect();
    let mut report = ContinuousReport::default();
    loop {
        crate::profile::start();
        // Fill the free slots: the next waiting prompts, prefilled together, each
        // choosing its first token. A prompt that stops at once frees its slot again.
        loop {
            let free: Vec<usize> = (0..slots).filter(|&s| table[s].is_none()).collect();
            let admitted = admit(&free, &mut waiting, |i| requests[i].prompt_ids.len());
            if admitted.is_empty() {
                break;
            }
            let prompts: Vec<&[u32]> = admitted
                .iter()
                .map(|&(_, index)| requests[index].prompt_ids.as_slice())
                .collect();
            let logits = prefill_into_slots(model, &prompts, &admitted, &mut cache);
            crate::profile::mark("prefill (the prompts admitted together)");
            let mut states: Vec<Slot> = admitted
                .iter()
                .map(|&(_, index)| Slot {
                    request: index,
                    generation: Generation::default(),
                    position: requests[index].prompt_ids.len() as i64,
                    rng: row_rng(config.seed, requests[index].row_number),
                })
                .collect();
            for row in 0..states.len() {
                suppress_stops(&logits, row as i64, 0);
            }
            let rows = states
                .iter_mut()
                .map(|state| {
                    let prompt: &[u32] = &requests[state.request].prompt_ids;
                    (prompt, &[] as &[u32], &mut state.rng)
                })
                .collect();
            let tokens = next_tokens(&logits, rows, config)?;
            for ((mut state, token), &(slot, _)) in states.into_iter().zip(tokens).zip(&admitted) {
                if state.take(token, stop_ids, config) {
                    finished(state.request, state.generation)?;
                } else {
                    table[slot] = Some(state);
                }
            }
        }
        if table.iter().all(Option::is_none) {
            report.cuda_graph = decode.is_graphed();
            return Ok(report);
        }
        // One step for every slot (a free one computes a throwaway token at position 0).
        let last = |s: &Option<Slot>| {
            s.as_ref()
                .map_or(0, |s| *s.generation.tokens.last().expect("a token") as i64)
        };
        let ids: Vec<i64> = table.iter().map(last).collect();
        let positions: Vec<i64> = table
            .iter()
            .map(|s| s.as_ref().map_or(0, |s| s.position))
            .collect();
        crate::profile::resume();
        let step_started = std::time::Instant::now();
        let recording = decode.records_next(device);
        let logits = decode.run(model, &mut cache, &ids, &positions)?;
        crate::profile::mark(if decode.is_graphed() {
            "decode step (CUDA graph)"
        } else {
            "decode step (eager)"
        });
        let active: Vec<usize> = (0..slots).filter(|&s| table[s].is_some()).collect();
        let logits = logits.index_select(
            0,
            &Tensor::from_slice(&active.iter().map(|&s| s as i64).collect::<Vec<_>>())
                .to_device(device),
        );
        for (row, &s) in active.iter().enumerate() {
            let generated = table[s].as_ref().map_or(0, |t| t.generation.tokens.len());
            suppress_stops(&logits, row as i64, generated);
        }
        let rows: Vec<(&[u32], &[u32], &mut ChaCha8Rng)> = table
            .iter_mut()
            .flatten()
            .map(|slot| {
                (
                    requests[slot.request].prompt_ids.as_slice(),
                    slot.generation.tokens.as_slice(),
                    &mut slot.rng,
                )
            })
            .collect();
        let chosen = next_tokens(&logits, rows, config)?;
        crate::profile::mark("sampling");
        if !recording {
            report.decode_steps += 1;
            report.decode_tokens += chosen.len();
            report.decode_seconds += step_started.elapsed().as_secs_f64();
        }
        for (&s, token) in active.iter().zip(chosen) {
            let slot = table[s].as_mut().expect("an active slot");
            slot.position += 1;
            if slot.take(token, stop_ids, config) {
                let done = table[s].take().expect("an active slot");
                finished(done.request, done.generation)?;
            }
        }
    }
}

/// Picks one token from one row's logits with HF's processors in HF's order:
/// repetition penalty, no-repeat n-grams, then argmax if greedy, else the sampling
/// warpers (`logits_warpers::warp`: temperature, top-h, top-k, top-p, min-p,
/// typical-p, epsilon, eta) and a draw. `seen`: the prompt and the tokens generated
/// so far, in order.
pub fn pick_token<'a>(
    logits: &mut [f32],
    seen: impl Iterator<Item = &'a u32>,
    config: &SamplingConfig,
    rng: &mut ChaCha8Rng,
) -> u32 {
    let sequence: Vec<u32> = seen.copied().collect();
    if config.no_repeat_ngram_size > 0 {
        for id in repeated_ngram_endings(&sequence, config.no_repeat_ngram_size) {
            if let Some(value) = logits.get_mut(id as usize) {
                *value = f32::NEG_INFINITY;
            }
        }
    }
    if config.repetition_penalty != 1.0 {
        let mut seen = sequence;
        seen.sort_unstable();
        seen.dedup();
        let penalty = config.repetition_penalty as f32;
        for id in seen {
            if let Some(value) = logits.get_mut(id as usize) {
                *value = if *value < 0.0 {
                    *value * penalty
                } else {
                    *value / penalty
                };
            }
        }
    }
    if config.is_greedy() {
        return argmax(logits);
    }
    crate::logits_warpers::warp(logits, config);
    // The kept tokens, highest first (ties by id, for determinism).
    let mut order: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i] > f32::NEG_INFINITY)
        .collect();
    if order.is_empty() {
        // Every token banned by the processors: HF would draw from NaNs; amthal picks
        // the lowest id rather than fail a whole run.
        return 0;
    }
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let keep = order.len();
    let max = logits[order[0]] as f64;
    let kept: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64) - max).exp())
        .collect();
    let kept_total: f64 = kept.iter().sum();
    let draw = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * kept_total;
    let mut acc = 0.0;
    for (n, w) in kept.iter().enumerate() {
        acc += w;
        if draw < acc {
            return order[n] as u32;
        }
    }
    order[keep - 1] as u32
}

/// The tokens that would complete an n-gram already in `sequence`: those that
/// followed an earlier occurrence of its last n - 1 tokens (HF's
/// NoRepeatNGramLogitsProcessor; nothing until the sequence holds n - 1 tokens).
pub fn repeated_ngram_endings(sequence: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || sequence.len() + 1 < n {
        return Vec::new();
    }
    let prefix = &sequence[sequence.len() + 1 - n..];
    let mut banned: Vec<u32> = sequence
        .windows(n)
        .filter(|gram| gram[..n - 1] == *prefix)
        .map(|gram| gram[n - 1])
        .collect();
    banned.sort_unstable();
    banned.dedup();
    banned
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(config: &SamplingConfig, seed: u64, logits: &[f32]) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..200)
            .map(|_| pick_token(&mut logits.to_vec(), [].iter(), config, &mut rng))
            .collect()
    }

    #[test]
    fn top_k_and_top_p_restrict_the_draws() {
        let logits = [3.0, 2.9, 1.0, 0.5, -1.0];
        let top_k = SamplingConfig {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        assert!(sampled(&top_k, 1, &logits).iter().all(|&t| t < 2));
        let top_p = SamplingConfig {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        // p(0) ~ 0.47 < 0.5, so the set is {0, 1}.
        let draws = sampled(&top_p, 2, &logits);
        assert!(draws.iter().all(|&t| t < 2) && draws.contains(&0) && draws.contains(&1));
        let all = SamplingConfig {
            temperature: 1.0,
            ..Default::default()
        };
        assert!(sampled(&all, 3, &logits).iter().any(|&t| t >= 2));
        assert_eq!(
            sampled(&all, 4, &logits),
            sampled(&all, 4, &logits),
            "same seed, same draws"
        );
    }

    /// Prompts are admitted in order, one per free slot, as many as fit PREFILL_TOKENS
    /// positions together; a prompt longer than that still goes, alone.
    #[test]
    fn admitted_prompts_fit_the_prefill_budget() {
        let lengths = [100, 100, 1000, 60, 3000, 10];
        let mut waiting = (0..lengths.len()).peekable();
        let free = [0, 1, 2, 3, 4, 5, 6, 7];
        let length = |i: usize| lengths[i];
        // 100, 100, 1000: 3 x 1000 > 2048, so 1000 waits.
        assert_eq!(admit(&free, &mut waiting, length), vec![(0, 0), (1, 1)]);
        // 1000 and 60 (2 x 1000), not 3000.
        assert_eq!(
            admit(&free[2..], &mut waiting, length),
            vec![(2, 2), (3, 3)]
        );
        assert_eq!(admit(&free[4..], &mut waiting, length), vec![(4, 4)]);
        assert_eq!(admit(&free[5..], &mut waiting, length), vec![(5, 5)]);
        assert!(admit(&free[6..], &mut waiting, length).is_empty());
        // Fewer free slots than fitting prompts: one per slot.
        let mut waiting = (0..lengths.len()).peekable();
        assert_eq!(admit(&[3], &mut waiting, length), vec![(3, 0)]);
    }

    #[test]
    fn auto_batch_size_fills_the_free_memory() {
        assert_eq!("auto".parse::<BatchSize>(), Ok(BatchSize::Auto));
        assert_eq!("16".parse::<BatchSize>(), Ok(BatchSize::Fixed(16)));
        assert!("0".parse::<BatchSize>().is_err() && "many".parse::<BatchSize>().is_err());
        // 10 GB free, 100 MB per slot, 1 GB reserved: (9 - 1) GB / 100 MB = 80 slots.
        assert_eq!(
            slots_that_fit(10_000_000_000, 100_000_000, 1_000_000_000, 100),
            80
        );
        // Never more than the prompts, never fewer than one.
        assert_eq!(slots_that_fit(10_000_000_000, 100_000_000, 0, 20), 20);
        assert_eq!(slots_that_fit(1_000, 100_000_000, 0, 20), 1);
        assert_eq!(slots_that_fit(u64::MAX / 2, 1, 0, 10_000), 256);
    }

    #[test]
    fn no_repeat_ngrams_ban_what_followed_the_last_tokens() {
        // 5 7 5 7 5: the bigrams starting with 5 were (5, 7): 7 is banned.
        assert_eq!(repeated_ngram_endings(&[5, 7, 5, 7, 5], 2), vec![7]);
        // Trigrams ending with (7, 5) were (7, 5, 7): 7 is banned.
        assert_eq!(repeated_ngram_endings(&[5, 7, 5, 7, 5], 3), vec![7]);
        assert_eq!(repeated_ngram_endings(&[1, 2, 3], 2), Vec::<u32>::new());
        // n = 1 bans every token seen (HF's behaviour for size 1).
        assert_eq!(repeated_ngram_endings(&[4, 2, 4], 1), vec![2, 4]);
        assert!(repeated_ngram_endings(&[1], 3).is_empty());
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        let mut logits = vec![2.0, -2.0, 1.9];
        let config = SamplingConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let token = pick_token(&mut logits, [0u32, 1].iter(), &config, &mut rng);
        assert_eq!(logits, vec![1.0, -4.0, 1.9]);
        assert_eq!(token, 2);
    }
}
