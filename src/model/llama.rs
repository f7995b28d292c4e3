//! The Llama decoder in tch: embeddings, RMSNorm, rotate-half RoPE, grouped-query
//! attention through scaled_dot_product_attention, SiLU-gated MLP, lm_head (tied or
//! not). Computes what transformers' LlamaForCausalLM computes.
//!
//! Padded batches: `key_mask` [B, past + T] marks real tokens; positions are per row,
//! so left padding (generation) and right padding (training) both work. A KV cache
//! lets generation prefill a batch and then decode one token at a time.

use tch::{Device, Kind, Tensor};

use super::config::LlamaConfig;
use super::fuse::Fused;
use super::linear::{Linear, LoraDropout, PaddedLayout, dense_linear};
use super::quantized::Quantization;
use super::rope::{Rope, apply_rotary};

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// q, k and v in one matmul (generation; `fuse::fuse_projections`).
    pub qkv: Option<Fused>,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// gate and up in one matmul (generation; `fuse::fuse_projections`).
    pub gate_up: Option<Fused>,
}

pub struct DecoderLayer {
    pub input_layernorm: Tensor,
    pub self_attn: Attention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

/// The whole model. Tensor names follow the HF keys (see `named_tensors`).
pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    pub rope: Rope,
    pub device: Device,
    /// The compute dtype of the base weights and activations.
    pub kind: Kind,
    /// Generation on a GPU: RMSNorm as libtorch's fused `rms_norm`, one kernel instead
    /// of eight (`fuse::fuse_projections` turns it on). That kernel scales in f32
    /// before its one cast, so in bf16 a value can differ from transformers' by one
    /// rounding (f32: the same). Training keeps transformers' order in the forward
    /// pass (`Ops::rms_norm`, which only changes how the backward pass is computed): on
    /// the bf16 quality check (`tests/optimizer_quality.rs`) that one rounding moved
    /// `adamw-bf16` from -0.45 % to +1.97 % of `adamw`. (libtorch's CPU `rms_norm`
    /// rounds as its CUDA kernel does, so the CPU never uses it.)
    pub fused_norm: bool,
    /// `--quantize`: how the decoder projections are stored (None: dense).
    pub quantization: Option<Quantization>,
    /// Generation on a GPU: fewer kernels in each decode step (`decode_slots`), which
    /// replays from a CUDA graph at ~17 kernels a layer, most of them small: a small
    /// kernel costs a few microseconds on the GPU however little it does, so a batch-1
    /// step of a 7B spends a large share of its time outside the matmuls that read the
    /// weights. Two folds: the rotary embedding as one matmul per layer by a per-slot
    /// matrix (`Rope::rotary_matrices`, 4 kernels -> 1), and both residual adds into
    /// the o_proj / down_proj matmuls, which add into the residual stream in place
    /// (`addmm_` with beta = 1; 2 kernels fewer). 5 of ~17 kernels a layer. Values
    /// differ from the unfolded step by rounding only (fewer roundings; tested on the
    /// CPU within 1e-5 in f32). `fuse::fuse_projections` turns it on off the CPU;
    /// `AMTHAL_DECODE_FOLDS=0` keeps the unfolded step, `=1` folds on the CPU too.
    pub decode_folds: bool,
}

/// The inputs a decoder layer's projections read (`LayerContext::input_observer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProjectionInput {
    /// The normed hidden state q_proj, k_proj and v_proj read.
    Attention,
    /// The attention output o_proj reads.
    AttentionOutput,
    /// The normed hidden state gate_proj and up_proj read.
    Mlp,
    /// silu(gate) * up, which down_proj reads.
    MlpHidden,
}

impl ProjectionInput {
    /// The projections (module paths under `model.layers.N.`) that read this input.
    pub fn readers(self) -> &'static [&'static str] {
        match self {
            ProjectionInput::Attention => {
                &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
            }
            ProjectionInput::AttentionOutput => &["self_attn.o_proj"],
            ProjectionInput::Mlp => &["mlp.gate_proj", "mlp.up_proj"],
            ProjectionInput::MlpHidden => &["mlp.down_proj"],
        }
    }
}

