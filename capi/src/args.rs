//! Argument helpers: pointers, strings, paths and buffers from C, checked.

use std::ffi::{c_char, CStr};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, TryLockError};

use crate::error::{Error, Result};
use crate::handles::V2lGenerator;
use crate::types::V2lStatus;
use v2l_runtime::pipeline::Pipeline;
use v2l_runtime::video::Frames;

pub(crate) fn null(arg: &str) -> Error {
    Error::new(V2lStatus::NullPointer, format!("`{arg}` is NULL"))
}

/// Checks an output-handle pointer and sets `*out = NULL` so it is NULL on failure.
pub(crate) unsafe fn out_handle<T>(out: *mut *mut T, arg: &str) -> Result<*mut *mut T> {
    if out.is_null() {
        return Err(null(arg));
    }
    *out = std::ptr::null_mut();
    Ok(out)
}

/// A NUL-terminated UTF-8 argument (NULL: empty).
pub(crate) unsafe fn text_arg(ptr: *const c_char, arg: &str) -> Result<String> {
    if ptr.is_null() {
        return Ok(String::new());
    }
    CStr::from_ptr(ptr)
        .to_str()
        .map(str::to_string)
        .map_err(|e| {
            Error::new(
                V2lStatus::InvalidArgument,
                format!("{arg} is not valid UTF-8 ({e})"),
            )
        })
}

pub(crate) unsafe fn path_arg(p: *const c_char, arg: &str) -> Result<PathBuf> {
    if p.is_null() {
        return Err(null(arg));
    }
    let bytes = CStr::from_ptr(p).to_bytes();
    if bytes.is_empty() {
        return Err(Error::new(
            V2lStatus::InvalidArgument,
            format!("`{arg}` is empty"),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        std::str::from_utf8(bytes)
            .map(PathBuf::from)
            .map_err(|_| Error::new(V2lStatus::InvalidArgument, format!("`{arg}` is not UTF-8")))
    }
}

/// A borrowed input buffer of exactly `len` elements.
pub(crate) unsafe fn input<'a, T>(p: *const T, len: usize, arg: &str) -> Result<&'a [T]> {
    if p.is_null() {
        return Err(null(arg));
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Error::new(
            V2lStatus::InvalidArgument,
            format!(
                "`{arg}` is not aligned to {} bytes",
                std::mem::align_of::<T>()
            ),
        ));
    }
    if len
        .checked_mul(std::mem::size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Error::new(
            V2lStatus::BufferSize,
            format!("`{arg}`: {len} elements is too large"),
        ));
    }
    Ok(std::slice::from_raw_parts(p, len))
}

pub(crate) fn product(dims: &[usize], what: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| {
            Error::new(
                V2lStatus::InvalidArgument,
                format!("{what} {dims:?} is too large"),
            )
        })
}

/// A scale or weight argument: finite and within ±1e4 (`v2l_runtime::request::MAX_SCALE`).
pub(crate) fn finite(v: f32, arg: &str) -> Result<f32> {
    v2l_runtime::request::bounded(v).map_err(|_| {
        let why = match v.is_finite() {
            true => "within ±1e4 (a larger scale overflows the weights)",
            false => "finite",
        };
        Error::new(
            V2lStatus::InvalidArgument,
            format!("`{arg}` is {v}; it must be {why}"),
        )
    })
}

pub(crate) fn lock(g: &V2lGenerator) -> Result<MutexGuard<'_, Pipeline>> {
    try_lock(
        &g.pipeline,
        "the generator is in use by another call (one call at a time per generator; only v2l_generator_cancel may run alongside)",
        "the generator is unusable after an internal error in an earlier call; free it and make a new one",
    )
}

/// `m` for this call, or `V2L_STATUS_BUSY` with `busy` while another call holds it, or
/// `V2L_STATUS_RUNTIME` with `poisoned` after a panic inside it.
pub(crate) fn try_lock<'a, T>(
    m: &'a Mutex<T>,
    busy: &str,
    poisoned: &str,
) -> Result<MutexGuard<'a, T>> {
    match m.try_lock() {
        Ok(p) => Ok(p),
        Err(TryLockError::WouldBlock) => Err(Error::new(V2lStatus::Busy, busy)),
        Err(TryLockError::Poisoned(_)) => Err(Error::new(V2lStatus::Runtime, poisoned)),
    }
}

/// An RGB8 clip `frames × height × width × 3` from a buffer of `len` bytes.
pub(crate) unsafe fn clip(
    rgb: *const u8,
    len: usize,
    frames: u32,
    height: u32,
    width: u32,
    arg: &str,
) -> Result<Frames> {
    let (f, h, w) = (frames as usize, height as usize, width as usize);
    if f == 0 || h == 0 || w == 0 {
        return Err(Error::new(
            V2lStatus::InvalidArgument,
            format!("`{arg}` is {f} frames of {w}x{h}; every dimension must be at least 1"),
        ));
    }
    let need = product(&[f, h, w, 3], arg)?;
    if rgb.is_null() {
        return Err(null(arg));
    }
    if len != need {
        return Err(Error::new(
            V2lStatus::BufferSize,
            format!("`{arg}` has {len} bytes; {f} frames of {w}x{h} RGB8 are {need}"),
        ));
    }
    Ok(Frames {
        frames: f,
        height: h,
        width: w,
        rgb: input(rgb, len, arg)?.to_vec(),
    })
}
