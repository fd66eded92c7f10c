//! Procedural macros for `zrpc-service`: [`macro@service`] and
//! [`macro@rpc_method`].
//!
//! Use them through the re-exports `zrpc_service::service` and
//! `zrpc_service::rpc_method`; the generated code refers to items of the
//! `zrpc_service` crate by absolute path.
//!
//! ```ignore
//! use zrpc_service::{service, rpc_method, Context};
//!
//! struct TestServer;
//!
//! #[service]
//! impl TestServer {
//!     /// Echoes its payload.
//!     #[rpc_method]
//!     fn func(&mut self, ctx: &Context, payload: rmpv::Value) -> (String, rmpv::Value) {
//!         println!("RPC request [{}]: {}", ctx.counter(), payload);
//!         ("func".into(), payload)
//!     }
//! }
//! ```

mod interface;

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote};
use syn::spanned::Spanned;
use syn::{
    parse_macro_input, Attribute, Expr, ExprLit, FnArg, ImplItem, ImplItemFn, ItemImpl, Lit,
    LitStr, Meta, Pat, ReturnType, Type,
};

/// Turns an inherent `impl` block into a zrpc service.
///
/// Every method marked with `#[rpc_method]` becomes callable over zrpc under
/// its own name; other methods stay ordinary helpers. The macro keeps the
/// `impl` block as it is and adds an
/// `impl zrpc_service::Service for Type`.
///
/// Options: `#[service(name = "custom")]` sets the service name; by default
/// it is the type name converted from CamelCase to snake_case by the
/// original Python zrpc's rule (`TestServer` becomes `test_server`,
/// `HTTPServer` becomes `httpserver`: see `zrpc_proto::to_snake_case`).
///
/// Supported method shapes (sync or `async fn`):
///
/// ```text
/// fn m(&self | &mut self [, ctx: &Context] [, payload: T]) [-> R]
/// ```
///
/// * `T: serde::de::DeserializeOwned` is decoded from the call's MessagePack
///   payload (an empty payload is nil); without a payload parameter the
///   payload is ignored.
/// * The context parameter is recognised by its type: a reference whose last
///   path segment is `Context`.
/// * `R: serde::Serialize` is encoded as the reply. When the return type is
///   spelled `Result<X, E>` (last path segment `Result`), `Ok(x)` is the
///   reply and `Err(e)` becomes a `Remote` error. If `E: Serialize`, the
///   error value travels beside the message (a typed client gets `e` back
///   as `E`) and the message is `e.to_string()` (`E: Display`) or else
///   `format!("{e:?}")` (`E: Debug`); otherwise `E: Display` is required
///   and the message alone is sent.
///
/// `#[rpc_method(name = "other")]` exposes a method under another name.
///
/// **On an interface.** `#[service] impl Calc for CalcServer { ... }`,
/// where `Calc` is a trait marked `#[zrpc_client::interface]`, serves every
/// method of the trait (no `#[rpc_method]` needed) under the interface's
/// service name (`Calc::ZRPC_SERVICE_NAME`, unless `name = "..."` is
/// given); callers use the generated `CalcClient` / `CalcBlockingClient`,
/// and the compiler checks that both sides agree.
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    let custom_name = match name_option(attr, "service") {
        Ok(n) => n,
        Err(e) => return e.to_compile_error().into(),
    };
    let item = parse_macro_input!(item as ItemImpl);
    match expand_service(custom_name, item) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// Turns a trait into a zrpc interface: typed clients for callers, and the
