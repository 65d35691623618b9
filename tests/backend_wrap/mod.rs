//! Test backends that wrap another one (`self.inner`) to count, record or fail some calls: the
//! `Backend` methods they do not change, forwarded in one place.

/// Expands, inside `impl Backend for Wrapper`, to the methods forwarded unchanged to
/// `self.inner`: everything but `decode` and `decode_argmax`, which each wrapper writes itself
/// (`decode_argmax` keeps the trait's default unless the wrapper overrides it). `fuses_steps`
/// and `step` keep the trait's defaults too (a wrapped engine takes the separate prefill and
/// decode calls it counts) unless the wrapper overrides them.
///
/// `forward_backend_to_inner!(without_prefill)` forwards the same methods but `prefill`, for a
/// wrapper that writes that one itself too.
macro_rules! forward_backend_to_inner {
    () => {
        forward_backend_to_inner!(without_prefill);
        fn prefill(
            &mut self,
            seq: triton_unweight::device::SeqId,
            tokens: &[u32],
        ) -> Result<Vec<f32>, triton_unweight::device::DeviceError> {
            self.inner.prefill(seq, tokens)
        }
    };
    (without_prefill) => {
        fn config(&self) -> &triton_unweight::model::LlamaConfig {
            self.inner.config()
        }
        fn kv_capacity(&self) -> triton_unweight::device::KvCapacity {
            self.inner.kv_capacity()
        }
        fn kv_usage(&self) -> triton_unweight::device::KvUsage {
            self.inner.kv_usage()
        }
        fn weight_memory(&self) -> triton_unweight::device::WeightMemory {
            self.inner.weight_memory()
        }
        fn new_sequence(
            &mut self,
        ) -> Result<triton_unweight::device::SeqId, triton_unweight::device::DeviceError> {
            self.inner.new_sequence()
        }
        fn free_sequence(&mut self, seq: triton_unweight::device::SeqId) {
            self.inner.free_sequence(seq)
        }
        fn sequence_len(
            &self,
            seq: triton_unweight::device::SeqId,
        ) -> Result<usize, triton_unweight::device::DeviceError> {
            self.inner.sequence_len(seq)
        }
    };
}
