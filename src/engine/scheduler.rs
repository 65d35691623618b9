//! The scheduling rule of one engine step, as a pure function: which waiting requests are
//! admitted (prefilled) and which running ones decode, and how many prompt tokens a step's
//! budget holds.
//!
//! Every running sequence decodes every step (iteration-level, continuous batching). Prompts are
//! prefilled in chunks under a per-step [`PrefillBudget`], so a long prompt never stalls the
//! running streams for more than one chunk's time: the engine first continues the prompts
//! already being prefilled, then this plan admits waiting requests, first come, first served,
//! while a batch slot is free, budget is left (an admitted prompt's first chunk takes what is
//! left, at most its length; the rest follows in later steps) and the KV cache has free blocks
//! for its whole prompt, after what the prompts being prefilled still need, on top of a reserve
//! for the running sequences: the blocks their decode needs this step plus a watermark of 1% of
//! the cache (at least one block) while anything runs, none when a block holds a whole context
//! (slots that never grow, as the CUDA engine's). A request
//! that does not fit waits, and so do the ones behind it (no overtaking, so a long prompt is not
//! starved by short ones).
//!
//! The budget counts prompt tokens (a fixed cap) and, when the engine paces long prompts against
//! the running streams (`super::pacing`), work units of a [`CostModel`]: a prompt token costs its
//! share of the weight products plus attention over every position before it, so a chunk late
//! in a long prompt holds fewer tokens than an early one for the same step time. Short prompts
//! (at most [`PrefillBudget::short`] tokens to prefill) are never paced: the token cap alone
//! limits them, so a burst of short requests is admitted together, whole prompts in one step
//! while the cap has room, as a serving engine's per-step token budget does (vLLM's
//! `max_num_batched_tokens`), while a long prompt is spread thin enough that the streams barely
//! notice it.

use super::request::RequestId;
use crate::model::LlamaConfig;

/// The work of prompt rows in abstract units (floating-point operations of the forward pass),
/// from the model's shape: each row goes through every weight product, attends over its own
/// context, and each chunk's last row goes through `lm_head` for its logits. Decode rows are not
/// priced: a decode-only step is bound by reading the weights, and its time is measured instead
/// (`super::pacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CostModel {
    /// Units of one row through the weight products of every layer.
    pub row: u64,
    /// Units of one row's attention per position of its context (scores and weighted values,
    /// every layer and query head).
    pub per_context: u64,
    /// Units of one row through `lm_head` (once per chunk).
    pub head: u64,
}

impl CostModel {
    /// The model of a Llama configuration: 2 units per multiply-add.
    pub fn for_config(cfg: &LlamaConfig) -> Self {
        let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
        let q = (cfg.num_attention_heads * cfg.head_dim) as u64;
        let kv = (cfg.num_key_value_heads * cfg.head_dim) as u64;
        let layer = h * q + 2 * h * kv + q * h + 3 * h * i;
        let layers = cfg.num_hidden_layers as u64;
        Self {
            row: 2 * layers * layer,
            per_context: 4 * layers * q,
            head: 2 * h * cfg.vocab_size as u64,
        }
    }

    /// Units of a chunk of `tokens` prompt rows at positions `start..start + tokens` (the row at
    /// position p attends over p + 1 positions); nothing for an empty chunk.
    pub fn chunk(&self, start: usize, tokens: usize) -> u64 {
        if tokens == 0 {
            return 0;
        }
        let (s, k) = (start as u64, tokens as u64);
        // Σ_{p=s}^{s+k-1} (p + 1) = k·s + k(k+1)/2.
        let positions = k.saturating_mul(s).saturating_add(k * (k + 1) / 2);
        k.saturating_mul(self.row)
            .saturating_add(positions.saturating_mul(self.per_context))
            .saturating_add(self.head)
    }
}

