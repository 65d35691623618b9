//! Philox4x32-10, the counter-based generator of Salmon et al., "Parallel random numbers: as
//! easy as 1, 2, 3" (SC'11; the Random123 library, which cuRAND and PyTorch also use).
//!
//! A counter-based generator is a pure function of (key, counter): the sampler keys it with a
//! request's seed and counts with the position of the token being drawn, so a draw never
//! depends on how many draws came before it, on the batch it ran in, nor on a preemption and
//! recompute. A CUDA kernel computes the same 32-bit words with `__umulhi` and integer adds
//! (docs/sampling.md).

/// Philox4x32's round multipliers.
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
/// Its key schedule increments (the golden ratio and sqrt(3) - 1, as 32-bit fractions).
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// The four output words of Philox4x32 with 10 rounds for `counter` under `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The sampler's 32-bit random word for the token at `position` (0 for a request's first
/// generated token) of a request seeded with `seed`: word 0 of Philox4x32-10 with key
/// (seed low 32 bits, seed high 32 bits) and counter (position low, position high, 0, 0).
/// Counter words 2 and 3 are reserved (0) for other draws a later feature may need.
pub fn draw_word(seed: u64, position: u64) -> u32 {
    philox4x32_10(
        [position as u32, (position >> 32) as u32, 0, 0],
        [seed as u32, (seed >> 32) as u32],
    )[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published known answers of Random123 (its `examples/kat_vectors`, the three
    /// `philox4x32 10` lines: counter, key, expected output), not outputs of this code.
    #[test]
    fn random123_known_answers() {
        let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0, 0, 0, 0],
                [0, 0],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (counter, key, want) in kat {
            assert_eq!(philox4x32_10(counter, key), want, "counter {counter:x?}");
        }
    }

    /// The word is keyed by both halves of the seed and counts with both halves of the
    /// position, and is the KAT's word 0 where they coincide.
    #[test]
    fn draw_word_maps_seed_and_position_onto_key_and_counter() {
        assert_eq!(draw_word(0, 0), 0x6627e8d5);
        let words: Vec<u32> = [
            (0, 0),
            (1, 0),
            (1 << 32, 0),
            (0, 1),
            (0, 1 << 32),
            (u64::MAX, u64::MAX),
        ]
        .iter()
        .map(|&(s, p)| draw_word(s, p))
        .collect();
        for i in 0..words.len() {
            for j in 0..i {
                assert_ne!(words[i], words[j], "draws {i} and {j} coincide");
            }
        }
        assert_eq!(
            draw_word(0x299f31d0_a4093822, 0x85a308d3_243f6a88),
            philox4x32_10([0x243f6a88, 0x85a308d3, 0, 0], [0xa4093822, 0x299f31d0])[0]
        );
    }
}
