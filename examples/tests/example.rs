//! The original example (`test_server`, `test_client`, `test_client_async`)
//! against the real broker. Living in this package makes `cargo test` build
//! the example binaries.

use zrpc_tests::{wait_registered, Broker, WAIT};

#[test]
fn original_example_runs() {
    let b = Broker::start();
    let mut server = b.spawn("test_server", &[]);
    wait_registered(b.dir(), "test_server", 1);

    let (status, out) = b.spawn("test_client", &[]).output(WAIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "test_client failed: {out}"
    );
    assert!(
        out.contains(r#"("func", {"haha": "brt"})"#),
        "unexpected test_client output: {out}"
    );
    let line = server
        .read_until(|l| l.starts_with("RPC request"))
        .expect("test_server logs the request");
    assert_eq!(line, r#"RPC request [1]: {"haha": "brt"}"#);

    let (status, out) = b.spawn("test_client_async", &[]).output(WAIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "test_client_async failed: {out}"
    );
    assert!(
        out.contains(r#"RPC response: ("func", {"haha": "brt"})"#),
        "{out}"
    );
    assert_eq!(out.matches("concurrent call").count(), 10, "{out}");
}
