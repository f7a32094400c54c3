//! MD5 of several messages at once: the aggregates of one request, checksummed side by side.
//!
//! MD5 is a chain: each of a block's 64 steps needs the one before it, so one message runs at
//! the speed of that chain, about 5 cycles a byte, however many execution units the core has.
//! A request carries dozens of aggregates, each with a checksum of its own. With AVX2, eight of
//! them run in the eight 32-bit lanes of a vector register, one step for all eight at the cost
//! of about one: several times the bytes per cycle. Without AVX2 (or for a single message) each
//! message goes through the `md-5` crate as before. The digests are the same either way; only
//! the speed differs.

use md5::{Digest, Md5};

/// A message as the slices it is made of, in order (an aggregate's protobuf sections).
pub(crate) type Message<'a> = &'a [&'a [u8]];

/// Messages checksummed side by side.
pub(crate) const LANES: usize = 8;

/// Writes the MD5 of each of `messages` to the same place in `out`, up to [`LANES`] at a time.
/// The messages are grouped by length, so that a group's shorter ones wait little for its
/// longest.
pub(crate) fn digests(messages: &[Message<'_>], out: &mut [[u8; 16]]) {
    digests_with(lanes_available(), messages, out);
}

/// [`digests`], side by side only if `lanes` (which needs [`lanes_available`]).
fn digests_with(lanes: bool, messages: &[Message<'_>], out: &mut [[u8; 16]]) {
    assert_eq!(messages.len(), out.len(), "one digest per message");
    if !lanes || messages.len() < 2 {
        for (message, digest) in messages.iter().zip(out.iter_mut()) {
            *digest = digest_one(message.iter().copied());
        }
        return;
    }
    let mut order: Vec<(usize, usize)> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| (m.iter().map(|part| part.len()).sum(), i))
        .collect();
    order.sort_unstable();
    for group in order.chunks(LANES) {
        let mut in_lanes: [Option<Message<'_>>; LANES] = [None; LANES];
        for (lane, &(_, i)) in in_lanes.iter_mut().zip(group) {
            *lane = Some(messages[i]);
        }
        let group_digests = digest_lanes(in_lanes);
        for (&(_, i), digest) in group.iter().zip(group_digests) {
            out[i] = digest;
        }
    }
}

/// The MD5 of one message given as its parts, with the `md-5` crate.
pub(crate) fn digest_one<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 16] {
    let mut md5 = Md5::new();
    for part in parts {
        md5.update(part);
    }
    md5.finalize().into()
}

/// Whether this CPU has AVX2 (std caches the answer).
#[cfg(target_arch = "x86_64")]
fn lanes_available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(not(target_arch = "x86_64"))]
fn lanes_available() -> bool {
    false
}

/// Digests of up to eight messages (`None` lanes give nothing worth reading). Only called
/// when [`lanes_available`].
#[cfg(target_arch = "x86_64")]
fn digest_lanes(messages: [Option<Message<'_>>; LANES]) -> [[u8; 16]; LANES] {
    let mut lanes = messages.map(|m| Blocks::new(m.unwrap_or(&[])));
    let mut live = [false; LANES];
    for (live, message) in live.iter_mut().zip(&messages) {
        *live = message.is_some();
    }
    let rounds = lanes.iter().map(|l| l.count).max().unwrap_or(0);
    let mut state = avx2::State::new();
    let mut out = [[0u8; 16]; LANES];
    for round in 0..rounds {
        let mut blocks = [ZERO_BLOCK.as_ptr(); LANES];
        for (block, lane) in blocks.iter_mut().zip(lanes.iter_mut()) {
            if round < lane.count {
                *block = lane.next_block();
            }
        }
        // SAFETY: `lanes_available` checked that the CPU has AVX2; each pointer is to 64
        // readable bytes (a whole block inside a part, a lane's staging block, or
        // `ZERO_BLOCK`), and the lanes are not touched until the call returns.
        unsafe { state.compress(&blocks) };
        for (i, lane) in lanes.iter().enumerate() {
            if live[i] && lane.count == round + 1 {
                out[i] = state.digest(i);
            }
        }
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
fn digest_lanes(_: [Option<Message<'_>>; LANES]) -> [[u8; 16]; LANES] {
    unreachable!("no lanes without AVX2")
}

/// What a lane reads once its message is done: its state is no longer looked at.
static ZERO_BLOCK: [u8; 64] = [0; 64];

/// A message's 64-byte blocks, padded as MD5 pads: a 0x80 byte, zeros, and the length in
/// bits (little-endian) in the last 8 bytes of the last block.
struct Blocks<'a> {
    parts: Message<'a>,
    /// The part being read and the offset in it.
    part: usize,
    at: usize,
    /// Bytes of the message, and blocks with the padding.
    len: u64,
    count: usize,
    /// The 0x80 after the message is written.
    marked: bool,
    /// A block put together here: one that spans parts, or holds the padding.
    staging: [u8; 64],
}

impl<'a> Blocks<'a> {
    fn new(parts: Message<'a>) -> Self {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        Blocks {
            parts,
            part: 0,
            at: 0,
            len,
            count: (len / 64 + 1 + u64::from(len % 64 >= 56)) as usize,
            marked: false,
            staging: [0; 64],
        }
    }

    /// The next block: inside a part when it lies whole in one, else in `staging`. Valid until
    /// the next call; not called more than `count` times.
    fn next_block(&mut self) -> *const u8 {
        while self.part < self.parts.len() && self.at == self.parts[self.part].len() {
            self.part += 1;
            self.at = 0;
        }
        if let Some(part) = self.parts.get(self.part) {
            if part.len() - self.at >= 64 {
                let block = part[self.at..].as_ptr();
                self.at += 64;
                return block;
            }
        }
        let mut filled = 0;
        while filled < 64 && self.part < self.parts.len() {
            let part = self.parts[self.part];
            let take = (part.len() - self.at).min(64 - filled);
            self.staging[filled..filled + take].copy_from_slice(&part[self.at..self.at + take]);
            filled += take;
            self.at += take;
            if self.at == part.len() {
                self.part += 1;
                self.at = 0;
            }
        }
        if filled < 64 {
            self.staging[filled..].fill(0);
            if !self.marked {
                self.staging[filled] = 0x80;
                self.marked = true;
                filled += 1;
            }
            if filled <= 56 {
                self.staging[56..].copy_from_slice(&self.len.wrapping_mul(8).to_le_bytes());
            }
        }
        self.staging.as_ptr()
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// The four MD5 words of eight messages, word by word, one message per lane. Kept in
    /// memory between blocks: vector values only live inside the functions compiled for them.
    pub(super) struct State([[u32; LANES]; 4]);

    impl State {
        pub fn new() -> Self {
            State([0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476].map(|word| [word; LANES]))
        }

        /// The digest of lane `lane`, as MD5 writes it (little-endian words).
        pub fn digest(&self, lane: usize) -> [u8; 16] {
            let mut out = [0u8; 16];
            for (bytes, word) in out.chunks_exact_mut(4).zip(&self.0) {
                bytes.copy_from_slice(&word[lane].to_le_bytes());
            }
            out
        }

        /// Runs one block of each lane through MD5's 64 steps.
        ///
        /// # Safety
        /// The CPU must have AVX2, and each pointer must be to 64 readable bytes.
        pub unsafe fn compress(&mut self, blocks: &[*const u8; LANES]) {
            unsafe { compress_avx2(&mut self.0, blocks) }
        }
    }

    // The round functions: F = (b & c) | (!b & d), G = (b & d) | (c & !d), H = b ^ c ^ d,
    // I = c ^ (b | !d). (AVX-512's one-instruction forms and rotation were tried: no faster
    // here.)
    macro_rules! f2 {
        ($b:expr, $c:expr, $d:expr) => {
            _mm256_xor_si256($d, _mm256_and_si256($b, _mm256_xor_si256($c, $d)))
        };
    }
    macro_rules! g2 {
        ($b:expr, $c:expr, $d:expr) => {
            _mm256_xor_si256($c, _mm256_and_si256($d, _mm256_xor_si256($b, $c)))
        };
    }
    macro_rules! h2 {
        ($b:expr, $c:expr, $d:expr) => {
            _mm256_xor_si256(_mm256_xor_si256($b, $c), $d)
        };
    }
    macro_rules! i2 {
        ($b:expr, $c:expr, $d:expr) => {
            _mm256_xor_si256(
                $c,
                _mm256_or_si256($b, _mm256_xor_si256($d, _mm256_set1_epi32(-1))),
            )
        };
    }
    macro_rules! rotl2 {
        ($x:expr, $s:expr) => {
            _mm256_or_si256(
                _mm256_slli_epi32::<$s>($x),
                _mm256_srli_epi32::<{ 32 - $s }>($x),
            )
        };
    }
    /// One MD5 step: `w = x + rotl(w + f(x, y, z) + k + m[word], s)`.
    macro_rules! md5_step {
        ($rotl:ident, $f:ident, $m:ident, $w:ident, $x:ident, $y:ident, $z:ident, $word:expr, $k:expr, $s:expr) => {
            let sum = _mm256_add_epi32(
                _mm256_add_epi32($w, $f!($x, $y, $z)),
                _mm256_add_epi32(
                    $m[$word],
                    _mm256_set1_epi32({
                        let k: u32 = $k;
                        k as i32
                    }),
                ),
            );
            $w = _mm256_add_epi32($x, $rotl!(sum, $s));
        };
    }

    /// One round of 16 steps, four at a time with the words' roles turning.
    macro_rules! md5_round {
        (($rotl:ident, $f:ident, $m:ident, $a:ident, $b:ident, $c:ident, $d:ident), [$($w0:expr, $w1:expr, $w2:expr, $w3:expr),*], [$($k0:expr, $k1:expr, $k2:expr, $k3:expr),*], $s0:expr, $s1:expr, $s2:expr, $s3:expr) => {
            $(
                md5_step!($rotl, $f, $m, $a, $b, $c, $d, $w0, $k0, $s0);
                md5_step!($rotl, $f, $m, $d, $a, $b, $c, $w1, $k1, $s1);
                md5_step!($rotl, $f, $m, $c, $d, $a, $b, $w2, $k2, $s2);
                md5_step!($rotl, $f, $m, $b, $c, $d, $a, $w3, $k3, $s3);
            )*
        };
    }

    /// One block of each lane through MD5's 64 steps.
    ///
    /// # Safety
    /// The CPU must have AVX2, and each pointer must be to 64 readable bytes.
    #[target_feature(enable = "avx2")]
    unsafe fn compress_avx2(state: &mut [[u32; LANES]; 4], blocks: &[*const u8; LANES]) {
        let m = unsafe { load_words(blocks) };
        // SAFETY: unaligned loads of 32 bytes from arrays of 32 bytes.
        let start = state.map(|word| unsafe { _mm256_loadu_si256(word.as_ptr().cast()) });
        let [mut a, mut b, mut c, mut d] = start;
        md5_round!(
            (rotl2, f2, m, a, b, c, d),
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            [
                0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613,
                0xfd469501, 0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193,
                0xa679438e, 0x49b40821
            ],
            7,
            12,
            17,
            22
        );
        md5_round!(
            (rotl2, g2, m, a, b, c, d),
            [1, 6, 11, 0, 5, 10, 15, 4, 9, 14, 3, 8, 13, 2, 7, 12],
            [
                0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681,
                0xe7d3fbc8, 0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8,
                0x676f02d9, 0x8d2a4c8a
            ],
            5,
            9,
            14,
            20
        );
        md5_round!(
            (rotl2, h2, m, a, b, c, d),
            [5, 8, 11, 14, 1, 4, 7, 10, 13, 0, 3, 6, 9, 12, 15, 2],
            [
                0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60,
                0xbebfbc70, 0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5,
                0x1fa27cf8, 0xc4ac5665
            ],
            4,
            11,
            16,
            23
        );
        md5_round!(
            (rotl2, i2, m, a, b, c, d),
            [0, 7, 14, 5, 12, 3, 10, 1, 8, 15, 6, 13, 4, 11, 2, 9],
            [
                0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d,
                0x85845dd1, 0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235,
                0x2ad7d2bb, 0xeb86d391
            ],
            6,
            10,
            15,
            21
        );
        for ((word, start), end) in state.iter_mut().zip(start).zip([a, b, c, d]) {
            // SAFETY: an unaligned store of 32 bytes into an array of 32 bytes.
            unsafe { _mm256_storeu_si256(word.as_mut_ptr().cast(), _mm256_add_epi32(start, end)) };
        }
    }

    /// The 16 message words of each lane's block, word `k` of every lane in vector `k`: two
    /// 8×8 transposes of 32-bit words.
    ///
    /// # Safety
    /// AVX2, and 64 readable bytes at each pointer.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load_words(blocks: &[*const u8; LANES]) -> [__m256i; 16] {
        let mut words = [_mm256_setzero_si256(); 16];
        for half in 0..2 {
            let mut row = [_mm256_setzero_si256(); LANES];
            for (row, block) in row.iter_mut().zip(blocks) {
                // SAFETY: bytes 0..32 or 32..64 of a 64-byte block.
                *row = unsafe { _mm256_loadu_si256(block.add(half * 32).cast::<__m256i>()) };
            }
            let t0 = _mm256_unpacklo_epi32(row[0], row[1]);
            let t1 = _mm256_unpackhi_epi32(row[0], row[1]);
            let t2 = _mm256_unpacklo_epi32(row[2], row[3]);
            let t3 = _mm256_unpackhi_epi32(row[2], row[3]);
            let t4 = _mm256_unpacklo_epi32(row[4], row[5]);
            let t5 = _mm256_unpackhi_epi32(row[4], row[5]);
            let t6 = _mm256_unpacklo_epi32(row[6], row[7]);
            let t7 = _mm256_unpackhi_epi32(row[6], row[7]);
            let u0 = _mm256_unpacklo_epi64(t0, t2);
            let u1 = _mm256_unpackhi_epi64(t0, t2);
            let u2 = _mm256_unpacklo_epi64(t1, t3);
            let u3 = _mm256_unpackhi_epi64(t1, t3);
            let u4 = _mm256_unpacklo_epi64(t4, t6);
            let u5 = _mm256_unpackhi_epi64(t4, t6);
            let u6 = _mm256_unpacklo_epi64(t5, t7);
            let u7 = _mm256_unpackhi_epi64(t5, t7);
            let w = &mut words[half * 8..half * 8 + 8];
            w[0] = _mm256_permute2x128_si256::<0x20>(u0, u4);
            w[1] = _mm256_permute2x128_si256::<0x20>(u1, u5);
            w[2] = _mm256_permute2x128_si256::<0x20>(u2, u6);
            w[3] = _mm256_permute2x128_si256::<0x20>(u3, u7);
            w[4] = _mm256_permute2x128_si256::<0x31>(u0, u4);
            w[5] = _mm256_permute2x128_si256::<0x31>(u1, u5);
            w[6] = _mm256_permute2x128_si256::<0x31>(u2, u6);
            w[7] = _mm256_permute2x128_si256::<0x31>(u3, u7);
        }
        words
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::xorshift64;

    fn md5_of(parts: &[&[u8]]) -> [u8; 16] {
        Md5::digest(parts.concat()).into()
    }

    /// Every way this CPU can compute the digests: one by one, and side by side if it can.
    fn kernels() -> Vec<bool> {
        if lanes_available() {
            vec![false, true]
        } else {
            vec![false]
        }
    }

    /// `digests_with` for each of [`kernels`], checked against `md-5` on the whole message.
    fn check_all_kernels(messages: &[Vec<&[u8]>]) {
        let views: Vec<Message<'_>> = messages.iter().map(Vec::as_slice).collect();
        for kernel in kernels() {
            let mut out = vec![[0u8; 16]; views.len()];
            digests_with(kernel, &views, &mut out);
            for (parts, digest) in messages.iter().zip(&out) {
                let len: usize = parts.iter().map(|p| p.len()).sum();
                assert_eq!(*digest, md5_of(parts), "lanes {kernel}, {len} bytes");
            }
        }
    }

    #[test]
    fn every_length_around_the_padding_boundaries_matches_md5() {
        let bytes: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        let lengths: Vec<usize> = (0..=200).chain([255, 256, 257, 299, 300]).collect();
        for group in lengths.chunks(LANES + 3) {
            let messages: Vec<Vec<&[u8]>> = group.iter().map(|&n| vec![&bytes[..n]]).collect();
            check_all_kernels(&messages);
        }
    }

    #[test]
    fn messages_split_anywhere_and_of_any_lengths_match_md5() {
        let mut next = xorshift64(0x5eed);
        let bytes: Vec<u8> = (0..70_000).map(|_| next() as u8).collect();
        for count in [1, 2, 7, 8, 9, 17, 40] {
            let mut messages: Vec<Vec<&[u8]>> = Vec::new();
            for _ in 0..count {
                let len = match next() % 4 {
                    0 => (next() % 130) as usize,
                    1 => (next() % 5_000) as usize,
                    _ => (next() % 60_000) as usize,
                };
                let start = (next() % 10_000) as usize;
                let mut parts = Vec::new();
                let mut at = start;
                while at < start + len {
                    let piece = ((next() % 200) as usize).min(start + len - at);
                    parts.push(&bytes[at..at + piece]);
                    at += piece;
                    if next().is_multiple_of(5) {
                        parts.push(&[][..]);
                    }
                }
                messages.push(parts);
            }
            check_all_kernels(&messages);
        }
    }

    #[test]
    fn no_messages_give_no_digests() {
        digests(&[], &mut []);
    }

    #[test]
    fn a_known_digest_comes_out_of_every_lane() {
        // RFC 1321's test suite: "message digest".
        let expected = [
            0xf9, 0x6b, 0x69, 0x7d, 0x7c, 0xb7, 0x93, 0x8d, 0x52, 0x5a, 0x2f, 0x31, 0xaa, 0xf1,
            0x61, 0xd0,
        ];
        let message: &[&[u8]] = &[b"message ", b"digest"];
        for kernel in kernels() {
            let mut out = [[0u8; 16]; LANES];
            digests_with(kernel, &[message; LANES], &mut out);
            assert_eq!(out, [expected; LANES], "lanes {kernel}");
        }
    }
}
