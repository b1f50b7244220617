//! The library behind the `gmem` command: the guest program, test machines,
//! the bundled workload and its virtio device, the self-test scenarios, the stress torture and
//! the benchmarks.

pub mod backend;
pub mod bench;
pub mod counter;
pub mod floor;
pub mod guest;
pub mod info;
pub mod interrupt;
pub mod machine;
pub mod progress;
pub mod run_snapshot;
pub mod scenarios;
pub mod stress;
pub mod summary;
pub mod virtio;
pub mod workload;
