//! Lossless coding of 16-bit floating-point weights: the bits of a trained network's exponents carry far less
//! information than their width, so an entropy code of them moves fewer bytes over the link and changes nothing.
//!
//! Each 16-bit word `w` is split into a *symbol*, bits 14..7 (BF16: the 8 exponent bits; FP16: the 5 exponent bits
//! and the top 3 mantissa bits), coded with a canonical Huffman code built from the tensor's own histogram, and a
//! *raw* byte, the sign bit and bits 6..0, stored as they are:
//!
//! ```text
//!   symbol = (w >> 7) & 0xff          raw = ((w >> 8) & 0x80) | (w & 0x7f)
//!   w      = ((raw & 0x80) << 8) | (symbol << 7) | (raw & 0x7f)
//! ```
//!
//! Every symbol of the histogram gets a code (at most `MAX_CODE_LEN` bits), so any bit pattern round-trips: NaN,
//! infinities, subnormals and rare exponents need no escape. Codes are read MSB-first through one lookup table of
//! `1 << MAX_CODE_LEN` entries, `symbol | length << 8`.
//!
//! For parallel decoding the elements are dealt to `lanes` independent bit streams in runs of `RUN` (4) consecutive
//! elements: run `r` (elements `RUN * r .. RUN * r + RUN`) goes to lane `r % lanes`, so lane `j` codes runs `j`,
//! `j + lanes`, `j + 2 * lanes`, ... In step `k` the lanes decode the consecutive runs `k * lanes .. (k + 1) * lanes`:
//! on a GPU each lane reads its run's raw bytes as one 4-byte word and writes its 4 outputs as one 8-byte word, and
//! the lanes of a warp read and write consecutive memory.
//!
//! The lanes' streams are laid end to end in one MSB-first bit stream of `u32` words, without padding between lanes,
//! in groups of `LANE_GROUP` lanes; each group starts on a word. Where a lane starts costs 2 bytes and 1/16 of a
//! group's base: `offsets` holds each group's first word, then each lane's first bit counted from its group's
//! first word, as `u16` pairs (lane `2i` in the low half of word `groups + i`). Two zero words end the stream, so a
//! reader may load the two words after any it is in. (Format 2 gave each lane 512 elements, a `u32` offset and
//! its own zero word: 10 bytes a lane; lanes of 128 elements at 2.2 bytes each give four times the lanes for the GPU
//! to run at once, and a smaller code.)

use crate::error::{Error, Result};

/// The longest code.
pub const MAX_CODE_LEN: u32 = 12;
/// Consecutive elements a lane takes at a time.
pub const RUN: usize = 4;
/// Lanes whose starts share one base word in `offsets`.
pub const LANE_GROUP: usize = 32;
/// Slots for per-length values in the decode tables (lengths 0..16; 1..=12 are used).
const LEN_SLOTS: usize = 16;
/// Entries of the decode tables: per-length limits, per-length index deltas, then the symbols in code order.
pub const TABLE_LEN: usize = 2 * LEN_SLOTS + 256;

/// One tensor, coded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The lanes' bit streams, one after another, then two zero words.
    pub words: Vec<u32>,
    /// Where each lane starts (`offsets_len(lanes)` words): the groups' first words, then the lanes' `u16` starts.
    pub offsets: Vec<u32>,
    /// Number of lanes.
    pub lanes: usize,
    /// The raw byte of every element, in element order.
    pub raw: Vec<u8>,
    /// The decode tables (`decode_tables`).
    pub table: Vec<u16>,
    /// Code length of each symbol (0: absent).
    pub lengths: [u8; 256],
}

/// Words of the `offsets` of `lanes` lanes: one a group, then one for two lanes.
pub fn offsets_len(lanes: usize) -> usize {
    lanes.div_ceil(LANE_GROUP) + lanes.div_ceil(2)
}

/// The first bit of lane `lane` in the stream, from `offsets` (`offsets_len(lanes)` words long).
fn lane_start(offsets: &[u32], lanes: usize, lane: usize) -> usize {
    let half = offsets[lanes.div_ceil(LANE_GROUP) + lane / 2] >> (16 * (lane % 2)) & 0xffff;
    32 * offsets[lane / LANE_GROUP] as usize + half as usize
}

/// The symbol of a 16-bit word.
#[inline]
pub fn symbol(w: u16) -> u8 {
    (w >> 7) as u8
}

