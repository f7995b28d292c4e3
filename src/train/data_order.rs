//! Which examples go into which micro-batch, epoch by epoch: shuffled from the seed
//! and the epoch number (so a resumed run sees the same order), and grouped by length
//! like HF's group_by_length (mega-batches of 50 batches, each sorted longest first)
//! so little compute goes to padding while epochs stay shuffled. `file` keeps the
//! file's order (benchmarks against scripts that do not shuffle).

use rand_chacha::ChaCha8Rng;

use super::config::DataOrder;
use rand_chacha::rand_core::{Rng, SeedableRng};

/// The micro-batches of one epoch, as indices into the training set.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
    order_kind: DataOrder,
) -> Vec<Vec<usize>> {
    if order_kind == DataOrder::File {
        let order: Vec<usize> = (0..lengths.len()).collect();
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(0x5EED_0000 + epoch as u64));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    for i in (1..order.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    if order_kind == DataOrder::Grouped {
        let mega = 50 * batch_size;
        for chunk in order.chunks_mut(mega) {
            // Stable: equal lengths keep their shuffled order, as HF's sort does.
            chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        }
    }
    order.chunks(batch_size).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_once_per_epoch_and_reproducible() {
        let lengths: Vec<usize> = (0..23).map(|i| (i * 7) % 11).collect();
        let a = epoch_batches(&lengths, 4, 42, 0, DataOrder::Grouped);
        assert_eq!(a, epoch_batches(&lengths, 4, 42, 0, DataOrder::Grouped));
        assert_ne!(a, epoch_batches(&lengths, 4, 42, 1, DataOrder::Grouped));
        let mut seen: Vec<usize> = a.concat();
        seen.sort();
        assert_eq!(seen, (0..23).collect::<Vec<_>>());
        assert_eq!(a.len(), 6);
        // Within a mega-batch (here all 23), longest first.
        let flat = a.concat();
        assert!(flat.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
    }
}
