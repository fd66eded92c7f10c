//! zrpc service (under construction).
