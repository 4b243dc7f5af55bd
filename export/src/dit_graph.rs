//! What an architecture's DiT exporter returns: the graph, its config and its linears.

use v2l_contracts::io::dit::cache;
use v2l_graphs::{Graph, Value};

use crate::scope::LinearInfo;

/// A DiT graph as its architecture's exporter returns it (`C`: the architecture's config).
pub struct DitGraph<C> {
    pub graph: Graph,
    pub config: C,
    /// `config.json` as read.
    pub raw_config: serde_json::Value,
    /// Every `nn.Linear`, in `named_modules()` order (the LiLoRA layer order).
    pub linears: Vec<LinearInfo>,
    /// Checkpoint tensors the graph does not use.
    pub unused_keys: Vec<String>,
}

/// Records where step caching cuts the DiT (graph metadata the runtime reads): the video tokens
/// entering and leaving the first transformer block, and those the last block returns.
pub fn record_cache_cuts(g: &mut Graph, first_input: &Value, first_output: &Value, last: &Value) {
    g.metadata(cache::FIRST_BLOCK_INPUT, first_input.name());
    g.metadata(cache::FIRST_BLOCK_OUTPUT, first_output.name());
    g.metadata(cache::BLOCKS_OUTPUT, last.name());
}
