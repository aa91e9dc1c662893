//! Read planning: turn a set of tensors into a few large, aligned reads and a layout in an arena.
//!
//! `O_DIRECT` needs the file offset, the length and the memory address aligned to the device's block size. A tensor
//! at an arbitrary offset is read through its aligned superset: the extent is widened to `align` on both sides and
//! placed in the arena at an `align`-aligned position, so the tensor's bytes land at
//! `extent.arena_offset + (tensor.offset - extent.file_start)`. Tensors that lie next to each other in one file (a
//! transformer block usually does) are coalesced into one extent, so a block arrives in a few large reads.

/// One tensor-sized byte range wanted from a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub file: usize,
    pub offset: u64,
    pub len: u64,
}

/// One contiguous aligned read from one file into the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub file: usize,
    /// Aligned down to `align`.
    pub file_start: u64,
    /// Aligned up to `align`; may run past the end of the file (the read then comes back short, which is fine).
    pub file_end: u64,
    /// The last byte actually needed, plus one: a read that stops before this is a truncated file.
    pub needed_end: u64,
    /// Position in the arena, aligned to `align`.
    pub arena_offset: usize,
}

impl Extent {
    pub fn len(&self) -> u64 {
        self.file_end - self.file_start
    }

    pub fn is_empty(&self) -> bool {
        self.file_end == self.file_start
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPlan {
    pub extents: Vec<Extent>,
    /// For each `Want`, in the caller's order: where its first byte lands in the arena.
    pub placements: Vec<usize>,
    /// Arena bytes the plan needs.
    pub arena_len: usize,
    pub align: u64,
}

/// One I/O of at most `chunk` bytes: a piece of an extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub file: usize,
    pub file_offset: u64,
    pub len: usize,
    pub arena_offset: usize,
    /// Bytes of this chunk that must arrive (less than `len` only for the last chunk of an extent at EOF).
    pub needed: usize,
}

pub fn align_down(x: u64, a: u64) -> u64 {
    debug_assert!(a.is_power_of_two());
    x & !(a - 1)
}

pub fn align_up(x: u64, a: u64) -> u64 {
    debug_assert!(a.is_power_of_two());
    (x + a - 1) & !(a - 1)
}

/// Plan reads for `wants`. Neighbours in one file whose gap is at most `max_gap` bytes share an extent: reading a
/// small gap costs less than another I/O.
pub fn plan(wants: &[Want], align: u64, max_gap: u64) -> ReadPlan {
    plan_aligned(wants, align, max_gap, 0)
}

/// Like [`plan`], but each extent is shifted in the arena so that its first tensor starts on a multiple of
/// `tensor_align` (0: no shift). Kernels that read weights where they lie (the ats mode) want 256-byte aligned
/// operands, which a tensor at its file offset modulo 4096 seldom is. The shift gives up `O_DIRECT`'s buffer
/// alignment: such reads go through the page cache (the readers check every I/O's alignment).
pub fn plan_aligned(wants: &[Want], align: u64, max_gap: u64, tensor_align: u64) -> ReadPlan {
    assert!(align.is_power_of_two(), "alignment must be a power of two");
    let mut order: Vec<usize> = (0..wants.len()).filter(|&i| wants[i].len > 0).collect();
    order.sort_by_key(|&i| (wants[i].file, wants[i].offset, wants[i].len));

    let mut extents: Vec<Extent> = Vec::new();
    let mut placements = vec![0usize; wants.len()];
    let mut arena_len = 0usize;
    // Extent currently being grown: (file, first byte, end byte) unaligned.
    let mut open: Option<(usize, u64, u64)> = None;
    let mut members: Vec<usize> = Vec::new();

    let mut close = |open: (usize, u64, u64), members: &mut Vec<usize>, extents: &mut Vec<Extent>| {
        let (file, start, end) = open;
        let file_start = align_down(start, align);
        let file_end = align_up(end, align);
        let mut arena_offset = arena_len;
        if tensor_align > 1 {
            // Room for the shift, then place the extent so that `start` lands on a multiple of tensor_align.
            let lead = (start - file_start) as usize;
            let ta = tensor_align as usize;
            arena_offset = (arena_offset + lead).next_multiple_of(ta) - lead;
        }
        arena_len = arena_offset + (file_end - file_start) as usize;
        for &m in members.iter() {
            placements[m] = arena_offset + (wants[m].offset - file_start) as usize;
        }
        members.clear();
        extents.push(Extent { file, file_start, file_end, needed_end: end, arena_offset });
    };

    for &i in &order {
        let w = wants[i];
        let end = w.offset + w.len;
        match open {
            Some((f, s, e)) if f == w.file && w.offset <= e.saturating_add(max_gap) => {
                open = Some((f, s, e.max(end)));
            }
            Some(prev) => {
                close(prev, &mut members, &mut extents);
                open = Some((w.file, w.offset, end));
            }
            None => open = Some((w.file, w.offset, end)),
        }
        members.push(i);
    }
    if let Some(prev) = open {
        close(prev, &mut members, &mut extents);
    }
    // Empty tensors point at the start of the arena: any valid address will do, nothing is read through it.
    ReadPlan { extents, placements, arena_len, align }
}

impl ReadPlan {
    /// Split every extent into I/Os of at most `chunk` bytes (`chunk` a multiple of `align`).
    pub fn chunks(&self, chunk: usize) -> Vec<Chunk> {
        assert!(chunk > 0 && chunk as u64 % self.align == 0, "chunk must be a positive multiple of the alignment");
        let mut out = Vec::new();
        for e in &self.extents {
            let mut off = e.file_start;
            while off < e.file_end {
                let len = (e.file_end - off).min(chunk as u64);
                let needed = e.needed_end.saturating_sub(off).min(len);
                out.push(Chunk {
                    file: e.file,
                    file_offset: off,
                    len: len as usize,
                    arena_offset: e.arena_offset + (off - e.file_start) as usize,
                    needed: needed as usize,
                });
                off += len;
            }
        }
        out
    }

