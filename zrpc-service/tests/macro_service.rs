//! The `#[service]` macro: introspection, naming and dispatch, by calling
//! `Service::handle` directly.

use std::fmt;

use serde::{Deserialize, Serialize};
use zrpc_service::{rpc_method, service, Bytes, Context, HandlerError, Service, Value};

#[derive(Default)]
struct TestServer {
    total: i64,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
struct Pair {
    a: i64,
    b: i64,
}

#[derive(Debug)]
struct MyError(String);

impl fmt::Display for MyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "my error: {}", self.0)
    }
}

#[service]
impl TestServer {
    /// Echoes the payload, tagged with the method name.
    ///
    /// Second paragraph.
    #[rpc_method]
    fn func(&mut self, payload: Value) -> (String, Value) {
        ("func".to_string(), payload)
    }

    /// Adds to the running total.
    #[rpc_method]
    fn add(&mut self, ctx: &Context, n: i64) -> (u64, i64) {
        self.total += n;
        (ctx.counter(), self.total)
    }

    #[rpc_method]
    fn total(&self) -> i64 {
        self.total
    }

    /// Sums a pair, asynchronously.
    #[rpc_method]
    async fn sum(&self, p: Pair) -> i64 {
        tokio::task::yield_now().await;
        p.a + p.b
    }

    #[rpc_method]
    async fn whoami(&mut self, ctx: &Context) -> String {
        format!("{}.{}", ctx.service(), ctx.method())
    }

    #[rpc_method]
    fn checked_div(&self, p: Pair) -> Result<i64, MyError> {
        if p.b == 0 {
            Err(MyError("division by zero".into()))
        } else {
            Ok(p.a / p.b)
        }
    }

    #[rpc_method]
    fn boom(&mut self) {
        panic!("kaboom");
    }

    #[rpc_method]
    async fn async_boom(&mut self) -> u8 {
        tokio::task::yield_now().await;
        panic!("async kaboom {}", 42);
    }

    #[rpc_method(name = "renamed")]
    fn original_name(&self) -> &'static str {
        "renamed!"
    }

    /// A helper that is not exposed.
    fn helper(&self) -> i64 {
        self.total * 2
    }
}

#[service(name = "custom")]
impl Pair {
    #[rpc_method]
    fn get(&self) -> (i64, i64) {
        (self.a, self.b)
    }
}

struct HTTPServer;

#[service]
impl HTTPServer {}

fn enc<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(rmp_serde::encode::to_vec_named(v).expect("encode"))
}

fn call<S: Service, T: Serialize>(
    s: &mut S,
    method: &str,
    payload: Option<&T>,
) -> Result<Value, HandlerError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let ctx = Context::new(s.service_name(), method).with_counter(7);
    let payload = payload.map(enc).unwrap_or_default();
    let out = rt.block_on(s.handle(&ctx, method, payload))?;
    Ok(rmpv::decode::read_value(&mut &out[..]).expect("reply is msgpack"))
}

const NONE: Option<&()> = None;

#[test]
fn names() {
    assert_eq!(TestServer::default().service_name(), "test_server");
    assert_eq!(Pair { a: 1, b: 2 }.service_name(), "custom");
    // The original Python zrpc's rule: a run of capitals stays one word.
    assert_eq!(HTTPServer.service_name(), "httpserver");
    assert!(HTTPServer.methods().is_empty());
}

#[test]
fn method_infos() {
    let s = TestServer::default();
    assert_eq!(s.helper(), 0);
    let m = s.methods();
    let names: Vec<&str> = m.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "func",
            "add",
            "total",
            "sum",
            "whoami",
            "checked_div",
            "boom",
            "async_boom",
            "renamed"
        ]
    );
    assert_eq!(
        m[0].doc,
        "Echoes the payload, tagged with the method name.\n\nSecond paragraph."
    );
    assert_eq!(m[0].params.len(), 1);
    assert_eq!(m[0].params[0].name, "payload");
    assert_eq!(m[0].params[0].ty, "Value");
    assert_eq!(m[0].returns, "(String, Value)");
    assert_eq!(m[1].params.len(), 1, "ctx is not a parameter");
    assert_eq!(m[1].params[0].name, "n");
    assert_eq!(m[1].params[0].ty, "i64");
    assert_eq!(m[2].params.len(), 0);
    assert_eq!(m[2].doc, "");
    assert_eq!(m[5].returns, "Result<i64, MyError>");
    assert_eq!(m[6].returns, "()");
}

