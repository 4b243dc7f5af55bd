"""Video2LoRA modules for training: the VideoHyperDream hypernetwork and LiLoRA.

Written from the description in /work/shared/specs/video2lora.md (no upstream code). The state
dicts use the upstream checkpoint key names, so `save_hypernet` / `save_lilora` produce files
`v2l-export pipeline DIR --hypernet ... --lilora ...` reads:

  hypernetwork.safetensors  img_weight_generator.{feature_proj, decoder_model.*, block_pos_emb}
  lilora.safetensors        lora_unet__<module path, '.' -> '_'>.{down_aux [a, in], up_aux [out, b]}

Hypernetwork (reference latents f [B, C, T, H, W], already x VAE scaling factor):
  ctx = feature_proj(f.view(B, C, T*H*W).transpose(1, 2))           # [B, L, D], D = (a + b) * r
  w = 0 [B, N, D]; repeat k times: h = w + pos_emb_proj(P[:N]); h = blocks(h, ctx); w += delta_proj(h)
LiLoRA on the i-th nn.Linear of the DiT (named_modules order), row w_i = [down_w (a*r) | up_w (b*r)]:
  y = W x + bias + s * up_aux @ up_w[b, r] @ down_w[r, a] @ down_aux @ x
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

HYPER_PREFIX = "img_weight_generator."


def upstream_heads(dim: int) -> int:
    """Head count rule of the spec: double while divisible and wider than 64, then halve."""
    heads = 1
    while dim % heads == 0 and dim // heads > 64:
        heads *= 2
    return heads // 2


def sinusoid_table(n_pos: int, dim: int) -> torch.Tensor:
    """[1, n_pos, dim]: angle(p, j) = p / 10000^(2 floor(j/2) / dim); sin on even j, cos on odd j."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2.0 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if ctx is None else ctx
        b, n, d = x.shape
        h = self.heads

        def split(t):
            return t.view(t.shape[0], t.shape[1], h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(ctx)), split(self.v(ctx))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        o = (p @ v).transpose(1, 2).reshape(b, n, d)
        return self.out(o)


class _FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # keys: net.0.0.{weight,bias} (Linear D -> 4D, then exact GELU), net.1.{weight,bias}
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU()), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = _Attention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = _FeedForward(dim)

    def forward(self, h, ctx):
        h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), ctx)
        return h + self.ff(self.norm3(h))


