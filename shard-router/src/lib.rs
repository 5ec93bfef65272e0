//! The shard router: Tributary's stateless front door.
//!
//! It will read the first xDS request of a proxy (node id, `tributary.io/env`, zone),
//! pick a live replica of the owning `(environment, zone)` shard from the membership
//! kept in the store, and relay the stream; and it will answer agents' directory
//! queries (which hubs serve a zone). Nothing is implemented yet: see DESIGN.md §2 and §4.
