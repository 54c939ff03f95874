//! Runs N training steps of the training-step bench's model (N128/M192 scale hyperprior, batch
//! 8 of 128x128, AdamW), for profilers: `perf stat -e page-faults,task-clock
//! target/release/examples/train_profile 4`. It keeps the system allocator on purpose, so that
//! `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (or adding `psic::alloc::HugePages` as the global
//! allocator) shows what huge pages change.
#[path = "../benches/common/train_step.rs"]
mod train_step;

fn main() {
    let n: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(n)) => n,
        _ => {
            eprintln!("usage: train_profile STEPS");
            std::process::exit(2);
        }
    };
    let mut step = train_step::TrainStep::new();
    for _ in 0..n {
        step.run();
    }
}