    /// Bytes that will cross the disk: the aligned extents, gaps included.
    pub fn read_bytes(&self) -> u64 {
        self.extents.iter().map(Extent::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn adjacent_tensors_coalesce() {
        let wants = [Want { file: 0, offset: 100, len: 50 }, Want { file: 0, offset: 150, len: 4000 }];
        let p = plan(&wants, 4096, 0);
        assert_eq!(p.extents.len(), 1);
        assert_eq!(p.extents[0].file_start, 0);
        assert_eq!(p.extents[0].file_end, 4096 * 2);
        assert_eq!(p.placements, vec![100, 150]);
    }

    #[test]
    fn far_tensors_and_other_files_split() {
        let wants = [
            Want { file: 0, offset: 0, len: 10 },
            Want { file: 0, offset: 1 << 30, len: 10 },
            Want { file: 1, offset: 0, len: 10 },
        ];
        let p = plan(&wants, 4096, 1 << 20);
        assert_eq!(p.extents.len(), 3);
        assert_eq!(p.arena_len, 3 * 4096);
    }

    #[test]
    fn align_helpers_by_hand() {
        for (x, down, up) in [(0, 0, 0), (1, 0, 4096), (4095, 0, 4096), (4096, 4096, 4096), (4097, 4096, 8192)] {
            assert_eq!(align_down(x, 4096), down, "align_down({x})");
            assert_eq!(align_up(x, 4096), up, "align_up({x})");
        }
        assert_eq!(align_up(513, 512), 1024);
        assert_eq!(align_down(1023, 512), 512);
    }

    #[test]
    fn extent_len_and_emptiness() {
        let e = |file_start, file_end| Extent { file: 0, file_start, file_end, needed_end: file_end, arena_offset: 0 };
        assert_eq!(e(4096, 12288).len(), 8192);
        assert!(!e(4096, 12288).is_empty());
        assert_eq!(e(8192, 8192).len(), 0);
        assert!(e(8192, 8192).is_empty());
    }

    #[test]
    fn empty_tensors_get_no_extent() {
        // A zero-length tensor on a page boundary, then a 10-byte tensor at 8292: one extent, page 8192..12288.
        let wants = [Want { file: 0, offset: 4096, len: 0 }, Want { file: 0, offset: 8292, len: 10 }];
        let p = plan(&wants, 4096, 0);
        let only = Extent { file: 0, file_start: 8192, file_end: 12288, needed_end: 8302, arena_offset: 0 };
        assert_eq!(p.extents, vec![only]);
        assert_eq!(p.placements, vec![0, 100]);
        assert_eq!(p.arena_len, 4096);
        assert!(p.extents.iter().all(|e| !e.is_empty()));
    }

    #[test]
    fn tensor_alignment_shift_by_hand() {
        // align 4096, tensor_align 256. File 0: a tensor at 100 (lead 100): the extent goes at 156 so that the
        // tensor lands on 256; the arena then ends at 156 + 4096 = 4252. File 1: a tensor at 4396 (page 4096,
        // lead 300): 4252 + 300 = 4552 rounds up to 4608, so the extent goes at 4308 and the tensor at 4608.
        let wants = [Want { file: 0, offset: 100, len: 10 }, Want { file: 1, offset: 4396, len: 10 }];
        let p = plan_aligned(&wants, 4096, 0, 256);
        assert_eq!(p.placements, vec![256, 4608]);
        assert_eq!(p.extents.iter().map(|e| e.arena_offset).collect::<Vec<_>>(), vec![156, 4308]);
        assert_eq!(p.arena_len, 4308 + 4096);
        // tensor_align 0 and 1 both mean no shift: the plain layout.
        for ta in [0, 1] {
            let p = plan_aligned(&wants, 4096, 0, ta);
            assert_eq!(p.placements, vec![100, 4096 + 300], "tensor_align {ta}");
            assert_eq!(p.arena_len, 2 * 4096);
        }
        // A tensor boundary coarser than the I/O alignment (512-byte blocks, 4096-byte tensors): a tensor at 600
        // reads the block at 512 (lead 88); the extent goes at 4096 - 88 = 4008, the tensor at 4096.
        let p = plan_aligned(&[Want { file: 0, offset: 600, len: 10 }], 512, 0, 4096);
        assert_eq!(p.extents[0].file_start, 512);
        assert_eq!(p.extents[0].arena_offset, 4008);
        assert_eq!(p.placements, vec![4096]);
        assert_eq!(p.arena_len, 4008 + 512);
    }

    #[test]
    fn gap_rule_by_hand() {
        // Two tensors 1000 bytes apart (end 110, next at 1110): merged when max_gap >= 1000, split below.
        let wants = [Want { file: 0, offset: 100, len: 10 }, Want { file: 0, offset: 1110, len: 10 }];
        let merged = plan(&wants, 512, 1000);
        assert_eq!(merged.extents.len(), 1);
        assert_eq!((merged.extents[0].file_start, merged.extents[0].file_end), (0, 1536));
        assert_eq!(merged.extents[0].needed_end, 1120);
        assert_eq!(merged.placements, vec![100, 1110]);
        let split = plan(&wants, 512, 999);
        assert_eq!(split.extents.len(), 2);
        assert_eq!(
            (split.extents[1].file_start, split.extents[1].file_end, split.extents[1].arena_offset),
            (1024, 1536, 512)
        );
        assert_eq!(split.placements, vec![100, 512 + 86]);
        // The same offsets in different files never merge, whatever the gap.
        let other = [Want { file: 0, offset: 0, len: 10 }, Want { file: 1, offset: 10, len: 10 }];
        assert_eq!(plan(&other, 512, u64::MAX).extents.len(), 2);
        // A tensor inside another one does not shrink the extent's end.
        let nested = [Want { file: 0, offset: 0, len: 5000 }, Want { file: 0, offset: 100, len: 10 }];
        let p = plan(&nested, 4096, 0);
        assert_eq!((p.extents.len(), p.extents[0].needed_end, p.extents[0].file_end), (1, 5000, 8192));
    }

    #[test]
    fn chunks_by_hand() {
        // File 0: bytes 100..10100 (pages 0..12288, at arena 0). File 1: bytes 5000..5010 (page 4096..8192, at
        // arena 12288). Chunks of 8192 bytes.
        let wants = [Want { file: 0, offset: 100, len: 10_000 }, Want { file: 1, offset: 5000, len: 10 }];
        let p = plan(&wants, 4096, 0);
        assert_eq!(p.read_bytes(), 12288 + 4096);
        let chunks = p.chunks(8192);
        let c = |file, file_offset, len, arena_offset, needed| Chunk { file, file_offset, len, arena_offset, needed };
        assert_eq!(
            chunks,
            vec![c(0, 0, 8192, 0, 8192), c(0, 8192, 4096, 8192, 10_100 - 8192), c(1, 4096, 4096, 12288, 5010 - 4096),]
        );
    }

    #[test]
    fn aligned_extent_sharing_a_page_with_its_neighbour() {
        // File 1, tensor_align 16, max_gap 0. A = 466898..507904 and B = 507904..507905 touch: one extent, pages
        // 462848..512000 (lead 4050, so it goes at arena 14 and A at 4064; B at 14 + 45056). C = 511217..511218 is
        // 3312 bytes past B: its own extent, from page 507904 (the page B's extent ends in; lead 3313). The arena
        // so far ends at 14 + 49152 = 49166; 49166 + 3313 = 52479 rounds up to 52480, so C's extent goes at 49167.
        // B lies in C's page range too, but it is not C's extent's first tensor: C is, and C is on the boundary.
        let wants = [
            Want { file: 1, offset: 511_217, len: 1 },
            Want { file: 1, offset: 507_904, len: 1 },
            Want { file: 1, offset: 466_898, len: 41_006 },
        ];
        let p = plan_aligned(&wants, 4096, 0, 16);
        let ext = |file_start, file_end, needed_end, arena_offset| Extent {
            file: 1,
            file_start,
            file_end,
            needed_end,
            arena_offset,
        };
        assert_eq!(p.extents, vec![ext(462_848, 512_000, 507_905, 14), ext(507_904, 512_000, 511_218, 49_167)]);
        assert_eq!(p.placements, vec![52_480, 45_070, 4064]);
        assert_eq!(p.arena_len, 49_167 + 4096);
    }

    proptest! {
        /// With tensor_align > 1, the first tensor of every extent lands on a tensor_align boundary, and the
        /// shifted extents still do not overlap in the arena.
        #[test]
        fn aligned_layout_puts_first_tensors_on_the_boundary(
            raw in prop::collection::vec((0usize..2, 0u64..1_000_000, 1u64..200_000), 1..20),
            ta_pow in 4u32..10,
        ) {
            let wants: Vec<Want> = raw.iter().map(|&(file, offset, len)| Want { file, offset, len }).collect();
            let ta = 1u64 << ta_pow;
            let p = plan_aligned(&wants, 4096, 0, ta);
            // Reference grouping (max_gap 0): in (file, offset) order, a tensor joins the open group when it starts
            // at or before the group's end. An extent's members cannot be told from its page range: two extents
            // may share a page, and a neighbour's tensor may then lie inside the later extent's range.
            let mut order: Vec<usize> = (0..wants.len()).collect();
            order.sort_by_key(|&i| (wants[i].file, wants[i].offset));
            let mut firsts: Vec<usize> = Vec::new();
            let mut open: Option<(usize, u64)> = None;
            for &i in &order {
                let w = wants[i];
                match open {
                    Some((f, end)) if f == w.file && w.offset <= end => open = Some((f, end.max(w.offset + w.len))),
                    _ => {
                        firsts.push(i);
                        open = Some((w.file, w.offset + w.len));
                    }
                }
            }
            prop_assert_eq!(p.extents.len(), firsts.len());
            let mut prev_end = 0usize;
            for (e, &first) in p.extents.iter().zip(&firsts) {
                prop_assert!(e.arena_offset >= prev_end, "extents overlap in the arena");
                prev_end = e.arena_offset + e.len() as usize;
                prop_assert_eq!((e.file, e.file_start), (wants[first].file, wants[first].offset / 4096 * 4096));
                prop_assert_eq!(p.placements[first] as u64 % ta, 0);
            }
            prop_assert!(prev_end <= p.arena_len);
        }

        #[test]
        fn layout_is_sound(
            raw in prop::collection::vec((0usize..3, 0u64..1_000_000, 0u64..200_000), 0..40),
            align_pow in 9u32..14,
            gap in 0u64..100_000,
            chunk_mul in 1usize..64,
        ) {
            let align = 1u64 << align_pow;
            let wants: Vec<Want> = raw.iter().map(|&(file, offset, len)| Want { file, offset, len }).collect();
            let p = plan(&wants, align, gap);
            let mut prev_end = 0usize;
            for e in &p.extents {
                prop_assert_eq!(e.file_start % align, 0);
                prop_assert_eq!(e.file_end % align, 0);
                prop_assert_eq!(e.arena_offset as u64 % align, 0);
                prop_assert!(e.arena_offset >= prev_end, "extents overlap in the arena");
                prop_assert!(e.needed_end <= e.file_end && e.needed_end > e.file_start);
                prev_end = e.arena_offset + e.len() as usize;
            }
            prop_assert_eq!(prev_end, p.arena_len);
            for (i, w) in wants.iter().enumerate() {
                if w.len == 0 { continue; }
                let e = p.extents.iter().find(|e| e.file == w.file && e.file_start <= w.offset
                    && w.offset + w.len <= e.needed_end).expect("a covering extent");
                prop_assert_eq!(p.placements[i], e.arena_offset + (w.offset - e.file_start) as usize);
            }
            let chunk = chunk_mul * align as usize;
            let chunks = p.chunks(chunk);
            let total: usize = chunks.iter().map(|c| c.len).sum();
            prop_assert_eq!(total as u64, p.read_bytes());
            for c in &chunks {
                prop_assert!(c.len <= chunk && c.len > 0);
                prop_assert_eq!(c.file_offset % align, 0);
                prop_assert_eq!(c.arena_offset as u64 % align, 0);
                prop_assert!(c.needed <= c.len);
            }
        }
    }
}