/// Called with (layer, which input, the input [B, T, width]) as a forward pass reaches
/// each projection's input: how `amthal export --imatrix-data` measures an importance
/// matrix.
pub type InputObserver = std::sync::Arc<dyn Fn(usize, ProjectionInput, &Tensor) + Send + Sync>;

/// Per-forward values shared by all layers.
pub struct LayerContext {
    pub cos: Tensor,
    pub sin: Tensor,
    /// `Rope::rotation` in the model's dtype.
    pub rotation: Tensor,
    pub mask: Option<Tensor>,
    pub past: i64,
    /// A packed batch (one row holding several documents): each document's (start,
    /// length). Attention then runs per document, so no token sees another document.
    pub segments: Option<Vec<(i64, i64)>>,
    /// A packed batch: where its tokens sit in the padded batch of the same documents,
    /// in whose shape LoRA dropout draws its masks (`LoraDropout::Padded`).
    pub padded_layout: Option<PaddedLayout>,
    /// Decode steps with `Llama::decode_folds`: the per-slot rotation matrices
    /// [S, 1, D, D] (`Rope::rotary_matrices`), used instead of `apply_rotary`.
    pub rotary_matrices: Option<Tensor>,
    /// Decode steps with `Llama::decode_folds`: o_proj and down_proj add into the
    /// residual stream in place. Only where the caller owns the layer's input (a
    /// checkpointed training forward recomputes from it).
    pub residual_in_place: bool,
    /// Sees each projection's input (None: nothing is observed).
    pub input_observer: Option<InputObserver>,
}

impl LayerContext {
    /// The same context for a packed row of documents: their (start, length) spans and,
    /// on the CPU, where their tokens sit in the padded batch (`LoraDropout::Padded`).
    pub fn with_packing(
        mut self,
        segments: Vec<(i64, i64)>,
        padded_layout: Option<PaddedLayout>,
    ) -> LayerContext {
        self.segments = Some(segments);
        self.padded_layout = padded_layout;
        self
    }

    /// How this forward applies LoRA dropout (none outside training).
    fn lora_dropout(&self, train: bool) -> LoraDropout<'_> {
        match (&self.padded_layout, train) {
            (_, false) => LoraDropout::Off,
            (Some(layout), true) => LoraDropout::Padded(layout),
            (None, true) => LoraDropout::AsInput,
        }
    }
}

/// Keys and values of every layer for the tokens seen so far.
///
/// A static cache (`with_capacity`, what generation uses) allocates every layer's
/// [B, kv_heads, capacity, head_dim] buffers once, at the prefill, and each forward
/// writes its keys and values in place at the next positions: no `cat` per token, and
/// buffers whose addresses do not change (what CUDA graphs need). `default()` is a
/// growing cache (a `cat` per forward), for callers that cannot know the length.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    /// Positions written so far.
    len: i64,
    /// 0: a growing cache.
    capacity: i64,
    /// Continuous batching (`slots`): where each row writes the current token, [B]
    /// int64 (each row has its own length); set by `Llama::decode_slots`.
    write_at: Option<Tensor>,
}

