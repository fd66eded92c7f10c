//! Typed clients reject wrong argument and result types at compile time
//! (`tests/ui/*.rs`, with the compiler's expected messages next to them).

#[test]
fn typed_clients_reject_wrong_types_at_compile_time() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui/*.rs");
}
