//! Hub allocation (PROTOCOL A6): [`allocate`] applies an enrollment's policy to the
//! linked hubs.
//!
//! The candidates are the enrollment's `iotHubs` when it names any, otherwise every
//! linked hub that takes part in allocation. `static` needs exactly one candidate;
//! `hashed` picks among them with [`hashed`]; `geoLatency` takes the reachable one with
//! the lowest latency the gateway measured (`LinkedHub::latency`), ties and hubs not yet
//! measured decided by the hash; `custom` is an allocator's answer, checked by
//! [`custom_answer`]. Every choice comes with its reason, for the record and the event.
//!
//! `hashed` is weighted rendezvous hashing: every candidate hub scores the registration
//! id and the highest score wins. The score depends only on the id, the hub's name and
//! its weight, so every node and every restart gives the same answer, and linking a new
//! hub moves exactly the devices the new hub outscores.

use ring::digest;

use edgedps_topics::admin::{AllocationPolicy, LinkedHub};
use edgedps_topics::allocation::{ExplainedAllocation, ExplainedCandidate};
use edgedps_topics::identity::RegistrationId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    #[error("static allocation needs exactly one hub in the enrollment's iotHubs")]
    StaticNeedsOneHub,
    #[error("no linked hub can be assigned to this device")]
    NoHub,
    #[error("geoLatency: no candidate hub is reachable ({0})")]
    NoneReachable(String),
    /// A custom allocator failed: timed out, errored, answered something unusable.
    #[error("custom allocation failed: {0}")]
    Custom(String),
}

/// Latencies closer than this (or [`TIE_FRACTION`] of the lower) are a tie, broken by
/// the hash: measurement noise must not move devices between equally near hubs.
pub const TIE_MICROSECONDS: u64 = 200;
pub const TIE_FRACTION: f64 = 0.05;

/// A hub chosen, and the rule that chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated<'a> {
    pub hub: &'a str,
    pub reason: String,
}

/// The hubs a device of an enrollment naming `iot_hubs` may be given: those hubs, or
/// when it names none every linked hub that takes part in allocation.
pub fn candidates<'a>(iot_hubs: &[String], linked: &'a [LinkedHub]) -> Vec<&'a LinkedHub> {
    linked
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
        .collect()
}

/// The hub for `registration_id` under `policy`, among the `linked` hubs (or those of
/// them the enrollment names in `iot_hubs`). `custom` is decided by an allocator
/// (see [`custom_answer`]); asked here, it is refused.
pub fn allocate<'a>(
    policy: AllocationPolicy,
    registration_id: &RegistrationId,
    iot_hubs: &[String],
    linked: &'a [LinkedHub],
) -> Result<Allocated<'a>, AllocationError> {
    let candidates = candidates(iot_hubs, linked);
    match policy {
        AllocationPolicy::Static => match candidates.as_slice() {
            [only] => Ok(Allocated {
                hub: &only.host_name,
                reason: "static: the enrollment's one hub".into(),
            }),
            [] => Err(AllocationError::NoHub),
            _ => Err(AllocationError::StaticNeedsOneHub),
        },
        AllocationPolicy::Hashed => by_hash(registration_id, &candidates, "hashed"),
        AllocationPolicy::GeoLatency => by_latency(registration_id, &candidates),
        AllocationPolicy::Custom => Err(AllocationError::Custom(
            "no custom allocator was asked".into(),
        )),
    }
}

fn by_hash<'a>(
    registration_id: &RegistrationId,
    candidates: &[&'a LinkedHub],
    rule: &str,
) -> Result<Allocated<'a>, AllocationError> {
    let scored: Vec<Candidate<'a>> = candidates.iter().map(|hub| Candidate::of(hub)).collect();
    let (score, hub) = best(registration_id, &scored).ok_or(AllocationError::NoHub)?;
    let eligible = scored.iter().filter(|c| c.weight > 0).count();
    Ok(Allocated {
        hub,
        reason: format!("{rule}: highest score {score:.2} of {eligible} candidates"),
    })
}

