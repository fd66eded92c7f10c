// A typed client takes the interface's argument type: a string where the
// method takes a `Pair` does not compile.
use zrpc_tests::typed::CalcBlockingClient;

fn call(calc: &CalcBlockingClient) {
    let _ = calc.add("one and two");
}

fn main() {}
