//! Which nodes own a key: the `ringcache-placement` crate, which the
//! clients that route themselves (direct mode) use too, so every process
//! places every key alike.

pub use ringcache_placement::*;