impl KvCache {
    /// A static cache for up to `capacity` positions per row.
    pub fn with_capacity(capacity: i64) -> KvCache {
        KvCache {
            capacity,
            ..KvCache::default()
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the buffers are preallocated and written in place.
    pub fn is_static(&self) -> bool {
        self.capacity > 0
    }

    /// A cache for continuous batching: `slots` rows of `capacity` positions, each
    /// row with its own length. Rows are filled by `adopt` (a prompt prefilled alone)
    /// and extended by `Llama::decode_slots`. The capacity is rounded up to a multiple
    /// of 8 positions: attention reads the whole cache under a mask [S, 1, 1, capacity],
    /// and libtorch's memory-efficient CUDA kernel copies a mask whose rows are not
    /// 8-aligned into a padded one first (`preprocess_mask`), once per layer and step.
    /// The extra positions are masked like any position a row has not reached.
    pub fn slots(model: &Llama, slots: i64, capacity: i64) -> KvCache {
        let capacity = KvCache::slot_capacity(capacity);
        let shape = [
            slots,
            model.config.num_key_value_heads as i64,
            capacity,
            model.config.head_dim as i64,
        ];
        let buffer = || Tensor::zeros(shape, (model.kind, model.device));
        KvCache {
            layers: (0..model.layers.len())
                .map(|_| (buffer(), buffer()))
                .collect(),
            len: 0,
            capacity,
            write_at: None,
        }
    }

    /// The positions a slot cache holds for `positions` asked: rounded up to 8 (`slots`).
    pub fn slot_capacity(positions: i64) -> i64 {
        (positions + 7) / 8 * 8
    }

    /// Copies row `row` of a prefilled cache (positions 0..length, a prompt's keys and
    /// values) into row `slot`; whatever the slot held after them is masked from then on.
    pub fn adopt(&mut self, slot: i64, prefilled: &KvCache, row: i64, length: i64) {
        for ((k, v), (from_k, from_v)) in self.layers.iter_mut().zip(&prefilled.layers) {
            k.narrow(0, slot, 1)
                .narrow(2, 0, length)
                .copy_(&from_k.narrow(0, row, 1).narrow(2, 0, length));
            v.narrow(0, slot, 1)
                .narrow(2, 0, length)
                .copy_(&from_v.narrow(0, row, 1).narrow(2, 0, length));
        }
    }

    /// Keeps only the given batch rows (finished rows stop costing compute).
    pub fn select_rows(&mut self, rows: &Tensor) {
        for (k, v) in self.layers.iter_mut() {
            *k = k.index_select(0, rows);
            *v = v.index_select(0, rows);
        }
    }

    /// Reserves `steps` more positions; returns where they start.
    fn advance(&mut self, steps: i64) -> i64 {
        let start = self.len;
        assert!(
            self.capacity == 0 || start + steps <= self.capacity,
            "the KV cache holds {} positions; {} more were asked after {start}",
            self.capacity,
            steps
        );
        self.len += steps;
        start
    }

    /// Stores one layer's new keys and values [B, kv_heads, T, head_dim] at `start`
    /// and returns all of that layer's keys and values so far.
    fn store(&mut self, layer: usize, start: i64, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let (cached_k, cached_v) = &mut self.layers[layer];
        let steps = k.size()[2];
        if let Some(rows_at) = &self.write_at {
            // One token per row, each at its own position: a scatter along time.
            let index = rows_at.view([-1, 1, 1, 1]).expand_as(k);
            let _ = cached_k.scatter_(2, &index, k);
            let _ = cached_v.scatter_(2, &index, v);
            return (cached_k.shallow_clone(), cached_v.shallow_clone());
        }
        if self.capacity == 0 {
            *cached_k = Tensor::cat(&[&*cached_k, k], 2);
            *cached_v = Tensor::cat(&[&*cached_v, v], 2);
            return (cached_k.shallow_clone(), cached_v.shallow_clone());
        }
        cached_k.narrow(2, start, steps).copy_(k);
        cached_v.narrow(2, start, steps).copy_(v);
        (
            cached_k.narrow(2, 0, start + steps),
            cached_v.narrow(2, 0, start + steps),
        )
    }
}

/// Whether training's RMSNorm runs as one autograd node (`Ops::rms_norm`);
/// `AMTHAL_NORM_NODE=0` keeps autograd's graph of `rms_norm` (to compare the two).
fn norm_node_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("AMTHAL_NORM_NODE").map_or(true, |v| v != "0"))
}

/// RMSNorm as transformers orders it: normalize in f32, cast back, then scale by the
/// weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let x32 = x.to_kind(Kind::Float);
    let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    let normed = x32 * (variance + eps).rsqrt();
    weight * normed.to_kind(kind)
}

