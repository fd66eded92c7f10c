//! The broker's handling of decoded envelopes (`zrpcd::replay::drive`):
//! arbitrary sequences of frames from several peers, disconnects,
//! deadlines, heartbeats and partial frames must never panic the broker,
//! and once every peer is gone it must hold no call, name or buffer.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    zrpcd::replay::drive(data);
});
