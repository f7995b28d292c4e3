//! Command-line interface: commands and flags. The seed scripts' spellings
//! (--model_id, --cutoff_len, ...) are accepted as aliases so their commands run with
//! only the program name changed.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::data::{ReadOptions, TextEncoding};
use crate::device::Precision;
use crate::prompt::PromptFormat;
use crate::score::normalize::Normalization;

#[derive(Debug, Parser)]
#[command(
    name = "amthal",
    version,
    about = "Fine-tune, run and score language models that explain Yemeni proverbs in Modern Standard Arabic"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show how examples are encoded for training: the rendered prompt and the tokens,
    /// with the trained (answer) tokens marked; or JSONL {"input_ids", "labels"}.
    Tokenize(TokenizeArgs),
    /// Run the main job on the embedded default model and sample data.
    Demo(DemoArgs),
    /// Mean answer-token cross-entropy (and perplexity) of a model over a data file.
    Loss(LossArgs),
    /// Fold a LoRA adapter into its base model and write a merged HF model folder.
    Merge(MergeArgs),
    /// Write a model (with its adapter folded in) as a GGUF file for llama.cpp and Ollama,
    /// with an Ollama Modelfile beside it.
    Export(ExportArgs),
    /// Fine-tune a model (LoRA or full) on a data dir (the seed's train.py).
    Train(Box<TrainArgs>),
    /// Generate explanations for a test file and write the predictions CSV (the seed's evaluate.py).
    #[command(visible_alias = "generate")]
    Evaluate(Box<EvaluateArgs>),
    /// Score a predictions CSV against its references: sacrebleu BLEU (13a, intl), NLTK
    /// BLEU, ROUGE-1/2/L, chrF++, BERTScore, sentence-embedding cosine, task checks.
    Score(ScoreArgs),
    /// Compare several prediction files in one Markdown + HTML report with charts.
    Report(ReportArgs),
    /// What this machine gives amthal: libtorch version and file, CPU, CUDA devices
    /// (name, memory), and what --device/--precision auto resolve to.
    Env(EnvArgs),
}

