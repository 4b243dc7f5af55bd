//! The C ABI (`libv2l`), its header, the C example under valgrind and the Python binding with
//! Ray Serve, in one harness: one binary to link. `common` holds the shared fixture helpers.

mod common;

mod c_example;
mod capi;
mod errors;
mod header;
mod python_ray;
mod wheel;
