#![allow(missing_docs)] // criterion_group! makes an undocumented function.

//! Criterion benches of the headline cases, each beside its floor. `gmem
//! bench` runs the same fixtures in one process and prints the ratios.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use gmem_cli::bench::{Copies, PinUnpin, RoundTrip};

/// Round trips with guard markers (gmem's default and the floor's), and
/// with the empty-file remap (gmem's fallback and the old floor). The
/// fragmented 1 GiB cases are too slow for criterion: `gmem bench` has them.
fn round_trips(c: &mut Criterion) {
    let mut group = c.benchmark_group("round-trip");
    let sizes = [("4k", 4 << 10), ("2m", 2 << 20), ("64m", 64 << 20)];
    let fixtures = sizes.into_iter().flat_map(|(name, len)| {
        [
            (
                name.to_string(),
                RoundTrip::new as fn(u64) -> RoundTrip,
                len,
            ),
            (format!("{name}-remap"), RoundTrip::remap, len),
        ]
    });
    for (name, fixture, len) in fixtures {
        let fixture = fixture(len);
        group.bench_function(format!("{name}/gmem"), |b| {
            b.iter_batched(
                || fixture.populate_ours(),
                |()| fixture.ours(),
                BatchSize::PerIteration,
            )
        });
        group.bench_function(format!("{name}/floor"), |b| {
            b.iter_batched(
                || fixture.populate_floor(),
                |()| fixture.floor(),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn pins(c: &mut Criterion) {
    let fixture = PinUnpin::new();
    let mut group = c.benchmark_group("pin-unpin");
    group.bench_function("gmem", |b| b.iter(|| fixture.ours()));
    group.bench_function("atomic-floor", |b| b.iter(|| fixture.atomic()));
    group.bench_function("mutex-design", |b| b.iter(|| fixture.mutex()));
    group.finish();
}

fn copies(c: &mut Criterion) {
    let mut fixture = Copies::new();
    let mut group = c.benchmark_group("copy-64k");
    group.throughput(criterion::Throughput::Bytes(64 << 10));
    group.bench_function("host-mapping-read", |b| b.iter(|| fixture.host_read()));
    group.bench_function("host-mapping-write", |b| b.iter(|| fixture.host_write()));
    group.bench_function("pin-read", |b| b.iter(|| fixture.pin_read()));
    group.bench_function("pin-write", |b| b.iter(|| fixture.pin_write()));
    group.bench_function("floor-read", |b| b.iter(|| fixture.floor_read()));
    group.bench_function("floor-write", |b| b.iter(|| fixture.floor_write()));
    group.finish();
}

criterion_group!(benches, round_trips, pins, copies);
criterion_main!(benches);
