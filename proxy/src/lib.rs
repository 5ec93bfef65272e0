//! The Tributary proxy: a lightweight Rust data plane.
//!
//! It will own a Delta-xDS client, TCP / HTTP/1.1 / HTTP/2 / gRPC forwarding,
//! weighted and locality-aware load balancing, and mTLS from SDS. Nothing is
//! implemented yet: see DESIGN.md §2.
