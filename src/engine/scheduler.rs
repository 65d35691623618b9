//! The scheduling rule of one engine step, as a pure function: which waiting requests are
//! admitted (prefilled) and which running ones decode.
//!
//! Every running sequence decodes every step (iteration-level, continuous batching). Waiting
//! requests are admitted first come, first served while a batch slot is free and the step's
//! prefill-token budget lasts; the first one in line is admitted even if its prompt alone exceeds
//! the budget, so a long prompt cannot starve.

use super::request::RequestId;

/// Limits of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Sequences running at once (bounded by the KV-cache slots).
    pub max_running: usize,
    /// Prompt tokens prefilled per step (after the first admitted prompt).
    pub max_prefill_tokens: usize,
}

/// The work of one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Requests to admit and prefill, in order.
    pub prefill: Vec<RequestId>,
    /// Running requests to decode together.
    pub decode: Vec<RequestId>,
}

/// Plans a step: `waiting` in arrival order with their prompt lengths, `running` as they are.
pub fn plan(waiting: &[(RequestId, usize)], running: &[RequestId], limits: Limits) -> Plan {
    let mut p = Plan {
        prefill: Vec::new(),
        decode: running.to_vec(),
    };
    let mut budget = limits.max_prefill_tokens;
    for &(id, len) in waiting {
        if running.len() + p.prefill.len() >= limits.max_running {
            break;
        }
        if !p.prefill.is_empty() && len > budget {
            break;
        }
        budget = budget.saturating_sub(len);
        p.prefill.push(id);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<RequestId> {
        v.iter().map(|&i| RequestId(i)).collect()
    }

    #[test]
    fn admits_in_order_up_to_the_slots() {
        let lim = Limits {
            max_running: 3,
            max_prefill_tokens: 1000,
        };
        let w = [(RequestId(5), 10), (RequestId(6), 10), (RequestId(7), 10)];
        let p = plan(&w, &ids(&[1]), lim);
        assert_eq!(p.prefill, ids(&[5, 6]));
        assert_eq!(p.decode, ids(&[1]));
        assert_eq!(plan(&w, &ids(&[1, 2, 3]), lim).prefill, vec![]);
    }

    #[test]
    fn prefill_budget_bounds_a_step_but_never_starves() {
        let lim = Limits {
            max_running: 8,
            max_prefill_tokens: 100,
        };
        let w = [(RequestId(1), 500), (RequestId(2), 10)];
        assert_eq!(plan(&w, &[], lim).prefill, ids(&[1]));
        let w = [(RequestId(1), 60), (RequestId(2), 30), (RequestId(3), 30)];
        assert_eq!(plan(&w, &[], lim).prefill, ids(&[1, 2]));
    }
}
