"""Does a source tree compute, bit for bit, what another computes? For the CPU linear-backend choice.

``mixmim.models.layers.CPU_LINEAR_BACKEND`` picks oneDNN (AMD CPUs) or the BLAS (Intel and others)
for large fp32 linear products. On the machine that produced the committed pipeline results (an AMD
EPYC) the choice is oneDNN, the route every earlier commit took. This script checks that the
choosing code, forced to ``onednn`` (``MIXMIM_CPU_LINEAR=onednn``), computes exactly what an earlier
tree computes on the pipelines' own model configurations, and that the oneDNN route is really taken
(it counts the oneDNN products). It also runs the BLAS choice, which must differ at rounding level
wherever oneDNN products were taken (so the comparison can tell the two apart).

Each tree runs in a subprocess with ``PYTHONPATH=<tree>`` and this interpreter::

    git worktree add --detach /tmp/linear-old HEAD~1
    .venv/bin/python benchmarks/linear_backend_equivalence.py --old /tmp/linear-old --new .

Cases: the default and ablations pipelines' pretraining (mixmim_micro, decoder 192, 56 px, batch 8
and 16), finetuning (batch 16), the probes' frozen features (batch 64, no gradient), the dense
stages' encoder (64 px, windows 8, batch 4), and one MixMIM-B pretraining step (224 px, batch 1).
For each: loss or features, and every parameter gradient, compared with ``torch.equal``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CASES = ("pretrain_micro_b8", "pretrain_micro_b16", "finetune_micro_b16", "probe_micro_b64", "dense_micro_b4",
         "pretrain_base_b1")


def run_cases(out: Path) -> None:
    """Inside a tree's subprocess: compute every case, save tensors and the oneDNN product count."""
    from mixmim.models import build_classifier, build_pretrainer, layers

    calls = {"n": 0}
    real = layers._ONEDNN_LINEAR
    if real is not None:
        def counted(*args):
            calls["n"] += 1
            return real(*args)
        layers._ONEDNN_LINEAR = counted
    torch.set_num_threads(1)
    results: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = {}

    def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for case in CASES:
        calls["n"] = 0
        torch.manual_seed(0)
        if case.startswith("pretrain"):
            big = case == "pretrain_base_b1"
            model = build_pretrainer("mixmim_base") if big else build_pretrainer("mixmim_micro", decoder_dim=192)
            batch = 1 if big else int(case.rsplit("_b", 1)[1])
            size = 224 if big else 56
            loss = model(torch.randn(batch, 3, size, size)).loss
            loss.backward()
            results[case] = {"loss": loss.detach(), **grads(model)}
        elif case == "finetune_micro_b16":
            model = build_classifier("mixmim_micro", num_classes=10)
            logits = model(torch.randn(16, 3, 56, 56))
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(16) % 10)
            loss.backward()
            results[case] = {"loss": loss.detach(), **grads(model)}
        elif case == "probe_micro_b64":
            model = build_classifier("mixmim_micro", num_classes=10).eval()
            with torch.no_grad():
                results[case] = {"features": model.forward_features(torch.randn(64, 3, 56, 56))}
        else:  # dense stages: the encoder at 64 px with windows of 8, features of every stage
            model = build_classifier("mixmim_micro", num_classes=10, img_size=64, window_size=(8, 8, 8, 8))
            feats = model.encoder.forward_features(torch.randn(4, 3, 64, 64))
            loss = sum(f.square().mean() for f in feats)
            loss.backward()
            results[case] = {"loss": loss.detach(), **grads(model)}
        counts[case] = calls["n"]
    torch.save({"results": results, "onednn_products": counts}, out)


def run_tree(tree: Path, backend: str | None, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()), OMP_NUM_THREADS="1")
    env.pop("MIXMIM_CPU_LINEAR", None)
    if backend:
        env["MIXMIM_CPU_LINEAR"] = backend
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(out)], env=env, check=True,
                   cwd=str(tree.resolve()))
    return torch.load(out, weights_only=True)


def compare(a: dict, b: dict) -> tuple[int, int, float]:
    """(tensors compared, tensors that differ, largest absolute difference)."""
    if a.keys() != b.keys():
        raise SystemExit(f"the two trees saved different tensors: {sorted(set(a) ^ set(b))}")
    n = diff = 0
    worst = 0.0
    for key in a:
        n += 1
        if not torch.equal(a[key], b[key]):
            diff += 1
            worst = max(worst, (a[key] - b[key]).abs().max().item())
    return n, diff, worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, help="the earlier tree (always oneDNN for large fp32 products)")
    p.add_argument("--new", type=Path, help="the tree with the backend choice")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_cases(args.worker)
        return
    if not (args.old and args.new):
        p.error("--old and --new are both needed")
    with tempfile.TemporaryDirectory() as tmp:
        old = run_tree(args.old, None, Path(tmp) / "old.pt")
        runs = {b: run_tree(args.new, b, Path(tmp) / f"new-{b}.pt") for b in ("onednn", "blas")}
    identical = True
    print(f"{'case':<20} {'oneDNN products (old / new onednn / new blas)':<48} new onednn vs old   new blas vs old")
    for case in CASES:
        o = old["results"][case]
        cols = []
        for backend in ("onednn", "blas"):
            n, diff, worst = compare(o, runs[backend]["results"][case])
            cols.append(f"{diff}/{n} differ" + (f" (max {worst:.1e})" if diff else ""))
            if backend == "onednn" and diff:
                identical = False
        products = f"{old['onednn_products'][case]} / {runs['onednn']['onednn_products'][case]} / " \
                   f"{runs['blas']['onednn_products'][case]}"
        print(f"{case:<20} {products:<48} {cols[0]:<19} {cols[1]}")
    print("new tree forced to onednn is bit-identical to the old tree" if identical
          else "DIFFERENT: the new tree forced to onednn does not compute what the old tree computes")
    raise SystemExit(0 if identical else 1)


if __name__ == "__main__":
    main()
