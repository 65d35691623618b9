//! A real sticky fault on the device, in its own process (it kills the device's context for
//! everything else in the process, so it cannot share a test binary with the other GPU tests):
//! what `device::shared::ContextEpochs` and the Triton worker's rebuild assume about CUDA is
//! checked here, on the GPU, not only against fakes. An illegal store is fatal; the other holder
//! of the same primary context sees its calls fail and the context marked lost; a new context
//! waits until every holder has let go; and the context made after that works.
//!
//! The test is `#[ignore]`d (tests/gpu_required/mod.rs): scripts/gpu-check runs it.

use std::sync::Arc;
use std::time::Duration;

use triton_unweight::device::cuda::driver::{Context, DevBuf};
use triton_unweight::device::cuda::kernels::Kernels;
use triton_unweight::device::FaultKind;

mod gpu_required;
use gpu_required::require_gpu;

/// An address no allocation has: the embedding kernel's stores there fault.
const BAD_ADDRESS: u64 = 0x10;

/// A round trip through the device in `ctx`: an upload, the embedding kernel, a download.
fn works(ctx: &Arc<Context>) -> Result<(), String> {
    let k = Kernels::load(ctx).map_err(|e| e.to_string())?;
    let table: Vec<u16> = (0..4 * 8).map(|i| 0x3f80 + i as u16).collect(); // BF16 rows
    let table = DevBuf::from_host(ctx, &table).map_err(|e| e.to_string())?;
    let tokens = DevBuf::from_host(ctx, &[2i32]).map_err(|e| e.to_string())?;
    let x = DevBuf::new(ctx, 4 * 8).map_err(|e| e.to_string())?;
    k.embed(table.ptr(), tokens.ptr(), x.ptr(), 1, 8)
        .and_then(|()| ctx.sync())
        .map_err(|e| e.to_string())?;
    let mut got = [0f32; 8];
    x.download(&mut got).map_err(|e| e.to_string())?;
    let want: Vec<f32> = (16..24)
        .map(|i| f32::from_bits(u32::from(0x3f80u16 + i as u16) << 16))
        .collect();
    if got.as_slice() != want.as_slice() {
        return Err(format!("embedding row 2: got {got:?}, want {want:?}"));
    }
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu-check"]
fn a_sticky_fault_is_fatal_for_every_holder_and_a_context_made_after_all_let_go_works() {
    require_gpu();
    let a = Context::new(0).unwrap();
    let b = Context::new(0).unwrap();
    works(&a).expect("before the fault");
    works(&b).expect("before the fault");

    // An illegal store in a's stream: fatal.
    let k = Kernels::load(&a).unwrap();
    let table = DevBuf::from_host(&a, &[0u16; 8]).unwrap();
    let tokens = DevBuf::from_host(&a, &[0i32]).unwrap();
    let fault = k
        .embed(table.ptr(), tokens.ptr(), BAD_ADDRESS, 1, 8)
        .and_then(|()| a.sync())
        .expect_err("a store to an unmapped address must fail");
    assert_eq!(fault.kind, FaultKind::Fatal, "{fault}");
    assert!(a.mark_lost(), "the first fault ends the generation");

    // b retains the same primary context: marked lost, and its own calls fail too.
    assert!(b.lost());
    assert!(
        b.sync().is_err() || works(&b).is_err(),
        "b's calls in the dead context succeeded"
    );

    // A new context waits while anyone holds the dead one...
    let waiter = std::thread::spawn(|| Context::new(0));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !waiter.is_finished(),
        "a new context was made while the dead one was held"
    );
    // ...and, once all have let go, is a fresh one that works.
    drop((k, table, tokens, a, b));
    let fresh = waiter
        .join()
        .unwrap()
        .expect("a context after the dead one was released");
    assert!(!fresh.lost());
    works(&fresh).expect("the context made after every holder let go");
}
