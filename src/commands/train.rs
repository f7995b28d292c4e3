//! `amthal train`: resolve the configuration (defaults < --config TOML < flags), run
//! the training, print the summary and the previews.

use anyhow::Result;

use crate::cli::TrainArgs;
use crate::device::Precision;
use crate::distributed::launch::Launch;
use crate::train::config::TrainConfig;
use crate::train::train;

/// Defaults, then the TOML file, then every flag the user gave.
pub fn resolve_config(args: &TrainArgs) -> Result<TrainConfig> {
    let mut c = match &args.config {
        Some(path) => TrainConfig::from_toml(path)?,
        None => TrainConfig::default(),
    };
    macro_rules! take {
        ($($field:ident),*) => { $( if let Some(v) = &args.$field { c.$field = v.clone(); } )* };
    }
    take!(
        data_dir,
        output_dir,
        lora_r,
        lora_alpha,
        lora_dropout,
        lora_targets,
        lr,
        epochs,
        batch_size,
        grad_accum,
        cutoff_len,
        precision,
        device,
        seed,
        warmup_ratio,
        lr_scheduler,
        lr_scheduler_kwargs,
        weight_decay,
        adam_beta1,
        adam_beta2,
        adam_epsilon,
        max_grad_norm,
        label_smoothing_factor,
        eval_strategy,
        eval_steps,
        load_best_model_at_end,
        metric_for_best_model,
        logging_steps,
        report_to,
        save_strategy,
        save_steps,
        prompt_format,
        previews,
        data_order,
        encoding,
        loss_scale_init,
        optim
    );
    if args.model.is_some() {
        c.model = args.model.clone();
    }
    if args.save_total_limit.is_some() {
        c.save_total_limit = args.save_total_limit;
    }
    if args.eval_batch_size.is_some() {
        c.eval_batch_size = args.eval_batch_size;
    }
    if args.max_steps.is_some() {
        c.max_steps = args.max_steps;
    }
    // A warmup flag replaces the --config file's warmup, whichever spelling it used.
    match (args.warmup_steps, args.warmup_ratio) {
        (Some(steps), None) => {
            c.warmup_steps = Some(steps);
            c.warmup_ratio = 0.0;
        }
        (None, Some(_)) => c.warmup_steps = None,
        (Some(steps), Some(_)) => c.warmup_steps = Some(steps),
        (None, None) => {}
    }
    if args.neftune_noise_alpha.is_some() {
        c.neftune_noise_alpha = args.neftune_noise_alpha;
    }
    if args.early_stopping_patience.is_some() {
        c.early_stopping_patience = args.early_stopping_patience;
    }
    if args.adapter_dir.is_some() {
        c.adapter_dir = args.adapter_dir.clone();
    }
    // An adapter to continue is a LoRA run (from the flag or the --config file).
    c.lora |= args.lora || c.adapter_dir.is_some();
    c.train_on_inputs |= args.train_on_inputs;
    c.eval_on_start |= args.eval_on_start;
    c.logging_first_step |= args.logging_first_step;
    if args.data_seed.is_some() {
        c.data_seed = args.data_seed;
    }
    if let Some(init) = args.init_lora_weights {
        c.init_lora_weights = init;
    }
    c.rslora |= args.rslora;
    c.use_dora |= args.use_dora;
    c.gradient_checkpointing |= args.gradient_checkpointing;
    c.skip_invalid_rows |= args.skip_invalid_rows;
    c.save_only_model |= args.save_only_model;
    c.async_checkpoint |= args.async_checkpoint;
    c.optim_in_backward |= args.optim_in_backward;
    c.offload_optimizer |= args.offload_optimizer;
    c.packing |= args.packing;
    if args.no_packing {
        c.packing = false;
    }
    c.cuda_graphs |= args.cuda_graphs;
    if args.no_packing && c.cuda_graphs {
        // The flag form is refused by clap; this is `cuda_graphs = true` from --config.
        crate::bail_input!(
            "--no-packing: --cuda-graphs (set in the --config file) lays packed rows out at \
             fixed widths; leave out one of them"
        );
    }
    c.packing |= c.cuda_graphs;
    if let Some(kind) = args.quantize.quant_kind() {
        c.quantize = Some(kind);
    }
    c.double_quant |= args.quantize.double_quant;
    if let Some(zero) = args.launch.zero {
        c.zero = zero;
    }
    if let Some(backend) = args.launch.dist_backend {
        c.dist_backend = backend;
    }
    if args.fp16 {
        c.precision = Precision::F16;
    }
    if args.bf16 {
        c.precision = Precision::Bf16;
    }
    if let Some(dir) = c.adapter_dir.clone() {
        c.adopt_adapter_settings(&dir)?;
    }
    Ok(c)
}