/// geoLatency: the reachable candidate with the lowest measured latency; candidates
/// within a tie of it are decided by the hash. Hubs never measured yet are left out
/// while any is measured; when none is, the hash decides among all.
fn by_latency<'a>(
    registration_id: &RegistrationId,
    candidates: &[&'a LinkedHub],
) -> Result<Allocated<'a>, AllocationError> {
    let measured: Vec<(&'a LinkedHub, u64)> = candidates
        .iter()
        .filter(|hub| hub.allocation_weight > 0)
        .filter_map(|hub| {
            let latency = hub.latency.as_ref()?;
            Some((*hub, latency.microseconds.filter(|_| latency.reachable)?))
        })
        .collect();
    if measured.is_empty() {
        let probed: Vec<&str> = candidates
            .iter()
            .filter(|hub| hub.latency.is_some())
            .map(|hub| hub.host_name.as_str())
            .collect();
        if !probed.is_empty() && probed.len() == candidates.len() {
            return Err(AllocationError::NoneReachable(format!(
                "unreachable: {}",
                probed.join(", ")
            )));
        }
        return by_hash(
            registration_id,
            candidates,
            "geoLatency: no latency measured yet; hashed",
        );
    }
    let lowest = measured.iter().map(|(_, us)| *us).min().unwrap_or_default();
    let tie = TIE_MICROSECONDS.max((lowest as f64 * TIE_FRACTION) as u64);
    let near: Vec<&'a LinkedHub> = measured
        .iter()
        .filter(|(_, us)| *us <= lowest + tie)
        .map(|(hub, _)| *hub)
        .collect();
    let chosen = by_hash(registration_id, &near, "hash")?;
    let own = measured
        .iter()
        .find(|(hub, _)| hub.host_name == chosen.hub)
        .map(|(_, us)| *us)
        .unwrap_or(lowest);
    let next = measured
        .iter()
        .filter(|(hub, _)| hub.host_name != chosen.hub)
        .map(|(_, us)| *us)
        .min();
    let mut reason = format!("geoLatency: {}", milliseconds(own));
    match next {
        Some(next) => reason.push_str(&format!(", next {}", milliseconds(next))),
        None => reason.push_str(", the only reachable candidate"),
    }
    if near.len() > 1 {
        reason.push_str(&format!(
            "; a tie of {} within {}, broken by the hash",
            near.len(),
            milliseconds(tie)
        ));
    }
    Ok(Allocated {
        hub: chosen.hub,
        reason,
    })
}

/// `4.1 ms`.
pub fn milliseconds(microseconds: u64) -> String {
    format!("{:.1} ms", microseconds as f64 / 1000.0)
}

/// The hub a custom allocator answered, if it is one of the `candidates` it was
/// offered (spelled as linked).
pub fn custom_answer<'a>(
    answered: &str,
    candidates: &[&'a LinkedHub],
) -> Result<&'a str, AllocationError> {
    candidates
        .iter()
        .find(|hub| hub.host_name.eq_ignore_ascii_case(answered))
        .map(|hub| hub.host_name.as_str())
        .ok_or_else(|| {
            let offered: Vec<&str> = candidates.iter().map(|h| h.host_name.as_str()).collect();
            AllocationError::Custom(format!(
                "the allocator answered hub `{answered}`, which is not one of the linked hubs offered ({})",
                offered.join(", ")
            ))
        })
}