impl Llama {
    /// Hidden states after the final norm, [B, T, hidden].
    ///
    /// - `input_ids`, `positions`: [B, T] int64.
    /// - `key_mask`: [B, past + T] bool, true on real tokens; `None` means no padding.
    /// - `cache`: appended to when given.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let context = self.context(input_ids, positions, key_mask, cache.as_deref_mut());
        self.forward_hidden_in(input_ids, &context, cache, train)
    }

    /// One decoding step of continuous batching: `ids` and `positions` [S, 1], one
    /// token per slot of a `KvCache::slots` cache, each written at its own position
    /// (its row's length so far) and attending to that row's positions up to it.
    /// Returns the hidden states after the final norm, [S, 1, hidden].
    pub fn decode_slots(&self, ids: &Tensor, positions: &Tensor, cache: &mut KvCache) -> Tensor {
        let capacity = cache.capacity;
        let keys = Tensor::arange(capacity, (Kind::Int64, self.device)).view([1, capacity]);
        let allowed = keys.le_tensor(positions); // [S, capacity]
        let (cos, sin) = self.rope.cos_sin(positions, self.kind);
        let rotation = self.rope.rotation(self.kind);
        let context = LayerContext {
            rotary_matrices: self
                .decode_folds
                .then(|| self.rope.rotary_matrices(&cos, &sin, &rotation)),
            residual_in_place: self.decode_folds,
            input_observer: None,
            cos,
            sin,
            rotation,
            mask: Some(additive_mask(&allowed.unsqueeze(1).unsqueeze(1), self.kind)),
            past: 0,
            segments: None,
            padded_layout: None,
        };
        cache.write_at = Some(positions.view([-1]));
        let hidden = self.forward_hidden_in(ids, &context, Some(&mut *cache), false);
        cache.write_at = None;
        hidden
    }

    /// Hidden states after the final norm for a prepared context: embedding, every
    /// decoder layer (writing to `cache` when given), final norm.
    pub fn forward_hidden_in(
        &self,
        input_ids: &Tensor,
        context: &LayerContext,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let mut hidden = self.embed(input_ids);
        for index in 0..self.layers.len() {
            hidden = self.layer_forward(index, &hidden, context, cache.as_deref_mut(), train);
        }
        self.final_norm(&hidden)
    }

    /// Token embeddings [B, T, hidden].
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false)
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, hidden: &Tensor) -> Tensor {
        self.norm(hidden, &self.norm)
    }

    /// RMSNorm with `weight`: transformers' order, or the fused kernel (`fused_norm`).
    fn norm(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        let eps = self.config.rms_norm_eps;
        if self.fused_norm && x.device() != Device::Cpu {
            return x.rms_norm([self.config.hidden_size as i64], Some(weight), eps);
        }
        // Training on a GPU: the same values as one autograd node with a cheaper backward
        // pass (fewer launches; the CPU is not bound by them). Its gradients differ from
        // autograd's graph by f32 rounding; on the CPU that alone moved the 50-step
        // quality check's first, chaotic form (`tests/optimizer_quality.rs`, batch 1 on
        // the sample data: f32 `adamw` 0.5343 -> 0.5555), so the CPU kept the graph.
        if x.device() != Device::Cpu
            && (x.requires_grad() || weight.requires_grad())
            && norm_node_enabled()
            && let Some(Ok(y)) = crate::torch_ops::ops().map(|ops| ops.rms_norm(x, weight, eps))
        {
            return y;
        }
        rms_norm(x, weight, eps)
    }

    /// What every layer of one forward pass shares: rotary cos/sin and the mask.
    pub fn context(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> LayerContext {
        let (batch, steps) = input_ids.size2().expect("input_ids is [B, T]");
        let mut past = 0;
        if let Some(cache) = cache {
            let (kv_heads, head_dim) = (
                self.config.num_key_value_heads as i64,
                self.config.head_dim as i64,
            );
            let length = cache.capacity;
            cache.layers.resize_with(self.layers.len(), || {
                let buffer = || {
                    Tensor::zeros(
                        [batch, kv_heads, length, head_dim],
                        (self.kind, self.device),
                    )
                };
                (buffer(), buffer())
            });
            // The layers of this forward write at `past`.
            past = cache.advance(steps);
        }
        let (cos, sin) = self.rope.cos_sin(positions, self.kind);
        LayerContext {
            cos,
            sin,
            rotation: self.rope.rotation(self.kind),
            mask: attention_mask(key_mask, batch, steps, past, self.device)
                .map(|mask| additive_mask(&mask, self.kind)),
            past,
            segments: None,
            padded_layout: None,
            rotary_matrices: None,
            residual_in_place: false,
            input_observer: None,
        }
    }

    /// One decoder layer: attention and MLP blocks with their residuals.
    pub fn layer_forward(
        &self,
        index: usize,
        hidden: &Tensor,
        context: &LayerContext,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let config = &self.config;
        let layer = &self.layers[index];
        let (batch, steps, _) = hidden.size3().expect("hidden is [B, T, H]");
        let heads = config.num_attention_heads as i64;
        let kv_heads = config.num_key_value_heads as i64;
        let head_dim = config.head_dim as i64;
        let dropout = context.lora_dropout(train);
        let observe = |input: ProjectionInput, x: &Tensor| {
            if let Some(observer) = &context.input_observer {
                observer(index, input, x)
            }
        };
        let x = self.norm(hidden, &layer.input_layernorm);
        observe(ProjectionInput::Attention, &x);
        let attn = &layer.self_attn;
        // Rotated in [B, T, heads, D] (the projections' own layout, so the rotation's
        // matmul needs no copy), then heads first for attention.
        let rotate = |x: &Tensor, heads: i64| {
            let x = x.view([batch, steps, heads, head_dim]);
            match &context.rotary_matrices {
                Some(matrices) => x.matmul(matrices),
                None => apply_rotary(&x, &context.cos, &context.sin, &context.rotation),
            }
        };
        let (q, mut k, v) = match &attn.qkv {
            Some(fused) if fused.is_current(&[&attn.q_proj, &attn.k_proj, &attn.v_proj]) => {
                // q and k sit side by side in the fused output: one rotation for both
                // (the same values; half the launches of a decode step's rotations).
                let all = fused.forward_whole(&x);
                let rotated = rotate(
                    &all.narrow(-1, 0, (heads + kv_heads) * head_dim),
                    heads + kv_heads,
                );
                (
                    rotated.narrow(2, 0, heads),
                    rotated.narrow(2, heads, kv_heads),
                    all.narrow(-1, (heads + kv_heads) * head_dim, kv_heads * head_dim),
                )
            }
            _ => {
                let [q, k, v] =
                    [&attn.q_proj, &attn.k_proj, &attn.v_proj].map(|p| p.forward(&x, dropout));
                (rotate(&q, heads), rotate(&k, kv_heads), v)
            }
        };
        let q = q.transpose(1, 2);
        k = k.transpose(1, 2);
        let mut v = v.view([batch, steps, kv_heads, head_dim]).transpose(1, 2);
        if let Some(cache) = cache {
            (k, v) = cache.store(index, context.past, &k, &v);
        }
        let scale = Some((head_dim as f64).powf(-0.5));
        let grouped = heads != kv_heads;
        let out = match &context.segments {
            // Packed documents: causal attention inside each one, nothing across.
            // Slicing the time axis keeps every call maskless, so flash attention
            // stays usable (a block-diagonal mask would rule it out).
            Some(segments) => {
                let parts: Vec<Tensor> = segments
                    .iter()
                    .map(|&(start, length)| {
                        Tensor::scaled_dot_product_attention(
                            &q.narrow(2, start, length),
                            &k.narrow(2, start, length),
                            &v.narrow(2, start, length),
                            None::<&Tensor>,
                            0.0,
                            length > 1,
                            scale,
                            grouped,
                        )
                    })
                    .collect();
                Tensor::cat(&parts, 2)
            }
            None => {
                let causal_without_mask = context.mask.is_none() && context.past == 0 && steps > 1;
                Tensor::scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    context.mask.as_ref(),
                    0.0,
                    causal_without_mask,
                    scale,
                    grouped,
                )
            }
        };
        let out = out
            .transpose(1, 2)
            .reshape([batch, steps, heads * head_dim]);
        observe(ProjectionInput::AttentionOutput, &out);
        let hidden = add_projection(hidden, &attn.o_proj, &out, context, train);
        let x = self.norm(&hidden, &layer.post_attention_layernorm);
        observe(ProjectionInput::Mlp, &x);
        let mlp = &layer.mlp;
        let (gate, up) = match &mlp.gate_up {
            Some(fused) if fused.is_current(&[&mlp.gate_proj, &mlp.up_proj]) => {
                let parts = fused.forward(&x);
                (parts[0].shallow_clone(), parts[1].shallow_clone())
            }
            _ => (
                mlp.gate_proj.forward(&x, dropout),
                mlp.up_proj.forward(&x, dropout),
            ),
        };
        let gated = gate.silu() * up;
        observe(ProjectionInput::MlpHidden, &gated);
        add_projection(&hidden, &mlp.down_proj, &gated, context, train)
    }

    /// Logits for hidden states [..., hidden] -> [..., vocab].
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        dense_linear(hidden, head, None)
    }

    /// Logits for every position, [B, T, vocab] (tests and small batches).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: Option<&Tensor>,
    ) -> Tensor {
        let hidden = self.forward_hidden(input_ids, positions, key_mask, None, false);
        self.logits(&hidden)
    }

    /// The base weights and norms with their HF names, in checkpoint order. A dense
    /// model only (a quantized projection has no tensor to lend).
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut named = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            named.push((
                format!("{p}.input_layernorm.weight"),
                &layer.input_layernorm,
            ));
            named.push((
                format!("{p}.post_attention_layernorm.weight"),
                &layer.post_attention_layernorm,
            ));
            for (name, linear) in layer.linears() {
                named.push((format!("{p}.{name}.weight"), linear.weight.expect_dense()));
                if let Some(bias) = &linear.bias {
                    named.push((format!("{p}.{name}.bias"), bias));
                }
            }
        }
        named.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(head) = &self.lm_head {
            named.push(("lm_head.weight".to_string(), head));
        }
        named
    }
}

