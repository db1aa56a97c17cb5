//! Hub allocation (PROTOCOL A6): [`allocate`] applies an enrollment's policy to the
//! linked hubs.
//!
//! The candidates are the enrollment's `iotHubs` when it names any, otherwise every
//! linked hub that takes part in allocation. `static` needs exactly one candidate;
//! `hashed` (and the service default) picks among them with [`hashed`].
//!
//! `hashed` is weighted rendezvous hashing: every candidate hub scores the registration
//! id and the highest score wins. The score depends only on the id, the hub's name and
//! its weight, so every node and every restart gives the same answer, and linking a new
//! hub moves exactly the devices the new hub outscores.

use ring::digest;

use edgedps_topics::admin::{AllocationPolicy, LinkedHub};
use edgedps_topics::identity::RegistrationId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    #[error("static allocation needs exactly one hub in the enrollment's iotHubs")]
    StaticNeedsOneHub,
    #[error("no linked hub can be assigned to this device")]
    NoHub,
}

/// The hub for `registration_id` under `policy`, among the `linked` hubs (or those of
/// them the enrollment names in `iot_hubs`).
pub fn allocate<'a>(
    policy: AllocationPolicy,
    registration_id: &RegistrationId,
    iot_hubs: &[String],
    linked: &'a [LinkedHub],
) -> Result<&'a str, AllocationError> {
    let candidates: Vec<Candidate<'a>> = linked
        .iter()
        .filter(|hub| {
            if iot_hubs.is_empty() {
                hub.apply_allocation_policy
            } else {
                iot_hubs
                    .iter()
                    .any(|name| name.eq_ignore_ascii_case(&hub.host_name))
            }
        })
        .map(|hub| Candidate {
            host_name: &hub.host_name,
            weight: hub.allocation_weight,
        })
        .collect();
    let chosen = match policy {
        AllocationPolicy::Static => match candidates.as_slice() {
            [only] => Some(only.host_name),
            [] => None,
            _ => return Err(AllocationError::StaticNeedsOneHub),
        },
        _ => hashed(registration_id, &candidates),
    };
    chosen.ok_or(AllocationError::NoHub)
}

/// A hub a device may be assigned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub host_name: &'a str,
    pub weight: u32,
}

/// Weighted rendezvous hashing over `candidates`; `None` when there is none with a
/// positive weight.
pub fn hashed<'a>(
    registration_id: &RegistrationId,
    candidates: &[Candidate<'a>],
) -> Option<&'a str> {
    // Registration ids are case-insensitive: the canonical spelling is hashed.
    let id = registration_id.key();
    let mut best: Option<(f64, &'a str)> = None;
    for candidate in candidates.iter().filter(|c| c.weight > 0) {
        let score = score(&id, candidate);
        let better = match best {
            None => true,
            Some((best_score, best_name)) => {
                score > best_score || (score == best_score && candidate.host_name < best_name)
            }
        };
        if better {
            best = Some((score, candidate.host_name));
        }
    }
    best.map(|(_, name)| name)
}

