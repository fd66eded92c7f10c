//! `#[interface]`: typed clients from a trait (see [`crate::interface`]).

use proc_macro2::TokenStream as TokenStream2;
use quote::{format_ident, quote};
use syn::spanned::Spanned;
use syn::{FnArg, ItemTrait, LitStr, ReturnType, TraitItem, Type};

use crate::{doc_of, is_context, last_segment_is, method_params};

/// One method of the interface, as the clients call it.
struct ClientMethod {
    ident: syn::Ident,
    doc: String,
    /// The argument's name and type, if the method takes one.
    arg: Option<(syn::Ident, Type)>,
    /// What a successful call returns (`T` of `Result<T, E>`).
    ok: Type,
    /// The service's error type (`E` of `Result<T, E>`), if declared.
    err: Option<Type>,
}

/// The `T` and `E` of a return type spelled `Result<T, E>`.
pub(crate) fn result_types(ty: &Type) -> Option<(Type, Type)> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    let syn::PathArguments::AngleBracketed(a) = &last.arguments else {
        return None;
    };
    let mut types = a.args.iter().filter_map(|g| match g {
        syn::GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    });
    match (types.next(), types.next(), types.next()) {
        (Some(t), Some(e), None) => Some((t, e)),
        _ => None,
    }
}

fn analyse(f: &syn::TraitItemFn) -> syn::Result<ClientMethod> {
    let sig = &f.sig;
    let inputs = method_params(sig, "methods of a zrpc interface")?;
    let mut arg = None;
    for a in inputs {
        let FnArg::Typed(pt) = a else {
            return Err(syn::Error::new(a.span(), "unexpected receiver"));
        };
        if is_context(&pt.ty) {
            return Err(syn::Error::new(
                pt.ty.span(),
                "a zrpc interface method cannot take the `Context` (the caller does not send it); \
                 use an inherent `#[service] impl` for methods that need it",
            ));
        }
        if arg.is_some() {
            return Err(syn::Error::new(
                pt.span(),
                "methods of a zrpc interface take at most one argument besides `self`; \
                 use a tuple or a struct for several",
            ));
        }
        if let Type::Reference(_) = &*pt.ty {
            return Err(syn::Error::new(
                pt.ty.span(),
                "the argument must be an owned type (serde::Serialize + DeserializeOwned)",
            ));
        }
        let name = match &*pt.pat {
            syn::Pat::Ident(pi) => pi.ident.clone(),
            _ => format_ident!("arg"),
        };
        arg = Some((name, (*pt.ty).clone()));
    }
    let (ok, err): (Type, Option<Type>) = match &sig.output {
        ReturnType::Default => (syn::parse_quote!(()), None),
        ReturnType::Type(_, ty) if last_segment_is(ty, "Result") => {
            let (t, e) = result_types(ty).ok_or_else(|| {
                syn::Error::new(
                    ty.span(),
                    "expected `Result<T, E>` with both types spelled out (the client \
                     needs `E` to decode the service's error)",
                )
            })?;
            (t, Some(e))
        }
        ReturnType::Type(_, ty) => ((**ty).clone(), None),
    };
    Ok(ClientMethod {
        ident: sig.ident.clone(),
        doc: doc_of(&f.attrs),
        arg,
        ok,
        err,
    })
}