/// The raw byte of a 16-bit word: its sign and its 7 low bits.
#[inline]
pub fn raw(w: u16) -> u8 {
    (((w >> 8) & 0x80) | (w & 0x7f)) as u8
}

/// The word of a symbol and a raw byte.
#[inline]
pub fn word(symbol: u8, raw: u8) -> u16 {
    ((u16::from(raw) & 0x80) << 8) | (u16::from(symbol) << 7) | (u16::from(raw) & 0x7f)
}

/// Huffman code lengths for `counts`, none longer than `max_len`: where the optimal code is longer, the counts
/// are halved (rounding up, so no present symbol disappears) and the code built again, which narrows their range
/// until it fits (256 equal counts give 8 bits each).
pub fn code_lengths(counts: &[u64; 256], max_len: u32) -> [u8; 256] {
    let mut c = *counts;
    loop {
        let lengths = huffman_lengths(&c);
        if lengths.iter().all(|&l| u32::from(l) <= max_len) {
            return lengths;
        }
        for x in &mut c {
            if *x > 0 {
                *x = x.div_ceil(2);
            }
        }
    }
}

/// Optimal (unbounded) Huffman code lengths; a lone symbol gets length 1.
fn huffman_lengths(counts: &[u64; 256]) -> [u8; 256] {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut lengths = [0u8; 256];
    let present: Vec<usize> = (0..256).filter(|&s| counts[s] > 0).collect();
    if present.len() == 1 {
        lengths[present[0]] = 1;
        return lengths;
    }
    // nodes 0..256 are leaves; parents follow. Ties broken by index: the code is a function of the counts.
    let mut parent: Vec<usize> = vec![usize::MAX; 256];
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = present.iter().map(|&s| Reverse((counts[s], s))).collect();
    while heap.len() > 1 {
        let Reverse((a, i)) = heap.pop().expect("two nodes");
        let Reverse((b, j)) = heap.pop().expect("two nodes");
        let node = parent.len();
        parent.push(usize::MAX);
        parent[i] = node;
        parent[j] = node;
        heap.push(Reverse((a + b, node)));
    }
    for &s in &present {
        let (mut depth, mut n) = (0u8, s);
        while parent[n] != usize::MAX {
            n = parent[n];
            depth += 1;
        }
        lengths[s] = depth;
    }
    lengths
}

/// Canonical codes of `lengths`: symbols ordered by (length, symbol) take consecutive codes.
fn canonical_codes(lengths: &[u8; 256]) -> [u32; 256] {
    let mut order: Vec<usize> = (0..256).filter(|&s| lengths[s] > 0).collect();
    order.sort_by_key(|&s| (lengths[s], s));
    let mut codes = [0u32; 256];
    let (mut code, mut len) = (0u32, 0u8);
    for (k, &s) in order.iter().enumerate() {
        if k > 0 {
            code += 1;
        }
        code <<= lengths[s] - len;
        len = lengths[s];
        codes[s] = code;
    }
    codes
}

/// The decode tables of `lengths` (every code at most `MAX_CODE_LEN` bits). With `v` the next 12 bits of a stream
/// (MSB-first) and the codes canonical, they give the next code's length and symbol by comparisons, where a table of
/// `1 << 12` entries would take one gather per code:
///
/// ```text
///   table[l]          l = 0..16   where the codes of length l end, left-justified to 12 bits (0 for l = 0; 4096
///                                 past the longest): length = #{l : v >= table[l]}  (the limits only grow)
///   table[16 + l]                 index of the first code of length l minus that code (two's complement)
///   table[32 + k]     k = 0..256  the symbols in code order: symbol = table[32 + table[16 + length] + (v >> (12 - length))]
/// ```
pub fn decode_tables(lengths: &[u8; 256]) -> Vec<u16> {
    let mut count = [0u32; LEN_SLOTS];
    for &l in lengths {
        count[usize::from(l)] += 1;
    }
    count[0] = 0;
    let mut table = vec![0u16; TABLE_LEN];
    let (mut code, mut index) = (0u32, 0u32);
    for l in 1..=MAX_CODE_LEN as usize {
        code = (code + count[l - 1]) << 1; // the first code of length l (deflate's next_code)
        table[l] = ((code + count[l]) << (MAX_CODE_LEN as usize - l)) as u16;
        table[LEN_SLOTS + l] = index.wrapping_sub(code) as u16;
        index += count[l];
    }
    table[MAX_CODE_LEN as usize + 1..LEN_SLOTS].fill(1 << MAX_CODE_LEN);
    let mut order: Vec<usize> = (0..256).filter(|&s| lengths[s] > 0).collect();
    order.sort_by_key(|&s| (lengths[s], s));
    for (k, &s) in order.iter().enumerate() {
        table[2 * LEN_SLOTS + k] = s as u16;
    }
    table
}

