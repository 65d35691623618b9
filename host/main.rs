//! Placeholder, replaced in this session by the test host.
fn main() {}