#[test]
fn dispatch() {
    let mut s = TestServer::default();
    let v = call(&mut s, "func", Some(&("haha", "brt"))).expect("func");
    assert_eq!(
        v,
        Value::Array(vec![
            "func".into(),
            Value::Array(vec!["haha".into(), "brt".into()])
        ])
    );
    // An empty payload is nil.
    let v = call(&mut s, "func", NONE).expect("func nil");
    assert_eq!(v, Value::Array(vec!["func".into(), Value::Nil]));

    let v = call(&mut s, "add", Some(&5)).expect("add");
    assert_eq!(v, Value::Array(vec![7.into(), 5.into()]));
    call(&mut s, "add", Some(&3)).expect("add");
    // No-payload methods ignore whatever payload they get.
    assert_eq!(
        call(&mut s, "total", Some(&"ignored")).expect("total"),
        Value::from(8)
    );
    assert_eq!(call(&mut s, "total", NONE).expect("total"), Value::from(8));

    let v = call(&mut s, "sum", Some(&Pair { a: 2, b: 40 })).expect("sum");
    assert_eq!(v, Value::from(42));
    // Structs decode from arrays too.
    let v = call(&mut s, "sum", Some(&(1, 2))).expect("sum array");
    assert_eq!(v, Value::from(3));
    let v = call(&mut s, "whoami", NONE).expect("whoami");
    assert_eq!(v, Value::from("test_server.whoami"));

    assert_eq!(
        call(&mut s, "checked_div", Some(&(9, 3))).expect("div"),
        Value::from(3)
    );
    assert_eq!(
        call(&mut s, "checked_div", Some(&(9, 0))),
        Err(HandlerError::Remote("my error: division by zero".into()))
    );
    assert_eq!(
        call(&mut s, "renamed", NONE).expect("renamed"),
        Value::from("renamed!")
    );
    assert_eq!(
        call(&mut s, "boom", NONE).map_err(|e| e.code()).err(),
        Some(zrpc_service::ErrorCode::Remote)
    );
    assert!(matches!(
        call(&mut Pair { a: 1, b: 2 }, "get", NONE),
        Ok(Value::Array(_))
    ));
}

