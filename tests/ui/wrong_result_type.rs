// A typed client returns the interface's result type: using `version`'s
// `String` as a number does not compile.
use zrpc_tests::typed::CalcBlockingClient;

fn call(calc: &CalcBlockingClient) -> zrpc_client::Result<u64> {
    calc.version()
}

fn main() {}
