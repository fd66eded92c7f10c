//! A service implementing the `Calc` interface (`zrpc_tests::typed`) for
//! the typed-client tests. Socket directory: `$ZRPC_SOCKET_DIR`.

use std::time::Duration;

use zrpc_tests::typed::{Calc, CalcError, Pair};

struct CalcServer {
    bumps: u64,
}

#[zrpc_service::service]
impl Calc for CalcServer {
    fn add(&self, p: Pair) -> f64 {
        p.a + p.b
    }

    fn version(&self) -> String {
        "calc/1".into()
    }

    fn divide(&self, p: Pair) -> Result<f64, CalcError> {
        if p.b == 0.0 {
            return Err(CalcError::DivisionByZero);
        }
        Ok(p.a / p.b)
    }

    async fn double_later(&self, x: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        x * 2
    }

    fn bump(&mut self) {
        self.bumps += 1;
    }

    fn bumps(&self) -> u64 {
        self.bumps
    }

    fn counter(&self) -> u64 {
        zrpc_service::Context::current().map_or(0, |c| c.counter())
    }

    async fn counter_later(&self) -> u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        zrpc_service::Context::current().map_or(0, |c| c.counter())
    }
}

fn main() -> Result<(), zrpc_service::Error> {
    zrpc_service::Server::new(CalcServer { bumps: 0 }).run()
}