#[derive(Debug, Args)]
pub struct EnvArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Which metrics to compute and with which models (shared by `score` and `report`).
#[derive(Debug, Clone, Args)]
pub struct MetricArgs {
    /// Comma-separated metrics: bleu, bleu-intl, nltk-bleu, rouge, chrf++, bertscore,
    /// cosine, checks. Default: all (a default embedding model that is not available
    /// offline is then skipped with a warning; a metric named here must run).
    #[arg(long, value_name = "LIST")]
    pub metrics: Vec<String>,
    /// BERTScore model: HF folder or Hub id (default bert-base-multilingual-cased, as
    /// bert_score uses for lang="ar").
    #[arg(long, value_name = "M")]
    pub bertscore_model: Option<String>,
    /// Hidden layer whose embeddings BERTScore compares (default: bert_score's choice
    /// for the model, 9 for bert-base-multilingual-cased, else the last layer).
    #[arg(long, value_name = "N")]
    pub bertscore_layer: Option<usize>,
    /// Weight tokens by idf computed from the references (bert_score idf=True).
    #[arg(long)]
    pub bertscore_idf: bool,
    /// Rescale with a baseline file in bert_score's format (LAYER,P,R,F per line).
    #[arg(long, value_name = "FILE")]
    pub bertscore_baseline: Option<PathBuf>,
    /// Sentence-transformers model folder or Hub id for cosine similarity (SAS);
    /// repeat for several. Default: all-MiniLM-L6-v2 (fetched by scripts/setup).
    #[arg(long = "embedding-model", value_name = "M")]
    pub embedding_models: Vec<String>,
    /// Text normalisation before the string metrics.
    #[arg(long, value_enum, default_value_t = Normalization::None)]
    pub normalize: Normalization,
    /// auto, cpu, cuda or cuda:N (embedding models only).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Sentences per BERTScore batch. bert_score zeroes the similarities of padding
    /// before taking maxima, so its scores can depend on the batch; the default is
    /// bert_score's (64) so the numbers match a default Python run.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub bertscore_batch_size: usize,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Predictions CSV (Generated_Explanation and Reference_Explanation columns, any
    /// case; prediction/reference also accepted).
    #[arg(long, value_name = "FILE")]
    pub pred: PathBuf,
    /// Per-row scores: the input columns plus one column per metric.
    /// Default: beside the input, NAME.scores.csv.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Summary JSON. Default: beside the input, NAME.scores.json.
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
    /// Text encoding of the predictions CSV (auto: a byte-order mark decides, else UTF-8).
    #[arg(long, value_enum, default_value_t = TextEncoding::Auto)]
    pub encoding: TextEncoding,
    #[command(flatten)]
    pub metrics: MetricArgs,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Prediction CSVs to compare (e.g. zero-shot, few-shot, fine-tuned).
    #[arg(required = true, value_name = "RUN.csv")]
    pub runs: Vec<PathBuf>,
    /// A name per run, in the same order (default: the file names).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub names: Vec<String>,
    /// Training logs (log.jsonl from amthal train) to draw loss curves from.
    #[arg(long = "train-log", value_name = "FILE")]
    pub train_logs: Vec<PathBuf>,
    /// How many proverbs to show side by side.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub samples: usize,
    /// Folder for report.md, report.html, scores and charts.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Text encoding of the prediction CSVs (auto: a byte-order mark decides, else UTF-8).
    #[arg(long, value_enum, default_value_t = TextEncoding::Auto)]
    pub encoding: TextEncoding,
    #[command(flatten)]
    pub metrics: MetricArgs,
}

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// A full fine-tune (or any HF folder, GGUF file or Hub id) to generate with.
    #[arg(long, visible_alias = "checkpoint_dir", value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// The base model for --adapter-dir (same as --model).
    #[arg(long, visible_alias = "base_id", value_name = "M")]
    pub base_id: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quantize: QuantizeArgs,
    /// A LoRA adapter (PEFT format, amthal's or Python's) on top of the base model.
    #[arg(long, visible_aliases = ["adapter_dir", "adapter"], value_name = "DIR")]
    pub adapter_dir: Option<PathBuf>,
    /// Keep the adapter beside the base weights instead of folding it into them
    /// (folding, PEFT's merge_and_unload in memory, is the default: faster decoding).
    #[arg(long, visible_alias = "no_merge_adapter")]
    pub no_merge_adapter: bool,
    /// On CUDA, decode eagerly instead of replaying the decode step from a CUDA graph
    /// (the graph is recorded once per run; the tokens are the same either way).
    #[arg(long)]
    pub no_cuda_graph: bool,
    /// The test file (CSV/JSON/JSONL); a reference column is optional.
    #[arg(
        long,
        visible_alias = "test_path",
        default_value = "data/Test_data.csv",
        value_name = "FILE"
    )]
    pub test_path: PathBuf,
    /// The predictions CSV (default results/finetune_<timestamp>.csv); a .json sidecar goes beside it.
    #[arg(long, visible_alias = "out_path", value_name = "FILE")]
    pub out_path: Option<PathBuf>,
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// Seeds sampling (per row, so outputs do not depend on the batch size) and shot choice.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Rows decoding at once (continuous batching slots), or `auto`: on CUDA as many as
    /// the card's free memory holds (KV cache and logits per row), on CPU 8.
    #[arg(
        long,
        visible_alias = "batch_size",
        default_value = "8",
        value_name = "N|auto"
    )]
    pub batch_size: crate::generate::BatchSize,
    #[arg(long, value_enum, default_value_t = PromptFormat::Auto)]
    pub prompt_format: PromptFormat,
    /// Few-shot: put K worked examples before each proverb (needs --shots-from).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub shots: usize,
    /// Where the worked examples come from (e.g. Train_data.csv).
    #[arg(long, value_name = "FILE")]
    pub shots_from: Option<PathBuf>,
    /// Seed for choosing the shots (default: --seed).
    #[arg(long, value_name = "S")]
    pub shots_seed: Option<u64>,
    /// Only the first N test rows.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Continue an interrupted run: rows already in --out-path are kept, not regenerated.
    #[arg(long)]
    pub resume: bool,
    /// Replace an existing --out-path.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    #[command(flatten)]
    pub data_options: DataArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// How `evaluate` picks tokens. Each setting left out comes from the model's
