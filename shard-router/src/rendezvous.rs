//! Rendezvous (highest-random-weight) hashing: every router picks the same replica for
//! a node from the same set of live replicas, without talking to the others, and a
//! replica leaving moves only the nodes it had.

/// The weight of `replica` for `node`: FNV-1a over both (with a separator), then a
/// 64-bit finalizer so that near-identical ids spread evenly. Stable across builds
/// and platforms.
pub fn weight(node: &str, replica: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(replica.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64's finalizer
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The replica with the highest weight for `node` (ties, which need equal 64-bit
/// weights, go to the greater id), or `None` when there is none.
pub fn pick<'a, I, T>(node: &str, replicas: I, id: impl Fn(&T) -> &str) -> Option<&'a T>
where
    I: IntoIterator<Item = &'a T>,
    T: 'a,
{
    replicas
        .into_iter()
        .max_by(|a, b| (weight(node, id(a)), id(a)).cmp(&(weight(node, id(b)), id(b))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cases() -> u32 {
        std::env::var("TRIBUTARY_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000)
    }

    fn choose<'a>(node: &str, set: &'a [String]) -> Option<&'a String> {
        pick(node, set, |s| s.as_str())
    }

    #[test]
    fn spreads_nodes_evenly_over_replicas() {
        let replicas: Vec<String> = ["hub-a", "hub-b", "hub-c"].map(String::from).into();
        let mut counts = [0usize; 3];
        for i in 0..30_000 {
            let node = format!("sidecar-{i}.prod");
            let r = choose(&node, &replicas).unwrap();
            counts[replicas.iter().position(|x| x == r).unwrap()] += 1;
        }
        for c in counts {
            assert!((9_000..=11_000).contains(&c), "uneven: {counts:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: cases(),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// The choice does not depend on the order replicas are listed in; removing a
        /// replica moves only the nodes that had it; adding one moves a node only to
        /// the newcomer.
        #[test]
        fn fuzz_rendezvous(
            node in "[a-z0-9.-]{1,24}",
            set in proptest::collection::btree_set("[a-z0-9-]{1,8}", 1..8),
            extra in "[a-z0-9-]{1,8}",
            drop_at in 0usize..8,
        ) {
            let mut replicas: Vec<String> = set.into_iter().collect();
            let chosen = choose(&node, &replicas).unwrap().clone();
            let mut reversed = replicas.clone();
            reversed.reverse();
            prop_assert_eq!(choose(&node, &reversed).unwrap(), &chosen);

            let dropped = replicas[drop_at % replicas.len()].clone();
            let without: Vec<String> = replicas.iter().filter(|r| **r != dropped).cloned().collect();
            let after = choose(&node, &without);
            if dropped == chosen {
                prop_assert!(after.is_none_or(|a| *a != chosen));
            } else {
                prop_assert_eq!(after, Some(&chosen));
            }

            if !replicas.contains(&extra) {
                replicas.push(extra.clone());
                let after = choose(&node, &replicas).unwrap();
                prop_assert!(*after == chosen || *after == extra);
            }
        }
    }
}
