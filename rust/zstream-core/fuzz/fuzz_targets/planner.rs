//! Arbitrary wanted byte ranges through `plan_aligned` and `chunks`: every wanted byte lands inside the extent that
//! reads it, extents are aligned (when no tensor shift is asked for) and disjoint in the arena, and the chunks add
//! up to exactly the bytes the plan reads.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use zstream_core::plan::{plan_aligned, Want};

/// Offsets and lengths below 2^40 (1 TiB): real shard sizes, and far from u64 overflow.
const BOUND: u64 = 1 << 40;

#[derive(Debug, Arbitrary)]
struct RawWant {
    file: u8,
    offset: u64,
    len: u64,
}

#[derive(Debug, Arbitrary)]
struct Input {
    align_sel: u8,
    max_gap: u64,
    /// Low bits pick 0 or a power of two up to 4096 for the tensor alignment.
    ta_sel: u8,
    chunk_mul: u8,
    /// Bounded: the planner's arena is one allocation, so a plan over many TiB is meaningless.
    wants: Vec<RawWant>,
}

fuzz_target!(|inp: Input| {
    let align = 512u64 << (inp.align_sel % 4);
    let max_gap = inp.max_gap % BOUND;
    let tensor_align = match inp.ta_sel % 16 {
        0..=3 => 0,
        k => 1u64 << (k - 3), // 2 ..= 4096
    };
    let wants: Vec<Want> = inp
        .wants
        .iter()
        .take(64)
        .map(|w| Want { file: usize::from(w.file % 4), offset: w.offset % BOUND, len: w.len % BOUND })
        .collect();
    let p = plan_aligned(&wants, align, max_gap, tensor_align);
    assert_eq!(p.placements.len(), wants.len());
    assert_eq!(p.align, align);

    let mut prev_end = 0usize;
    for e in &p.extents {
        assert_eq!(e.file_start % align, 0, "{e:?}");
        assert_eq!(e.file_end % align, 0, "{e:?}");
        if tensor_align == 0 {
            assert_eq!(e.arena_offset as u64 % align, 0, "{e:?}");
        }
        assert!(e.file_start < e.file_end, "empty extent {e:?}");
        assert!(e.file_start < e.needed_end && e.needed_end <= e.file_end, "{e:?}");
        assert!(e.arena_offset >= prev_end, "extents overlap in the arena: {e:?} starts before {prev_end}");
        prev_end = e.arena_offset + e.len() as usize;
    }
    assert!(prev_end <= p.arena_len, "last extent ends at {prev_end}, past arena_len {}", p.arena_len);

    // For each extent, the smallest file offset among the wants placed in it.
    let mut first = vec![u64::MAX; p.extents.len()];
    for (i, w) in wants.iter().enumerate() {
        if w.len == 0 {
            continue;
        }
        let place = p.placements[i];
        assert!(place as u64 + w.len <= p.arena_len as u64, "want {i} {w:?} at {place} runs past the arena");
        // The extent holding this placement reads this want's file bytes at that spot.
        let k = p
            .extents
            .iter()
            .position(|e| e.arena_offset <= place && place < e.arena_offset + e.len() as usize)
            .unwrap_or_else(|| panic!("want {i} {w:?} placed at {place}, in no extent"));
        let e = &p.extents[k];
        assert_eq!(e.file, w.file, "want {i} placed in an extent of another file");
        assert!(e.file_start <= w.offset && w.offset + w.len <= e.needed_end, "want {i} {w:?} outside {e:?}");
        assert_eq!(place, e.arena_offset + (w.offset - e.file_start) as usize, "want {i} misplaced");
        first[k] = first[k].min(w.offset);
    }
    for (k, e) in p.extents.iter().enumerate() {
        assert_ne!(first[k], u64::MAX, "extent {e:?} holds no want");
        if tensor_align > 1 {
            // The first tensor of each extent starts on a tensor_align boundary of the arena.
            assert_eq!((e.arena_offset as u64 + first[k] - e.file_start) % tensor_align, 0, "{e:?}");
        }
    }

    // At most ~1k chunks (plus one per extent): a 1 TiB extent in 512-byte chunks would only measure the
    // allocator (at 64k chunks the target ran at 640 exec/s).
    let mut chunk = (usize::from(inp.chunk_mul % 64) + 1) * align as usize;
    let floor = (p.read_bytes() >> 10).next_multiple_of(align) as usize;
    chunk = chunk.max(floor);
    let chunks = p.chunks(chunk);
    let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
    assert_eq!(total, p.read_bytes(), "chunks do not add up to read_bytes");
    for c in &chunks {
        assert!(c.len > 0 && c.len <= chunk, "{c:?}");
        assert_eq!(c.file_offset % align, 0, "{c:?}");
        assert!(c.needed <= c.len, "{c:?}");
    }
});