/// generation_config.json (see `--generation-config`), else from HF's defaults, as
/// transformers' `generate` merges its keyword arguments over `model.generation_config`
/// (`generation_settings.rs`); hence `Option` everywhere.
#[derive(Debug, Clone, Default, Args)]
pub struct GenerationArgs {
    /// Where settings not given as flags come from: `auto` (the model folder's
    /// generation_config.json, as HF's generate), `none` (HF's defaults only), or a
    /// generation_config.json file.
    #[arg(
        long,
        visible_alias = "generation_config",
        default_value = "auto",
        value_name = "auto|none|FILE"
    )]
    pub generation_config: crate::generation_settings::GenerationConfigSource,
    /// At most N new tokens per answer (default 256, or the model's max_new_tokens).
    #[arg(long, visible_alias = "max_new_tokens", value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// Suppress end tokens until N tokens were generated (benchmarks force a length).
    #[arg(long, visible_alias = "min_new_tokens", value_name = "N")]
    pub min_new_tokens: Option<usize>,
    /// 0 = greedy decoding (the default, unless the model's generation_config.json
    /// samples; with --do-sample, its temperature or 1).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// HF's do_sample: sample, with HF's defaults for what is not given (temperature 1,
    /// top-k 50); `false` decodes greedily whatever --temperature says. Without it, a
    /// temperature above 0 samples.
    #[arg(
        long,
        visible_alias = "do_sample",
        value_name = "true|false",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub do_sample: Option<bool>,
    /// Sampling: nucleus sampling's mass (HF's top_p; 1 = off).
    #[arg(long, visible_alias = "top_p", value_name = "P")]
    pub top_p: Option<f64>,
    /// Keep the K most probable tokens (default: off; with --do-sample, the model's
    /// top_k or HF's 50).
    #[arg(long, visible_alias = "top_k", value_name = "K")]
    pub top_k: Option<usize>,
    /// Sampling: drop tokens less probable than P x the most probable one (HF's min_p;
    /// 0.05-0.1 is common).
    #[arg(long, visible_alias = "min_p", value_name = "P")]
    pub min_p: Option<f64>,
    /// Sampling: locally typical sampling's mass (HF's typical_p; 1 = off).
    #[arg(long, visible_alias = "typical_p", value_name = "MASS")]
    pub typical_p: Option<f64>,
    /// Sampling: drop tokens below this probability (HF's epsilon_cutoff; 0 = off; its
    /// paper suggests 3e-4 to 9e-4).
    #[arg(long, visible_alias = "epsilon_cutoff", value_name = "P")]
    pub epsilon_cutoff: Option<f64>,
    /// Sampling: eta sampling's cutoff, min(eta, sqrt(eta) x e^-entropy) (HF's
    /// eta_cutoff; 0 = off; its paper suggests 3e-4 to 2e-3).
    #[arg(long, visible_alias = "eta_cutoff", value_name = "ETA")]
    pub eta_cutoff: Option<f64>,
    /// Sampling: top-h, keep the top tokens within H x the entropy of the 100 most
    /// probable (HF's top_h, in (0, 1]).
    #[arg(long, visible_alias = "top_h", value_name = "H")]
    pub top_h: Option<f64>,
    /// HF's repetition_penalty (1 = off): a seen token's positive logit is divided by
    /// it, a negative one multiplied.
    #[arg(long, visible_alias = "repetition_penalty", value_name = "X")]
    pub repetition_penalty: Option<f64>,
    /// No n-gram of this size may occur twice in prompt + answer (HF's
    /// no_repeat_ngram_size; 0 = off).
    #[arg(long, visible_alias = "no_repeat_ngram_size", value_name = "N")]
    pub no_repeat_ngram_size: Option<usize>,
    /// Beam search with N beams (HF's num_beams; 1 = off): greedy only, each prompt's
    /// beams decode together, --batch-size prompts at a time.
    #[arg(long, visible_alias = "num_beams", value_name = "N")]
    pub num_beams: Option<usize>,
    /// Beam search: a finished beam's summed log-probability is divided by its length
    /// to this power (HF's length_penalty, default 1; > 0 favours longer answers).
    #[arg(long, visible_alias = "length_penalty", value_name = "X")]
    pub length_penalty: Option<f64>,
    /// Beam search: false (HF's default: stop when no running beam can beat the
    /// finished ones), true (as soon as N beams finished), never (the canonical search).
    #[arg(long, visible_alias = "early_stopping", value_enum)]
    pub early_stopping: Option<crate::generate::EarlyStopping>,
}

/// How data files are read; shared by every command that reads proverbs.
#[derive(Debug, Clone, Copy, Args)]
pub struct DataArgs {
    /// Text encoding of the data files: auto (a byte-order mark decides, else UTF-8),
    /// utf-8, utf-16 (Excel's "Unicode text") or cp1256 (Excel's "CSV" on Arabic Windows).
    #[arg(long, value_enum, default_value_t = TextEncoding::Auto)]
    pub encoding: TextEncoding,
    /// Leave out rows whose proverb (or, for training and validation, reference) is
    /// empty, null or not text, and report them, instead of refusing the file.
    #[arg(long, visible_alias = "skip_invalid_rows")]
    pub skip_invalid_rows: bool,
}

impl DataArgs {
    /// The same settings as command-line words (for commands the demo runs).
    pub fn to_words(&self) -> Vec<String> {
        use clap::ValueEnum;
        let encoding = self
            .encoding
            .to_possible_value()
            .expect("every encoding has a name");
        let mut words = vec!["--encoding".to_string(), encoding.get_name().to_string()];
        if self.skip_invalid_rows {
            words.push("--skip-invalid-rows".into());
        }
        words
    }

    pub fn read_options(&self) -> ReadOptions {
        ReadOptions {
            encoding: self.encoding,
            skip_invalid_rows: self.skip_invalid_rows,
        }
    }
}

