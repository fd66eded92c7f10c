//! zrpc client (under construction).