/// What a step may still spend on prompt chunks: prompt tokens (the fixed cap of
/// `EngineOptions::max_prefill_tokens`) and, when paced, cost units of a [`CostModel`] for the
/// long prompts' chunks. A short prompt (at most `short` tokens to prefill) is limited by the
/// tokens alone; its chunk still spends the units it costs, so a long prompt's chunk after it
/// in the same step gets what is left. The step's first long chunk gets at least `floor` tokens
/// (as many as are left, if fewer) whatever they cost, so a long prompt always progresses, and
/// by chunks big enough to be worth a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillBudget {
    /// Prompt tokens left.
    pub tokens: usize,
    /// Cost units left for long prompts' chunks; `None` for no limit but the tokens.
    pub units: Option<u64>,
    /// Tokens the step's first long chunk gets at least (within `tokens` and its prompt).
    pub floor: usize,
    /// Prompts of at most this many tokens to prefill are short: the units do not limit them.
    pub short: usize,
    /// Whether a long prompt's chunk was taken from this budget already.
    pub started: bool,
}

impl PrefillBudget {
    /// A budget of `tokens` prompt tokens, any cost.
    pub fn tokens(tokens: usize) -> Self {
        Self {
            tokens,
            units: None,
            floor: 1,
            short: 0,
            started: false,
        }
    }

    /// A budget of at most `tokens` prompt tokens, of which long prompts' chunks cost at most
    /// `units`, but at least `floor` tokens for the first of them; prompts of at most `short`
    /// tokens are limited by the tokens alone.
    pub fn paced(tokens: usize, units: u64, floor: usize, short: usize) -> Self {
        Self {
            tokens,
            units: Some(units),
            floor,
            short,
            started: false,
        }
    }

    /// Whether a prompt of `len` tokens to prefill is paced by the units (a long one).
    pub fn paces(&self, len: usize) -> bool {
        self.units.is_some() && len > self.short
    }

