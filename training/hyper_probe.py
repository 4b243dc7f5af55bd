"""Can a hypernetwork architecture *see* each effect in a reference clip? A probe that trains the
hypernetwork alone, without the DiT, so each variant takes minutes instead of hours.

    python training/hyper_probe.py --cache /work/train/latents.pt --steps 1500

For each variant (upstream VideoHyperDream; + context positions; + positions and self-attention
blocks over the context tokens) it trains the hypernetwork on the cached reference latents with
an InfoNCE loss: the rows predicted from scene s1 with effect E should be nearest to the rows from
another scene s2 with the same E, among the batch's other effects. Then on held-out scenes
(the cache's last --held-out training scenes, unused by the probe's training) it classifies each reference by its nearest neighbour among the rows of the *other*
scenes and reports accuracy per effect, with the accuracy on the opposite pairs (cw/ccw, in/out,
left/right). If a variant cannot separate a motion from its reverse here, no amount of DiT
training makes the LoRA carry that motion (training/README.md, "Motion run").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from effects import EFFECTS  # noqa: E402
from video2lora import VideoHyperDream  # noqa: E402

VARIANTS = {
    "upstream": dict(),
    "positions": dict(context_len=True),
    "positions+1 context block": dict(context_len=True, context_blocks=1),
    "positions+2 context blocks": dict(context_len=True, context_blocks=2),
    "conv3d encoder": dict(context_conv=64),
}


def info_nce(a: torch.Tensor, b: torch.Tensor, e: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    a, b = F.normalize(a.flatten(1), dim=1), F.normalize(b.flatten(1), dim=1)
    logits = a @ b.T / tau
    same = e[:, None] == e[None, :]
    logits = logits.masked_fill(same & ~torch.eye(len(e), dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(e)))


@torch.no_grad()
def nearest_neighbour(hyper, refs: torch.Tensor) -> dict:
    """refs [S, E, ...]: each (s, e) labelled by its nearest row among scenes != s."""
    S, E = refs.shape[:2]
    rows = F.normalize(hyper(refs.flatten(0, 1)).flatten(1), dim=1).view(S, E, -1)
    hits = {e: 0 for e in EFFECTS}
    for s in range(S):
        others = torch.cat([rows[:s], rows[s + 1:]]).flatten(0, 1)  # [(S-1)*E, D]
        labels = torch.arange(E).repeat(S - 1)
        pred = labels[(rows[s] @ others.T).argmax(dim=1)]
        for e in range(E):
            hits[EFFECTS[e]] += int(pred[e] == e)
    return {e: h / S for e, h in hits.items()}


def supervised_bound(ref: torch.Tensor, val: torch.Tensor, steps: int, batch: int, lr: float) -> dict:
    """The upper bound of what the reference latents hold: a small 3D conv net with a
    position-aware readout (flatten + linear), trained on the effect *labels*. Not a hypernetwork;
    it shows whether the information is there and what kind of network extracts it."""
    from torch import nn

    S, E = ref.shape[:2]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(16, 64, 3, padding=1), nn.GELU(), nn.Conv3d(64, 64, 3, padding=1), nn.GELU(),
                        nn.Conv3d(64, 16, 1), nn.Flatten(), nn.Linear(ref[0, 0].numel(), 128), nn.GELU(),
                        nn.Linear(128, E))
    opt = torch.optim.AdamW(net.parameters(), lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        e = torch.randint(0, E, (batch,), generator=g)
        s = torch.randint(0, S, (batch,), generator=g)
        loss = F.cross_entropy(net(ref[s, e]), e)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = net(val.flatten(0, 1)).argmax(1).view(val.shape[0], E)
    return {EFFECTS[e]: float((pred[:, e] == e).float().mean()) for e in range(E)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/work/train/latents.pt")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--supervised-steps", type=int, default=0,
                    help="also train the supervised conv3d bound (supervised_bound) this many steps, batch 64")
    ap.add_argument("--held-out", type=int, default=100, help="training scenes kept out of the probe's training")
    ap.add_argument("--objective", choices=["infonce", "labels"], default="infonce",
                    help="labels: train with a linear classifier of the effect on the rows (supervised) "
                         "and also report its held-out accuracy; shows whether the rows *can* carry each "
                         "effect, where InfoNCE measures whether they do without labels")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cache = torch.load(a.cache, weights_only=False)
    # Held out for the probe: the last --held-out training scenes (more than the 8 validation seeds).
    ref, val = cache["reference"][: -a.held_out], cache["reference"][-a.held_out:]
    S, E = ref.shape[:2]
    L = ref.shape[-3] * ref.shape[-2] * ref.shape[-1]
    results = {}
    for name in filter(None, a.variants.split(",")):
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown {name!r}; one of {list(VARIANTS)}")
        v = VARIANTS[name]
        torch.manual_seed(0)
        hyper = VideoHyperDream(37, 16, 64, 32, 1, 2, 4, L if v.get("context_len") else 0, v.get("context_blocks", 0),
                                v.get("context_conv", 0), tuple(ref.shape[-3:]))
        head = torch.nn.Linear(hyper.decoder_model.num_layers * hyper.weight_dim, E)
        params = list(hyper.parameters()) + (list(head.parameters()) if a.objective == "labels" else [])
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        t0 = time.time()
        for step in range(a.steps):
            e = torch.randint(0, E, (a.batch,), generator=g)
            s1 = torch.randint(0, S, (a.batch,), generator=g)
            s2 = (s1 + torch.randint(1, S, (a.batch,), generator=g)) % S
            if a.objective == "labels":
                loss = F.cross_entropy(head(hyper(ref[s1, e]).flatten(1)), e)
            else:
                loss = info_nce(hyper(ref[s1, e]), hyper(ref[s2, e]), e)
            opt.zero_grad()
            loss.backward()
            opt.step()
        hyper.eval()
        acc = nearest_neighbour(hyper, val)
        results[name] = dict(accuracy=acc, mean=sum(acc.values()) / len(acc), final_loss=loss.item(),
                             seconds=round(time.time() - t0, 1))
        if a.objective == "labels":
            with torch.no_grad():
                pred = head(hyper(val.flatten(0, 1)).flatten(1)).argmax(1).view(val.shape[0], E)
            results[name]["classifier"] = {EFFECTS[i]: float((pred[:, i] == i).float().mean()) for i in range(E)}
            print(f"{name:28s} held-out classifier accuracy {float((pred == torch.arange(E)).float().mean()):.0%}  "
                  + "  ".join(f"{k}={x:.0%}" for k, x in results[name]["classifier"].items()), flush=True)
        print(f"{name:28s} held-out nearest-neighbour accuracy {results[name]['mean']:.0%}  "
              + "  ".join(f"{e}={x:.0%}" for e, x in acc.items()) + f"  ({results[name]['seconds']} s)", flush=True)
    if a.supervised_steps:
        t0 = time.time()
        acc = supervised_bound(ref, val, a.supervised_steps, 64, a.lr)
        results["supervised conv3d (labels)"] = dict(accuracy=acc, mean=sum(acc.values()) / len(acc),
                                                     seconds=round(time.time() - t0, 1))
        print(f"{'supervised conv3d (labels)':28s} held-out accuracy {sum(acc.values()) / len(acc):.0%}  "
              + "  ".join(f"{e}={x:.0%}" for e, x in acc.items()) + f"  ({time.time() - t0:.0f} s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), results=results), f, indent=1)


if __name__ == "__main__":
    main()
