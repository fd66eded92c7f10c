//! zrpc macros (under construction).