    /// The longest next chunk that the budget holds of a prompt of `len` tokens whose next
    /// position is `start`: the rest of a short prompt within the tokens left; for a long one,
    /// what the units hold, but at least `floor` tokens for the step's first long chunk, within
    /// the tokens left. Takes nothing.
    pub fn fit(&self, cost: &CostModel, start: usize, len: usize) -> usize {
        let most = len.saturating_sub(start).min(self.tokens);
        let Some(units) = self.units.filter(|_| self.paces(len)) else {
            return most;
        };
        // The cost grows with the chunk: the largest k with cost(k) ≤ units.
        let (mut lo, mut hi) = (0, most);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if cost.chunk(start, mid) <= units {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        if self.started {
            lo
        } else {
            lo.max(most.min(self.floor.max(1)))
        }
    }

    /// Spends a chunk of `tokens` at `start` of a prompt of `len` tokens.
    pub fn take(&mut self, cost: &CostModel, start: usize, len: usize, tokens: usize) {
        if tokens == 0 {
            return;
        }
        self.tokens = self.tokens.saturating_sub(tokens);
        if let Some(u) = &mut self.units {
            *u = u.saturating_sub(cost.chunk(start, tokens));
        }
        self.started |= self.paces(len);
    }
}

/// Limits of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Sequences running at once (bounded by the KV-cache slots).
    pub max_running: usize,
    /// What this step may still prefill (the engine's per-step budget, less what the prompts
    /// already being prefilled took).
    pub prefill: PrefillBudget,
    /// The cost of prompt rows, for a paced budget.
    pub cost: CostModel,
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
    let mut budget = limits.prefill;
    let mut free = limits
        .free_blocks
        .saturating_sub(limits.decode_blocks + limits.pending_blocks);
    for &(id, len) in waiting {
        if running.len() + p.prefill.len() >= limits.max_running {
            break;
        }
        // An admitted prompt starts at position 0.
        let chunk = budget.fit(&limits.cost, 0, len);
        if chunk == 0 {
            break;
        }
        let need = len.div_ceil(limits.block_tokens.max(1));
        let busy = !(running.is_empty() && p.prefill.is_empty());
        let reserve = if busy { limits.watermark_blocks } else { 0 };
        if need + reserve > free {
            break;
        }
        free -= need;
        budget.take(&limits.cost, 0, len, chunk);
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

    /// A model whose row costs 100 units, plus 1 per position of its context, and 10 for
    /// `lm_head`.
    const SMALL: CostModel = CostModel {
        row: 100,
        per_context: 1,
        head: 10,
    };

    /// Limits with a KV cache that never binds.
    fn roomy(max_running: usize, max_prefill_tokens: usize) -> Limits {
        Limits {
            max_running,
            prefill: PrefillBudget::tokens(max_prefill_tokens),
            cost: SMALL,
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

    /// The cost of a chunk, one row at a time.
    fn summed(c: &CostModel, start: usize, tokens: usize) -> u64 {
        let rows: u64 = (start..start + tokens)
            .map(|p| c.row + c.per_context * (p as u64 + 1))
            .sum();
        rows + if tokens > 0 { c.head } else { 0 }
    }

    #[test]
    fn a_chunk_costs_its_rows_weights_and_their_attention_over_the_prefix() {
        let cfg = crate::model::LlamaConfig::tiny_for_tests(50);
        let c = CostModel::for_config(&cfg);
        // The tiny model: hidden 8, one layer, one head of its own width, MLP 16.
        let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
        let (q, kv) = (
            (cfg.num_attention_heads * cfg.head_dim) as u64,
            (cfg.num_key_value_heads * cfg.head_dim) as u64,
        );
        assert_eq!(c.row, 2 * (2 * h * q + 2 * h * kv + 3 * h * i));
        assert_eq!(c.per_context, 4 * q);
        assert_eq!(c.head, 2 * h * 50);
        for (start, tokens) in [(0, 0), (0, 1), (0, 7), (5, 1), (100, 33), (4000, 96)] {
            assert_eq!(c.chunk(start, tokens), summed(&c, start, tokens));
        }
        // The same tokens cost more later in a prompt.
        assert!(c.chunk(4000, 16) > c.chunk(0, 16));
    }

    #[test]
    fn a_paced_budget_holds_fewer_tokens_late_in_a_prompt() {
        // 10 rows at positions 0..10: 1000 + 55 + 10 = 1065 units.
        let b = PrefillBudget::paced(1000, 1065, 1, 0);
        assert_eq!(b.fit(&SMALL, 0, 500), 10);
        assert_eq!(summed(&SMALL, 0, 10), 1065);
        // Later in a prompt each row also attends over ~200 positions: 3 rows hold the units.
        let late = b.fit(&SMALL, 200, 500);
        assert!(summed(&SMALL, 200, late) <= 1065 && summed(&SMALL, 200, late + 1) > 1065);
        assert_eq!(late, 3);
        // The tokens cap and the prompt's length bound it too.
        assert_eq!(PrefillBudget::paced(4, 1065, 1, 0).fit(&SMALL, 0, 500), 4);
        assert_eq!(b.fit(&SMALL, 0, 3), 3);
        // Unpaced: tokens only, whatever the position.
        assert_eq!(PrefillBudget::tokens(64).fit(&SMALL, 100_000, 100_500), 64);
    }

    #[test]
    fn the_first_chunk_of_a_step_gets_at_least_the_floor() {
        // One row costs more than the units: the step's first chunk still gets its floor...
        let mut b = PrefillBudget::paced(100, 50, 8, 0);
        assert_eq!(b.fit(&SMALL, 0, 500), 8);
        // ...within what is left of its prompt...
        assert_eq!(b.fit(&SMALL, 0, 3), 3);
        b.take(&SMALL, 0, 500, 8);
        assert_eq!(b.units, Some(0));
        assert_eq!(b.tokens, 92);
        // ...but the next chunk gets only what the units hold.
        assert_eq!(b.fit(&SMALL, 0, 500), 0);
        // Units for more than the floor: the floor does not bind.
        assert_eq!(
            PrefillBudget::paced(100, 1065, 8, 0).fit(&SMALL, 0, 500),
            10
        );
        // The cap binds the floor, and no tokens at all (a step kept for decode only): nothing.
        assert_eq!(PrefillBudget::paced(5, 0, 8, 0).fit(&SMALL, 0, 500), 5);
        assert_eq!(
            PrefillBudget::paced(0, 1 << 40, 8, 0).fit(&SMALL, 0, 500),
            0
        );
    }

    #[test]
    fn admission_spends_the_paced_budget_whole_prompts_first() {
        // Units for 10 fresh rows at most; prompts of 4, 4 and 9 tokens.
        let lim = Limits {
            prefill: PrefillBudget::paced(1000, summed(&SMALL, 0, 10) + 2 * SMALL.head, 1, 0),
            ..roomy(8, 1000)
        };
        let w = [(RequestId(1), 4), (RequestId(2), 4), (RequestId(3), 9)];
        let p = plan(&w, &ids(&[9]), lim);
        // 4 + 4 tokens cost 2·(400 + 10 + 10) = 840; 2 more rows at 0..2 cost 213 of the 245 left.
        assert_eq!((p.prefill, p.chunks), (ids(&[1, 2, 3]), vec![4, 4, 2]));
        // A budget already started by a prompt being prefilled, with no units left: nobody is
        // admitted (the progress guarantee is the first chunk's only).
        let mut spent = PrefillBudget::paced(1000, 0, 8, 0);
        spent.take(&SMALL, 0, 500, 1);
        let lim = Limits {
            prefill: spent,
            ..roomy(8, 1000)
        };
        assert_eq!(plan(&w, &ids(&[9]), lim).prefill, vec![]);
        // An unstarted budget too small for one row admits the first prompt with its floor.
        let lim = Limits {
            prefill: PrefillBudget::paced(1000, 1, 3, 0),
            ..roomy(8, 1000)
        };
        let p = plan(&w, &ids(&[9]), lim);
        assert_eq!((p.prefill, p.chunks), (ids(&[1]), vec![3]));
    }

    #[test]
    fn short_prompts_are_admitted_whole_while_long_ones_are_paced() {
        // Streams run; the paced budget has no units left for long prompts' chunks (the floor of
        // 8 tokens still applies to the step's first one); prompts of up to 64 tokens are short.
        let lim = Limits {
            prefill: PrefillBudget::paced(1000, 0, 8, 64),
            ..roomy(8, 1000)
        };
        let w = [
            (RequestId(1), 40),
            (RequestId(2), 64),
            (RequestId(3), 500),
            (RequestId(4), 30),
        ];
        let p = plan(&w, &ids(&[9]), lim);
        assert_eq!(
            (p.prefill, p.chunks),
            (ids(&[1, 2, 3, 4]), vec![40, 64, 8, 30])
        );
        // Every prompt paced (short 0): the first gets the floor, nobody else is admitted.
        let lim = Limits {
            prefill: PrefillBudget::paced(1000, 0, 8, 0),
            ..roomy(8, 1000)
        };
        let p = plan(&w, &ids(&[9]), lim);
        assert_eq!((p.prefill, p.chunks), (ids(&[1]), vec![8]));
        // The token cap still binds short prompts: the second gets the rest of it, and
        // continues later with what is left of its prompt, still unpaced.
        let b = PrefillBudget::paced(100, 0, 8, 64);
        let w = [(RequestId(1), 60), (RequestId(2), 60)];
        let p = plan(
            &w,
            &[],
            Limits {
                prefill: b,
                ..roomy(8, 1000)
            },
        );
        assert_eq!(p.chunks, vec![60, 40]);
        assert_eq!(b.fit(&SMALL, 40, 60), 20);
        // A short prompt spends units, so a long prompt after it in the same step gets what is
        // left: of units for 10 fresh rows, a 6-token short prompt leaves room for 4 rows.
        let mut b = PrefillBudget::paced(1000, summed(&SMALL, 0, 10), 1, 64);
        b.take(&SMALL, 0, 6, 6);
        assert!(
            !b.started,
            "a short chunk does not use up the long chunks' floor"
        );
        let long = b.fit(&SMALL, 0, 500);
        assert!(summed(&SMALL, 0, long) <= b.units.unwrap(), "{long}");
        assert!(summed(&SMALL, 0, long + 1) > b.units.unwrap(), "{long}");
        assert_eq!(long, 4);
        // Unpaced, nothing is long.
        assert!(!PrefillBudget::tokens(16).paces(10_000));
        assert!(b.paces(65) && !b.paces(64));
    }
}
