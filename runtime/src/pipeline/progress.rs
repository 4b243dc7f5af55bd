//! What a run tells its caller while it works, and how the caller stops it.

/// Told after each frame batch of a reference clip's encode (a LoRA predicted for the
/// request), each denoising step and each frame batch of the VAE decode; `false` from any
/// cancels the run ([`crate::error::RuntimeError::Cancelled`]).
///
/// A closure `FnMut(step, steps) -> bool` is one: it hears the steps and lets the encode and
/// the decode run to their ends. A caller that cancels or times out runs, or shows their
/// progress, implements the other two too: at a real size on a CPU the decode is the longest
/// stage after the steps (some twenty minutes at 49×480×720).
pub trait Progress {
    /// After frame batch `done` of `of` of the reference clip's VAE encode, every tile's
    /// batches counted (in a batch of requests, each request's reference counted on its own).
    fn reference(&mut self, done: usize, of: usize) -> bool {
        let _ = (done, of);
        true
    }

    /// After denoising step `done` of `of`.
    fn step(&mut self, done: usize, of: usize) -> bool;

    /// After frame batch `done` of `of` of the VAE decode, every tile's batches counted (a
    /// batch of requests decodes each in turn: their batches are counted together).
    fn decode(&mut self, done: usize, of: usize) -> bool {
        let _ = (done, of);
        true
    }
}

impl<F: FnMut(usize, usize) -> bool + ?Sized> Progress for F {
    fn step(&mut self, done: usize, of: usize) -> bool {
        self(done, of)
    }
}