/// `weight / -ln(u)` with `u` uniform in (0, 1) from SHA-256(id || 0 || hub): the
/// highest of these is distributed in proportion to the weights.
fn score(id: &str, candidate: &Candidate<'_>) -> f64 {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(id.as_bytes());
    ctx.update(&[0]);
    ctx.update(candidate.host_name.to_ascii_lowercase().as_bytes());
    let hash = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_ref()[..8]);
    let bits = u64::from_be_bytes(first) >> 11; // 53 bits: exact in an f64
    let u = (bits as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(candidate.weight) / -u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn linked(host_name: &str, weight: u32, apply: bool) -> LinkedHub {
        LinkedHub {
            allocation_weight: weight,
            apply_allocation_policy: apply,
            ..LinkedHub::named(host_name)
        }
    }

    #[test]
    fn static_takes_the_one_hub_the_enrollment_names() {
        let hubs = [linked("a.example", 1, true), linked("b.example", 1, false)];
        let names = vec!["B.example".to_string()];
        assert_eq!(
            allocate(AllocationPolicy::Static, &"dev".into(), &names, &hubs),
            Ok("b.example")
        );
        let both = vec!["a.example".to_string(), "b.example".to_string()];
        assert_eq!(
            allocate(AllocationPolicy::Static, &"dev".into(), &both, &hubs),
            Err(AllocationError::StaticNeedsOneHub)
        );
        let unknown = vec!["c.example".to_string()];
        assert_eq!(
            allocate(AllocationPolicy::Static, &"dev".into(), &unknown, &hubs),
            Err(AllocationError::NoHub)
        );
    }

    #[test]
    fn hashed_without_named_hubs_uses_the_hubs_that_take_part() {
        let hubs = [linked("a.example", 1, false), linked("b.example", 1, true)];
        for id in ["d1", "d2", "d3", "d4"] {
            assert_eq!(
                allocate(AllocationPolicy::Hashed, &id.into(), &[], &hubs),
                Ok("b.example")
            );
        }
        let none = [linked("a.example", 1, false)];
        assert_eq!(
            allocate(AllocationPolicy::Hashed, &"d1".into(), &[], &none),
            Err(AllocationError::NoHub)
        );
        // Named hubs take part whatever their flag; a weight of 0 never wins.
        let named = vec!["a.example".to_string()];
        assert_eq!(
            allocate(AllocationPolicy::Hashed, &"d1".into(), &named, &hubs),
            Ok("a.example")
        );
        let zero = [linked("a.example", 0, true)];
        assert_eq!(
            allocate(AllocationPolicy::Hashed, &"d1".into(), &[], &zero),
            Err(AllocationError::NoHub)
        );
    }

    fn hubs(weights: &[(&'static str, u32)]) -> Vec<Candidate<'static>> {
        weights
            .iter()
            .map(|&(host_name, weight)| Candidate { host_name, weight })
            .collect()
    }

    #[test]
    fn weights_are_respected_within_five_percent_over_100k_ids() {
        let candidates = hubs(&[("hub-a", 1), ("hub-b", 2), ("hub-c", 5)]);
        let mut counts: HashMap<&str, u32> = HashMap::new();
        let n = 100_000;
        for i in 0..n {
            let hub = hashed(&format!("device-{i}").into(), &candidates).unwrap();
            *counts.entry(hub).or_default() += 1;
        }
        for (hub, weight) in [("hub-a", 1.0), ("hub-b", 2.0), ("hub-c", 5.0)] {
            let expected = n as f64 * weight / 8.0;
            let got = f64::from(counts[hub]);
            assert!(
                (got - expected).abs() / expected < 0.05,
                "{hub}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn adding_a_hub_moves_only_devices_the_new_hub_wins() {
        let before = hubs(&[("hub-a", 1), ("hub-b", 1)]);
        let after = hubs(&[("hub-a", 1), ("hub-b", 1), ("hub-c", 1)]);
        let mut moved = 0;
        for i in 0..10_000 {
            let id = format!("device-{i}");
            let old = hashed(&id.as_str().into(), &before).unwrap();
            let new = hashed(&id.as_str().into(), &after).unwrap();
            if old != new {
                assert_eq!(new, "hub-c", "{id} moved from {old} to {new}");
                moved += 1;
            }
        }
        // About a third of the devices move to the new hub.
        assert!((3000..3700).contains(&moved), "{moved}");
    }

    #[test]
    fn answer_is_stable_and_case_insensitive() {
        let candidates = hubs(&[("hub-a", 1), ("hub-b", 1), ("hub-c", 1)]);
        let first = hashed(&"Device-42".into(), &candidates);
        assert_eq!(first, hashed(&"device-42".into(), &candidates));
        let reversed: Vec<_> = candidates.iter().rev().copied().collect();
        assert_eq!(first, hashed(&"device-42".into(), &reversed));
    }

    #[test]
    fn no_candidate_means_no_hub() {
        assert_eq!(hashed(&"dev".into(), &[]), None);
        assert_eq!(hashed(&"dev".into(), &hubs(&[("hub-a", 0)])), None);
    }
}
