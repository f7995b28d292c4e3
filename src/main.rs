//! The `amthal` binary: parse the command line, run, map errors to exit codes
//! (2 = bad input the user can fix, 1 = anything else).

use clap::Parser;

fn main() {
    amthal::device::pin_mkl_code_path();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AMTHAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    let cli = amthal::cli::Cli::parse();
    // Before anything can ask libtorch about CUDA (see amthal::cuda): loads
    // libtorch_cuda.so when an NVIDIA driver is present, costs a stat() otherwise.
    amthal::cuda::init();
    amthal::device::init_threads();
    if let Err(error) = amthal::commands::run(cli) {
        eprintln!("error: {error:#}");
        std::process::exit(amthal::error::exit_code(&error));
    }
}
