//! The scheduling rule of one engine step, as a pure function: which waiting requests are
//! admitted (prefilled) and which running ones decode.
//!
//! Every running sequence decodes every step (iteration-level, continuous batching). Prompts are
//! prefilled in chunks under a per-step token budget, so a long prompt never stalls the running
//! streams for more than one chunk's time: the engine first continues the prompts already being
//! prefilled, then this plan admits waiting requests, first come, first served, while a batch
//! slot is free, budget is left (an admitted prompt's first chunk takes what is left, at most
//! its length; the rest follows in later steps) and the KV cache has free blocks for its whole
//! prompt, after what the prompts being prefilled still need, on top of a reserve for the
//! running sequences: the blocks their decode needs this step plus a watermark of 1% of the
//! cache (at least one block) while anything runs, none when a block holds a whole context
//! (slots that never grow, as the CUDA engine's). A request
//! that does not fit waits, and so do the ones behind it (no overtaking, so a long prompt is not
//! starved by short ones).

use super::request::RequestId;

/// Limits of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Sequences running at once (bounded by the KV-cache slots).
    pub max_running: usize,
    /// Prompt tokens this step may still prefill (the engine's per-step budget, less what the
    /// prompts already being prefilled took).
    pub max_prefill_tokens: usize,
    /// KV-cache blocks free before the step.
    pub free_blocks: usize,
    /// Positions per block.
    pub block_tokens: usize,
    /// Blocks the running sequences' decode takes this step.
    pub decode_blocks: usize,
    /// Blocks kept free while anything runs, for the running sequences to grow into.
    pub watermark_blocks: usize,
    /// Blocks the prompts being prefilled will still take for their remaining chunks.
    pub pending_blocks: usize,
}

/// The watermark for a cache of `total_blocks`: 1%, at least one block.
pub fn watermark(total_blocks: usize) -> usize {
    total_blocks.div_ceil(100).max(1)
}

/// The work of one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Requests to admit and prefill, in order.
    pub prefill: Vec<RequestId>,
    /// The first chunk of each admitted request: prompt tokens prefilled this step.
    pub chunks: Vec<usize>,
    /// Running requests to decode together.
    pub decode: Vec<RequestId>,
}

/// Plans a step: `waiting` in arrival order with their prompt lengths, `running` as they are
/// (prompts still being prefilled included: they hold a batch slot).
pub fn plan(waiting: &[(RequestId, usize)], running: &[RequestId], limits: Limits) -> Plan {
    let mut p = Plan {
        prefill: Vec::new(),
        chunks: Vec::new(),
        decode: running.to_vec(),
    };
    let mut budget = limits.max_prefill_tokens;
    let mut free = limits
        .free_blocks
        .saturating_sub(limits.decode_blocks + limits.pending_blocks);
    for &(id, len) in waiting {
        if running.len() + p.prefill.len() >= limits.max_running || budget == 0 {
            break;
        }
        let need = len.div_ceil(limits.block_tokens.max(1));
        let busy = !(running.is_empty() && p.prefill.is_empty());
        let reserve = if busy { limits.watermark_blocks } else { 0 };
        if need + reserve > free {
            break;
        }
        free -= need;
        let chunk = len.min(budget);
        budget -= chunk;
        p.prefill.push(id);
        p.chunks.push(chunk);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<RequestId> {
        v.iter().map(|&i| RequestId(i)).collect()
    }

    /// Limits with a KV cache that never binds.
    fn roomy(max_running: usize, max_prefill_tokens: usize) -> Limits {
        Limits {
            max_running,
            max_prefill_tokens,
            free_blocks: 1 << 20,
            block_tokens: 16,
            decode_blocks: 0,
            watermark_blocks: 1,
            pending_blocks: 0,
        }
    }

    #[test]
    fn admits_in_order_up_to_the_slots() {
        let lim = roomy(3, 1000);
        let w = [(RequestId(5), 10), (RequestId(6), 10), (RequestId(7), 10)];
        let p = plan(&w, &ids(&[1]), lim);
        assert_eq!(p.prefill, ids(&[5, 6]));
        assert_eq!(p.decode, ids(&[1]));
        assert_eq!(plan(&w, &ids(&[1, 2, 3]), lim).prefill, vec![]);
    }

    #[test]
    fn prefill_budget_is_shared_out_in_chunks() {
        let lim = roomy(8, 100);
        // A prompt longer than the budget starts with a chunk of the whole budget.
        let w = [(RequestId(1), 500), (RequestId(2), 10)];
        let p = plan(&w, &[], lim);
        assert_eq!((p.prefill, p.chunks), (ids(&[1]), vec![100]));
        // Whole prompts while they fit, then the next one's first chunk takes the rest.
        let w = [(RequestId(1), 60), (RequestId(2), 30), (RequestId(3), 30)];
        let p = plan(&w, &[], lim);
        assert_eq!((p.prefill, p.chunks), (ids(&[1, 2, 3]), vec![60, 30, 10]));
        // No budget left (taken by prompts being prefilled): nothing is admitted.
        assert_eq!(plan(&w, &ids(&[7]), roomy(8, 0)).prefill, vec![]);
    }

    #[test]
    fn blocks_promised_to_prompts_being_prefilled_are_not_handed_out_again() {
        // 10 free blocks, of which 6 are still owed to a prompt being prefilled.
        let lim = Limits {
            free_blocks: 10,
            pending_blocks: 6,
            ..roomy(8, 10_000)
        };
        // 48 tokens = 3 blocks: 3 + watermark 1 ≤ 4; 49 tokens = 4 blocks do not fit.
        assert_eq!(
            plan(&[(RequestId(2), 48)], &ids(&[1]), lim).prefill,
            ids(&[2])
        );
        assert_eq!(plan(&[(RequestId(2), 49)], &ids(&[1]), lim).prefill, vec![]);
    }

    #[test]
    fn admits_only_what_the_free_blocks_hold_above_the_reserve() {
        // 10 free blocks of 16 tokens; the running sequences need 2 this step, watermark 1.
        let lim = Limits {
            free_blocks: 10,
            decode_blocks: 2,
            watermark_blocks: 1,
            ..roomy(8, 10_000)
        };
        // 100 tokens = 7 blocks: 7 + 1 ≤ 8, admitted; then 17 tokens = 2 blocks: 2 + 1 > 1.
        let w = [(RequestId(1), 100), (RequestId(2), 17), (RequestId(3), 1)];
        assert_eq!(plan(&w, &ids(&[9]), lim).prefill, ids(&[1]));
        // Nothing running: no watermark and no decode reserve; 10 blocks hold 160 tokens.
        let lim = Limits {
            decode_blocks: 0,
            ..lim
        };
        assert_eq!(plan(&[(RequestId(1), 160)], &[], lim).prefill, ids(&[1]));
        assert_eq!(plan(&[(RequestId(1), 161)], &[], lim).prefill, vec![]);
        // The first in line that does not fit blocks the ones behind it (no overtaking).
        let w = [(RequestId(1), 161), (RequestId(2), 1)];
        assert_eq!(plan(&w, &[], lim).prefill, vec![]);
    }

    #[test]
    fn watermark_is_one_percent_at_least_one_block() {
        assert_eq!(watermark(0), 1);
        assert_eq!(watermark(8), 1);
        assert_eq!(watermark(1000), 10);
        assert_eq!(watermark(1001), 11);
    }
}
