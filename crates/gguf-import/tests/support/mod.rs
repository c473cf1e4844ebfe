//! Test support: a small GGUF writer, ggml block builders and llama.cpp's
//! dequantization formulas, written independently of the crate under test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod gguf_writer;
pub mod tiny_model;

use half::f16;

/// A deterministic xorshift generator, so test data is varied but fixed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A float in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() % 2001) as f32 / 1000.0 - 1.0
    }
}

/// llama.cpp's `dequantize_row_q4_0`.
pub fn ref_q4_0(block: &[u8]) -> Vec<f32> {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let mut y = vec![0.0; 32];
    for j in 0..16 {
        let x0 = i32::from(block[2 + j] & 0x0f) - 8;
        let x1 = i32::from(block[2 + j] >> 4) - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
    y
}

/// llama.cpp's `dequantize_row_q4_1`.
pub fn ref_q4_1(block: &[u8]) -> Vec<f32> {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
    let mut y = vec![0.0; 32];
    for j in 0..16 {
        let x0 = block[4 + j] & 0x0f;
        let x1 = block[4 + j] >> 4;
        y[j] = f32::from(x0) * d + m;
        y[j + 16] = f32::from(x1) * d + m;
    }
    y
}

/// llama.cpp's `dequantize_row_q8_0`.
pub fn ref_q8_0(block: &[u8]) -> Vec<f32> {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    (0..32).map(|j| f32::from(block[2 + j] as i8) * d).collect()
}

/// A random Q4_0 block with scale `d`.
pub fn q4_0_block(rng: &mut Rng, d: f32) -> Vec<u8> {
    let mut b = f16::from_f32(d).to_le_bytes().to_vec();
    b.extend((0..16).map(|_| rng.next() as u8));
    b
}

/// A random Q4_1 block with scale `d` and minimum `m`.
pub fn q4_1_block(rng: &mut Rng, d: f32, m: f32) -> Vec<u8> {
    let mut b = f16::from_f32(d).to_le_bytes().to_vec();
    b.extend_from_slice(&f16::from_f32(m).to_le_bytes());
    b.extend((0..16).map(|_| rng.next() as u8));
    b
}

/// A random Q8_0 block with scale `d`.
pub fn q8_0_block(rng: &mut Rng, d: f32) -> Vec<u8> {
    let mut b = f16::from_f32(d).to_le_bytes().to_vec();
    b.extend((0..32).map(|_| rng.next() as u8));
    b
}

/// MLX's affine dequantization of one row-major matrix, written from the
/// format's definition: `bits`-bit values packed into little-endian uint32
/// words, first value in the lowest bits; `w = scale * q + bias` per group.
pub fn mlx_dequantize(
    weight: &[u8],
    scales: &[u8],
    biases: &[u8],
    rows: usize,
    cols: usize,
    bits: usize,
    group: usize,
) -> Vec<f32> {
    let words: Vec<u32> = weight
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let halves = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    };
    let (s, bi) = (halves(scales), halves(biases));
    let per_word = 32 / bits;
    let words_per_row = cols / per_word;
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let w = words[r * words_per_row + c / per_word];
            let q = (w >> (bits * (c % per_word))) & mask;
            let g = r * (cols / group) + c / group;
            out.push(s[g] * q as f32 + bi[g]);
        }
    }
    out
}

/// llama.cpp's converter permutation (`convert_hf_to_gguf.py`'s `permute`):
/// rows reshaped to `(n_head, 2, head_dim / 2)`, the last two axes swapped.
/// Returns, for each GGUF row, the Hugging Face row it holds.
pub fn llama_cpp_permutation(rows: usize, n_head: usize) -> Vec<usize> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut perm = Vec::with_capacity(rows);
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                perm.push(h * head_dim + j * half + i);
            }
        }
    }
    perm
}