/// The `1 << 12`-entry lookup table (`symbol | length << 8`, 0 where no code starts) that `decode_tables` describes:
/// how the host decodes. Fails on tables that do not describe a prefix code.
fn lookup_table(tables: &[u16]) -> Result<Vec<u16>> {
    let bad = |why: &str| Err(Error::InvalidArgument(format!("lossless: corrupt decode tables ({why})")));
    if tables.len() != TABLE_LEN {
        return bad(&format!("{} entries, want {TABLE_LEN}", tables.len()));
    }
    if tables[..LEN_SLOTS].windows(2).any(|w| w[0] > w[1]) || tables[LEN_SLOTS - 1] > 1 << MAX_CODE_LEN {
        return bad("the limits do not grow");
    }
    let mut lookup = vec![0u16; 1 << MAX_CODE_LEN];
    for (v, entry) in lookup.iter_mut().enumerate() {
        let len = tables[..LEN_SLOTS].iter().filter(|&&lim| v >= usize::from(lim)).count();
        if len == 0 || len > MAX_CODE_LEN as usize || v >= usize::from(tables[len]) {
            continue; // no code starts with these bits
        }
        let k = i32::from(tables[LEN_SLOTS + len] as i16) + (v >> (MAX_CODE_LEN as usize - len)) as i32;
        let symbol = usize::try_from(k).ok().and_then(|k| tables.get(2 * LEN_SLOTS + k).filter(|_| k < 256));
        let Some(&symbol) = symbol else { return bad(&format!("code {v:#x} points outside the symbols")) };
        if symbol > 0xff {
            return bad(&format!("code {v:#x} decodes to {symbol}, not a byte"));
        }
        *entry = symbol | (len as u16) << 8;
    }
    Ok(lookup)
}

/// A lane's bits, MSB-first, gathered in a 64-bit accumulator and spilled as `u32` words.
#[derive(Default)]
struct BitWriter {
    words: Vec<u32>,
    acc: u64,
    bits: u32,
}

impl BitWriter {
    fn put(&mut self, code: u32, len: u32) {
        self.acc = (self.acc << len) | u64::from(code);
        self.bits += len;
        if self.bits >= 32 {
            self.bits -= 32;
            self.words.push((self.acc >> self.bits) as u32);
        }
    }

    /// Bits written so far.
    fn len(&self) -> usize {
        32 * self.words.len() + self.bits as usize
    }

    /// Append the bits of `other`.
    fn append(&mut self, other: &BitWriter) {
        for &w in &other.words {
            self.put(w, 32);
        }
        if other.bits > 0 {
            self.put((other.acc & ((1 << other.bits) - 1)) as u32, other.bits);
        }
    }

    /// Pad with zero bits to a whole word.
    fn align(&mut self) {
        if self.bits > 0 {
            self.put(0, 32 - self.bits);
        }
    }
}