/// Names of the seven projections, as PEFT's target_modules spell them.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl DecoderLayer {
    /// The projections with their module paths ("self_attn.q_proj", "mlp.down_proj", ...).
    pub fn linears(&self) -> Vec<(&'static str, &Linear)> {
        vec![
            ("self_attn.q_proj", &self.self_attn.q_proj),
            ("self_attn.k_proj", &self.self_attn.k_proj),
            ("self_attn.v_proj", &self.self_attn.v_proj),
            ("self_attn.o_proj", &self.self_attn.o_proj),
            ("mlp.gate_proj", &self.mlp.gate_proj),
            ("mlp.up_proj", &self.mlp.up_proj),
            ("mlp.down_proj", &self.mlp.down_proj),
        ]
    }

    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![
            ("self_attn.q_proj", &mut self.self_attn.q_proj),
            ("self_attn.k_proj", &mut self.self_attn.k_proj),
            ("self_attn.v_proj", &mut self.self_attn.v_proj),
            ("self_attn.o_proj", &mut self.self_attn.o_proj),
            ("mlp.gate_proj", &mut self.mlp.gate_proj),
            ("mlp.up_proj", &mut self.mlp.up_proj),
            ("mlp.down_proj", &mut self.mlp.down_proj),
        ]
    }
}

