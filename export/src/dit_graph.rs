//! What an architecture's DiT exporter returns: the graph, its config and its linears.

use v2l_graphs::Graph;

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