/// contract a service implements.
///
/// ```ignore
/// #[zrpc_client::interface]            // service name: `calc` (or name = "...")
/// pub trait Calc {
///     /// Adds the two numbers.
///     async fn add(&self, p: Pair) -> Result<f64, CalcError>;
///     fn version(&self) -> String;
/// }
/// ```
///
/// generates, next to the trait (which gains an associated const
/// `ZRPC_SERVICE_NAME`):
/// - `CalcClient`, over an async `zrpc_client::Client`: one `async fn` per
///   method, taking the argument type and returning
///   `zrpc_client::Result<R>` with `R` the declared return type: for a
///   method declared `-> Result<T, E>` that is
///   `zrpc_client::Result<Result<T, E>>`, the outer error the call's
///   (`zrpc_client::Error`: timeout, no such service, ...), the inner one
///   the service's own `E`, decoded from the error value it sent (so `E`
///   must be `Serialize + DeserializeOwned`); plus a
///   `*_with(arg, CallOptions)` form; `with_options` sets the
///   options of every call, `with_name` the instance's name;
/// - `CalcBlockingClient`, the same over a `zrpc_client::BlockingClient`.
///
/// A crate holding the trait and its types needs only `zrpc-client` and
/// `serde`: callers depend on it without the server side. A service
/// implements the trait with `#[zrpc_service::service] impl Calc for
/// CalcServer { ... }`, so the compiler checks that both sides agree. Each
/// method takes `&self` or `&mut self` and at most one argument (a tuple or
/// a struct for several), owned, `Serialize + DeserializeOwned`; no
/// `&Context` (the caller does not send it: use an inherent `#[service]`
/// impl for methods that need it).
#[proc_macro_attribute]
pub fn interface(attr: TokenStream, item: TokenStream) -> TokenStream {
    let custom_name = match name_option(attr, "interface") {
        Ok(n) => n,
        Err(e) => return e.to_compile_error().into(),
    };
    let item = parse_macro_input!(item as syn::ItemTrait);
    match interface::expand(custom_name, item) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// Marks a method of a `#[service]` impl block as callable over zrpc (the
/// Rust form of the original `@rpc_method` decorator).
///
/// It is processed by [`macro@service`], which must be on the enclosing
/// `impl` block; used anywhere else it is an error. Like any attribute macro
/// it must be in scope (`use zrpc_service::rpc_method;`) or written with its
/// path (`#[zrpc_service::rpc_method]`).
/// Optional: `#[rpc_method(name = "other")]` to expose the method under
/// another name.
#[proc_macro_attribute]
pub fn rpc_method(attr: TokenStream, item: TokenStream) -> TokenStream {
    let attr2: TokenStream2 = attr.into();
    if attr2.to_string() == EXPANDED_MARKER {
        // Left behind by #[service] after it processed the method.
        return item;
    }
    let item2: TokenStream2 = item.into();
    let err = syn::Error::new(
        Span::call_site(),
        "#[rpc_method] must be used on a method inside an `impl` block annotated with #[service]",
    )
    .to_compile_error();
    quote!(#err #item2).into()
}

/// The only option of `#[service]` and `#[interface]`: `name = "..."`.
fn name_option(attr: TokenStream, macro_name: &str) -> syn::Result<Option<LitStr>> {
    let mut name: Option<LitStr> = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            name = Some(meta.value()?.parse()?);
            Ok(())
        } else {
            Err(meta.error(format!(
                "unsupported #[{macro_name}] option; expected `name = \"...\"`"
            )))
        }
    });
    syn::parse::Parser::parse(parser, attr)?;
    Ok(name)
}

/// Argument of the `#[rpc_method(...)]` attributes that [`macro@service`]
/// leaves on the methods it processed, so that the user's `use` of
/// `rpc_method` counts as used; the attribute then expands to the method
/// unchanged.
const EXPANDED_MARKER: &str = "__zrpc_expanded";

/// A compact rendering of a type or pattern for introspection
/// (`Result < u8 , E >` becomes `Result<u8, E>`).
fn pretty(ts: &TokenStream2) -> String {
    let s = ts.to_string();
    let mut out = String::with_capacity(s.len());
    let toks: Vec<&str> = s.split(' ').collect();
    for (i, t) in toks.iter().enumerate() {
        if i > 0 {
            let prev = toks[i - 1];
            let glue = matches!(*t, "<" | ">" | "," | "::" | ")" | "]" | ">>" | ";" | "?")
                || matches!(prev, "<" | "::" | "&" | "(" | "[" | "'" | "#" | "!");
            if !glue {
                out.push(' ');
            }
        }
        out.push_str(t);
    }
    out
}

fn is_attr(attr: &Attribute, name: &str) -> bool {
    attr.path().segments.last().is_some_and(|s| s.ident == name)
}

fn last_segment_is(ty: &Type, name: &str) -> bool {
    match ty {
        Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == name),
        Type::Group(g) => last_segment_is(&g.elem, name),
        Type::Paren(p) => last_segment_is(&p.elem, name),
        _ => false,
    }
}