/// A boolean attention mask (true = may attend) as the additive mask attention turns
/// it into (0 where allowed, -inf elsewhere, in the activations' dtype): made once per
/// forward pass, where a boolean mask is converted again in every layer's attention
/// call (two launches per layer; a decode step's graph holds one per layer fewer of
/// each). The same values, so the same attention.
fn additive_mask(allowed: &Tensor, kind: Kind) -> Tensor {
    Tensor::full(allowed.size(), f64::NEG_INFINITY, (kind, allowed.device()))
        .masked_fill(allowed, 0.0)
}

/// `hidden + projection(x)`, the residual add after o_proj and down_proj. With
/// `context.residual_in_place` and a plain dense projection, the matmul adds into
/// `hidden` itself (one GEMM with beta = 1 instead of a GEMM and an add) and `hidden`
/// is returned.
fn add_projection(
    hidden: &Tensor,
    projection: &Linear,
    x: &Tensor,
    context: &LayerContext,
    train: bool,
) -> Tensor {
    if context.residual_in_place
        && !train
        && projection.lora.is_none()
        && projection.bias.is_none()
        && hidden.is_contiguous()
        && let Some(weight) = projection.weight.dense()
    {
        let width = |t: &Tensor| *t.size().last().expect("a projection's input has a width");
        let mut rows = hidden.view([-1, width(hidden)]);
        let _ = rows.addmm_(&x.reshape([-1, width(x)]), &weight.tr());
        return hidden.shallow_clone();
    }
    hidden + projection.forward(x, context.lora_dropout(train))
}

