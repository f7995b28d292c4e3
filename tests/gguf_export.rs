//! `amthal export --format gguf`: the file amthal writes reads back (through amthal's
//! own GGUF reader, which is checked against transformers and the gguf package) as the
//! same model: logits within f16's rounding (1e-2) for an f16 export, within a
//! reported error for q8_0 and q4_k_m; the tokenizer rebuilt from the file's metadata
//! encodes as the source tokenizer does; an adapter is folded in; a GGUF source keeps
//! its tokenizer keys verbatim; the Ollama Modelfile names the file and stop tokens.
//! The block encoders give the gguf package's bytes where it has a quantizer.
//! llama.cpp itself (its prebuilt CPU library from npm, driven by tests/llama_cpp/greedy.c)
//! loads the exports, tokenizes as amthal and decodes greedily as amthal does.

mod common;

use std::path::{Path, PathBuf};

use amthal::export::modelfile::default_system_message;
use amthal::generate::{GenerationRequest, SamplingConfig, generate_batch};
use amthal::gguf::GgufFile;
use amthal::model::{Llama, LoadOptions, load_llama};
use amthal::model_source::ModelSource;
use amthal::prompt::{PromptBuilder, PromptFormat, instruction_for};
use amthal::tokenizer::ModelTokenizer;
use common::*;
use tch::{Device, Kind, Tensor};

/// The tiny model with default rope (llama.cpp stores llama3 scaling as a
/// `rope_freqs` tensor, which amthal's reader, like transformers', does not apply).
fn tiny_default_rope(dir: &Path) -> PathBuf {
    let folder = dir.join("tiny");
    std::fs::create_dir_all(&folder).unwrap();
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture("tiny-llama").join(file), folder.join(file)).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-llama").join("config.json")).unwrap(),
    )
    .unwrap();
    config["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 10000.0});
    std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
    folder
}

fn export(model: &Path, out: &Path, quant: &str, extra: &[&str]) {
    let mut args = vec![
        "export",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quant",
        quant,
    ];
    args.extend_from_slice(extra);
    let output = amthal(&args);
    assert!(output.status.success(), "{quant}: {}", stderr(&output));
}