/// Code `data` (16-bit words) over `lanes` lanes (at least 1, at most the element count unless it is 0). The
/// histogram and the lanes are split over the machine's cores.
pub fn encode(data: &[u16], lanes: usize) -> Result<Encoded> {
    if lanes == 0 || (lanes > data.len() && !data.is_empty()) {
        return Err(Error::InvalidArgument(format!("lossless: {lanes} lanes for {} elements", data.len())));
    }
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get).min(lanes).max(1);
    let mut counts = histogram(data, threads);
    if data.is_empty() {
        counts[0] = 1; // a table for nothing: one code
    }
    let lengths = code_lengths(&counts, MAX_CODE_LEN);
    let codes = canonical_codes(&lengths);
    // each thread codes whole groups of lanes into words of its own (a group starts on a word, so a thread's words
    // need no shifting); the threads' words are then laid end to end and their groups' bases moved by where they land
    let per = lanes.div_ceil(threads).next_multiple_of(LANE_GROUP);
    let parts: Vec<Result<Lanes>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..lanes)
            .step_by(per)
            .map(|first| {
                let (codes, lengths) = (&codes, &lengths);
                scope.spawn(move || code_lanes(data, lanes, first..(first + per).min(lanes), codes, lengths))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a coding thread panicked")).collect()
    });
    let too_large = || Error::InvalidArgument("lossless: a tensor of more than 2^32 words".into());
    let mut words = Vec::new();
    let (mut bases, mut starts) = (Vec::with_capacity(lanes.div_ceil(LANE_GROUP)), Vec::with_capacity(lanes));
    for part in parts {
        let part = part?;
        let shift = u32::try_from(words.len()).map_err(|_| too_large())?;
        bases.extend(part.bases.iter().map(|&b| b + shift));
        starts.extend_from_slice(&part.starts);
        words.extend_from_slice(&part.words);
    }
    u32::try_from(words.len() + 2).map_err(|_| too_large())?;
    words.extend([0, 0]);
    starts.resize(lanes.next_multiple_of(2), 0);
    let mut offsets = bases;
    offsets.extend(starts.chunks(2).map(|p| u32::from(p[0]) | u32::from(p[1]) << 16));
    let raw = raw_bytes(data, threads);
    Ok(Encoded { words, offsets, lanes, raw, table: decode_tables(&lengths), lengths })
}

fn histogram(data: &[u16], threads: usize) -> [u64; 256] {
    let chunk = data.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let parts: Vec<_> = data
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut counts = [0u64; 256];
                    for &w in part {
                        counts[symbol(w) as usize] += 1;
                    }
                    counts
                })
            })
            .collect();
        let mut counts = [0u64; 256];
        for part in parts {
            for (c, p) in counts.iter_mut().zip(part.join().expect("a counting thread panicked")) {
                *c += p;
            }
        }
        counts
    })
}

/// Whole groups of lanes, coded: their words (each group starting on a word), each group's first word and each
/// lane's first bit counted from its group's.
struct Lanes {
    words: Vec<u32>,
    bases: Vec<u32>,
    starts: Vec<u16>,
}

/// Lanes `run` (whole groups, but for the last) coded. The lanes take their elements row by row (row `k` is runs
/// `k * lanes ..`, and the runs of lanes `run` are contiguous in it), so the tensor is read once, in order, however
/// many lanes there are. Fails where a lane starts more than 2^16 bits into its group (lanes of more than about 170
/// elements of 12-bit codes).
fn code_lanes(
    data: &[u16],
    lanes: usize,
    run: std::ops::Range<usize>,
    codes: &[u32; 256],
    lengths: &[u8; 256],
) -> Result<Lanes> {
    let per_lane = data.len() / lanes.max(1) / 8 + 2; // words a lane needs at ~4 bits an element, rounded up
    let mut writers: Vec<BitWriter> =
        run.clone().map(|_| BitWriter { words: Vec::with_capacity(per_lane), ..BitWriter::default() }).collect();
    let span = RUN * run.start..RUN * run.end;
    for row in data.chunks(RUN * lanes) {
        let Some(part) = row.get(span.clone()).or_else(|| row.get(span.start..)) else { break };
        for (bits, elements) in writers.iter_mut().zip(part.chunks(RUN)) {
            for &w in elements {
                let s = symbol(w) as usize;
                bits.put(codes[s], u32::from(lengths[s]));
            }
        }
    }
    let mut out = BitWriter {
        words: Vec::with_capacity(writers.iter().map(|b| b.words.len() + 1).sum()),
        ..BitWriter::default()
    };
    let (mut bases, mut starts) = (Vec::new(), Vec::with_capacity(run.len()));
    for (k, group) in writers.chunks(LANE_GROUP).enumerate() {
        out.align();
        bases.push(out.words.len() as u32); // the caller checks the total fits 32 bits
        let base = out.len();
        for (j, bits) in group.iter().enumerate() {
            let lane = run.start + k * LANE_GROUP + j;
            let start = u16::try_from(out.len() - base).map_err(|_| {
                Error::InvalidArgument(format!(
                    "lossless: lane {lane} starts past 2^16 bits into its group; use more lanes"
                ))
            })?;
            starts.push(start);
            out.append(bits);
        }
    }
    out.align();
    Ok(Lanes { words: out.words, bases, starts })
}

/// The raw byte of every element, split over `threads`.
fn raw_bytes(data: &[u16], threads: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    let chunk = data.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (run, part) in out.chunks_mut(chunk).zip(data.chunks(chunk)) {
            scope.spawn(move || run.iter_mut().zip(part).for_each(|(r, &w)| *r = raw(w)));
        }
    });
    out
}