pub(crate) fn expand(name: Option<LitStr>, mut item: ItemTrait) -> syn::Result<TokenStream2> {
    if !item.generics.params.is_empty() {
        return Err(syn::Error::new(
            item.generics.span(),
            "a zrpc interface cannot be generic",
        ));
    }
    let trait_ident = item.ident.clone();
    let service_name = name
        .map(|l| l.value())
        .unwrap_or_else(|| zrpc_proto::to_snake_case(&trait_ident.to_string()));
    if let Err(e) = zrpc_proto::validate_name(&service_name) {
        return Err(syn::Error::new(
            trait_ident.span(),
            format!("invalid service name {service_name:?}: {e}"),
        ));
    }
    let mut methods: Vec<ClientMethod> = Vec::new();
    for it in &item.items {
        match it {
            TraitItem::Fn(f) => {
                let m = analyse(f)?;
                let name = m.ident.to_string();
                // The clients' own methods, and each method's `*_with` form.
                let taken = [
                    "new",
                    "with_name",
                    "with_options",
                    "client",
                    "zrpc_method_doc",
                ]
                .contains(&name.as_str())
                    || methods.iter().any(|o| format!("{}_with", o.ident) == name)
                    || name
                        .strip_suffix("_with")
                        .is_some_and(|base| methods.iter().any(|o| o.ident == base));
                if taken || name == "zrpc.describe" {
                    return Err(syn::Error::new(
                        m.ident.span(),
                        format!(
                            "`{name}` would clash with a method of the generated clients (new, with_name, with_options, client, and `<method>_with` for each method); rename it"
                        ),
                    ));
                }
                methods.push(m);
            }
            other => {
                return Err(syn::Error::new(
                    other.span(),
                    "a zrpc interface holds methods only",
                ))
            }
        }
    }
    item.items.push(syn::parse_quote! {
        /// The name the service registers and the typed clients call.
        const ZRPC_SERVICE_NAME: &'static str = #service_name;
    });
    // The trait's doc comments, for the service's introspection
    // (`#[service]` on the impl sees only the impl).
    let doc_arms = methods.iter().map(|m| {
        let name = m.ident.to_string();
        let doc = &m.doc;
        quote!(#name => #doc,)
    });
    item.items.push(syn::parse_quote! {
        /// The doc comment of `method` in the interface (for
        /// `zrpc.describe`); used by `#[zrpc_service::service]`.
        #[doc(hidden)]
        fn zrpc_method_doc(method: &str) -> &'static str
        where
            Self: Sized,
        {
            match method {
                #(#doc_arms)*
                _ => "",
            }
        }
    });

    let c = quote!(::zrpc_client);
    let trait_doc = format!(
        "the `{service_name}` service (the `{trait_ident}` interface; generated by `#[interface]`)"
    );
    let async_client = client(
        &format_ident!("{}Client", trait_ident),
        &format!("Typed async client of {trait_doc}."),
        quote!(#c::Client),
        &service_name,
        &methods,
        true,
    );
    let blocking_client = client(
        &format_ident!("{}BlockingClient", trait_ident),
        &format!("Typed blocking client of {trait_doc}."),
        quote!(#c::BlockingClient),
        &service_name,
        &methods,
        false,
    );
    Ok(quote! {
        #[allow(async_fn_in_trait)]
        #item

        #async_client

        #blocking_client
    })
}

/// One typed client: `name`, over `inner` (the async or the blocking
/// client), with a method per interface method.
fn client(
    name: &syn::Ident,
    doc: &str,
    inner: TokenStream2,
    service_name: &str,
    methods: &[ClientMethod],
    is_async: bool,
) -> TokenStream2 {
    let c = quote!(::zrpc_client);
    let methods = methods.iter().map(|m| method(m, is_async));
    quote! {
        #[doc = #doc]
        #[derive(Clone, Debug)]
        pub struct #name {
            client: #inner,
            service: ::std::borrow::Cow<'static, str>,
            options: #c::CallOptions,
        }

        impl #name {
            /// A client of the service under its default name, calling with
            /// default options (no timeout; see [`with_options`](Self::with_options)).
            pub fn new(client: #inner) -> Self {
                Self {
                    client,
                    service: ::std::borrow::Cow::Borrowed(#service_name),
                    options: #c::CallOptions::default(),
                }
            }

            /// Calls the instance registered under `name` instead.
            pub fn with_name(mut self, name: impl ::std::convert::Into<::std::string::String>) -> Self {
                self.service = ::std::borrow::Cow::Owned(name.into());
                self
            }

            /// The options of every call made through the typed methods
            /// (timeout, `no_wait`, `no_retry`); each method also has a
            /// `*_with` form taking options for one call.
            pub fn with_options(mut self, options: #c::CallOptions) -> Self {
                self.options = options;
                self
            }

            /// The untyped client underneath.
            pub fn client(&self) -> &#inner {
                &self.client
            }

            #(#methods)*
        }
    }
}

/// The typed method `m` of a client, and its `*_with` form.
fn method(m: &ClientMethod, is_async: bool) -> TokenStream2 {
    let c = quote!(::zrpc_client);
    let ident = &m.ident;
    let with = format_ident!("{}_with", m.ident);
    let rpc_name = m.ident.to_string();
    let ok = &m.ok;
    let doc = if m.doc.is_empty() {
        format!("Calls `{rpc_name}`.")
    } else {
        m.doc.clone()
    };
    let with_doc = format!("[`{rpc_name}`](Self::{rpc_name}) with these options for this call.");
    let (params, payload) = match &m.arg {
        Some((name, ty)) => (quote!(#name: #ty,), quote!(&#name)),
        None => (quote!(), quote!(&())),
    };
    let pass = match &m.arg {
        Some((name, _)) => quote!(#name,),
        None => quote!(),
    };
    let (asyncness, dot_await) = if is_async {
        (quote!(async), quote!(.await))
    } else {
        (quote!(), quote!())
    };
    let call = quote! {
        self.client
            .call_with::<_, #ok>(&self.service, #rpc_name, #payload, options)
            #dot_await
    };
    // A method declared `-> Result<T, E>` returns the service's `Err(e)` as
    // `Ok(Err(e))`: the outer `Result` is the call's, the inner the method's.
    let (ret, body) = match &m.err {
        Some(err) => (
            quote!(::std::result::Result<#ok, #err>),
            quote! {
                match #call {
                    ::std::result::Result::Ok(v) => ::std::result::Result::Ok(::std::result::Result::Ok(v)),
                    ::std::result::Result::Err(e) => e.into_remote::<#err>().map(::std::result::Result::Err),
                }
            },
        ),
        None => (quote!(#ok), call),
    };
    quote! {
        #[doc = #doc]
        pub #asyncness fn #ident(&self, #params) -> #c::Result<#ret> {
            self.#with(#pass self.options) #dot_await
        }

        #[doc = #with_doc]
        pub #asyncness fn #with(&self, #params options: #c::CallOptions) -> #c::Result<#ret> {
            #body
        }
    }
}