pub fn run(args: &TrainArgs) -> Result<()> {
    if let Some(nproc_per_node) = args.launch.nproc_per_node {
        let config = resolve_config(args)?;
        config.validate()?;
        config.validate_distributed()?;
        // The workers would each refuse a backend their device cannot use: say it once.
        config
            .dist_backend
            .resolve(crate::device::parse_device(&config.device)?)?;
        let launch = Launch {
            nproc_per_node,
            nnodes: args.launch.nnodes,
            node_rank: args.launch.node_rank,
            master_addr: args.launch.master_addr.clone(),
            master_port: args.launch.master_port,
        };
        return crate::distributed::launch::launch(&launch, &worker_args());
    }
    let config = resolve_config(args)?;
    let summary = train(&config, args.resume.as_deref())?;
    // In a data-parallel run only rank 0 reports (the others wrote nothing).
    if crate::distributed::WorkerPlace::from_env()?.is_some_and(|place| place.rank != 0) {
        return Ok(());
    }
    println!(
        "\ntraining done: {} optimizer steps in {:.1}s, {:.0} tokens/s, memory: {}",
        summary.steps,
        summary.seconds,
        summary.tokens_per_second,
        crate::memory::MemoryReport {
            peak_rss_bytes: summary.peak_rss_bytes,
            gpu: summary.gpu_memory,
        }
        .short()
    );
    match (summary.best_eval_loss, summary.best_step) {
        (Some(loss), Some(step)) => println!(
            "best eval loss {loss:.6} at step {step} (saved in {})",
            summary.output_dir.display()
        ),
        _ => println!(
            "no evaluation; the final model is in {}",
            summary.output_dir.display()
        ),
    }
    println!(
        "log: {}/log.jsonl, curves: {}/loss.svg and loss.png",
        summary.output_dir.display(),
        summary.output_dir.display()
    );
    for (proverb, explanation) in &summary.previews {
        println!("\nProverb: {proverb}\nModel: {explanation}");
    }
    Ok(())
}

/// This command line without the launcher's flags: what each worker runs.
fn worker_args() -> Vec<String> {
    strip_launch_flags(std::env::args().skip(1))
}