/// What [`allocate`] would do, with every candidate's weight, score and latency.
pub fn explain(
    policy: AllocationPolicy,
    registration_id: &RegistrationId,
    iot_hubs: &[String],
    linked: &[LinkedHub],
) -> ExplainedAllocation {
    let id = registration_id.key();
    let outcome = match policy {
        AllocationPolicy::Custom => Err(
            "custom: the enrollment's allocator decides at registration (explain does not call it)"
                .to_owned(),
        ),
        _ => allocate(policy, registration_id, iot_hubs, linked)
            .map(|a| (a.hub.to_owned(), a.reason))
            .map_err(|e| e.to_string()),
    };
    let chosen = outcome.as_ref().ok().map(|(hub, _)| hub.as_str());
    let candidates = candidates(iot_hubs, linked)
        .into_iter()
        .map(|hub| ExplainedCandidate {
            host_name: hub.host_name.clone(),
            weight: hub.allocation_weight,
            hash_score: match hub.allocation_weight {
                0 => 0.0,
                _ => score(&id, &Candidate::of(hub)),
            },
            latency_microseconds: hub.latency.as_ref().and_then(|l| l.microseconds),
            reachable: hub.latency.as_ref().map(|l| l.reachable),
            chosen: chosen == Some(hub.host_name.as_str()),
        })
        .collect();
    let (hub, reason) = match outcome {
        Ok((hub, reason)) => (Some(hub), reason),
        Err(reason) => (None, reason),
    };
    ExplainedAllocation {
        policy,
        candidates,
        hub,
        reason,
    }
}

/// A hub a device may be assigned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub host_name: &'a str,
    pub weight: u32,
}

impl<'a> Candidate<'a> {
    fn of(hub: &'a LinkedHub) -> Candidate<'a> {
        Candidate {
            host_name: &hub.host_name,
            weight: hub.allocation_weight,
        }
    }
}

/// Weighted rendezvous hashing over `candidates`; `None` when there is none with a
/// positive weight.
pub fn hashed<'a>(
    registration_id: &RegistrationId,
    candidates: &[Candidate<'a>],
) -> Option<&'a str> {
    best(registration_id, candidates).map(|(_, name)| name)
}