/// `--quantize` and the spellings of transformers' BitsAndBytesConfig: how the frozen
/// decoder projections are stored (see `model::quantized`).
#[derive(Debug, Clone, Default, Args)]
pub struct QuantizeArgs {
    /// Keep the frozen projections quantized as bitsandbytes does (QLoRA's base): nf4 or
    /// fp4 (4-bit, blocks of 64) or int8 (LLM.int8's row-wise int8, weights only).
    /// Embeddings, norms and lm_head stay in the compute dtype.
    #[arg(long, value_name = "nf4|fp4|int8", value_parser = clap::value_parser!(crate::model::quantized::QuantKind))]
    pub quantize: Option<crate::model::quantized::QuantKind>,
    /// 4-bit: keep the block absmaxes in 8 bits too (bnb_4bit_use_double_quant),
    /// ~0.4 bits per weight less.
    #[arg(long, visible_alias = "bnb_4bit_use_double_quant")]
    pub double_quant: bool,
    /// transformers' load_in_4bit: --quantize nf4 (the QLoRA recipe's type; a bare
    /// BitsAndBytesConfig would pick fp4, which --quantize fp4 gives).
    #[arg(long, visible_alias = "load_in_4bit", conflicts_with_all = ["quantize", "load_in_8bit"])]
    pub load_in_4bit: bool,
    /// transformers' load_in_8bit: --quantize int8.
    #[arg(long, visible_alias = "load_in_8bit", conflicts_with = "quantize")]
    pub load_in_8bit: bool,
}

impl QuantizeArgs {
    /// The chosen storage, None for a dense model.
    pub fn quant_kind(&self) -> Option<crate::model::quantized::QuantKind> {
        use crate::model::quantized::QuantKind;
        if self.load_in_4bit {
            Some(QuantKind::Nf4)
        } else if self.load_in_8bit {
            Some(QuantKind::Int8)
        } else {
            self.quantize
        }
    }

    /// The storage with its double-quantization setting; `--double-quant` without a
    /// 4-bit type is an error.
    pub fn resolve(&self) -> anyhow::Result<Option<crate::model::quantized::Quantization>> {
        crate::model::quantized::Quantization::from_settings(self.quant_kind(), self.double_quant)
    }
}

/// Data-parallel training (torchrun's flags): start N workers of this command on this
/// node; they rendezvous at --master-addr:--master-port through c10d's TCPStore.
#[derive(Debug, Clone, Default, Args)]
pub struct LaunchArgs {
    /// Workers to start on this node (torchrun's --nproc-per-node). A command started by
    /// torchrun itself (RANK, WORLD_SIZE, ... set) joins without this flag.
    #[arg(long, visible_alias = "nproc_per_node", value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Nodes in the run.
    #[arg(long, default_value_t = 1, requires = "nproc_per_node")]
    pub nnodes: usize,
    /// This node's index.
    #[arg(
        long,
        visible_alias = "node_rank",
        default_value_t = 0,
        requires = "nproc_per_node"
    )]
    pub node_rank: usize,
    /// Where rank 0 hosts the rendezvous store.
    #[arg(
        long,
        visible_alias = "master_addr",
        default_value = "127.0.0.1",
        requires = "nproc_per_node"
    )]
    pub master_addr: String,
    /// Its port (default: a free one, single node only).
    #[arg(long, visible_alias = "master_port", requires = "nproc_per_node")]
    pub master_port: Option<u16>,
    /// c10d backend: auto (nccl when training on CUDA, gloo on the CPU), gloo (CPU
    /// tensors; CUDA tensors through host copies) or nccl (sums on the cards).
    #[arg(long, visible_alias = "dist_backend", value_enum)]
    pub dist_backend: Option<crate::distributed::DistBackend>,
    /// ZeRO stage: 1 shards AdamW's state (moments, master weights) across the ranks, so
    /// each keeps about 1/world of it (DeepSpeed's stage 1, FSDP's SHARD_GRAD_OP for the
    /// optimizer). 0: every rank keeps all of it.
    #[arg(long, value_name = "0|1")]
    pub zero: Option<u8>,
}