fn logits(model: &Llama, ids: &[i64]) -> Tensor {
    let input = Tensor::from_slice(ids).unsqueeze(0);
    let positions = Tensor::arange(ids.len() as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    tch::no_grad(|| model.forward(&input, &positions, None))
}

fn load(source: ModelSource) -> Llama {
    load_llama(&source, LoadOptions::default()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

const TEXT: &str = "اشرح المثل: الصبر مفتاح الفرج. Explain it in 3 words!";

#[test]
fn tiny_model_round_trips_in_every_quant() {
    let dir = temp_dir("export-tiny");
    let folder = tiny_default_rope(&dir);
    let source = load(ModelSource::HfFolder(folder.clone()));
    let hf_tokenizer = ModelSource::HfFolder(folder.clone()).tokenizer().unwrap();
    let ids: Vec<i64> = hf_tokenizer
        .encode(TEXT, true)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let reference = logits(&source, &ids);
    for (quant, tolerance) in [
        ("f16", 1e-2),
        ("bf16", 5e-2),
        ("q8_0", 5e-2),
        ("q4_k_m", 5e-2),
    ] {
        let file = dir.join(format!("tiny-{quant}.gguf"));
        export(&folder, &file, quant, &[]);
        let exported = load(ModelSource::Gguf(file.clone()));
        let diff = max_diff(&logits(&exported, &ids), &reference);
        eprintln!("{quant}: max abs logit difference {diff:.2e}");
        assert!(diff <= tolerance, "{quant}: logits differ by {diff:e}");
        // The tokenizer rebuilt from the file's metadata encodes as the source.
        let gguf = GgufFile::open(&file).unwrap();
        assert_eq!(gguf.get_str("tokenizer.ggml.model"), Some("llama"));
        assert_eq!(gguf.get_str("general.architecture"), Some("llama"));
        let rebuilt = ModelSource::Gguf(file.clone()).tokenizer().unwrap();
        for text in [TEXT, "  spaces  and\nnewlines", "<s> literal"] {
            assert_eq!(
                rebuilt.encode(text, true).unwrap(),
                hf_tokenizer.encode(text, true).unwrap(),
                "{quant}: {text:?}"
            );
        }
        assert_eq!(rebuilt.chat_template, hf_tokenizer.chat_template);
        assert_eq!(
            rebuilt.eos.as_ref().map(|t| t.id),
            hf_tokenizer.eos.as_ref().map(|t| t.id)
        );
    }
}

#[test]
fn an_adapter_is_folded_into_the_export() {
    let dir = temp_dir("export-adapter");
    let folder = tiny_default_rope(&dir);
    let adapter = fixture("tiny-llama-adapter");
    let mut with_adapter = load(ModelSource::HfFolder(folder.clone()));
    amthal::model::lora::load_adapter(&mut with_adapter, &adapter).unwrap();
    let file = dir.join("merged.gguf");
    export(
        &folder,
        &file,
        "f16",
        &["--adapter", adapter.to_str().unwrap()],
    );
    let exported = load(ModelSource::Gguf(file));
    let ids = [1i64, 20, 300, 45, 7, 99, 150];
    let base = load(ModelSource::HfFolder(folder));
    let adapted = logits(&with_adapter, &ids);
    let diff = max_diff(&logits(&exported, &ids), &adapted);
    assert!(diff <= 1e-2, "{diff:e}");
    // The adapter changes the model by more than the f16 rounding.
    assert!(max_diff(&logits(&base, &ids), &adapted) > 10.0 * diff.max(1e-4));
}

#[test]
fn the_default_gguf_model_keeps_its_tokenizer_and_gets_a_modelfile() {
    let dir = temp_dir("export-smollm2");
    let file = dir.join("smollm2-f16.gguf");
    export(&smollm2(), &file, "f16", &["--name", "smollm2-proverbs"]);
    let (source, exported) = (
        GgufFile::open(&smollm2()).unwrap(),
        GgufFile::open(&file).unwrap(),
    );
    let mut compared = 0;
    for (key, value) in source
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
    {
        assert_eq!(exported.get(key), Some(value), "{key}");
        compared += 1;
    }
    assert!(compared >= 5, "{compared} tokenizer keys");
    assert_eq!(exported.get_str("general.name"), Some("smollm2-proverbs"));
    assert_eq!(exported.get_i64("general.file_type"), Some(1));
    let ids = [1i64, 504, 3458, 28, 9538, 30, 2];
    let diff = max_diff(
        &logits(&load(ModelSource::Gguf(file.clone())), &ids),
        &logits(&load(ModelSource::Gguf(smollm2())), &ids),
    );
    assert!(diff <= 1e-2 * 10.0, "{diff:e}");
    eprintln!("SmolLM2 f16 export: max abs logit difference {diff:.2e}");
    let modelfile = std::fs::read_to_string(dir.join("Modelfile")).unwrap();
    assert!(modelfile.contains("FROM ./smollm2-f16.gguf"), "{modelfile}");
    assert!(
        modelfile.contains("PARAMETER stop \"<|im_end|>\""),
        "{modelfile}"
    );
    assert!(modelfile.contains("<|im_start|>assistant"), "{modelfile}");
}

#[test]
fn a_model_that_cannot_be_exported_is_a_clear_error_and_writes_nothing() {
    let dir = temp_dir("export-errors");
    let out = dir.join("never.gguf");
    let output = amthal(&[
        "export",
        "--model",
        dir.join("missing").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(!out.exists() && !dir.join("Modelfile").exists());
    // An importance matrix weighs only q4_k_m's blocks: asked for with f16, refused.
    let output = amthal(&[
        "export",
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--imatrix-data",
        "data",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_refused(&output, "--imatrix-data with f16", "--imatrix-data");
    // A missing calibration file is named (before the model is loaded).
    let missing = dir.join("no-such-rows.csv");
    let output = amthal(&[
        "export",
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--quant",
        "q4_k_m",
        "--imatrix-data",
        missing.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_refused(&output, "missing --imatrix-data", "no-such-rows.csv");
    assert!(!out.exists() && !dir.join("Modelfile").exists());
}

/// The importance matrix is each projection's mean squared input column: layer 0's
/// q/k/v read the normed embeddings, computed here on their own from the weights.
#[test]
fn the_importance_matrix_is_the_mean_square_of_each_input_column() {
    use amthal::export::imatrix::measure;
    let model = load(ModelSource::HfFolder(fixture("tiny-llama")));
    let sequences = vec![vec![1u32, 20, 30, 40, 50], vec![1, 7, 8], vec![]];
    let matrix = measure(&model, &sequences, "two rows").unwrap();
    assert_eq!((matrix.tokens, matrix.sequences), (8, 2));
    let layers = model.config.num_hidden_layers;
    assert_eq!(matrix.entries(), 7 * layers);
    let config = &model.config;
    for (projection, width) in [
        ("self_attn.q_proj", config.hidden_size),
        (
            "self_attn.o_proj",
            config.num_attention_heads * config.head_dim,
        ),
        ("mlp.up_proj", config.hidden_size),
        ("mlp.down_proj", config.intermediate_size),
    ] {
        let name = format!("model.layers.{}.{projection}.weight", layers - 1);
        assert_eq!(
            matrix.for_tensor(&name).map(<[f32]>::len),
            Some(width),
            "{name}"
        );
    }
    assert_eq!(matrix.for_tensor("lm_head.weight"), None);
    let q = matrix
        .for_tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    for reader in ["k_proj", "v_proj"] {
        let name = format!("model.layers.0.self_attn.{reader}.weight");
        assert_eq!(
            matrix.for_tensor(&name),
            Some(q),
            "{name} reads q_proj's input"
        );
    }
    // RMSNorm of the embeddings, by hand.
    let ids: Vec<i64> = sequences.concat().into_iter().map(i64::from).collect();
    let embedded = model
        .embed_tokens
        .index_select(0, &Tensor::from_slice(&ids));
    let rms = (embedded.square().mean_dim(-1, true, Kind::Float) + config.rms_norm_eps).rsqrt();
    let weight = &model.layers[0].input_layernorm;
    let expected = (embedded * rms * weight)
        .square()
        .mean_dim(0, false, Kind::Float);
    let diff = max_diff(&Tensor::from_slice(q), &expected);
    let scale = expected.abs().max().double_value(&[]);
    assert!(
        diff <= 1e-6 * scale,
        "{diff:e} against values up to {scale:e}"
    );
}

/// `--imatrix-data` through the command: the file says what it was measured on, as
/// llama-quantize's does, and its 4-bit blocks differ from the unweighted export's
/// (the tiny model's 64-wide rows are Q5_0, whose weighted route the byte test above
/// checks against ggml).
#[test]
fn an_export_with_an_importance_matrix_records_it() {
    let dir = temp_dir("export-imatrix");
    let folder = tiny_default_rope(&dir);
    let (plain, weighted) = (dir.join("plain.gguf"), dir.join("weighted.gguf"));
    export(&folder, &plain, "q4_k_m", &[]);
    export(
        &folder,
        &weighted,
        "q4_k_m",
        &["--imatrix-data", "data", "--imatrix-rows", "8"],
    );
    let (plain, weighted) = (
        GgufFile::open(&plain).unwrap(),
        GgufFile::open(&weighted).unwrap(),
    );
    assert_eq!(plain.get("quantize.imatrix.dataset"), None);
    let dataset = weighted.get_str("quantize.imatrix.dataset").unwrap();
    assert!(
        dataset.contains("Train_data.csv") && dataset.contains("8 rows"),
        "{dataset}"
    );
    assert_eq!(weighted.get_i64("quantize.imatrix.chunks_count"), Some(8));
    assert_eq!(weighted.get_i64("quantize.imatrix.entries_count"), Some(14));
    // A tensor's bytes: from its offset to the next tensor's (or the file's end).
    let bytes = |file: &GgufFile, name: &str| -> Vec<u8> {
        let all = std::fs::read(&file.path).unwrap();
        let start = file.tensors.iter().find(|t| t.name == name).unwrap().offset;
        let end = file
            .tensors
            .iter()
            .map(|t| t.offset)
            .filter(|&o| o > start)
            .min()
            .map_or(all.len(), |o| (file.data_offset + o) as usize);
        all[(file.data_offset + start) as usize..end].to_vec()
    };
    for name in ["blk.0.attn_q.weight", "blk.1.ffn_up.weight"] {
        assert!(
            bytes(&plain, name) != bytes(&weighted, name),
            "{name}: the same bytes"
        );
    }
    // What has no weighted route is written as without it: the f32 norms, and the
    // Q6_K tensors, which fall back to Q8_0 on rows of 64 (the tied embedding) and 96
    // (ffn_down of the layers `use_more_bits` picks).
    for name in [
        "blk.0.attn_norm.weight",
        "token_embd.weight",
        "blk.1.ffn_down.weight",
    ] {
        assert!(
            bytes(&plain, name) == bytes(&weighted, name),
            "{name}: bytes differ"
        );
    }
}

/// Q8_0 and Q5_0 blocks byte for byte as the gguf package's `quantize` (its ports of
/// ggml's `quantize_row_q8_0_ref` / `quantize_row_q5_0_ref`) encodes the same values:
/// mixed blocks, ties of the rounding, zeros, a constant, tiny values
/// (`scripts/golden/make_ggml_quant_golden.py`).
#[test]
fn block_encoders_match_the_gguf_package() {
    use amthal::export::ggml_quant::{encode, ggml_type};
    let golden = golden("ggml_quants.json");
    let values: Vec<f32> = golden["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    for (name, ggml_type) in [("Q8_0", ggml_type::Q8_0), ("Q5_0", ggml_type::Q5_0)] {
        let expected = golden["quants"][name].as_str().unwrap();
        let ours: String = encode(ggml_type, &values)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(ours.len(), expected.len(), "{name}: length");
        let first_difference = ours
            .as_bytes()
            .chunks(2)
            .zip(expected.as_bytes().chunks(2))
            .position(|(a, b)| a != b);
        assert_eq!(first_difference, None, "{name}: first differing byte");
    }
}

// llama.cpp itself reads the exports: tests/llama_cpp/greedy.c, compiled against the
// prebuilt libllama that scripts/setup fetches from npm, loads a file amthal wrote,
// tokenizes a prompt and decodes greedily; its tokens are compared with amthal's.

/// llama.cpp's libraries as scripts/setup leaves them.
fn llama_cpp_libs() -> PathBuf {
    let libs = repo_root().join(".cache/llama-cpp");
    assert!(
        libs.join(".complete").is_file(),
        "{} not found: run scripts/setup, which fetches llama.cpp's prebuilt libraries from \
         the npm registry (x86-64 Linux with glibc >= 2.34; its warning says why it could not)",
        libs.display()
    );
    libs
}

/// Compiles `tests/llama_cpp/{name}.c` into `dir` with the system's C compiler ($CC,
/// else cc), linked against llama.cpp's libraries.
fn build_llama_cpp_program(dir: &Path, name: &str) -> PathBuf {
    let libs = llama_cpp_libs();
    let program = dir.join(name);
    // $CC may carry arguments ("ccache gcc").
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let mut words = compiler.split_whitespace();
    let sources = repo_root().join("tests/llama_cpp");
    let output = std::process::Command::new(words.next().unwrap_or("cc"))
        .args(words)
        .arg("-O1")
        .arg("-o")
        .arg(&program)
        .arg(sources.join(format!("{name}.c")))
        .arg("-I")
        .arg(sources.join("include"))
        .args(["libllama.v0.5.0.so", "libggml.v0.5.0.so", "libggml-base.so"].map(|l| libs.join(l)))
        .arg(format!("-Wl,-rpath,{}", libs.display()))
        .output()
        .unwrap_or_else(|e| panic!("could not run the C compiler {compiler:?}: {e}"));
    assert!(
        output.status.success(),
        "compiling tests/llama_cpp/{name}.c: {}",
        stderr(&output)
    );
    program
}

fn build_llama_cpp_probe(dir: &Path) -> PathBuf {
    build_llama_cpp_program(dir, "greedy")
}

fn write_floats(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// ggml's own bytes for `values` in rows of `row` (tests/llama_cpp/quantize.c),
/// weighted by `importance` (one value per column) when given.
fn ggml_quantize(
    program: &Path,
    ggml_type: u32,
    values: &[f32],
    row: usize,
    importance: Option<&[f32]>,
) -> Vec<u8> {
    let dir = program.parent().unwrap();
    let (input, output) = (dir.join("values.f32"), dir.join("blocks.bin"));
    write_floats(&input, values);
    let importance_file = importance.map(|w| {
        let path = dir.join("importance.f32");
        write_floats(&path, w);
        path
    });
    let run = std::process::Command::new(program)
        .args([ggml_type.to_string(), row.to_string()])
        .arg(&input)
        .arg(&output)
        .args(importance_file)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "ggml_quantize_chunk: {}",
        stderr(&run)
    );
    std::fs::read(output).unwrap()
}

/// The block encoders give ggml's own bytes (`ggml_quantize_chunk`, what llama-quantize
/// calls, from the prebuilt library) for every type the export writes, without and
/// with an importance matrix: on the golden values above and on a real weight
/// (SmolLM2's first down_proj, rows of 1536).
#[test]
fn block_encoders_match_ggml_itself() {
    use amthal::export::ggml_quant::{encode, ggml_type};
    use amthal::export::weighted_quant::encode_with_importance;
    let dir = temp_dir("export-ggml-quantize");
    let program = build_llama_cpp_program(&dir, "quantize");
    let golden_values: Vec<f32> = golden("ggml_quants.json")["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let model = load(ModelSource::Gguf(smollm2()));
    let (_, down) = model
        .named_tensors()
        .into_iter()
        .find(|(name, _)| name == "model.layers.0.mlp.down_proj.weight")
        .expect("SmolLM2's first down_proj");
    let (rows, row) = down.size2().unwrap();
    let weight = Vec::<f32>::try_from(down.to_kind(Kind::Float).reshape([-1])).unwrap();
    for (name, ggml_type) in [
        ("Q8_0", ggml_type::Q8_0),
        ("Q5_0", ggml_type::Q5_0),
        ("Q4_K", ggml_type::Q4_K),
        ("Q6_K", ggml_type::Q6_K),
    ] {
        for (what, values, row) in [
            ("golden values", &golden_values, 256),
            ("down_proj", &weight, row as usize),
        ] {
            // Importances as an imatrix's: positive, spread over three decades.
            let importance: Vec<f32> = (0..row)
                .map(|i| 1e-3 + ((i as f32 * 0.61).sin() * 3.0).exp())
                .collect();
            for weighted in [false, true] {
                let ours = match weighted {
                    false => encode(ggml_type, values),
                    true => encode_with_importance(ggml_type, values, row, &importance),
                };
                let theirs = ggml_quantize(
                    &program,
                    ggml_type,
                    values,
                    row,
                    weighted.then_some(&importance[..]),
                );
                let what = format!("{name} {what}, weighted: {weighted}");
                assert_eq!(ours.len(), theirs.len(), "{what}: length");
                let first_difference = ours.iter().zip(&theirs).position(|(a, b)| a != b);
                assert_eq!(first_difference, None, "{what}: first differing byte");
            }
        }
    }
    eprintln!(
        "ggml's bytes for 4 types, with and without importances, on 512 golden values and a \
         {rows} x {row} weight"
    );
}

/// The prompt llama.cpp is given: the text itself, or a user message (after a system
/// message, if any) that llama.cpp renders through the file's chat template.
enum LlamaCppPrompt<'a> {
    Raw(&'a str),
    Chat {
        system: Option<&'a str>,
        user: &'a str,
    },
}

/// What llama.cpp made of a prompt: its rendering (chat), its token ids, the logits
/// after it, then `new_tokens` greedy ids.
struct LlamaCppRun {
    rendered: Option<String>,
    prompt: Vec<u32>,
    logits: Tensor,
    greedy: Vec<u32>,
}

fn llama_cpp_greedy(
    probe: &Path,
    file: &Path,
    prompt: LlamaCppPrompt,
    new_tokens: usize,
) -> LlamaCppRun {
    llama_cpp_greedy_with(probe, file, None, prompt, new_tokens)
}

/// `llama_cpp_greedy` with a GGUF LoRA adapter applied (`lora`), as `--lora` applies it.
fn llama_cpp_greedy_with(
    probe: &Path,
    file: &Path,
    lora: Option<&Path>,
    prompt: LlamaCppPrompt,
    new_tokens: usize,
) -> LlamaCppRun {
    let logits_file = file.with_extension("logits");
    let (mode, text, system) = match prompt {
        LlamaCppPrompt::Raw(text) => ("raw", text, None),
        LlamaCppPrompt::Chat { system, user } => ("chat", user, system),
    };
    let mut command = std::process::Command::new(probe);
    if let Some(lora) = lora {
        command.env("LORA_FILE", lora);
    }
    let output = command
        .arg(file)
        .arg(llama_cpp_libs())
        .args([mode, text, &new_tokens.to_string()])
        .arg(&logits_file)
        .args(system)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "llama.cpp on {}: {}",
        file.display(),
        stderr(&output)
    );
    let stdout = stdout(&output);
    let line = |label: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .map(str::trim)
    };
    let ids = |label: &str| -> Vec<u32> {
        line(label)
            .unwrap_or_else(|| panic!("no {label:?} line in {stdout:?}"))
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect()
    };
    let rendered = line("rendered").map(|hex| {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        String::from_utf8(bytes).unwrap()
    });
    let values: Vec<f32> = std::fs::read(&logits_file)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes(b.try_into().unwrap()))
        .collect();
    LlamaCppRun {
        rendered,
        prompt: ids("prompt"),
        logits: Tensor::from_slice(&values),
        greedy: ids("greedy"),
    }
}

/// amthal's greedy continuation of `prompt` (no stop token: as many as asked).
fn amthal_greedy(model: &Llama, prompt: &[u32], new_tokens: usize) -> Vec<u32> {
    let config = SamplingConfig {
        max_new_tokens: new_tokens,
        ..SamplingConfig::default()
    };
    let request = GenerationRequest {
        prompt_ids: prompt.to_vec(),
        row_number: 0,
    };
    generate_batch(model, &[request], &[], &config).unwrap()[0]
        .tokens
        .clone()
}

/// amthal's logits after `prompt` (the last position).
fn last_logits(model: &Llama, prompt: &[u32]) -> Tensor {
    let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    logits(model, &ids).get(0).get(-1)
}

/// For each of llama.cpp's greedy tokens, how far its logit in `model` (fed llama.cpp's
/// own sequence) falls below that step's best: 0 where both pick the same token.
fn shortfalls(model: &Llama, run: &LlamaCppRun) -> Vec<f64> {
    let sequence: Vec<i64> = run
        .prompt
        .iter()
        .chain(&run.greedy)
        .map(|&t| i64::from(t))
        .collect();
    let all = logits(model, &sequence).get(0);
    (0..run.greedy.len())
        .map(|step| {
            let row = all.get((run.prompt.len() + step - 1) as i64);
            row.max().double_value(&[]) - row.double_value(&[i64::from(run.greedy[step])])
        })
        .collect()
}

fn largest(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

/// amthal's chat prompt for a proverb (the prompt `train` and `evaluate` use) and its
/// ids, tokenized as amthal tokenizes chat prompts (the template writes any BOS).
fn amthal_chat_prompt(tokenizer: &ModelTokenizer, proverb: &str) -> (String, Vec<u32>) {
    let builder = PromptBuilder::new(PromptFormat::Chat, tokenizer).unwrap();
    let text = builder.prompt(proverb).unwrap();
    let ids = tokenizer
        .encode(&text, builder.prompt_adds_special_tokens())
        .unwrap();
    (text, ids)
}

const PROVERB: &str = "الصبر مفتاح الفرج";

/// llama.cpp, given amthal's user message and the system message the Modelfile sets
/// (SmolLM2's template writes its own when there is none, and llama.cpp's built-in
/// ChatML does not), renders the export's chat template into amthal's prompt,
/// tokenizes it as amthal does and decodes as amthal does.
#[test]
fn llama_cpp_decodes_the_default_models_export_as_amthal() {
    let dir = temp_dir("export-llama-cpp-smollm2");
    let probe = build_llama_cpp_probe(&dir);
    let source = load(ModelSource::Gguf(smollm2()));
    let tokenizer = ModelSource::Gguf(smollm2()).tokenizer().unwrap();
    let (text, prompt) = amthal_chat_prompt(&tokenizer, PROVERB);
    let user = instruction_for(PROVERB);
    let system = default_system_message(&tokenizer).expect("SmolLM2's default system message");
    assert!(system.contains("SmolLM"), "{system}");
    let chat = || LlamaCppPrompt::Chat {
        system: Some(&system),
        user: &user,
    };

    let f16 = dir.join("smollm2-f16.gguf");
    export(&smollm2(), &f16, "f16", &[]);
    let modelfile = std::fs::read_to_string(dir.join("Modelfile")).unwrap();
    assert!(
        modelfile.contains(&format!("SYSTEM \"\"\"{system}\"\"\"")),
        "{modelfile}"
    );
    let run = llama_cpp_greedy(&probe, &f16, chat(), 16);
    assert_eq!(
        run.rendered.as_deref(),
        Some(text.as_str()),
        "f16: chat template"
    );
    assert_eq!(run.prompt, prompt, "f16: llama.cpp tokenizes as the source");
    // llama.cpp rounds activations to f16 for an f16 matmul: 3.3e-2 measured (logits
    // up to ~33; 4.3e-2 for a shorter prompt).
    let diff = max_diff(&run.logits, &last_logits(&source, &prompt));
    eprintln!("f16: llama.cpp's logits within {diff:.2e} of amthal's on the source");
    assert!(diff <= 0.1, "f16: llama.cpp's logits differ by {diff:e}");
    assert_eq!(
        run.greedy,
        amthal_greedy(&source, &prompt, 16),
        "f16: greedy tokens; llama.cpp's below amthal's best by {:?}",
        shortfalls(&source, &run)
    );

    // q4_k_m: the same weights on both sides (amthal reads the file back), but llama.cpp
    // multiplies quantized blocks with activations rounded to 8 bits (Q8_K / Q8_0), so
    // its logits move by up to ~1 (measured: 0.71; 0.92 for a shorter prompt, where
    // a q8_0 export, whose weights lose far less, moved by 0.68; a wrong block decode
    // or q/k permutation moves them by several units) and near-ties may flip. Each
    // token llama.cpp picks must be one amthal ranks within 1 logit of its best, fed
    // llama.cpp's own sequence (measured: all 16 its best here; 0.35 at most for the
    // shorter prompt).
    let q4 = dir.join("smollm2-q4_k_m.gguf");
    export(&smollm2(), &q4, "q4_k_m", &[]);
    let run = llama_cpp_greedy(&probe, &q4, chat(), 16);
    assert_eq!(
        run.prompt, prompt,
        "q4_k_m: llama.cpp tokenizes as the source"
    );
    let same_file = load(ModelSource::Gguf(q4.clone()));
    let diff = max_diff(&run.logits, &last_logits(&same_file, &prompt));
    let gaps = shortfalls(&same_file, &run);
    eprintln!("q4_k_m: logits within {diff:.2e} of amthal's on the file; shortfalls {gaps:.3?}");
    assert!(diff <= 2.0, "q4_k_m: llama.cpp's logits differ by {diff:e}");
    assert!(
        largest(&gaps) <= 1.0,
        "q4_k_m: llama.cpp picked a token amthal ranks {:.3} below its best",
        largest(&gaps)
    );
}

/// The tiny fixture keeps its llama3 rope scaling, which the export stores as a
/// `rope_freqs` tensor: llama.cpp applies it (amthal's reader, like transformers', does
/// not, so the round trip above cannot check it), and its vocabulary becomes a `llama`
/// sentencepiece one built from tokenizer.json; its chat template is Llama-2's
/// `[INST]` one, as ALLaM's.
#[test]
fn llama_cpp_reads_a_llama_vocabulary_and_llama3_rope() {
    let dir = temp_dir("export-llama-cpp-tiny");
    let probe = build_llama_cpp_probe(&dir);
    let folder = fixture("tiny-llama");
    let source = load(ModelSource::HfFolder(folder.clone()));
    let tokenizer = ModelSource::HfFolder(folder.clone()).tokenizer().unwrap();
    let prompt = tokenizer.encode(TEXT, true).unwrap();
    let file = dir.join("tiny-f16.gguf");
    export(&folder, &file, "f16", &[]);
    let run = llama_cpp_greedy(&probe, &file, LlamaCppPrompt::Raw(TEXT), 16);
    assert_eq!(run.prompt, prompt, "llama.cpp tokenizes as tokenizer.json");
    // Measured (logits up to 1.0): 3.0e-4; 2.9e-3 when the export leaves out
    // rope_freqs, 3.1e-3 when it leaves k's rows unpermuted (the attention of a random
    // tiny model is nearly uniform, so rotary errors move its logits little).
    let diff = max_diff(&run.logits, &last_logits(&source, &prompt));
    eprintln!("tiny f16: llama.cpp's logits within {diff:.2e} of amthal's on the source");
    assert!(diff <= 1e-3, "llama.cpp's logits differ by {diff:e}");
    assert_eq!(run.greedy, amthal_greedy(&source, &prompt, 16));

    // The [INST] template has no system message of its own (the Modelfile sets none).
    // llama.cpp renders it without the leading `<s>` and adds BOS when tokenizing, and
    // its sentencepiece tokenizer then puts "▁" before "[INST]" (as Meta's reference
    // code, which encodes "[INST] ..." with bos=True, does), where transformers and
    // amthal, tokenizing "<s>[INST] ...", put none: one token more, inherent to
    // llama.cpp's rendering (llama.cpp's own convert_hf_to_gguf.py sets the same
    // add_space_prefix), not to the file.
    assert_eq!(default_system_message(&tokenizer), None);
    let (text, prompt) = amthal_chat_prompt(&tokenizer, PROVERB);
    let user = instruction_for(PROVERB);
    let chat = LlamaCppPrompt::Chat {
        system: None,
        user: &user,
    };
    let run = llama_cpp_greedy(&probe, &file, chat, 16);
    let rendered = run.rendered.clone().unwrap();
    assert_eq!(Some(rendered.as_str()), text.strip_prefix("<s>"));
    let ids = tokenizer.encode(&rendered, true).unwrap();
    assert_eq!(
        run.prompt, ids,
        "llama.cpp tokenizes its rendering as amthal"
    );
    assert_eq!(run.prompt.len(), prompt.len() + 1);
    assert_eq!(run.greedy, amthal_greedy(&source, &ids, 16));
}

/// `--format gguf-lora`: an adapter alone, which llama.cpp applies to the base's export
/// (`llama_adapter_lora_init`, as `--lora`) and gives amthal's logits and greedy tokens
/// with the adapter: a plain PEFT adapter on all seven projections (q and k with B's
/// rows permuted), and one with rsLoRA and per-module ranks and alphas (their scalings
/// folded into B against the file's one alpha). The Modelfile puts base and adapter
/// together; DoRA and quantized adapter types are refused.
#[test]
fn llama_cpp_applies_an_exported_lora_adapter_as_amthal() {
    let dir = temp_dir("export-lora-gguf");
    let probe = build_llama_cpp_probe(&dir);
    let folder = fixture("tiny-llama");
    let base_file = dir.join("base.gguf");
    export(&folder, &base_file, "f32", &[]);
    let base = load(ModelSource::HfFolder(folder.clone()));
    let tokenizer = ModelSource::HfFolder(folder.clone()).tokenizer().unwrap();
    let prompt = tokenizer.encode(TEXT, true).unwrap();
    let plain = llama_cpp_greedy(&probe, &base_file, LlamaCppPrompt::Raw(TEXT), 8);
    let base_diff = max_diff(&plain.logits, &last_logits(&base, &prompt));
    eprintln!("f32 base: llama.cpp within {base_diff:.2e} of amthal");
    // Measured: 1.9e-4 for the base, 3.9e-4 and 9.2e-4 with the two adapters (whose
    // logits move by 0.6 and 0.9); 2e-1 when q's B rows are left unpermuted.
    for name in ["tiny-llama-adapter", "tiny-llama-patterns"] {
        let adapter = fixture(name);
        let file = dir.join(format!("{name}.gguf"));
        export(
            &folder,
            &file,
            "f32",
            &[
                "--format",
                "gguf-lora",
                "--adapter",
                adapter.to_str().unwrap(),
            ],
        );
        let modelfile = std::fs::read_to_string(dir.join("Modelfile")).unwrap();
        assert!(
            modelfile.contains("FROM ./base.gguf\n")
                && modelfile.contains(&format!("ADAPTER ./{name}.gguf\n")),
            "{modelfile}"
        );
        let mut adapted = load(ModelSource::HfFolder(folder.clone()));
        amthal::model::lora::load_adapter(&mut adapted, &adapter).unwrap();
        let run = llama_cpp_greedy_with(
            &probe,
            &base_file,
            Some(&file),
            LlamaCppPrompt::Raw(TEXT),
            8,
        );
        assert_eq!(run.prompt, prompt);
        let expected = last_logits(&adapted, &prompt);
        let diff = max_diff(&run.logits, &expected);
        let moved = max_diff(&plain.logits, &expected);
        eprintln!(
            "{name}: llama.cpp with the adapter within {diff:.2e} of amthal's (the adapter moves them {moved:.2e})"
        );
        assert!(
            diff <= 1e-3,
            "{name}: llama.cpp's logits differ by {diff:e}"
        );
        assert!(
            moved > 20.0 * diff.max(1e-5),
            "{name}: the adapter moved the logits by {moved:e}"
        );
        assert_eq!(run.greedy, amthal_greedy(&adapted, &prompt, 8), "{name}");
    }
    for (adapter, quant, expected) in [
        ("tiny-llama-dora", "f16", "DoRA"),
        ("tiny-llama-adapter", "q4_k_m", "f32, f16 or bf16"),
        ("tiny-llama-saved-both", "f16", "modules_to_save"),
    ] {
        let out = dir.join("refused.gguf");
        let output = amthal(&[
            "export",
            "--model",
            folder.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--format",
            "gguf-lora",
            "--quant",
            quant,
            "--adapter",
            fixture(adapter).to_str().unwrap(),
        ]);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(stderr(&output).contains(expected), "{}", stderr(&output));
        assert!(!out.exists());
    }
}