/// The winner of the hash and its score.
fn best<'a>(
    registration_id: &RegistrationId,
    candidates: &[Candidate<'a>],
) -> Option<(f64, &'a str)> {
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
    best
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
            allocate(AllocationPolicy::Static, &"dev".into(), &names, &hubs).map(|a| a.hub),
            Ok("b.example")
        );
        let both = vec!["a.example".to_string(), "b.example".to_string()];
        assert_eq!(
            allocate(AllocationPolicy::Static, &"dev".into(), &both, &hubs).map(|a| a.hub),
            Err(AllocationError::StaticNeedsOneHub)
        );
        let unknown = vec!["c.example".to_string()];
        assert_eq!(
            allocate(AllocationPolicy::Static, &"dev".into(), &unknown, &hubs).map(|a| a.hub),
            Err(AllocationError::NoHub)
        );
    }

    #[test]
    fn hashed_without_named_hubs_uses_the_hubs_that_take_part() {
        let hubs = [linked("a.example", 1, false), linked("b.example", 1, true)];
        for id in ["d1", "d2", "d3", "d4"] {
            assert_eq!(
                allocate(AllocationPolicy::Hashed, &id.into(), &[], &hubs).map(|a| a.hub),
                Ok("b.example")
            );
        }
        let none = [linked("a.example", 1, false)];
        assert_eq!(
            allocate(AllocationPolicy::Hashed, &"d1".into(), &[], &none).map(|a| a.hub),
            Err(AllocationError::NoHub)
        );
        // Named hubs take part whatever their flag; a weight of 0 never wins.
        let named = vec!["a.example".to_string()];
        assert_eq!(
            allocate(AllocationPolicy::Hashed, &"d1".into(), &named, &hubs).map(|a| a.hub),
            Ok("a.example")
        );
        let zero = [linked("a.example", 0, true)];
        assert_eq!(
            allocate(AllocationPolicy::Hashed, &"d1".into(), &[], &zero).map(|a| a.hub),
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

    fn measured(host_name: &str, microseconds: Option<u64>, reachable: bool) -> LinkedHub {
        LinkedHub {
            latency: Some(edgedps_topics::admin::HubLatency {
                reachable,
                microseconds,
                probe_address: format!("{host_name}:8883"),
                error: None,
                measured_at_utc: String::new(),
            }),
            ..LinkedHub::named(host_name)
        }
    }

    #[test]
    fn geo_latency_takes_the_nearest_reachable_hub() {
        let hubs = [
            measured("far.example", Some(60_000), true),
            measured("near.example", Some(4_100), true),
            measured("down.example", Some(1_000), false),
            measured("mid.example", Some(9_800), true),
        ];
        for id in ["d1", "d2", "d3", "d4", "d5"] {
            let got = allocate(AllocationPolicy::GeoLatency, &id.into(), &[], &hubs).unwrap();
            assert_eq!(got.hub, "near.example");
            assert_eq!(got.reason, "geoLatency: 4.1 ms, next 9.8 ms");
        }
        // Only the unreachable ones: none.
        let down = [measured("a", None, false), measured("b", Some(10), false)];
        assert!(matches!(
            allocate(AllocationPolicy::GeoLatency, &"d1".into(), &[], &down),
            Err(AllocationError::NoneReachable(_))
        ));
    }

    #[test]
    fn geo_latency_ties_and_unmeasured_hubs_go_by_the_hash() {
        let hubs = [
            measured("a.example", Some(5_000), true),
            measured("b.example", Some(5_100), true),
            measured("c.example", Some(50_000), true),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let id: RegistrationId = format!("dev-{i}").into();
            let got = allocate(AllocationPolicy::GeoLatency, &id, &[], &hubs).unwrap();
            let both = [LinkedHub::named("a.example"), LinkedHub::named("b.example")];
            let hashed = allocate(AllocationPolicy::Hashed, &id, &[], &both).unwrap();
            assert_eq!(got.hub, hashed.hub, "{id}");
            assert!(got.reason.contains("a tie of 2"), "{}", got.reason);
            seen.insert(got.hub);
        }
        assert_eq!(seen.len(), 2, "both tied hubs get devices");
        // Nothing measured yet: hashed over all, and the reason says so.
        let fresh = [LinkedHub::named("a.example"), LinkedHub::named("b.example")];
        let got = allocate(AllocationPolicy::GeoLatency, &"d1".into(), &[], &fresh).unwrap();
        assert!(
            got.reason
                .starts_with("geoLatency: no latency measured yet; hashed: highest score"),
            "{}",
            got.reason
        );
    }

    #[test]
    fn custom_answers_must_name_an_offered_hub_and_explain_shows_every_candidate() {
        let hubs = [
            LinkedHub::named("Hub-A.example"),
            LinkedHub::named("hub-b.example"),
        ];
        let offered = candidates(&[], &hubs);
        assert_eq!(
            custom_answer("hub-a.EXAMPLE", &offered),
            Ok("Hub-A.example")
        );
        let err = custom_answer("hub-z.example", &offered).unwrap_err();
        assert!(err.to_string().contains("hub-z.example"), "{err}");
        let explained = explain(AllocationPolicy::Hashed, &"d1".into(), &[], &hubs);
        let direct = allocate(AllocationPolicy::Hashed, &"d1".into(), &[], &hubs).unwrap();
        assert_eq!(explained.hub.as_deref(), Some(direct.hub));
        assert_eq!(explained.reason, direct.reason);
        assert_eq!(explained.candidates.len(), 2);
        let chosen: Vec<_> = explained.candidates.iter().filter(|c| c.chosen).collect();
        assert_eq!(chosen.len(), 1);
        let top = explained
            .candidates
            .iter()
            .map(|c| c.hash_score)
            .fold(f64::MIN, f64::max);
        assert_eq!(chosen[0].hash_score, top);
        let custom = explain(AllocationPolicy::Custom, &"d1".into(), &[], &hubs);
        assert_eq!(custom.hub, None);
        assert!(custom.reason.starts_with("custom"), "{}", custom.reason);
    }
}