/// Decode into `out` (as many elements as `raw` holds) from `lanes` lanes: the CPU path, and the reference the GPU
/// kernel is tested against.
pub fn decode(words: &[u32], offsets: &[u32], lanes: usize, raw: &[u8], tables: &[u16], out: &mut [u16]) -> Result<()> {
    if lanes == 0 || out.len() != raw.len() || offsets.len() != offsets_len(lanes) {
        return Err(Error::InvalidArgument(format!(
            "lossless: {lanes} lanes with {} offset words (want {}), {} raw bytes for {} elements",
            offsets.len(),
            offsets_len(lanes),
            raw.len(),
            out.len()
        )));
    }
    let lookup = lookup_table(tables)?;
    let n = out.len();
    for lane in 0..lanes {
        let start = lane_start(offsets, lanes, lane);
        let runs_out =
            || Error::InvalidArgument(format!("lossless: lane {lane} runs past the stream's {} words", words.len()));
        // a 64-bit window, MSB-first: `have` valid bits at its top; `next` the word to load next. The lane's first
        // word goes in without the bits before its start (the lane before's).
        let skip = (start % 32) as u32;
        let mut window = u64::from(*words.get(start / 32).ok_or_else(runs_out)?) << (32 + skip);
        let (mut have, mut next) = (32 - skip, start / 32 + 1);
        for i in (RUN * lane..n).step_by(RUN * lanes).flat_map(|e| e..(e + RUN).min(n)) {
            if have < MAX_CODE_LEN {
                let w = *words.get(next).ok_or_else(runs_out)?;
                window |= u64::from(w) << (32 - have);
                have += 32;
                next += 1;
            }
            let entry = lookup[(window >> (64 - MAX_CODE_LEN)) as usize];
            let len = u32::from(entry >> 8);
            if len == 0 {
                return Err(Error::InvalidArgument(format!("lossless: lane {lane}: no code at element {i}")));
            }
            window <<= len;
            have -= len;
            out[i] = word(entry as u8, raw[i]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(data: &[u16], lanes: usize) -> Encoded {
        let enc = encode(data, lanes).unwrap();
        let mut out = vec![0u16; data.len()];
        decode(&enc.words, &enc.offsets, enc.lanes, &enc.raw, &enc.table, &mut out).unwrap();
        assert_eq!(out, data);
        enc
    }

    #[test]
    fn words_split_and_join() {
        for w in 0..=u16::MAX {
            assert_eq!(word(symbol(w), raw(w)), w);
        }
    }

    #[test]
    fn runs_of_four_are_dealt_to_the_lanes_in_turn() {
        // 13 elements, 2 lanes: elements 0..4 and 8..12 go to lane 0, 4..8 and 12 to lane 1. Lane 0's get symbol 5
        // (code 0), lane 1's symbol 9 (code 1): 8 zero bits, then 5 one bits, in one stream; lane 1 starts at bit 8.
        let data: Vec<u16> = (0..13).map(|i| word(if (i / RUN) % 2 == 0 { 5 } else { 9 }, i as u8)).collect();
        let enc = roundtrip(&data, 2);
        assert_eq!(enc.offsets, [0, 8 << 16]);
        assert_eq!(enc.words, [0b11111 << 19, 0, 0]);
    }

    #[test]
    fn groups_start_on_a_word_and_lanes_on_a_bit() {
        // 34 lanes of one 4-element run each, every symbol but one 1 bit long: lanes 0..32 form group 0, lanes 32 and
        // 33 group 1, which starts on the word after group 0's last bit
        let mut data: Vec<u16> = (0..136).map(|i| word(5, i as u8)).collect();
        data[0] = word(9, 0); // one rarer symbol: codes 0 (symbol 5) and 1 (symbol 9)
        let enc = roundtrip(&data, 34);
        assert_eq!(offsets_len(34), 2 + 17);
        assert_eq!(enc.offsets[..2], [0, 4]); // group 0: 128 bits = 4 words
        let starts: Vec<usize> = (0..34).map(|lane| lane_start(&enc.offsets, 34, lane)).collect();
        let want: Vec<usize> = (0..32).map(|j| 4 * j).chain([128, 132]).collect();
        assert_eq!(starts, want);
        assert_eq!(enc.words.len(), 5 + 2);
        assert_eq!(enc.words[0], 1 << 31); // symbol 9 first: code 1
    }

    #[test]
    fn one_symbol_and_all_symbols() {
        roundtrip(&[0x3f80; 1000], 7);
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let enc = roundtrip(&all, 2048);
        assert!(enc.lengths.iter().all(|&l| l == 8)); // uniform symbols: 8 bits each
        roundtrip(&[], 1);
    }

    #[test]
    fn skewed_counts_fit_the_table() {
        // counts 2^0 .. 2^40 would want codes 40 bits long
        let mut counts = [0u64; 256];
        for (s, c) in counts.iter_mut().enumerate().take(41) {
            *c = 1 << s;
        }
        let lengths = code_lengths(&counts, MAX_CODE_LEN);
        assert!(lengths.iter().all(|&l| u32::from(l) <= MAX_CODE_LEN));
        let kraft: f64 = lengths.iter().filter(|&&l| l > 0).map(|&l| 0.5f64.powi(i32::from(l))).sum();
        assert!(kraft <= 1.0 + 1e-12);
        assert_eq!(lengths.iter().filter(|&&l| l > 0).count(), 41);
    }

    /// Counts 20, 6, 5, 5 of symbols 5, 9, 2, 7: Huffman joins 2+7 (10), then 9+10 (16), then 5+16: lengths 1, 2,
    /// 3, 3; canonical codes 0, 10, 110, 111.
    fn small_code_counts() -> [u64; 256] {
        let mut counts = [0u64; 256];
        (counts[5], counts[9], counts[2], counts[7]) = (20, 6, 5, 5);
        counts
    }

    #[test]
    fn a_small_code_by_hand() {
        let lengths = code_lengths(&small_code_counts(), MAX_CODE_LEN);
        let (present, codes) = ([5, 9, 2, 7], canonical_codes(&lengths));
        assert_eq!(present.map(|s| lengths[s]), [1, 2, 3, 3]);
        assert_eq!(lengths.iter().filter(|&&l| l > 0).count(), 4);
        assert_eq!(present.map(|s| codes[s]), [0b0, 0b10, 0b110, 0b111]);
        // the tables: length l's codes end at (first code + count) << (12 - l); deltas index - first code
        let table = decode_tables(&lengths);
        assert_eq!(table.len(), 288);
        let limits = [0, 1 << 11, 3 << 10, 8 << 9].into_iter().chain([4096; 12]);
        assert_eq!(table[..16], limits.collect::<Vec<u16>>());
        assert_eq!(table[17..20], [0u16, (-1i16) as u16, (-4i16) as u16]);
        assert_eq!(table[32..37], [5, 9, 2, 7, 0]);
        // symbols 5, 5, 9, 2, 7 coded: counts 2, 1, 1, 1 give four 2-bit codes (2: 00, 5: 01, 7: 10, 9: 11), laid
        // MSB-first in one lane's word; the raw bytes keep the sign and the 7 low bits
        let data = [0x0281, 0x82ff, 0x0480, 0x0100, 0x0380];
        assert_eq!(data.map(symbol), [5, 5, 9, 2, 7]);
        let enc = roundtrip(&data, 1);
        assert_eq!(enc.words, [0b01_01_11_00_10 << 22, 0, 0]);
        assert_eq!(enc.offsets, [0, 0]);
        assert_eq!(enc.raw, [0x01, 0xff, 0x00, 0x00, 0x00]);
    }

    #[test]
    fn twelve_bit_codes_round_trip() {
        // 16 symbols 256x as frequent as 240 others: the rare ones get 12-bit codes, met at every refill level
        let mut x: u64 = 7;
        let data: Vec<u16> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let s = if x % 4336 < 4096 { (x >> 16) % 16 } else { 16 + (x >> 16) % 240 };
                word(s as u8, (x >> 40) as u8)
            })
            .collect();
        let enc = roundtrip(&data, 4096);
        assert!(enc.lengths.iter().filter(|&&l| u32::from(l) == MAX_CODE_LEN).count() > 200);
    }

    /// The lookup table straight from the canonical codes: each code's run of 12-bit windows.
    fn lookup_from_codes(lengths: &[u8; 256]) -> Vec<u16> {
        let codes = canonical_codes(lengths);
        let mut table = vec![0u16; 1 << MAX_CODE_LEN];
        for s in 0..256 {
            let len = u32::from(lengths[s]);
            if len > 0 {
                let first = (codes[s] << (MAX_CODE_LEN - len)) as usize;
                table[first..first + (1 << (MAX_CODE_LEN - len))].fill(s as u16 | (len as u16) << 8);
            }
        }
        table
    }

    #[test]
    fn refuses_bad_lanes_and_corrupt_streams() {
        assert!(encode(&[1, 2, 3], 0).is_err());
        assert!(encode(&[1, 2, 3], 4).is_err());
        let enc = encode(&[1, 2, 3, 4], 2).unwrap();
        let mut out = vec![0u16; 4];
        let bad_table = vec![0u16; TABLE_LEN];
        assert!(decode(&enc.words, &enc.offsets, 2, &enc.raw, &bad_table, &mut out).is_err());
        assert!(decode(&enc.words, &[0, 99, 100], 2, &enc.raw, &enc.table, &mut out).is_err()); // offsets too long
        assert!(decode(&enc.words, &[9, 0], 2, &enc.raw, &enc.table, &mut out).is_err()); // past the stream
        assert!(decode(&enc.words, &enc.offsets, 2, &enc.raw, &enc.table, &mut out).is_ok());
        // two lanes of 8-bit codes, 32768 elements each: lane 1 would start 2^18 bits into the group
        let all: Vec<u16> = (0..=u16::MAX).collect();
        assert!(encode(&all, 2).unwrap_err().to_string().contains("lane 1 starts past 2^16 bits into its group"));
        // parts that do not go together: no lanes, or raw bytes for another element count
        assert!(decode(&enc.words, &[], 0, &enc.raw, &enc.table, &mut out).is_err());
        assert!(decode(&enc.words, &enc.offsets, 2, &enc.raw[..3], &enc.table, &mut out).is_err());
        assert!(decode(&enc.words, &enc.offsets, 2, &enc.raw, &enc.table, &mut out[..3]).is_err());
    }

    #[test]
    fn refuses_decode_tables_that_describe_no_code() {
        let good = decode_tables(&code_lengths(&small_code_counts(), MAX_CODE_LEN));
        assert!(lookup_table(&good).is_ok());
        let fault = |edit: &dyn Fn(&mut Vec<u16>)| {
            let mut t = good.clone();
            edit(&mut t);
            lookup_table(&t).unwrap_err().to_string()
        };
        assert!(fault(&|t| t.push(0)).contains("289 entries, want 288"));
        // limits that fall somewhere (lengths 2 and 3 swapped), and limits past the 12-bit windows at the end
        assert!(fault(&|t| t.swap(2, 3)).contains("the limits do not grow"));
        assert!(fault(&|t| t[15] = 4097).contains("the limits do not grow"));
        assert!(fault(&|t| t[2..16].fill(4097)).contains("the limits do not grow"));
        // a length's delta pointing before the first symbol, and a symbol that is no byte
        assert!(fault(&|t| t[18] = (-3i16) as u16).contains("code 0x800 points outside the symbols"));
        assert!(fault(&|t| t[33] = 0x109).contains("code 0x800 decodes to 265, not a byte"));
    }

    proptest! {
        #[test]
        fn compact_tables_describe_the_codes(counts in proptest::collection::vec(0u64..1 << 40, 256),
                                             keep in 1usize..256) {
            let mut c = [0u64; 256];
            for (s, &n) in counts.iter().enumerate().take(keep) {
                c[(s * 97) % 256] = n.max(1) >> (n % 41); // counts spread over 40 octaves, in any symbol order
            }
            let lengths = code_lengths(&c, MAX_CODE_LEN);
            prop_assert_eq!(lookup_table(&decode_tables(&lengths)).unwrap(), lookup_from_codes(&lengths));
        }

        #[test]
        fn any_words_round_trip(data in proptest::collection::vec(any::<u16>(), 1..3000), lanes in 1usize..40) {
            let lanes = lanes.min(data.len());
            roundtrip(&data, lanes);
        }

        #[test]
        fn narrow_exponents_round_trip(data in proptest::collection::vec(0x3b00u16..0x3d00, 1..3000),
                                       signs in any::<u64>(), lanes in 1usize..40) {
            let data: Vec<u16> = data.iter().enumerate()
                .map(|(i, &w)| w | if signs >> (i % 64) & 1 == 1 { 0x8000 } else { 0 }).collect();
            let lanes = lanes.min(data.len());
            roundtrip(&data, lanes);
        }
    }
}
