//! Reader throughput: io_uring vs the pread pool vs mmap vs a plain buffered `std::fs::File::read` loop, each
//! reading one multi-GB safetensors file end to end through the real `Store` API, in block-sized groups of
//! tensors as the streaming engine reads them (pooled slots, one group at a time).
//!
//!     cargo bench -p zstream-core --bench readers
//!     ZSTREAM_BENCH_BYTES=$((8<<30)) cargo bench -p zstream-core --bench readers -- uring
//!
//! Environment:
//! - `ZSTREAM_BENCH_BYTES`: size of the test file (default 2 GiB). It is written once, as a valid safetensors
//!   file of 1..64 MiB `U8` tensors, to `target/zstream-bench/readers-<bytes>.safetensors` (or under
//!   `CARGO_TARGET_DIR`), and reused by later runs.
//! - `ZSTREAM_BENCH_FILE`: use this safetensors file instead (nothing is written).
//! - `ZSTREAM_BENCH_GROUP_BYTES`: bytes per read group (default 400 MiB, about one bloom-7b1 block in fp16).
//! - `ZSTREAM_BENCH_SAMPLES`: criterion samples per reader (default 10, criterion's minimum; one pass each).
//!
//! Page cache: `uring` and `pread` open the file with `O_DIRECT` (where the filesystem allows it) and so measure
//! the device. `mmap` and `buffered` go through the page cache: unless the caches are dropped between runs
//! (`echo 1 > /proc/sys/vm/drop_caches` as root), their numbers are WARM-CACHE numbers (memory bandwidth), as
//! soon as the file fits in RAM. This bench does not drop caches itself; `benches/reader_sweep.py` does, for
//! cold-cache comparisons with fio.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use zstream_core::{Checkpoint, ReadOptions, ReaderKind, Store, StoreOptions};

const MIB: u64 = 1 << 20;
/// Tensor sizes, cycled: 1 MiB .. 64 MiB, in a mix like a transformer's (a few big matrices, small ones between).
const TENSOR_MIB: [u64; 10] = [64, 1, 16, 48, 2, 32, 4, 8, 24, 1];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"), PathBuf::from)
}

/// Tensor byte sizes adding up to exactly `total` (the last one is trimmed).
fn tensor_sizes(total: u64) -> Vec<u64> {
    let mut sizes = Vec::new();
    let mut left = total;
    for &mib in TENSOR_MIB.iter().cycle() {
        if left == 0 {
            break;
        }
        let n = (mib * MIB).min(left);
        sizes.push(n);
        left -= n;
    }
    sizes
}

