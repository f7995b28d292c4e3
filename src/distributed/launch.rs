//! `amthal train --nproc-per-node N`: starts N workers (this binary, the same
//! arguments) with torchrun's variables set, and supervises them. A worker that exits
//! with an error stops the others; the launcher then names it and exits non-zero. The
//! checkpoints stay usable: only rank 0 writes them, each through a temp folder and a
//! rename.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::bail_input;

/// Where the launched workers meet.
#[derive(Debug, Clone)]
pub struct Launch {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// None: a free port (single node only).
    pub master_port: Option<u16>,
}

/// Runs `args` (the worker's command line, without the launcher flags) in
/// `nproc_per_node` workers and waits for them all.
pub fn launch(launch: &Launch, args: &[String]) -> Result<()> {
    if launch.nproc_per_node == 0 || launch.nnodes == 0 || launch.node_rank >= launch.nnodes {
        bail_input!(
            "--nproc-per-node and --nnodes must be at least 1, and --node-rank below --nnodes"
        );
    }
    let port = match launch.master_port {
        Some(port) => port,
        None if launch.nnodes == 1 => super::free_port()?,
        None => bail_input!("--nnodes > 1 needs --master-port (and --master-addr)"),
    };
    let world = launch.nproc_per_node * launch.nnodes;
    let program = std::env::current_exe().context("finding the amthal binary")?;
    // CPU workers share the node's cores (torchrun sets 1 thread; an even share trains
    // faster on the CPU), unless the user chose.
    let threads = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / launch.nproc_per_node).max(1).to_string()
    });
    let mut workers: Vec<(usize, Child)> = Vec::new();
    for local in 0..launch.nproc_per_node {
        let rank = launch.node_rank * launch.nproc_per_node + local;
        let child = Command::new(&program)
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", launch.nproc_per_node.to_string())
            .env("MASTER_ADDR", &launch.master_addr)
            .env("MASTER_PORT", port.to_string())
            .env("OMP_NUM_THREADS", &threads)
            .spawn()
            .with_context(|| format!("starting worker {rank}"))?;
        workers.push((rank, child));
    }
    eprintln!(
        "launched {} worker(s) of {world} (ranks {}..{}), rendezvous at {}:{port}",
        launch.nproc_per_node,
        launch.node_rank * launch.nproc_per_node,
        (launch.node_rank + 1) * launch.nproc_per_node - 1,
        launch.master_addr
    );
    supervise(workers)
}

/// Waits for every worker; the first to fail stops the rest. When several fail at
/// once (a worker dies, and its peers' collectives fail because of it), the one killed
/// by a signal is named, else the lowest rank.
fn supervise(mut workers: Vec<(usize, Child)>) -> Result<()> {
    let mut failure: Option<(bool, usize, String)> = None;
    while !workers.is_empty() {
        let mut index = 0;
        while index < workers.len() {
            let (rank, child) = &mut workers[index];
            match child.try_wait()? {
                None => index += 1,
                Some(status) => {
                    if !status.success() {
                        let (signal, message) = match status.code() {
                            Some(code) => {
                                (false, format!("worker rank {rank} exited with code {code}"))
                            }
                            None => (true, format!("worker rank {rank} was killed by a signal")),
                        };
                        let better = match &failure {
                            None => true,
                            Some((seen_signal, seen_rank, _)) => {
                                (signal && !seen_signal)
                                    || (signal == *seen_signal && *rank < *seen_rank)
                            }
                        };
                        if better {
                            failure = Some((signal, *rank, message));
                        }
                    }
                    workers.remove(index);
                }
            }
        }
        if failure.is_some() {
            for (_, child) in workers.iter_mut() {
                let _ = child.kill();
            }
            for (_, child) in workers.iter_mut() {
                let _ = child.wait();
            }
            workers.clear();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failure {
        Some((_, _, message)) => anyhow::bail!(
            "{message}; the other workers were stopped (the last checkpoint in --output-dir can be resumed)"
        ),
        None => Ok(()),
    }
}