/// Whether `ty` mentions a reference or a lifetime.
fn borrows(ty: &Type) -> bool {
    fn scan(ts: TokenStream2) -> bool {
        ts.into_iter().any(|t| match t {
            proc_macro2::TokenTree::Punct(p) => p.as_char() == '&' || p.as_char() == '\'',
            proc_macro2::TokenTree::Group(g) => scan(g.stream()),
            _ => false,
        })
    }
    scan(quote!(#ty))
}

fn is_context(ty: &Type) -> bool {
    match ty {
        Type::Reference(r) => last_segment_is(&r.elem, "Context"),
        Type::Group(g) => is_context(&g.elem),
        _ => false,
    }
}

fn doc_of(attrs: &[Attribute]) -> String {
    let mut lines = Vec::new();
    for a in attrs {
        if !a.path().is_ident("doc") {
            continue;
        }
        if let Meta::NameValue(nv) = &a.meta {
            if let Expr::Lit(ExprLit {
                lit: Lit::Str(s), ..
            }) = &nv.value
            {
                let v = s.value();
                for line in v.split('\n') {
                    lines.push(line.strip_prefix(' ').unwrap_or(line).to_string());
                }
            }
        }
    }
    lines.join("\n").trim().to_string()
}

struct Method {
    rpc_name: String,
    ident: syn::Ident,
    is_async: bool,
    /// Takes `&mut self` (exclusive access), not `&self`.
    mut_self: bool,
    has_ctx: bool,
    payload_ty: Option<Type>,
    returns_result: bool,
    /// The reply value's type (`T` of `Result<T, E>`), if known.
    value_ty: Option<Type>,
    /// The error's type (`E` of `Result<T, E>`).
    error_ty: Option<Type>,
    doc: String,
    params: Vec<(String, String)>,
    returns: String,
}

fn parse_rpc_attr(attr: &Attribute) -> syn::Result<Option<String>> {
    match &attr.meta {
        Meta::Path(_) => Ok(None),
        Meta::List(_) => {
            let mut name = None;
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("name") {
                    let lit: LitStr = meta.value()?.parse()?;
                    name = Some(lit.value());
                    Ok(())
                } else {
                    Err(meta.error("unsupported #[rpc_method] option; expected `name = \"...\"`"))
                }
            })?;
            Ok(name)
        }
        Meta::NameValue(nv) => Err(syn::Error::new(
            nv.span(),
            "expected #[rpc_method] or #[rpc_method(name = \"...\")]",
        )),
    }
}

/// Checks that `sig` is a method that is not generic and takes `&self` or
/// `&mut self` (`what` names such methods in the errors); returns its other
/// parameters. Shared by `#[service]` and `#[interface]`.
fn method_params<'a>(
    sig: &'a syn::Signature,
    what: &str,
) -> syn::Result<syn::punctuated::Iter<'a, FnArg>> {
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            format!("{what} cannot be generic"),
        ));
    }
    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.colon_token.is_none() => Ok(inputs),
        _ => Err(syn::Error::new(
            sig.span(),
            format!("{what} must take `&self` or `&mut self`"),
        )),
    }
}