#[test]
fn errors() {
    let mut s = TestServer::default();
    match call(&mut s, "nope", NONE) {
        Err(HandlerError::NoSuchMethod(m)) => {
            assert!(m.contains("nope") && m.contains("test_server"), "{m}")
        }
        other => panic!("unexpected {other:?}"),
    }
    // The helper and the original name of a renamed method are not exposed.
    assert!(matches!(
        call(&mut s, "helper", NONE),
        Err(HandlerError::NoSuchMethod(_))
    ));
    assert!(matches!(
        call(&mut s, "original_name", NONE),
        Err(HandlerError::NoSuchMethod(_))
    ));
    match call(&mut s, "add", Some(&"not a number")) {
        Err(HandlerError::BadPayload(m)) => assert!(m.contains("add") && m.contains("i64"), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
    match call(&mut s, "sum", Some(&"x")) {
        Err(e @ HandlerError::BadPayload(_)) => {
            assert_eq!(e.code(), zrpc_service::ErrorCode::BadPayload)
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        call(&mut s, "boom", NONE),
        Err(HandlerError::Remote("handler panicked: kaboom".into()))
    );
    assert_eq!(
        call(&mut s, "async_boom", NONE),
        Err(HandlerError::Remote(
            "handler panicked: async kaboom 42".into()
        ))
    );
    // Still usable after panics.
    assert_eq!(call(&mut s, "total", NONE).expect("total"), Value::from(0));
}

#[test]
fn builder_service() {
    let mut svc = zrpc_service::ServiceBuilder::new("calc")
        .method("add", |_ctx: &Context, (a, b): (i64, i64)| {
            Ok::<_, String>(a + b)
        })
        .doc("Adds two integers.")
        .method("fail", |_ctx: &Context, _p: Value| Err::<(), _>("nope"))
        .method("panic", |_ctx: &Context, _p: Value| -> Result<(), String> {
            panic!("closure panic")
        })
        .async_method("later", |ctx: Context, p: String| async move {
            tokio::task::yield_now().await;
            Ok::<_, String>(format!("{}:{p}", ctx.method()))
        })
        .build();
    assert_eq!(svc.service_name(), "calc");
    let m = svc.methods();
    assert_eq!(m.len(), 4);
    assert_eq!(m[0].doc, "Adds two integers.");
    assert_eq!(
        call(&mut svc, "add", Some(&(2, 3))).expect("add"),
        Value::from(5)
    );
    assert_eq!(
        call(&mut svc, "fail", NONE),
        Err(HandlerError::Remote("nope".into()))
    );
    assert_eq!(
        call(&mut svc, "panic", NONE),
        Err(HandlerError::Remote(
            "handler panicked: closure panic".into()
        ))
    );
    assert_eq!(
        call(&mut svc, "later", Some(&"x")).expect("later"),
        Value::from("later:x")
    );
    assert!(matches!(
        call(&mut svc, "add", Some(&"x")),
        Err(HandlerError::BadPayload(_))
    ));
    assert!(matches!(
        call(&mut svc, "zzz", NONE),
        Err(HandlerError::NoSuchMethod(_))
    ));
}

/// `handle_now` (the server's path for synchronous methods) gives what
/// `handle` gives, for the synchronous methods only.
#[test]
fn handle_now_runs_synchronous_methods_as_handle_does() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let cases: Vec<(&str, Bytes)> = vec![
        ("func", enc(&("haha", "brt"))),
        ("func", Bytes::new()),
        ("add", enc(&5)),
        ("add", enc(&"not a number")),
        ("add", enc(&3)),
        ("total", enc(&"ignored")),
        ("checked_div", enc(&(9, 3))),
        ("checked_div", enc(&(9, 0))),
        ("renamed", Bytes::new()),
    ];
    // Two servers fed the same calls, one through each path.
    let (mut now, mut later) = (TestServer::default(), TestServer::default());
    for (i, (method, payload)) in cases.into_iter().enumerate() {
        let ctx = Context::new("test_server", method).with_counter(i as u64);
        let a = now
            .handle_now(&ctx, method, &payload)
            .unwrap_or_else(|| panic!("{method} is synchronous"));
        let b = rt.block_on(later.handle(&ctx, method, payload));
        assert_eq!(a, b, "{method}");
    }
    assert_eq!(now.total, 8);
    // Asynchronous, unknown and unexposed methods are left to `handle`.
    for method in [
        "sum",
        "whoami",
        "async_boom",
        "nope",
        "helper",
        "original_name",
    ] {
        let ctx = Context::new("test_server", method);
        assert!(
            now.handle_now(&ctx, method, &Bytes::new()).is_none(),
            "{method}"
        );
    }
    // A panic unwinds out of `handle_now`; the server catches it (and the
    // integration tests check the caller's error).
    let ctx = Context::new("test_server", "boom");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        now.handle_now(&ctx, "boom", &Bytes::new())
    }));
    assert!(r.is_err());

    let mut svc = zrpc_service::ServiceBuilder::new("calc")
        .method("add", |_ctx: &Context, (a, b): (i64, i64)| {
            Ok::<_, String>(a + b)
        })
        .method("panic", |_ctx: &Context, _p: Value| -> Result<(), String> {
            panic!("closure panic")
        })
        .async_method("later", |_ctx: Context, p: String| async move {
            Ok::<_, String>(p)
        })
        .build();
    let ctx = Context::new("calc", "add");
    assert_eq!(
        svc.handle_now(&ctx, "add", &enc(&(2, 3))),
        Some(Ok(enc(&5)))
    );
    assert_eq!(
        svc.handle_now(&ctx, "panic", &Bytes::new()),
        Some(Err(HandlerError::Remote(
            "handler panicked: closure panic".into()
        )))
    );
    assert_eq!(svc.handle_now(&ctx, "later", &enc(&"x")), None);
    assert_eq!(svc.handle_now(&ctx, "zzz", &Bytes::new()), None);
}
