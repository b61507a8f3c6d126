"""Trains the Fashion-MNIST ResNet-14 that mpq ships (python/mpq/examples/data/fashion_resnet14.pt).

    python scripts/train_fashion_resnet.py            # ~10 min on 2 idle CPU cores
Needs `apt-get install dataset-fashion-mnist`. Writes the checkpoint and a JSON record beside it
(seed, schedule, torch version, test accuracy, time).
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from mpq.examples.fashion import CHECKPOINT, FashionResNet, fashion_mnist


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (pad 2) and horizontal flip, per image."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=float(x.min()))
    dx, dy = torch.randint(0, 5, (2, n), generator=g)
    rows = torch.arange(28)[None, :] + dy[:, None]  # [n, 28]
    cols = torch.arange(28)[None, :] + dx[:, None]
    out = padded[:, 0][torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]].unsqueeze(1)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model, x, y, batch=1000) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(CHECKPOINT))
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    model = FashionResNet()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * math.ceil(len(xtr) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        total = 0.0
        for i in range(0, len(xtr), args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = F.cross_entropy(model(augment(xtr[idx], g)), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = evaluate(model, xte, yte)
        print(
            f"epoch {epoch + 1}/{args.epochs}: train loss {total / len(xtr):.4f}, test top-1 {acc:.4f}, {time.time() - t0:.0f}s",
            flush=True,
        )
    torch.save(model.state_dict(), args.out)
    record = {
        "model": "FashionResNet (ResNet-14, widths 16/32/64)",
        "command": "python scripts/train_fashion_resnet.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_lr": args.lr,
        "seed": args.seed,
        "optimizer": "SGD nesterov momentum 0.9, weight decay 5e-4, OneCycle (15% warm-up), label smoothing 0.05",
        "augmentation": "random crop (pad 2), horizontal flip",
        "test_top1": acc,
        "train_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    from pathlib import Path

    Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