fn analyse(f: &ImplItemFn, rename: Option<String>) -> syn::Result<Method> {
    let sig = &f.sig;
    let inputs = method_params(sig, "#[rpc_method] methods")?;
    let mut has_ctx = false;
    let mut payload_ty = None;
    let mut params = Vec::new();
    for (i, arg) in inputs.enumerate() {
        let FnArg::Typed(pt) = arg else {
            return Err(syn::Error::new(arg.span(), "unexpected receiver"));
        };
        if i == 0 && is_context(&pt.ty) {
            has_ctx = true;
            continue;
        }
        if payload_ty.is_some() {
            return Err(syn::Error::new(
                pt.span(),
                "#[rpc_method] methods take at most one payload parameter (after an optional `&Context`); \
                 use a tuple or a struct for several arguments",
            ));
        }
        if let Type::Reference(_) = &*pt.ty {
            return Err(syn::Error::new(
                pt.ty.span(),
                "the payload parameter must be an owned type implementing serde::de::DeserializeOwned",
            ));
        }
        let ty = &pt.ty;
        let name = match &*pt.pat {
            Pat::Ident(pi) => pi.ident.to_string(),
            other => pretty(&quote!(#other)),
        };
        params.push((name, pretty(&quote!(#ty))));
        payload_ty = Some((*pt.ty).clone());
    }
    let (returns_result, returns) = match &sig.output {
        ReturnType::Default => (false, "()".to_string()),
        ReturnType::Type(_, ty) => (last_segment_is(ty, "Result"), pretty(&quote!(#ty))),
    };
    // The types whose shapes introspection shows: the reply's (`T` of
    // `Result<T, E>`) and the error's.
    let (value_ty, error_ty): (Option<Type>, Option<Type>) = match &sig.output {
        ReturnType::Default => (Some(syn::parse_quote!(())), None),
        ReturnType::Type(_, ty) if returns_result => match interface::result_types(ty) {
            Some((t, e)) => (Some(t), Some(e)),
            None => (None, None),
        },
        ReturnType::Type(_, ty) => (Some((**ty).clone()), None),
    };
    Ok(Method {
        rpc_name: rename.unwrap_or_else(|| sig.ident.to_string()),
        ident: sig.ident.clone(),
        is_async: sig.asyncness.is_some(),
        mut_self: sig.receiver().is_some_and(|r| r.mutability.is_some()),
        has_ctx,
        payload_ty,
        returns_result,
        value_ty,
        error_ty,
        doc: doc_of(&f.attrs),
        params,
        returns,
    })
}

fn expand_service(custom_name: Option<LitStr>, mut item: ItemImpl) -> syn::Result<TokenStream2> {
    // `impl Calc for CalcServer`: a zrpc interface (see `#[interface]`);
    // every method is callable, under the interface's service name.
    let interface = item.trait_.as_ref().map(|(_, path, _)| path.clone());
    if item.generics.params.iter().any(|_| interface.is_some()) {
        return Err(syn::Error::new(
            item.generics.span(),
            "#[service] on an interface impl cannot be generic",
        ));
    }
    let type_name = match &*item.self_ty {
        Type::Path(p) => p
            .path
            .segments
            .last()
            .map(|s| s.ident.to_string())
            .ok_or_else(|| syn::Error::new(p.span(), "cannot name this type"))?,
        other => {
            return Err(syn::Error::new(
                other.span(),
                "#[service] needs a named type (`impl MyType { ... }`)",
            ))
        }
    };
    let service_name_expr = match (&custom_name, &interface) {
        (Some(l), _) => {
            let v = l.value();
            quote!(#v)
        }
        (None, Some(path)) => quote!(<Self as #path>::ZRPC_SERVICE_NAME),
        (None, None) => {
            let v = zrpc_proto::to_snake_case(&type_name);
            quote!(#v)
        }
    };

    let mut methods = Vec::new();
    for it in item.items.iter_mut() {
        let ImplItem::Fn(f) = it else { continue };
        let mut marker = None;
        for a in f.attrs.iter_mut() {
            if is_attr(a, "rpc_method") {
                if marker.is_some() {
                    return Err(syn::Error::new(a.span(), "duplicate #[rpc_method]"));
                }
                marker = Some(parse_rpc_attr(a)?);
                // Replace the options by the marker; the attribute itself
                // stays so the user's import of it is used, and expands to
                // nothing more than the method.
                let path = a.path().clone();
                let marker_ident = format_ident!("{}", EXPANDED_MARKER);
                *a = syn::parse_quote!(#[#path(#marker_ident)]);
            }
        }
        match marker {
            Some(rename) => methods.push(analyse(f, rename)?),
            None if interface.is_some() => methods.push(analyse(f, None)?),
            None => {}
        }
    }
    for (i, m) in methods.iter().enumerate() {
        if m.rpc_name == "zrpc.describe" {
            return Err(syn::Error::new(
                m.ident.span(),
                "the method name \"zrpc.describe\" is reserved for introspection",
            ));
        }
        if methods[..i].iter().any(|o| o.rpc_name == m.rpc_name) {
            return Err(syn::Error::new(
                m.ident.span(),
                format!("duplicate rpc method name {:?}", m.rpc_name),
            ));
        }
    }

    let z = quote!(::zrpc_service);
    let infos = methods.iter().map(|m| {
        let name = &m.rpc_name;
        let doc = &m.doc;
        // An interface impl's methods usually carry no doc comment: the
        // trait's is the one to show.
        let doc = match &interface {
            Some(path) if doc.is_empty() => quote!(<Self as #path>::zrpc_method_doc(#name)),
            _ => quote!(#doc),
        };
        let returns = &m.returns;
        // `Some(shape)` for a type that implements DeserializeOwned, chosen
        // here where the type is concrete (zrpc_service::__private::ShapeOf).
        // A type with a reference or lifetime in it (`&'static str`) is
        // never `DeserializeOwned`, and the probe would not fall back for
        // it (a higher-ranked bound fails hard): no shape.
        let shape = |ty: Option<&Type>| match ty.filter(|t| !borrows(t)) {
            Some(ty) => quote! {{
                #[allow(unused_imports)]
                use #z::__private::{NoShape as _, TracedShape as _};
                (&&#z::__private::ShapeOf::<#ty>::new()).zrpc_shape()
            }},
            None => quote!(::std::option::Option::None),
        };
        let param_shape = shape(m.payload_ty.as_ref());
        let params = m.params.iter().map(|(n, t)| {
            quote!(#z::ParamInfo {
                name: ::std::string::String::from(#n),
                ty: ::std::string::String::from(#t),
                shape: #param_shape,
            })
        });
        let returns_shape = shape(m.value_ty.as_ref());
        let error_shape = shape(m.error_ty.as_ref());
        quote! {
            #z::MethodInfo {
                name: ::std::string::String::from(#name),
                doc: ::std::string::String::from(#doc),
                params: ::std::vec![#(#params),*],
                returns: ::std::string::String::from(#returns),
                returns_shape: #returns_shape,
                error_shape: #error_shape,
            }
        }
    });
    let callee_of = |ident: &syn::Ident| match &interface {
        Some(path) => quote!(<Self as #path>::#ident),
        None => quote!(Self::#ident),
    };
    // A call of method `m` on `recv`; an interface method (which cannot
    // take the context) runs with it as `Context::current()`.
    let call_of = |m: &Method, recv: &TokenStream2, call_args: &[TokenStream2]| {
        let callee = callee_of(&m.ident);
        match (&interface, m.is_async) {
            (None, false) => quote!(#callee(#recv, #(#call_args),*)),
            (None, true) => quote!(#callee(#recv, #(#call_args),*).await),
            (Some(_), false) => {
                quote!(#z::__private::with_context(__zrpc_ctx, || #callee(#recv, #(#call_args),*)))
            }
            (Some(_), true) => {
                quote!(#z::__private::in_context(__zrpc_ctx, #callee(#recv, #(#call_args),*)).await)
            }
        }
    };
    // The body of one method's handler: decode the argument from
    // `payload` (a `&Bytes` expression), call it on `recv`, encode the
    // outcome. Every entry point below wraps it.
    let body_of = |m: &Method, payload: TokenStream2, recv: TokenStream2| {
        let arg = format_ident!("__zrpc_arg");
        let decode = m.payload_ty.as_ref().map(
            |ty| quote!(let #arg: #ty = #z::__private::decode::<#ty>(__zrpc_method, #payload)?;),
        );
        let mut call_args = Vec::new();
        if m.has_ctx {
            call_args.push(quote!(__zrpc_ctx));
        }
        if m.payload_ty.is_some() {
            call_args.push(quote!(#arg));
        }
        let call = call_of(m, &recv, &call_args);
        let encode = if m.returns_result {
            // The error's conversion is chosen here, where its type is
            // concrete (see `zrpc_service::__private::ErrorOf`).
            quote!(match __zrpc_out {
                ::std::result::Result::Ok(__zrpc_v) => #z::__private::encode(&__zrpc_v),
                ::std::result::Result::Err(__zrpc_e) => {
                    #[allow(unused_imports)]
                    use #z::__private::{
                        DisplayError as _, SerializeDebugError as _, SerializeDisplayError as _,
                    };
                    ::std::result::Result::Err((&&&#z::__private::ErrorOf(&__zrpc_e)).zrpc_error())
                }
            })
        } else {
            quote!(#z::__private::encode(&__zrpc_out))
        };
        quote! {
            #decode
            let __zrpc_out = #call;
            #encode
        }
    };
    let arms = methods.iter().map(|m| {
        let name = &m.rpc_name;
        let body = body_of(m, quote!(&__zrpc_payload), quote!(self));
        quote!(#name => #z::__private::guard(async move { #body }),)
    });
    // The synchronous methods again, run to completion by `handle_now`
    // without a boxed future.
    let now_arms = methods.iter().filter(|m| !m.is_async).map(|m| {
        let name = &m.rpc_name;
        let body = body_of(m, quote!(__zrpc_payload), quote!(self));
        quote!(#name => ::std::option::Option::Some((|| { #body })()),)
    });
    // The `&self` methods once more, for `handle_shared`: futures that own
    // the service's `Rc`, the context and the payload, run concurrently.
    let shared_arms = methods.iter().filter(|m| !m.mut_self).map(|m| {
        let name = &m.rpc_name;
        let body = body_of(m, quote!(&__zrpc_payload), quote!(&*self));
        let prelude = quote! {
            let __zrpc_ctx = &__zrpc_ctx;
            let __zrpc_method = __zrpc_ctx.method();
        };
        if m.is_async {
            quote!(#name => ::std::option::Option::Some(#z::__private::guard(async move { #prelude #body })),)
        } else {
            quote!(#name => ::std::option::Option::Some(#z::__private::ready((|| { #prelude #body })())),)
        }
    });
    // The `&mut self` methods: not here (they run alone, through `handle`).
    let exclusive_names = methods
        .iter()
        .filter(|m| m.mut_self)
        .map(|m| &m.rpc_name)
        .collect::<Vec<_>>();
    let exclusive_arm = if exclusive_names.is_empty() {
        quote!()
    } else {
        quote!(#(#exclusive_names)|* => ::std::option::Option::None,)
    };

    let (impl_generics, _, where_clause) = item.generics.split_for_impl();
    let self_ty = &item.self_ty;
    let out = quote! {
        #item

        impl #impl_generics #z::Service for #self_ty #where_clause {
            fn service_name(&self) -> ::std::string::String {
                ::std::string::String::from(#service_name_expr)
            }

            fn methods(&self) -> ::std::vec::Vec<#z::MethodInfo> {
                ::std::vec![#(#infos),*]
            }

            #[allow(unused_variables, clippy::let_unit_value, clippy::unit_arg)]
            fn handle<'__zrpc>(
                &'__zrpc mut self,
                __zrpc_ctx: &'__zrpc #z::Context,
                __zrpc_method: &'__zrpc str,
                __zrpc_payload: #z::Bytes,
            ) -> #z::HandlerFuture<'__zrpc> {
                match __zrpc_method {
                    #(#arms)*
                    _ => #z::__private::no_such_method(__zrpc_ctx, __zrpc_method),
                }
            }

            #[allow(unused_variables, clippy::let_unit_value, clippy::unit_arg, clippy::redundant_closure_call)]
            fn handle_now(
                &mut self,
                __zrpc_ctx: &#z::Context,
                __zrpc_method: &str,
                __zrpc_payload: &#z::Bytes,
            ) -> ::std::option::Option<::std::result::Result<#z::Bytes, #z::HandlerError>> {
                match __zrpc_method {
                    #(#now_arms)*
                    _ => ::std::option::Option::None,
                }
            }

            #[allow(unused_variables, clippy::let_unit_value, clippy::unit_arg, clippy::redundant_closure_call)]
            fn handle_shared(
                self: ::std::rc::Rc<Self>,
                __zrpc_ctx: #z::Context,
                __zrpc_method: &str,
                __zrpc_payload: #z::Bytes,
            ) -> ::std::option::Option<#z::HandlerFuture<'static>> {
                match __zrpc_method {
                    #(#shared_arms)*
                    #exclusive_arm
                    // An unknown method is answered at once, without
                    // waiting for exclusive access.
                    _ => ::std::option::Option::Some(#z::__private::no_such_method(
                        &__zrpc_ctx,
                        __zrpc_method,
                    )),
                }
            }
        }
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake() {
        for (a, b) in [
            ("TestServer", "test_server"),
            ("HTTPServer", "httpserver"),
            ("MyClass", "my_class"),
            ("A", "a"),
            ("Server2Go", "server2_go"),
            ("already_snake", "already_snake"),
            ("My_Type", "my__type"),
        ] {
            assert_eq!(zrpc_proto::to_snake_case(a), b, "{a}");
        }
    }

    #[test]
    fn pretty_types() {
        let t: Type = syn::parse_quote!(Result<Vec<u8>, std::io::Error>);
        assert_eq!(pretty(&quote!(#t)), "Result<Vec<u8>, std::io::Error>");
        let t: Type = syn::parse_quote!(&'a mut [u8]);
        assert_eq!(pretty(&quote!(#t)), "&'a mut [u8]");
        let t: Type = syn::parse_quote!((String, i64));
        assert_eq!(pretty(&quote!(#t)), "(String, i64)");
    }
}
