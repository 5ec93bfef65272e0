//! `tributary-loadtest`: the load-test harness.
//!
//! It will simulate clusters over the federation protocol and thousands of
//! lightweight xDS clients (Delta and SotW), measure end-to-end convergence and run a
//! peer control plane side by side. Nothing is implemented yet: see DESIGN.md §2.
