//! Errors at the boundary: the status and message of a failed call, the calling thread's last
//! error, and the guard every entry point runs under.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::types::V2lStatus;
use v2l_runtime::error::ErrorKind;
use v2l_runtime::request::{Field, RequestError};
use v2l_runtime::RuntimeError;

pub(crate) struct Error {
    pub(crate) status: V2lStatus,
    pub(crate) message: String,
}

impl Error {
    pub(crate) fn new(status: V2lStatus, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }
}

impl From<RuntimeError> for Error {
    fn from(e: RuntimeError) -> Error {
        // A request field by its `V2lGenerateParams` name, as the command line names its flag.
        let e = match e {
            RuntimeError::Request(r) => return request_error("params.", r),
            e => e,
        };
        let status = status_of(&e);
        let mut message = e.to_string();
        if let Some(h) = e.hint() {
            message.push_str(" (hint: ");
            message.push_str(&h);
            message.push(')');
        }
        Error { status, message }
    }
}

/// The C status of a runtime error: from its [`ErrorKind`], the classification the command-line
/// exit codes also come from.
pub(crate) fn status_of(e: &RuntimeError) -> V2lStatus {
    match e.kind() {
        ErrorKind::BadInput => V2lStatus::InvalidArgument,
        ErrorKind::BadFile => V2lStatus::Io,
        ErrorKind::Lora => V2lStatus::Lora,
        ErrorKind::OrtUnavailable => V2lStatus::OrtUnavailable,
        ErrorKind::Runtime => V2lStatus::Runtime,
        ErrorKind::Cancelled => V2lStatus::Cancelled,
    }
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: String) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs one entry point: clears the thread's error, catches panics, records the message.
pub(crate) fn guard(func: &str, f: impl FnOnce() -> Result<()>) -> V2lStatus {
    set_last_error(String::new());
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            // Cleared again at the end: a call made from the progress callback during this one
            // (answered BUSY on this thread) must not leave its message behind a success.
            set_last_error(String::new());
            V2lStatus::Ok
        }
        Ok(Err(e)) => {
            set_last_error(format!("{func}: {}", e.message));
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            // Dropping the payload could itself panic: catch that too (and forget its payload).
            if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
                std::mem::forget(again);
            }
            set_last_error(format!("{func}: internal error (please report): {what}"));
            V2lStatus::Panic
        }
    }
}

/// A request error in the C ABI's words: the field as `<prefix><name>` (`params.frames`,
/// `options.threads`), the message every front end gives, and the environment variable that
/// raises a limit.
pub(crate) fn request_error(prefix: &str, e: RequestError) -> Error {
    let field = match e.field {
        Field::Size => format!("{prefix}height/{prefix}width"),
        // The C ABI's name for the first frame.
        Field::Image => format!("{prefix}first_frame"),
        f => format!("{prefix}{}", f.name()),
    };
    Error::new(
        V2lStatus::InvalidArgument,
        format!("{field}: {}", e.message_with_env_hint()),
    )
}

/// The message of the calling thread's last v2l call: "" when it succeeded. The string belongs
/// to v2l and stays valid until the thread's next v2l call.
#[no_mangle]
pub extern "C" fn v2l_last_error() -> *const c_char {
    catch_unwind(|| LAST_ERROR.with(|e| e.borrow().as_ptr())).unwrap_or(c"".as_ptr())
}

/// A static name for a status ("V2L_STATUS_OK", ...; "unknown status" for other values).
#[no_mangle]
pub extern "C" fn v2l_status_str(status: i32) -> *const c_char {
    let s: &CStr = match status {
        0 => c"V2L_STATUS_OK",
        1 => c"V2L_STATUS_NULL_POINTER",
        2 => c"V2L_STATUS_INVALID_ARGUMENT",
        3 => c"V2L_STATUS_INVALID_HANDLE",
        4 => c"V2L_STATUS_BUFFER_SIZE",
        5 => c"V2L_STATUS_IO",
        6 => c"V2L_STATUS_ORT_UNAVAILABLE",
        7 => c"V2L_STATUS_RUNTIME",
        8 => c"V2L_STATUS_LORA",
        9 => c"V2L_STATUS_CANCELLED",
        10 => c"V2L_STATUS_BUSY",
        11 => c"V2L_STATUS_PANIC",
        _ => c"unknown status",
    };
    s.as_ptr()
}