/// The file formats `amthal export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// llama.cpp's single-file format (also what Ollama imports).
    Gguf,
    /// The --adapter alone as a GGUF LoRA adapter (llama.cpp's --lora, Ollama's
    /// ADAPTER), for a base exported with --format gguf.
    #[value(name = "gguf-lora")]
    GgufLora,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A LoRA adapter (PEFT format) folded into the weights before writing.
    #[arg(long, visible_aliases = ["adapter_dir", "adapter-dir"], value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The file to write (e.g. model.gguf); a Modelfile for Ollama goes beside it.
    #[arg(long, visible_alias = "out_path", value_name = "FILE")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = ExportFormat::Gguf)]
    pub format: ExportFormat,
    /// Weight type: f32, f16, bf16, q8_0 or q4_k_m (llama.cpp's mix; norms stay f32);
    /// an adapter (--format gguf-lora) f32, f16 or bf16.
    #[arg(long, value_enum, default_value_t = crate::export::ExportQuant::F16)]
    pub quant: crate::export::ExportQuant,
    /// general.name in the file (default: the model's folder or file name).
    #[arg(long)]
    pub name: Option<String>,
    /// Quantize q4_k_m with an importance matrix measured on this data (llama-quantize's
    /// --imatrix): a data dir (its Train split) or a CSV/JSON/JSONL file of proverbs
    /// with explanations, formatted as `train` formats them. The blocks' scales then
    /// favour the input columns whose activations run large on this task's text.
    #[arg(long, value_name = "DIR|FILE")]
    pub imatrix_data: Option<PathBuf>,
    /// How many rows of --imatrix-data to measure (from the top).
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub imatrix_rows: usize,
    /// --format gguf-lora: the Modelfile's FROM, the base the adapter goes on: its GGUF
    /// file beside the Modelfile (exported with --format gguf) or an Ollama model name.
    #[arg(long, default_value = "./base.gguf", value_name = "FILE|MODEL")]
    pub from: String,
}

/// Where and in which precision to run; shared by every command that runs a model.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// auto (CUDA when usable, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype: auto = bf16 on CPUs with AMX/AVX512-BF16 and on CUDA, else f32.
    #[arg(long, value_enum, default_value_t = Precision::Auto)]
    pub precision: Precision,
}

#[derive(Debug, Args)]
pub struct LossArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quantize: QuantizeArgs,
    /// A LoRA adapter folder (PEFT format) to apply to the model.
    #[arg(long, visible_alias = "adapter_dir", value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Data file with proverbs and reference explanations.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value_t = PromptFormat::Auto)]
    pub prompt_format: PromptFormat,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub batch_size: usize,
    /// Truncate answers to fit N tokens (default: no limit).
    #[arg(long, visible_alias = "cutoff_len", value_name = "N")]
    pub cutoff_len: Option<usize>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Print one JSON line per example (loss, answer tokens).
    #[arg(long)]
    pub jsonl: bool,
    #[command(flatten)]
    pub data_options: DataArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The LoRA adapter folder (PEFT format).
    #[arg(long, visible_alias = "adapter_dir", value_name = "DIR")]
    pub adapter: PathBuf,
    /// Where to write the merged HF model folder.
    #[arg(long, visible_alias = "output_dir", value_name = "DIR")]
    pub output_dir: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Which model to use; shared by every command that loads one.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model: a GGUF file, an HF model folder. Default: SmolLM2-135M-Instruct (GGUF)
    /// fetched by scripts/setup.
    #[arg(long, visible_alias = "model_id", value_name = "M")]
    pub model: Option<String>,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data file: CSV, JSON array or JSONL with a proverb column (and usually a reference).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Prompt format: the model's chat template, the seed's plain text, or auto
    /// (chat when the model has a template).
    #[arg(long, value_enum, default_value_t = PromptFormat::Auto)]
    pub prompt_format: PromptFormat,
    /// Maximum tokens per example: the answer is truncated, never the prompt; examples
    /// whose prompt alone reaches it are skipped.
    #[arg(long, visible_alias = "cutoff_len", value_name = "N")]
    pub cutoff_len: Option<usize>,
    /// Only the first N rows.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Print one JSON object per example: {"input_ids": [...], "labels": [...]}.
    #[arg(long)]
    pub jsonl: bool,
    /// Label the prompt's tokens too, as `train --train-on-inputs` trains them.
    #[arg(long, visible_alias = "train_on_inputs")]
    pub train_on_inputs: bool,
    #[command(flatten)]
    pub data_options: DataArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data dir with Train_data.csv, Validation_data.csv, Test_data.csv. Default: the
    /// sample data embedded in amthal (examples/data).
    #[arg(long, visible_alias = "data_dir", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the predictions, adapter, logs and summary go.
    #[arg(long, default_value = "results/demo", value_name = "DIR")]
    pub out: PathBuf,
    /// LoRA optimizer steps (batch 4); the default keeps the demo to a few minutes on 2 cores.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// New tokens per explanation.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// The demo's generations ban repeated trigrams: a small model fine-tuned for a few
    /// steps otherwise loops ("يقال لمن يضرب لمن يضرب ..."). 0 turns it off.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub no_repeat_ngram_size: usize,
    #[command(flatten)]
    pub data_options: DataArgs,
}

