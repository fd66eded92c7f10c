//! The async client keeps one file descriptor per broker connection. (Its
//! own test binary: other tests running in parallel threads would open and
//! close descriptors while this one counts them.)

use std::time::Duration;

use zrpc_client::{Client, Value};
use zrpc_tests::{wait_registered, Broker};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

#[test]
fn async_client_uses_one_fd_per_connection() {
    let b = Broker::start();
    let _svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let before = open_fds();
        let c = Client::builder()
            .socket_dir(b.dir())
            .connect()
            .await
            .expect("connect");
        let r: Value = c
            .call("echo", "echo", &1u8, Some(Duration::from_secs(10)))
            .await
            .expect("call");
        assert_eq!(r, Value::from(1u8));
        assert_eq!(open_fds(), before + 1, "one fd for the connection");
    });
}
