//! The one place where a core error becomes a JS error (SPEC §8).
//!
//! The error leaves as a napi error whose message is a JSON payload,
//! `{"smolError":{"code","message","problem"}}`: the stable code ([`Error::code`]), the message
//! and the error's problem body ([`Error::to_problem`], camelCase: `hint`, `status`, `code`
//! (the problem code), `retryable`, `retryAfterS`, `port`, `exitCode`, `logTail`, ...).
//! `errors.js` (`wrapNativeError`) turns it into the `SmolError` subclass of the code with those
//! fields as properties. `_errorFromProblem` does the same for an HTTP error response through
//! [`Error::from_problem`].

use napi::bindgen_prelude::*;
use napi_derive::napi;
use serde::Serialize;
use smolmachines::{Error, Problem};

#[derive(Serialize)]
struct Payload<'a> {
    #[serde(rename = "smolError")]
    smol_error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: String,
    problem: Problem,
}

/// The JSON payload of `e` (see the module docs).
pub(crate) fn payload(e: &Error) -> String {
    let p = Payload {
        smol_error: Inner {
            code: e.code().as_str(),
            message: e.to_string(),
            problem: e.to_problem(),
        },
    };
    serde_json::to_string(&p).expect("an error payload always serialises")
}

/// A core error as a JS error carrying its payload.
pub(crate) fn to_js(e: Error) -> napi::Error {
    napi::Error::new(Status::GenericFailure, payload(&e))
}

/// `_errorFromProblem(status, body, retryAfter?)`: the payload of the error of an HTTP error
/// response (any body) through the core's [`Error::from_problem`]; `index.js` wraps it into
/// the typed error. Not public API (tests, and the cloud client later).
#[napi(js_name = "_errorFromProblem")]
pub fn error_from_problem(status: u32, body: Buffer, retry_after: Option<String>) -> String {
    let status = u16::try_from(status).unwrap_or(0);
    payload(&Error::from_problem(status, &body, retry_after.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_carries_code_message_and_typed_fields() {
        let e = Error::PortUnavailable {
            port: 8080,
            reason: "in use".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&payload(&e)).unwrap();
        let inner = &v["smolError"];
        assert_eq!(inner["code"], "CONFLICT");
        assert_eq!(inner["message"], e.to_string());
        assert_eq!(inner["problem"]["port"], 8080);
        assert_eq!(inner["problem"]["status"], 409);
        assert!(inner["problem"]["hint"].is_string());
    }
}
