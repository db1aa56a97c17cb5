//! The responder's one error type, and the one place its variants become DPS error codes
//! (device requests, PROTOCOL A5) and operator-plane codes (PROTOCOL B). The broker
//! maps the same type to CONNACK codes, in one place of its own.

use edgedps_policies::access::{OutOfService, RegisterAnswer};
use edgedps_policies::allocation::AllocationError;
use edgedps_policies::attestation::AttestationError;
use edgedps_policies::validation::Invalid;
use edgedps_topics::admin::codes as admin_codes;
use edgedps_topics::registration::codes;

use crate::limits::GroupRefusal;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CONNECT no enrollment accepts.
    #[error(transparent)]
    Attestation(#[from] AttestationError),

    /// A register body that is not one.
    #[error("{0}")]
    MalformedBody(String),
    /// Over a rate limit; the device may retry after `retry_after` seconds.
    #[error("throttled: {what}")]
    Throttled {
        what: &'static str,
        retry_after: u32,
    },
    #[error("a registration for this device is already in progress")]
    InProgress,
    #[error("operation `{0}` is unknown for this device")]
    UnknownOperation(String),
    /// The device's enrollment is gone, disabled in a way DPS answers with an error, or
    /// its credential no longer counts (the access rule).
    #[error("`{registration_id}`: {}", .reason.reason())]
    OutOfService {
        registration_id: String,
        reason: OutOfService,
    },
    #[error("no enrollment for `{0}`")]
    NoEnrollment(String),
    #[error(transparent)]
    Allocation(#[from] AllocationError),
    /// An enrollment group's limits do not admit the device.
    #[error(transparent)]
    Group(#[from] crate::limits::GroupRefusal),

    /// An operator write that may not be stored.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// An operator write of something operators do not write.
    #[error("{0}")]
    Forbidden(String),
    /// An operator write about a record that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An operator write that cannot be carried out as things stand.
    #[error("{0}")]
    Conflict(String),

    #[error("internal error: {0}")]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
    /// A certificate could not be issued (the authority's key or certificate).
    #[error("certificate issuance failed: {0}")]
    Issuance(String),
    #[error("enrollment group `{group}` in the store is unusable: {reason}")]
    BadGroup { group: String, reason: String },
    #[error("revocation list `{name}` in the store is unusable: {reason}")]
    BadCrl { name: String, reason: String },
}

impl Error {
    /// The DPS error code of a device request that failed this way (PROTOCOL A5).
    pub fn dps_code(&self) -> u32 {
        match self {
            Error::MalformedBody(_) | Error::Invalid(_) => codes::MALFORMED_BODY,
            Error::Allocation(AllocationError::Custom(_)) => codes::CUSTOM_ALLOCATION_FAILED,
            Error::Allocation(_) => codes::NO_HUB,
            Error::Group(GroupRefusal::Full { .. }) => codes::GROUP_FULL,
            Error::Group(GroupRefusal::IdPattern(_)) => codes::ID_PATTERN,
            Error::Attestation(_) | Error::Forbidden(_) => codes::UNAUTHORIZED,
            Error::OutOfService { reason, .. } => match reason.register_answer() {
                RegisterAnswer::NotFound => codes::NOT_FOUND,
                RegisterAnswer::Unauthorized | RegisterAnswer::Disabled => codes::UNAUTHORIZED,
            },
            Error::NoEnrollment(_) | Error::UnknownOperation(_) | Error::NotFound(_) => {
                codes::NOT_FOUND
            }
            Error::InProgress | Error::Conflict(_) => codes::CONFLICT,
            Error::Throttled { .. } => codes::THROTTLED,
            Error::Store(_)
            | Error::Internal(_)
            | Error::Issuance(_)
            | Error::BadGroup { .. }
            | Error::BadCrl { .. } => codes::INTERNAL,
        }
    }

    /// The code of an operator write that failed this way (PROTOCOL B, results).
    pub fn admin_code(&self) -> u16 {
        match self {
            Error::Invalid(Invalid::BadRequest(_))
            | Error::MalformedBody(_)
            | Error::Attestation(_)
            | Error::Allocation(_)
            | Error::Group(_)
            | Error::OutOfService { .. }
            | Error::UnknownOperation(_)
            | Error::Throttled { .. } => admin_codes::BAD_REQUEST,
            Error::Invalid(Invalid::EtagMismatch(_)) => admin_codes::PRECONDITION_FAILED,
            Error::Forbidden(_) => admin_codes::FORBIDDEN,
            Error::NotFound(_) | Error::NoEnrollment(_) => admin_codes::NOT_FOUND,
            Error::Conflict(_) | Error::InProgress => admin_codes::CONFLICT,
            Error::Store(_)
            | Error::Internal(_)
            | Error::Issuance(_)
            | Error::BadGroup { .. }
            | Error::BadCrl { .. } => admin_codes::INTERNAL,
        }
    }

    /// `retry-after` of the answer: throttled requests and our own failures may be tried
    /// again.
    pub fn retry_after(&self, default: u32) -> Option<u32> {
        match self {
            Error::Throttled { retry_after, .. } => Some(*retry_after),
            _ if self.dps_code() == codes::INTERNAL => Some(default),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_dps_code_and_status() {
        let cases = [
            (Error::MalformedBody("x".into()), 400004, 400),
            (Error::Allocation(AllocationError::NoHub), 400208, 400),
            (
                Error::Allocation(AllocationError::Custom("timed out".into())),
                400207,
                400,
            ),
            (
                Error::Group(GroupRefusal::Full {
                    group: "g".into(),
                    max: 2,
                }),
                403001,
                403,
            ),
            (
                Error::Group(GroupRefusal::IdPattern("p".into())),
                400210,
                400,
            ),
            (
                Error::OutOfService {
                    registration_id: "d".into(),
                    reason: OutOfService::Superseded,
                },
                401002,
                401,
            ),
            (
                Error::OutOfService {
                    registration_id: "d".into(),
                    reason: OutOfService::EnrollmentDeleted,
                },
                404201,
                404,
            ),
            (Error::UnknownOperation("4.x".into()), 404201, 404),
            (Error::InProgress, 409203, 409),
            (
                Error::Throttled {
                    what: "t",
                    retry_after: 3,
                },
                429001,
                429,
            ),
            (Error::Store(StoreError::Flush("disk".into())), 500000, 500),
        ];
        for (error, code, status) in cases {
            assert_eq!(error.dps_code(), code, "{error}");
            assert_eq!(codes::status_of(error.dps_code()), status, "{error}");
        }
    }

    #[test]
    fn operator_errors_have_their_codes() {
        assert_eq!(
            Error::Invalid(Invalid::BadRequest("b".into())).admin_code(),
            400
        );
        assert_eq!(
            Error::Invalid(Invalid::EtagMismatch("e".into())).admin_code(),
            412
        );
        assert_eq!(Error::Forbidden("f".into()).admin_code(), 403);
        assert_eq!(Error::NotFound("n".into()).admin_code(), 404);
        assert_eq!(Error::Conflict("c".into()).admin_code(), 409);
        assert_eq!(
            Error::Store(StoreError::Flush("disk".into())).admin_code(),
            500
        );
    }

    #[test]
    fn only_throttling_and_our_failures_say_when_to_retry() {
        let throttled = Error::Throttled {
            what: "t",
            retry_after: 7,
        };
        assert_eq!(throttled.retry_after(1), Some(7));
        assert_eq!(
            Error::Store(StoreError::Flush("disk".into())).retry_after(1),
            Some(1)
        );
        assert_eq!(Error::InProgress.retry_after(1), None);
    }
}