class _EncoderBlock(nn.Module):
    """Pre-LN self-attention + feed-forward over the context tokens (v2l's extension)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = _FeedForward(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class _ContextEncoder(nn.Module):
    """v2l's extension (NOT upstream): a second path from the reference clip to the LiLoRA rows,
    through a network that sees where and when things move. Its output is added to the rows
    upstream's decoder predicts:

      h = conv_out(gelu(conv_mid(gelu(conv_in(f)))))          # f [B, C, T, H, W] -> [B, C, T, H, W]
      z = gelu(readout(h).flatten(1))                          # [B, 2·hidden], the clip's features
      rows += row_proj(z).view(B, N, D)

    conv_in / conv_mid are 3x3x3 (zero padding 1), conv_out 1x1x1: each voxel then describes how its
    neighbourhood changes from frame to frame. The readout is a conv whose kernel is the whole
    volume (T, H, W), i.e. a Linear over the flattened volume whose weight shape records the grid;
    it weighs every position differently: a rotation's sense is the product of where a voxel is
    and which way it moves, which neither a bag of tokens nor a translation-invariant conv can
    form. hyper_probe.py measured this stack trained on effect labels at 88 % held-out after 600
    steps (97 % after 2000), where upstream's decoder, even trained on labels, reached 39 %.
    row_proj starts at zero, so a hypernetwork trained without the encoder starts out unchanged."""

    def __init__(self, channels: int, hidden: int, shape: tuple[int, int, int], num_layers: int, dim: int):
        super().__init__()
        self.shape, self.num_layers, self.dim = tuple(shape), num_layers, dim
        self.conv_in = nn.Conv3d(channels, hidden, 3, padding=1)
        self.conv_mid = nn.Conv3d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv3d(hidden, channels, 1)
        self.readout = nn.Conv3d(channels, 2 * hidden, tuple(shape))
        self.row_proj = nn.Linear(2 * hidden, num_layers * dim)
        nn.init.zeros_(self.row_proj.weight)
        nn.init.zeros_(self.row_proj.bias)

    def features(self, f: torch.Tensor) -> torch.Tensor:
        """z [B, 2·hidden]: what the encoder sees in the clip (train_dit.py's --hyper-labels reads it)."""
        if tuple(f.shape[2:]) != self.shape:
            raise ValueError(f"reference latents are {tuple(f.shape[2:])} (T, H, W); this hypernetwork's context "
                             f"encoder was trained for {self.shape}")
        h = self.conv_out(F.gelu(self.conv_mid(F.gelu(self.conv_in(f)))))
        return F.gelu(self.readout(h).flatten(1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.row_proj(self.features(f)).view(f.shape[0], self.num_layers, self.dim)


class _WeightDecoder(nn.Module):
    def __init__(self, num_layers: int, dim: int, blocks: int, heads: int):
        super().__init__()
        self.num_layers = num_layers
        self.register_buffer("block_pos_emb", sinusoid_table(2 * num_layers, dim), persistent=True)
        self.pos_emb_proj = nn.Linear(dim, dim, bias=False)
        self.decoder_model = nn.ModuleList([_Block(dim, heads) for _ in range(blocks)])
        self.delta_proj = nn.Sequential(nn.LayerNorm(dim, eps=1e-5), nn.Linear(dim, dim, bias=False))

    def forward(self, ctx: torch.Tensor, iters: int) -> torch.Tensor:
        n = self.num_layers
        pos = self.pos_emb_proj(self.block_pos_emb[:, :n])
        w = ctx.new_zeros(ctx.shape[0], n, ctx.shape[-1])
        for _ in range(iters):
            h = w + pos
            for blk in self.decoder_model:
                h = blk(h, ctx)
            w = w + self.delta_proj(h)
        return w


class VideoHyperDream(nn.Module):
    """Reference latents [B, C, T, H, W] -> LiLoRA rows [B, N, D]."""

    def __init__(self, num_layers: int, feature_dim: int = 16, a: int = 64, b: int = 32, r: int = 1,
                 blocks: int = 2, sample_iters: int = 4, context_len: int = 0, context_blocks: int = 0,
                 context_conv: int = 0, context_shape: tuple[int, int, int] | None = None):
        """`context_len` > 0 adds a learned position table `context_pos_emb [1, L, D]` to the context
        tokens (L = T*H*W of the reference latents): NOT upstream. Upstream's context is a bag of
        latent vectors with no position or frame index, in which a clockwise and a counter-clockwise
        rotation (or a zoom in and a zoom out) of the same content look alike (training/README.md,
        "Motion run"). 0 = upstream exactly. `context_blocks` > 0 (also NOT upstream, and not yet
        exportable) runs that many self-attention blocks over the context tokens first, so tokens can
        be compared with each other: the direction of a motion is a relation between frames, which
        the decoder's pooling cross-attention of per-token features cannot form. `context_conv` > 0
        (NOT upstream; exportable) adds the rows of a `_ContextEncoder` of that many hidden
        channels, for reference latents of `context_shape` (T, H, W)."""
        super().__init__()
        dim = (a + b) * r
        heads = upstream_heads(dim)
        if heads == 0:
            raise ValueError(f"weight dim (a+b)*r = {dim} <= 64 gives 0 attention heads (upstream cannot build it)")
        self.a, self.b, self.r = a, b, r
        self.weight_dim, self.heads, self.blocks, self.sample_iters = dim, heads, blocks, sample_iters
        if context_conv:
            if context_shape is None:
                raise ValueError("context_conv needs context_shape (T, H, W) of the reference latents")
            self.context_encoder = _ContextEncoder(feature_dim, context_conv, tuple(context_shape), num_layers, dim)
        self.context_conv = context_conv
        self.feature_proj = nn.Linear(feature_dim, dim, bias=False)
        self.context_len = context_len
        if context_len:
            self.context_pos_emb = nn.Parameter(torch.randn(1, context_len, dim) * 0.02)
        self.context_blocks = nn.ModuleList([_EncoderBlock(dim, heads) for _ in range(context_blocks)])
        self.decoder_model = _WeightDecoder(num_layers, dim, blocks, heads)
        # upstream registers an unused copy of the table at the top level too
        self.register_buffer("block_pos_emb", sinusoid_table(2 * num_layers, dim), persistent=True)

    def forward(self, feats: torch.Tensor, iters: int | None = None) -> torch.Tensor:
        b, c = feats.shape[:2]
        tokens = feats.reshape(b, c, -1).transpose(1, 2)
        ctx = self.feature_proj(tokens)
        if self.context_len:
            if tokens.shape[1] != self.context_len:
                raise ValueError(f"reference latents give {tokens.shape[1]} tokens (T*H*W of {tuple(feats.shape[2:])}); "
                                 f"this hypernetwork's context positions were trained for {self.context_len}")
            ctx = ctx + self.context_pos_emb
        for blk in self.context_blocks:
            ctx = blk(ctx)
        rows = self.decoder_model(ctx, self.sample_iters if iters is None else iters)
        return rows + self.context_encoder(feats) if self.context_conv else rows

    def config(self) -> dict:
        return dict(architecture="VideoHyperDream", feature_dim=self.feature_proj.in_features,
                    weight_dim=self.weight_dim, num_layers=self.decoder_model.num_layers, a=self.a, b=self.b,
                    r=self.r, heads=self.heads, blocks=self.blocks, iterations=self.sample_iters,
                    **(dict(context_len=self.context_len) if self.context_len else {}),
                    **(dict(context_conv=self.context_conv, context_shape=list(self.context_encoder.shape))
                       if self.context_conv else {}),
                    **(dict(context_blocks=len(self.context_blocks)) if len(self.context_blocks) else {}))

    def upstream_state_dict(self) -> dict[str, torch.Tensor]:
        return {HYPER_PREFIX + k: v.detach().float().contiguous() for k, v in self.state_dict().items()}

    def load_upstream_state_dict(self, sd: dict[str, torch.Tensor], allow_new_positions: bool = False) -> None:
        """`allow_new_positions`: a checkpoint without `context_pos_emb` or `context_encoder.*` may
        start a hypernetwork with them (they keep their initialisation); nothing else may be missing."""
        own = {k[len(HYPER_PREFIX):]: v for k, v in sd.items() if k.startswith(HYPER_PREFIX)}
        missing, unexpected = self.load_state_dict(own, strict=False)
        new = {k for k in missing if k == "context_pos_emb" or k.startswith("context_encoder.")}
        missing = set(missing) - (new if allow_new_positions else set())
        if missing or unexpected:
            raise KeyError(f"hypernetwork checkpoint: missing {sorted(missing)}, unexpected {unexpected}")


def upstream_name(module_path: str) -> str:
    return "lora_unet__" + module_path.replace(".", "_")


class _AuxPair(nn.Module):
    def __init__(self, in_f: int, out_f: int, a: int, b: int, r: int = 1):
        super().__init__()
        self.down_aux = nn.Parameter(torch.empty(a, in_f))
        self.up_aux = nn.Parameter(torch.zeros(out_f, b))
        # For hypernet rows of unit size, lora_A = down_w @ down_aux should start like a
        # kaiming-initialised LoRA A (entries ~ 1/sqrt(in)): down_aux ~ N(0, 1/(in * a * r)).
        # up_aux = 0 so the LoRA starts as a no-op (like standard LoRA's zero B) while still
        # getting gradients (d/d up_aux needs only the down path, which is non-zero).
        nn.init.normal_(self.down_aux, std=1.0 / math.sqrt(in_f * a * r))


class LiLoRA(nn.Module):
    """LiLoRA auxiliaries for every nn.Linear of `model`, applied through forward hooks.

    `set_rows(w)` with w [B, N, D] makes every hooked Linear add its per-sample low-rank update
    (inputs with batch k*B, e.g. classifier-free guidance's [uncond, cond], reuse the rows tiled);
    `set_rows(None)` turns the LoRA off.
    """

    def __init__(self, model: nn.Module, a: int = 64, b: int = 32, r: int = 1, scale: float = 1.0):
        super().__init__()
        self.a, self.b, self.r, self.scale = a, b, r, scale
        self.paths = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        self.shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.layers = nn.ModuleDict({upstream_name(p): _AuxPair(*self.shapes[p], a, b, r) for p in self.paths})
        self._rows: torch.Tensor | None = None
        self._handles = []
        self.attach(model)

    @property
    def num_layers(self) -> int:
        return len(self.paths)

    @property
    def weight_dim(self) -> int:
        return (self.a + self.b) * self.r

    def attach(self, model: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        mods = dict(model.named_modules())
        for i, p in enumerate(self.paths):
            self._handles.append(mods[p].register_forward_hook(self._make_hook(i, upstream_name(p))))

    def set_rows(self, rows: torch.Tensor | None) -> None:
        if rows is not None:
            assert rows.dim() == 3 and rows.shape[1:] == (self.num_layers, self.weight_dim), rows.shape
        self._rows = rows

    def factors(self, i: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample down_w [B, r, a] and up_w [B, b, r] of layer i."""
        a, b, r = self.a, self.b, self.r
        row = rows[:, i]
        return row[:, : a * r].reshape(-1, r, a), row[:, a * r:].reshape(-1, b, r)

    def _make_hook(self, i: int, key: str):
        def hook(module, inputs, output):
            rows = self._rows
            if rows is None:
                return output
            aux = self.layers[key]
            x = inputs[0]
            bsz = rows.shape[0]
            down_w, up_w = self.factors(i, rows)
            if x.shape[0] != bsz:
                reps = x.shape[0] // bsz
                assert reps * bsz == x.shape[0], (x.shape, bsz)
                down_w, up_w = down_w.repeat(reps, 1, 1), up_w.repeat(reps, 1, 1)
            xs = x.reshape(x.shape[0], -1, x.shape[-1])
            h = F.linear(xs, aux.down_aux)              # [B, L, a]
            h = h @ down_w.transpose(1, 2)              # [B, L, r]
            h = h @ up_w.transpose(1, 2)                # [B, L, b]
            h = F.linear(h, aux.up_aux)                 # [B, L, out]
            return output + self.scale * h.reshape(output.shape).to(output.dtype)

        return hook

    @torch.no_grad()
    def fused_deltas(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Module path -> s * (up_aux @ up_w) @ (down_w @ down_aux) for one reference (rows [1, N, D])."""
        out = {}
        for i, p in enumerate(self.paths):
            aux = self.layers[upstream_name(p)]
            down_w, up_w = self.factors(i, rows)
            out[p] = self.scale * (aux.up_aux @ up_w[0]) @ (down_w[0] @ aux.down_aux)
        return out

    def upstream_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for p in self.paths:
            aux = self.layers[upstream_name(p)]
            sd[upstream_name(p) + ".down_aux"] = aux.down_aux.detach().float().contiguous()
            sd[upstream_name(p) + ".up_aux"] = aux.up_aux.detach().float().contiguous()
        return sd

    def load_upstream_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for p in self.paths:
            aux = self.layers[upstream_name(p)]
            aux.down_aux.data.copy_(sd[upstream_name(p) + ".down_aux"])
            aux.up_aux.data.copy_(sd[upstream_name(p) + ".up_aux"])


def save_hypernet(hyper: VideoHyperDream, path: str) -> None:
    from safetensors.torch import save_file

    save_file(hyper.upstream_state_dict(), path, metadata={"v2l.config": json.dumps(hyper.config())})


def save_lilora(lilora: LiLoRA, path: str) -> None:
    from safetensors.torch import save_file

    meta = dict(a=lilora.a, b=lilora.b, r=lilora.r, scale=lilora.scale, layers=lilora.paths)
    save_file(lilora.upstream_state_dict(), path, metadata={"v2l.config": json.dumps(meta)})


def load_video2lora(out_dir: str, model: nn.Module) -> tuple[VideoHyperDream, LiLoRA, dict]:
    """Loads hypernetwork.safetensors + lilora.safetensors + video2lora.json of a pipeline dir
    written by train_dit.py and hooks the LiLoRA into `model` (the diffusers transformer)."""
    import os

    from safetensors.torch import load_file

    with open(os.path.join(out_dir, "video2lora.json")) as f:
        cfg = json.load(f)
    hyper = VideoHyperDream(cfg["num_layers"], cfg["feature_dim"], cfg["a"], cfg["b"], cfg["r"], cfg["blocks"],
                            cfg["iterations"], cfg.get("context_len", 0), cfg.get("context_blocks", 0),
                            cfg.get("context_conv", 0), cfg.get("context_shape"))
    hyper.load_upstream_state_dict(load_file(os.path.join(out_dir, "hypernetwork.safetensors")))
    lilora = LiLoRA(model, cfg["a"], cfg["b"], cfg["r"], cfg.get("scale", 1.0))
    if lilora.paths != cfg["layer_order"]:
        raise ValueError("the transformer's nn.Linear order differs from the one the LiLoRA was trained on")
    lilora.load_upstream_state_dict(load_file(os.path.join(out_dir, "lilora.safetensors")))
    hyper.eval()
    lilora.eval()
    return hyper, lilora, cfg