/// The additive attention mask [1, 1, W, W] of one packed row whose positions belong
/// to `documents` [W] (a document index per position): causal within a document,
/// nothing across. Built on the device from a tensor, so a recorded CUDA graph
/// replays it for every batch laid out at that width (`batch::FixedWidthLayout`).
pub fn document_mask(documents: &Tensor, kind: Kind) -> Tensor {
    let width = documents.size()[0];
    let slots = Tensor::arange(width, (Kind::Int64, documents.device()));
    let causal = slots.unsqueeze(0).le_tensor(&slots.unsqueeze(1));
    let same_document = documents.unsqueeze(0).eq_tensor(&documents.unsqueeze(1));
    additive_mask(&causal.logical_and(&same_document), kind).view([1, 1, width, width])
}

/// Boolean attention mask [B, 1, T, past + T] (true = may attend), or `None` when
/// plain causal attention suffices. Every query may attend to itself, so rows of
/// padding stay finite (a fully masked row would be NaN and leak through V).
fn attention_mask(
    key_mask: Option<&Tensor>,
    batch: i64,
    steps: i64,
    past: i64,
    device: Device,
) -> Option<Tensor> {
    if key_mask.is_none() && (past == 0 || steps == 1) {
        return None;
    }
    let total = past + steps;
    let query_slots = Tensor::arange_start(past, total, (Kind::Int64, device)).unsqueeze(1);
    let key_slots = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
    let causal = key_slots.le_tensor(&query_slots);
    let allowed = match key_mask {
        Some(keys) => causal
            .unsqueeze(0)
            .logical_and(&keys.to_kind(Kind::Bool).unsqueeze(1)),
        None => causal.unsqueeze(0).expand([batch, steps, total], false),
    };
    let itself = key_slots.eq_tensor(&query_slots).unsqueeze(0);
    Some(allowed.logical_or(&itself).unsqueeze(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RMSNorm node (`Ops::rms_norm`) gives transformers' values bit for bit and
    /// the gradients of autograd's graph of `rms_norm`: x and a trained weight, f32
    /// within 1e-6 of the largest, bf16 within a rounding of it.
    #[test]
    fn norm_node_matches_autograd() {
        let ops = crate::torch_ops::ops().expect("the ops library loads");
        let wave =
            |n: i64, phase: f64| (Tensor::arange(n, (Kind::Float, Device::Cpu)) * phase).sin();
        let (rows, hidden) = (6i64, 32i64);
        for kind in [Kind::Float, Kind::BFloat16] {
            for weight_trained in [false, true] {
                let x = (wave(rows * hidden, 0.37) * 3.0)
                    .view([2, rows / 2, hidden])
                    .to_kind(kind)
                    .set_requires_grad(true);
                let weight = (wave(hidden, 0.9) * 0.5 + 1.0)
                    .to_kind(kind)
                    .set_requires_grad(weight_trained);
                let upstream = wave(rows * hidden, 0.23)
                    .view([2, rows / 2, hidden])
                    .to_kind(kind);
                let run = |node: bool| {
                    let y = if node {
                        ops.rms_norm(&x, &weight, 1e-5).unwrap()
                    } else {
                        rms_norm(&x, &weight, 1e-5)
                    };
                    let mut inputs = vec![&x];
                    if weight_trained {
                        inputs.push(&weight);
                    }
                    let grads = Tensor::run_backward(
                        &[(&y * &upstream).sum(Kind::Float)],
                        &inputs,
                        false,
                        false,
                    );
                    (y.detach(), grads)
                };
                let (y_graph, grads_graph) = run(false);
                let (y_node, grads_node) = run(true);
                let case = format!("{kind:?} weight trained {weight_trained}");
                assert!(y_node.equal(&y_graph), "{case}: values");
                assert_eq!(grads_node.len(), grads_graph.len());
                let tolerance = if kind == Kind::Float { 1e-6 } else { 1e-2 };
                for (node, graph) in grads_node.iter().zip(&grads_graph) {
                    assert_eq!(node.kind(), graph.kind(), "{case}");
                    let scale = graph.abs().max().to_kind(Kind::Float).double_value(&[]);
                    let difference = (node.to_kind(Kind::Float) - graph.to_kind(Kind::Float))
                        .abs()
                        .max()
                        .double_value(&[]);
                    assert!(scale > 1e-3, "{case}: a gradient flows");
                    assert!(
                        difference <= tolerance * scale,
                        "{case}: {difference} of {scale}"
                    );
                }
            }
        }
    }
}