/// Write a safetensors file of `total` data bytes (unless one of the right size is already there).
fn ensure_file(path: &Path, total: u64) -> std::io::Result<()> {
    let sizes = tensor_sizes(total);
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut off = 0u64;
    for (i, n) in sizes.iter().enumerate() {
        write!(header, ",\"t.{i:05}\":{{\"dtype\":\"U8\",\"shape\":[{n}],\"data_offsets\":[{off},{}]}}", off + n)
            .expect("writing to a String cannot fail");
        off += n;
    }
    header.push('}');
    // Pad with spaces to a multiple of 8, as the safetensors writer does.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let file_len = 8 + header.len() as u64 + total;
    if std::fs::metadata(path).is_ok_and(|m| m.len() == file_len) {
        return Ok(());
    }
    std::fs::create_dir_all(path.parent().expect("file has a parent"))?;
    eprintln!("writing {} ({:.2} GiB) ...", path.display(), total as f64 / (1u64 << 30) as f64);
    let tmp = path.with_extension("tmp");
    let mut f = std::io::BufWriter::with_capacity(8 << 20, File::create(&tmp)?);
    f.write_all(&(header.len() as u64).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    // Pseudo-random bytes (xorshift), so no filesystem or device can shortcut zeros.
    let mut buf = vec![0u8; 8 << 20];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut left = total;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    let f = f.into_inner().map_err(std::io::IntoInnerError::into_error)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Consecutive tensors, grouped into reads of about `group_bytes` each.
fn groups(ckpt: &Checkpoint, group_bytes: u64) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = vec![Vec::new()];
    let mut acc = 0u64;
    for t in &ckpt.tensors {
        if acc >= group_bytes {
            out.push(Vec::new());
            acc = 0;
        }
        out.last_mut().expect("non-empty").push(t.name.clone());
        acc += t.nbytes;
    }
    out
}

/// Read every group once, one at a time, into pooled slots (what the streaming engine does); returns bytes read.
fn read_all(store: &Store, groups: &[Vec<&str>], kind: ReaderKind) -> u64 {
    let mut bytes = 0;
    for g in groups {
        let job = store.submit(g, kind, true, None).expect("submit");
        loop {
            if let Some(r) = job.wait(Duration::from_secs(60)) {
                r.expect("read failed");
                break;
            }
        }
        bytes += job.read_bytes();
        std::hint::black_box(job.buffer.as_ptr());
    }
    bytes
}

/// The baseline: `File::read` of the whole file into one reused buffer, through the page cache.
fn buffered_read(path: &Path, buf: &mut [u8]) -> u64 {
    let mut f = File::open(path).expect("open");
    let mut total = 0u64;
    loop {
        let n = f.read(buf).expect("read");
        if n == 0 {
            return total;
        }
        total += n as u64;
        std::hint::black_box(&buf[..n]);
    }
}

fn bench_readers(c: &mut Criterion) {
    let path = if let Some(p) = std::env::var_os("ZSTREAM_BENCH_FILE") {
        PathBuf::from(p)
    } else {
        let bytes = env_u64("ZSTREAM_BENCH_BYTES", 2 << 30).max(MIB);
        let p = target_dir().join("zstream-bench").join(format!("readers-{bytes}.safetensors"));
        ensure_file(&p, bytes).expect("cannot write the bench file");
        p
    };
    let group_bytes = env_u64("ZSTREAM_BENCH_GROUP_BYTES", 400 * MIB);
    let samples = env_u64("ZSTREAM_BENCH_SAMPLES", 10).max(10) as usize;

    // One worker so that exactly one read is in flight: the numbers are the reader's, not the pipeline's.
    let opts = StoreOptions { read: ReadOptions::default(), workers: 1, max_slots: Some(1), ..StoreOptions::default() };
    let store = Store::open(&path, opts).expect("open the bench file");
    let direct = store.ckpt.shards.iter().all(|s| s.direct.is_some());
    let owned = groups(&store.ckpt, group_bytes);
    let groups: Vec<Vec<&str>> = owned.iter().map(|g| g.iter().map(String::as_str).collect()).collect();
    let file_len = std::fs::metadata(&path).expect("stat").len();
    let ReadOptions { queue_depth, chunk_size, threads, .. } = opts.read;
    eprintln!(
        "{}: {:.2} GiB, {} tensors in {} groups; O_DIRECT {}; uring qd {queue_depth} chunk {} KiB; {threads} threads",
        path.display(),
        file_len as f64 / (1u64 << 30) as f64,
        store.ckpt.tensors.len(),
        groups.len(),
        if direct { "yes" } else { "refused by the filesystem (uring/pread numbers are buffered)" },
        chunk_size >> 10,
    );

    let mut g = c.benchmark_group("readers");
    // Each iteration reads the whole file (seconds), so: one iteration per sample, few samples, short warm-up.
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(samples)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(store.ckpt.nbytes()));

    let mut readers = vec![ReaderKind::Uring, ReaderKind::Pread, ReaderKind::Mmap];
    if let Err(why) = zstream_core::reader::uring::available() {
        eprintln!("skipping uring: {why}");
        readers.remove(0);
    }
    for kind in readers {
        g.bench_function(BenchmarkId::new("store", kind.name()), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    read_all(&store, &groups, kind);
                }
                t.elapsed()
            });
        });
    }
    // The buffered loop reads the header too; its throughput is per file byte, within 0.01% of the tensor bytes.
    g.throughput(Throughput::Bytes(file_len));
    let mut buf = vec![0u8; chunk_size];
    g.bench_function(BenchmarkId::new("std_fs_read", format!("{}KiB", chunk_size >> 10)), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                buffered_read(&path, &mut buf);
            }
            t.elapsed()
        });
    });
    g.finish();
}

criterion_group!(benches, bench_readers);
criterion_main!(benches);
