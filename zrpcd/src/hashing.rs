//! The hash of the tables keyed by what peers choose: service and method
//! names, callers' call ids. Seeded at random in each process (foldhash),
//! where the broker's other tables use the fixed FxHash: with a fixed hash,
//! a peer could pick keys that all collide (FxHash on a call id is
//! invertible, and a caller learns its connection id from `Welcome`) and
//! make every lookup of its own walk all of them, on the broker's only
//! thread. SipHash (std's `RandomState`) would also resist an attacker who
//! studies the broker's timing to recover the seed (foldhash does not claim
//! to), but cost 17% more instructions per call in the broker for the
//! call-id index alone (`valgrind --tool=callgrind`, `ZARGS="--busy-poll-us
//! 0" bench/scripts/run.sh current 64 64 100000`: 465.8M against 399.3M
//! with FxHash); foldhash for all these tables costs nothing measurable
//! (397.8M against 395.6M; 64 B calls one at a time, 20,000: 309.7M
//! against 309.6M).

/// Builds the hashers of a table keyed by what peers choose.
pub type PeerKeyState = foldhash::fast::RandomState;

/// A map keyed by what peers choose.
pub type PeerKeyedMap<K, V> = std::collections::HashMap<K, V, PeerKeyState>;

/// A set of what peers choose.
pub type PeerKeyedSet<K> = std::collections::HashSet<K, PeerKeyState>;