/// `amthal train` flags. Every setting is optional here: unset ones come from
/// `--config FILE.toml`, then from the defaults (see `train::config::TrainConfig`).
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Model to fine-tune (GGUF file, HF folder or Hub id); default: the embedded SmolLM2.
    #[arg(long, visible_alias = "model_id", value_name = "M")]
    pub model: Option<String>,
    /// Folder with Train_data.csv and Validation_data.csv.
    #[arg(long, visible_alias = "data_dir", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where checkpoints, the best and final models, logs and plots go.
    #[arg(long, visible_alias = "output_dir", value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// A TOML file with the same keys as these flags (underscores); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Train a LoRA adapter (default: full fine-tune).
    #[arg(long)]
    pub lora: bool,
    #[arg(long, visible_alias = "lora_r")]
    pub lora_r: Option<i64>,
    #[arg(long, visible_alias = "lora_alpha")]
    pub lora_alpha: Option<f64>,
    #[arg(long, visible_alias = "lora_dropout")]
    pub lora_dropout: Option<f64>,
    /// Comma-separated projections (default all seven: q,k,v,o,gate,up,down).
    #[arg(long, visible_aliases = ["lora_targets", "target_modules", "target-modules"], value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
    /// Rank-stabilised LoRA scaling (alpha / sqrt(r)).
    #[arg(long, visible_aliases = ["use_rslora", "use-rslora"])]
    pub rslora: bool,
    /// DoRA (PEFT's use_dora): LoRA with a trainable magnitude per output row; saved
    /// as PEFT saves it. Slower per step than LoRA (each projection's norm is taken
    /// again at every forward pass, as PEFT does).
    #[arg(long, visible_aliases = ["use_dora", "dora"])]
    pub use_dora: bool,
    #[arg(long, visible_aliases = ["learning_rate", "learning-rate"])]
    pub lr: Option<f64>,
    #[arg(long, visible_aliases = ["num_train_epochs", "num-train-epochs"])]
    pub epochs: Option<f64>,
    #[arg(long, visible_aliases = ["bsz", "batch_size", "per_device_train_batch_size", "per-device-train-batch-size"])]
    pub batch_size: Option<usize>,
    #[arg(long, visible_aliases = ["grad_accum", "gradient_accumulation_steps", "gradient-accumulation-steps"])]
    pub grad_accum: Option<usize>,
    /// Tokens per example, prompt and answer together (longer ones are cut; TRL's
    /// max_length without its packing, which would mean the packed row's length).
    #[arg(long, visible_aliases = ["cutoff_len", "max_length", "max-length", "max_seq_length", "max-seq-length"])]
    pub cutoff_len: Option<usize>,
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// The seed's spelling of --precision f16.
    #[arg(long, conflicts_with_all = ["precision", "bf16"])]
    pub fp16: bool,
    /// The seed's spelling of --precision bf16.
    #[arg(long, conflicts_with = "precision")]
    pub bf16: bool,
    #[arg(long)]
    pub device: Option<String>,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    #[arg(long, visible_alias = "gradient_checkpointing")]
    pub gradient_checkpointing: bool,
    #[arg(long)]
    pub seed: Option<u64>,
    /// The share of the run's steps the learning rate warms up over (transformers 4's
    /// warmup_ratio; default 0).
    #[arg(long, visible_alias = "warmup_ratio")]
    pub warmup_ratio: Option<f64>,
    /// Warmup as transformers 5 spells it: N >= 1 steps, or below 1 a share of the run.
    #[arg(long, visible_alias = "warmup_steps", value_name = "N")]
    pub warmup_steps: Option<f64>,
    /// transformers' schedules: linear (default), cosine, cosine_with_restarts,
    /// polynomial, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, constant (no
    /// warmup, as transformers'), constant_with_warmup.
    #[arg(long, visible_aliases = ["lr_scheduler", "lr_scheduler_type", "lr-scheduler-type"], value_enum)]
    pub lr_scheduler: Option<crate::train::lr_schedule::Schedule>,
    /// The schedule's settings as a JSON object, as HF's lr_scheduler_kwargs:
    /// num_cycles, min_lr / min_lr_rate (cosine_with_min_lr), lr_end and power
    /// (polynomial), timescale (inverse_sqrt), num_decay_steps, num_stable_steps,
    /// warmup_type, decay_type, min_lr_ratio (warmup_stable_decay); e.g.
    /// '{"min_lr_rate": 0.1}'.
    #[arg(long, visible_alias = "lr_scheduler_kwargs", value_name = "JSON", value_parser = parse_scheduler_kwargs)]
    pub lr_scheduler_kwargs: Option<crate::train::lr_schedule::SchedulerKwargs>,
    #[arg(long, visible_alias = "weight_decay")]
    pub weight_decay: Option<f64>,
    #[arg(long, visible_alias = "max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// Label smoothing (HF's label_smoothing_factor, default 0): each answer token's
    /// loss is (1 - F) x its cross-entropy + F x the mean of -log p over the vocabulary,
    /// as transformers' LabelSmoother; the logged train and eval losses are smoothed too.
    #[arg(long, visible_alias = "label_smoothing_factor", value_name = "F")]
    pub label_smoothing_factor: Option<f64>,
    /// How the LoRA adapter starts (PEFT's init_lora_weights): true (A kaiming-uniform,
    /// B zeros), gaussian, pissa (the weight's top singular directions; the base keeps
    /// the rest), pissa_niter_K (the same from a randomised SVD with K iterations: fast
    /// on a 7B), olora (QR); pissa and olora adapters are saved converted for the
    /// original base (rank 2r, as PEFT converts them).
    #[arg(long, visible_alias = "init_lora_weights", value_name = "INIT")]
    pub init_lora_weights: Option<crate::model::lora_init::LoraInit>,
    /// Train on the prompt's tokens too, not only the answer's (axolotl's
    /// train_on_inputs; TRL's completion_only_loss = false); the eval loss counts them too.
    #[arg(long, visible_alias = "train_on_inputs")]
    pub train_on_inputs: bool,
    /// Continue training this PEFT adapter (PEFT's is_trainable=True, axolotl's
    /// lora_model_dir); implies --lora; its r, alpha, targets, dropout and DoRA decide.
    #[arg(long, visible_aliases = ["adapter_dir", "lora-model-dir", "lora_model_dir"], value_name = "DIR")]
    pub adapter_dir: Option<std::path::PathBuf>,
    /// Seeds the data order (shuffling) instead of --seed (HF's data_seed).
    #[arg(long, visible_alias = "data_seed", value_name = "N")]
    pub data_seed: Option<u64>,
    /// Evaluate before the first step (logged only; HF's eval_on_start).
    #[arg(long, visible_alias = "eval_on_start")]
    pub eval_on_start: bool,
    /// Log the first step too when --logging-steps is above 1 (HF's logging_first_step).
    #[arg(long, visible_alias = "logging_first_step")]
    pub logging_first_step: bool,
    /// AdamW's beta1 (default 0.9, HF's adam_beta1).
    #[arg(long, visible_alias = "adam_beta1")]
    pub adam_beta1: Option<f64>,
    /// AdamW's beta2 (default 0.999, HF's adam_beta2).
    #[arg(long, visible_alias = "adam_beta2")]
    pub adam_beta2: Option<f64>,
    /// AdamW's epsilon (default 1e-8, HF's adam_epsilon).
    #[arg(long, visible_alias = "adam_epsilon")]
    pub adam_epsilon: Option<f64>,
    #[arg(long, visible_alias = "eval_strategy", value_enum)]
    pub eval_strategy: Option<crate::train::config::EvalStrategy>,
    #[arg(long, visible_alias = "eval_steps")]
    pub eval_steps: Option<usize>,
    /// Rows per evaluation batch (default: twice --batch-size).
    #[arg(long, visible_aliases = ["eval_batch_size", "per_device_eval_batch_size", "per-device-eval-batch-size"], value_name = "N")]
    pub eval_batch_size: Option<usize>,
    /// Whether OUT holds the best checkpoint's model at the end (default true) or the
    /// last one's (false, HF's default); OUT/final/ is the last one's either way.
    #[arg(
        long,
        visible_alias = "load_best_model_at_end",
        value_name = "true|false",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub load_best_model_at_end: Option<bool>,
    /// What the best checkpoint is chosen by: only eval_loss (or loss) is built.
    #[arg(
        long,
        visible_alias = "metric_for_best_model",
        value_name = "eval_loss"
    )]
    pub metric_for_best_model: Option<String>,
    #[arg(long, visible_alias = "logging_steps")]
    pub logging_steps: Option<usize>,
    /// Also log to: none (default, as transformers 5), tensorboard (an event file in
    /// OUT/runs/, HF's folder and tags), all (every integration built: tensorboard).
    #[arg(long, visible_alias = "report_to", value_enum)]
    pub report_to: Option<crate::train::config::ReportTo>,
    /// When checkpoints are written: auto (at every evaluation; the default), steps
    /// (every --save-steps), epoch (each epoch's end), best (only at a new best eval
    /// loss), no (only the final model). The last step is always saved, and so, unless
    /// --load-best-model-at-end false, is every new best (OUT holds it at the end).
    #[arg(long, visible_alias = "save_strategy", value_enum)]
    pub save_strategy: Option<crate::train::config::SaveStrategy>,
    /// With --save-strategy steps: every N optimizer steps (default 500, as HF's).
    #[arg(long, visible_alias = "save_steps", value_name = "N")]
    pub save_steps: Option<usize>,
    #[arg(long, visible_alias = "save_total_limit")]
    pub save_total_limit: Option<usize>,
    #[arg(long, visible_alias = "max_steps")]
    pub max_steps: Option<usize>,
    #[arg(long, visible_alias = "early_stopping_patience")]
    pub early_stopping_patience: Option<usize>,
    #[arg(long, value_enum)]
    pub prompt_format: Option<PromptFormat>,
    /// grouped (default: shuffled per epoch, batches of similar length), shuffled, or file order.
    #[arg(long, visible_alias = "data_order", value_enum)]
    pub data_order: Option<crate::train::config::DataOrder>,
    /// Greedy previews of the first N validation proverbs at the end (default 3).
    #[arg(long)]
    pub previews: Option<usize>,
    /// Text encoding of the data files (see `evaluate --help`; default auto).
    #[arg(long, value_enum)]
    pub encoding: Option<TextEncoding>,
    /// Train on the valid rows and report the others (default: invalid rows are an error).
    #[arg(long, visible_alias = "skip_invalid_rows")]
    pub skip_invalid_rows: bool,
    /// With --fp16: the initial dynamic loss scale (GradScaler's init_scale, 65536).
    #[arg(long, value_name = "S")]
    pub loss_scale_init: Option<f64>,
    /// The optimizer: adamw (f32 moments and master weights), adamw-bf16 (bf16 weights
    /// and moments, Kahan-compensated updates), adamw-8bit (bitsandbytes-style 8-bit
    /// moments), adafactor (transformers' Adafactor as HF Trainer sets it up: factored
    /// second moment, no first moment).
    /// HF's names (adamw_torch, adamw_8bit, ...) are accepted.
    #[arg(long, value_enum)]
    pub optim: Option<crate::train::moments::OptimKind>,
    /// Checkpoints without optimizer state (HF's save_only_model).
    #[arg(long, visible_alias = "save_only_model")]
    pub save_only_model: bool,
    /// Write checkpoints on another thread while training goes on: the step waits only
    /// for host copies of the tensors (as torch.distributed.checkpoint's async_save);
    /// needs host memory for one checkpoint.
    #[arg(long)]
    pub async_checkpoint: bool,
    /// Update each tensor inside the backward pass, as soon as its gradient is complete,
    /// and free that gradient (only one layer's gradients in memory). Implies
    /// --gradient-checkpointing; clipping or --fp16 costs a second backward pass.
    #[arg(long, visible_alias = "optim_in_backward")]
    pub optim_in_backward: bool,
    /// Keep the optimizer state (moments, master weights, compensation) in host memory
    /// and copy it to the GPU a chunk at a time for each update (DeepSpeed's
    /// offload_optimizer): same results, the state off the card, bus traffic per step.
    #[arg(long, visible_alias = "offload_optimizer")]
    pub offload_optimizer: bool,
    /// Padding-free batches (the default): a micro-batch's examples packed into one
    /// row with per-document positions and attention (TRL's padding_free). The same
    /// losses and gradients as padded batches, to f32 rounding (on the CPU with the
    /// same LoRA dropout masks too); kept as a flag for scripts written before it
    /// became the default.
    #[arg(long, visible_alias = "padding_free")]
    pub packing: bool,
    /// Right-padded batches, as HF's data collator builds them (packing is the
    /// default).
    #[arg(long, visible_alias = "no_packing", conflicts_with_all = ["packing", "cuda_graphs"])]
    pub no_packing: bool,
    /// CUDA: record each micro-batch's forward and backward pass as a CUDA graph (one
    /// per width, a multiple of 128 tokens) and replay it, so a step costs a few launches
    /// instead of thousands (torch.compile's reduce-overhead mode). Implies --packing;
    /// LoRA dropout with --gradient-checkpointing needs --lora-dropout 0. On the CPU the
    /// same fixed-width step runs without a graph.
    #[arg(long, visible_alias = "cuda_graphs")]
    pub cuda_graphs: bool,
    #[command(flatten)]
    pub quantize: QuantizeArgs,
    #[command(flatten)]
    pub launch: LaunchArgs,
    /// NEFTune: uniform noise on the input embeddings while training, scaled by
    /// alpha / sqrt(length x hidden) (HF Trainer's neftune_noise_alpha; its paper uses 5
    /// to 15). Not with --cuda-graphs.
    #[arg(long, visible_aliases = ["neftune_noise_alpha"], value_name = "ALPHA")]
    pub neftune_noise_alpha: Option<f64>,
    /// Continue from the latest checkpoint in --output-dir, or from the one named
    /// (HF's resume_from_checkpoint).
    #[arg(
        long,
        visible_aliases = ["resume_from_checkpoint", "resume-from-checkpoint"],
        num_args = 0..=1,
        default_missing_value = "latest",
        value_name = "checkpoint-N"
    )]
    pub resume: Option<String>,
}

/// `--lr-scheduler-kwargs`: a JSON object of the schedule's settings.
fn parse_scheduler_kwargs(
    text: &str,
) -> Result<crate::train::lr_schedule::SchedulerKwargs, String> {
    serde_json::from_str(text).map_err(|e| {
        format!(
            "not a JSON object of the schedule's settings (num_cycles, min_lr, min_lr_rate, \
             lr_end, power, timescale, num_decay_steps, num_stable_steps, warmup_type, \
             decay_type, min_lr_ratio): {e}"
        )
    })
}