fn strip_launch_flags(args: impl Iterator<Item = String>) -> Vec<String> {
    // --dist-backend stays: it is the workers' setting (a worker started by torchrun
    // reads it too).
    const WITH_VALUE: [&str; 9] = [
        "--nproc-per-node",
        "--nproc_per_node",
        "--nnodes",
        "--node-rank",
        "--node_rank",
        "--master-addr",
        "--master_addr",
        "--master-port",
        "--master_port",
    ];
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        let name = arg.split('=').next().unwrap_or("");
        if WITH_VALUE.contains(&name) {
            skip_value = !arg.contains('=');
            continue;
        }
        out.push(arg);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The configuration `amthal ARGS...` resolves to.
    fn config_of(args: &[&str]) -> TrainConfig {
        let cli =
            crate::cli::Cli::try_parse_from(std::iter::once("amthal").chain(args.iter().copied()))
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.command {
            crate::cli::Command::Train(args) => resolve_config(&args).unwrap(),
            _ => panic!("not a train command"),
        }
    }

    #[test]
    fn hf_trainer_and_peft_spellings_set_the_same_settings() {
        let amthal = config_of(&[
            "train",
            "--lr",
            "3e-4",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            "--cutoff-len",
            "512",
            "--lr-scheduler",
            "cosine",
            "--lora-targets",
            "q_proj,v_proj",
            "--rslora",
            "--warmup-steps",
            "0.1",
            "--save-strategy",
            "steps",
            "--save-steps",
            "100",
            "--adam-beta1",
            "0.8",
            "--adam-beta2",
            "0.95",
            "--adam-epsilon",
            "1e-6",
            "--label-smoothing-factor",
            "0.1",
            "--eval-batch-size",
            "16",
            "--load-best-model-at-end",
            "false",
            "--metric-for-best-model",
            "loss",
        ]);
        let hf = config_of(&[
            "train",
            "--learning_rate",
            "3e-4",
            "--num_train_epochs",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "2",
            "--max_length",
            "512",
            "--lr_scheduler_type",
            "cosine",
            "--target_modules",
            "q_proj,v_proj",
            "--use_rslora",
            "--warmup_steps",
            "0.1",
            "--save_strategy",
            "steps",
            "--save_steps",
            "100",
            "--adam_beta1",
            "0.8",
            "--adam_beta2",
            "0.95",
            "--adam_epsilon",
            "1e-6",
            "--label_smoothing_factor",
            "0.1",
            "--per_device_eval_batch_size",
            "16",
            "--load_best_model_at_end",
            "false",
            "--metric_for_best_model",
            "loss",
        ]);
        let dashed = config_of(&[
            "train",
            "--learning-rate",
            "3e-4",
            "--num-train-epochs",
            "2",
            "--per-device-train-batch-size",
            "4",
            "--gradient-accumulation-steps",
            "2",
            "--max-seq-length",
            "512",
            "--lr-scheduler-type",
            "cosine",
            "--target-modules",
            "q_proj,v_proj",
            "--use-rslora",
            "--warmup-steps",
            "0.1",
            "--save-strategy",
            "steps",
            "--save-steps",
            "100",
            "--adam-beta1",
            "0.8",
            "--adam-beta2",
            "0.95",
            "--adam-epsilon",
            "1e-6",
            "--label-smoothing-factor",
            "0.1",
            "--per-device-eval-batch-size",
            "16",
            "--load-best-model-at-end",
            "false",
            "--metric-for-best-model",
            "loss",
        ]);
        assert_eq!(amthal, hf);
        assert_eq!(amthal, dashed);
        // And they differ from the defaults, so the comparison saw every flag.
        let defaults = TrainConfig::default();
        assert_ne!(amthal.lr, defaults.lr);
        assert_ne!(amthal.epochs, defaults.epochs);
        assert_ne!(amthal.batch_size, defaults.batch_size);
        assert_ne!(amthal.grad_accum, defaults.grad_accum);
        assert_ne!(amthal.cutoff_len, defaults.cutoff_len);
        assert_ne!(amthal.lr_scheduler, defaults.lr_scheduler);
        assert_ne!(amthal.lora_targets, defaults.lora_targets);
        assert!(amthal.rslora && !defaults.rslora);
        assert_eq!(amthal.warmup_steps, Some(0.1));
        assert_ne!(amthal.save_strategy, defaults.save_strategy);
        assert_ne!(amthal.save_steps, defaults.save_steps);
        assert_ne!(
            (amthal.adam_beta1, amthal.adam_beta2, amthal.adam_epsilon),
            (
                defaults.adam_beta1,
                defaults.adam_beta2,
                defaults.adam_epsilon
            )
        );
        assert_eq!(amthal.label_smoothing_factor, 0.1);
        assert_eq!(defaults.label_smoothing_factor, 0.0);
        assert_eq!(amthal.eval_rows(), 16);
        assert!(!amthal.load_best_model_at_end && defaults.load_best_model_at_end);
        amthal.validate().unwrap();
        // HF's bare boolean flag means true.
        let bare = config_of(&["train", "--load_best_model_at_end"]);
        assert!(bare.load_best_model_at_end);
        let other_metric = config_of(&["train", "--metric-for-best-model", "bleu"]);
        let error = other_metric.validate().unwrap_err().to_string();
        assert!(error.contains("eval_loss"), "{error}");
    }

    #[test]
    fn resume_from_checkpoint_is_resume() {
        let resume_of = |args: &[&str]| {
            let cli = crate::cli::Cli::try_parse_from(
                std::iter::once("amthal").chain(args.iter().copied()),
            )
            .unwrap();
            match cli.command {
                crate::cli::Command::Train(args) => args.resume,
                _ => panic!("not a train command"),
            }
        };
        assert_eq!(
            resume_of(&["train", "--resume_from_checkpoint", "checkpoint-4"]),
            Some("checkpoint-4".into())
        );
        assert_eq!(
            resume_of(&["train", "--resume-from-checkpoint"]),
            Some("latest".into())
        );
        assert_eq!(resume_of(&["train"]), None);
    }

    #[test]
    fn scheduler_kwargs_that_are_not_a_json_object_are_refused() {
        let error = crate::cli::Cli::try_parse_from([
            "amthal",
            "train",
            "--lr-scheduler-kwargs",
            "min_lr_rate=0.1",
        ])
        .expect_err("refused")
        .to_string();
        assert!(error.contains("not a JSON object"), "{error}");
    }

    #[test]
    fn a_config_file_takes_hf_names_too() {
        let dir = std::env::temp_dir().join(format!("amthal-hf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hf.toml");
        std::fs::write(
            &path,
            "learning_rate = 3e-4\nnum_train_epochs = 2.0\nper_device_train_batch_size = 4\n\
             gradient_accumulation_steps = 2\nmax_seq_length = 512\n\
             lr_scheduler_type = \"cosine_with_min_lr\"\ntarget_modules = [\"q_proj\"]\n\
             use_rslora = true\nwarmup_steps = 10.0\n[lr_scheduler_kwargs]\nmin_lr_rate = 0.1\n",
        )
        .unwrap();
        let from_file = config_of(&["train", "--config", path.to_str().unwrap()]);
        let from_flags = config_of(&[
            "train",
            "--lr",
            "3e-4",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            "--cutoff-len",
            "512",
            "--lr-scheduler",
            "cosine_with_min_lr",
            "--lr-scheduler-kwargs",
            r#"{"min_lr_rate": 0.1}"#,
            "--lora-targets",
            "q_proj",
            "--rslora",
            "--warmup-steps",
            "10",
        ]);
        assert_eq!(from_file, from_flags);
        assert_eq!(from_file.lr_scheduler_kwargs.min_lr_rate, Some(0.1));
        from_file.validate().unwrap();
        // The saved form (training_config.toml) reads back as itself.
        let saved = dir.join("saved.toml");
        std::fs::write(&saved, from_file.to_toml()).unwrap();
        assert_eq!(TrainConfig::from_toml(&saved).unwrap(), from_file);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn other_spellings_of_the_cutoff_and_batch_size_and_a_flag_over_the_file() {
        for spelling in [
            "--max-length",
            "--max_length",
            "--max_seq_length",
            "--max-seq-length",
        ] {
            assert_eq!(
                config_of(&["train", spelling, "300"]).cutoff_len,
                300,
                "{spelling}"
            );
        }
        let dir = std::env::temp_dir().join(format!("amthal-hf-config2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("seed.toml");
        std::fs::write(&path, "bsz = 3\nmax_length = 256\nwarmup_ratio = 0.1\n").unwrap();
        let path = path.to_str().unwrap();
        let from_file = config_of(&["train", "--config", path]);
        assert_eq!((from_file.batch_size, from_file.cutoff_len), (3, 256));
        assert_eq!(
            (from_file.warmup_ratio, from_file.warmup_steps),
            (0.1, None)
        );
        // --warmup-steps replaces the file's warmup_ratio (flags override the file).
        let flag = config_of(&["train", "--config", path, "--warmup-steps", "4"]);
        assert_eq!((flag.warmup_ratio, flag.warmup_steps), (0.0, Some(4.0)));
        assert!(flag.validate().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn neftune_is_refused_with_cuda_graphs_and_must_be_positive() {
        let graphs = config_of(&[
            "train",
            "--lora",
            "--cuda-graphs",
            "--neftune-noise-alpha",
            "5",
        ]);
        let message = graphs.validate().unwrap_err().to_string();
        assert!(
            message.contains("--neftune-noise-alpha with --cuda-graphs"),
            "{message}"
        );
        let zero = config_of(&["train", "--neftune_noise_alpha", "0"]);
        assert!(
            zero.validate()
                .unwrap_err()
                .to_string()
                .contains("positive")
        );
        let ok = config_of(&["train", "--lora", "--neftune-noise-alpha", "5"]);
        assert_eq!(ok.neftune_noise_alpha, Some(5.0));
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn label_smoothing_outside_zero_to_one_is_refused() {
        for bad in ["1", "1.5", "-0.1", "NaN"] {
            let config = config_of(&["train", &format!("--label-smoothing-factor={bad}")]);
            let message = config.validate().unwrap_err().to_string();
            assert!(
                message.contains("--label-smoothing-factor must be in [0, 1)"),
                "{bad}: {message}"
            );
        }
        let ok = config_of(&["train", "--label-smoothing-factor", "0.999"]);
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn warmup_given_twice_or_negative_is_refused() {
        let both = config_of(&["train", "--warmup-ratio", "0.1", "--warmup-steps", "5"]);
        let message = both.validate().unwrap_err().to_string();
        assert!(
            message.contains("--warmup-steps 5") && message.contains("--warmup-ratio 0.1"),
            "{message}"
        );
        let negative = config_of(&["train", "--warmup-steps=-1"]);
        assert!(
            negative
                .validate()
                .unwrap_err()
                .to_string()
                .contains("--warmup-steps must be")
        );
        assert!(
            config_of(&["train", "--warmup-steps", "5"])
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn workers_get_the_command_without_the_launcher_flags() {
        let args = [
            "train",
            "--lora",
            "--nproc-per-node",
            "2",
            "--master_port=29400",
            "--lr",
            "1e-3",
            "--nnodes",
            "1",
            "--dist-backend",
            "gloo",
        ];
        assert_eq!(
            strip_launch_flags(args.iter().map(|s| s.to_string())),
            vec!["train", "--lora", "--lr", "1e-3", "--dist-backend", "gloo"]
        );
    }
}
