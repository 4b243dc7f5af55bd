//! One (sample, head) of an attention call as the kernels walk it, and their block sizes.

/// Queries per block: their scores with one key block are the only scores held.
pub(super) const BLOCK_ROWS: usize = 32;
/// Keys per block.
pub(super) const BLOCK_KEYS: usize = 64;

/// One (sample, head): row views into the `[tokens, heads·head_dim]` slices of one sample.
pub(super) struct Head<'a> {
    pub(super) q: &'a [f32],
    pub(super) k: &'a [f32],
    pub(super) v: &'a [f32],
    pub(super) q_len: usize,
    pub(super) kv_len: usize,
    pub(super) head_dim: usize,
    pub(super) width: usize,
    pub(super) offset: usize,
    pub(super) scale: f32,
}

impl Head<'_> {
    fn row<'b>(&self, x: &'b [f32], i: usize) -> &'b [f32] {
        let at = i * self.width + self.offset;
        &x[at..at + self.head_dim]
    }
    pub(super) fn q_row(&self, i: usize) -> &[f32] {
        self.row(self.q, i)
    }
    pub(super) fn k_row(&self, i: usize) -> &[f32] {
        self.row(self.k, i)
    }
    pub(super) fn v_row(&self, i: usize) -> &[f32] {
        self.row(self.v, i)
    }
}
