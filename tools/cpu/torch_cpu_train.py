#!/usr/bin/env python3
"""PyTorch's twin of a `kd-runner train` baseline run, for comparing the accuracy a whole
training reaches (not one step) on the same data, recipe and model:

  kd-runner train configs/cifar10/baseline.toml --data-dir data --model resnet18 \
      --stem cifar-maxpool --set model.width=16 --batch-size 512 --lr 0.4 --epochs 15 \
      --warmup-epochs 1 --weight-decay 5e-4 --seed 0 --run-dir runs/w16
  python3 tools/cpu/torch_cpu_train.py --data data/cifar10 --width 16 --stem cifar-maxpool \
      --batch 512 --lr 0.4 --epochs 15 --warmup-epochs 1 --wd 5e-4 --seed 0

What it shares with kd (each as kd does it, so that only the seeds' draws differ):
- the model: ResNet18 of `--width` channels in its first stage (kd's `model.width`), stem
  `cifar` (3×3/s1 conv, BN, ReLU) or `cifar-maxpool` (the same + 3×3/s2/p1 max-pool);
  torchvision's init (Kaiming-normal fan-out convolutions, BN 1/0, default Linear);
- the data: the official CIFAR-10 binary files, every training image, the test set;
  crop 32×32 from the image zero-padded by 4 (black, before normalising), flip with p = 0.5,
  normalised by kd's CIFAR-10 mean and std; a reshuffle each epoch, the last batch kept;
- the recipe: SGD, momentum 0.9, Nesterov, weight decay on every parameter, cross-entropy,
  per-step learning rate: linear warm-up (step + 1)/W·lr over W = warm-up epochs' steps, then
  cosine to 0 with t = (step − W)/(total − W) (kd_schedulers::Schedule::WarmupCosine);
- evaluation: top-1 on the test set in eval mode after each epoch.

Prints `EPOCH e loss … test_top1 … train_s …` per epoch and `FINAL test_top1=… train_s=…`.
Run it with nothing else on the cores; `--threads` defaults to all of them.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2471, 0.2435, 0.2616)


def load_split(folder, names):
    """Official CIFAR-10 binary records (label byte, 3072 pixel bytes) → uint8 (N, 3, 32, 32)."""
    raw = np.concatenate([np.fromfile(os.path.join(folder, n), dtype=np.uint8) for n in names])
    raw = raw.reshape(-1, 3073)
    x = torch.from_numpy(np.ascontiguousarray(raw[:, 1:]).reshape(-1, 3, 32, 32))
    return x, torch.from_numpy(raw[:, 0].astype(np.int64))


def load_cifar10(folder):
    if os.path.isdir(os.path.join(folder, "cifar-10-batches-bin")):
        folder = os.path.join(folder, "cifar-10-batches-bin")
    train = load_split(folder, [f"data_batch_{i}.bin" for i in range(1, 6)])
    test = load_split(folder, ["test_batch.bin"])
    return train, test


class CifarResNet18(nn.Module):
    """kd's ResNet18 at `width`: stages of width, 2·width, 4·width, 8·width channels."""

    def __init__(self, width, maxpool, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if maxpool else nn.Identity()
        stages, inplanes = [], width
        for i, planes in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(2):
                s = stride if b == 0 else 1
                down = None
                if s != 1 or inplanes != planes:
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, s, bias=False),
                                         nn.BatchNorm2d(planes))
                blocks.append(BasicBlock(inplanes, planes, s, down))
                inplanes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(8 * width, classes)
        for m in self.modules():  # torchvision's ResNet init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def augment(x, gen):
    """Zero-pad 4, random 32×32 crop, random flip: uint8 (B, 3, 32, 32) → the same."""
    b = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    oy = torch.randint(0, 9, (b,), generator=gen)
    ox = torch.randint(0, 9, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    ar = torch.arange(32)
    rows = (oy[:, None] + ar)[:, None, :, None]
    cols = ox[:, None] + ar
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None],
                  rows, cols]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/cifar10")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--stem", choices=["cifar", "cifar-maxpool"], default="cifar")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="smoke test: the first N train and test images")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    (xtr, ytr), (xte, yte) = load_cifar10(a.data)
    if a.limit:
        xtr, ytr, xte, yte = xtr[:a.limit], ytr[:a.limit], xte[:a.limit], yte[:a.limit]
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    norm = lambda u8: (u8.float() - mean) / std  # noqa: E731
    model = CifarResNet18(a.width, a.stem == "cifar-maxpool")
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, nesterov=True,
                          weight_decay=a.wd)
    steps = math.ceil(len(ytr) / a.batch)
    total, warm = a.epochs * steps, a.warmup_epochs * steps

    def lr_at(s):
        if s < warm:
            return a.lr * (s + 1) / warm
        t = min((s - warm) / max(1, total - warm), 1.0)
        return a.lr * 0.5 * (1 + math.cos(math.pi * t))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | ResNet18 width {a.width} "
          f"stem {a.stem} | batch {a.batch}, lr {a.lr}, {a.epochs} epochs × {steps} steps, "
          f"warm-up {a.warmup_epochs}, wd {a.wd}, seed {a.seed}", flush=True)
    step, train_s = 0, 0.0
    for epoch in range(1, a.epochs + 1):
        model.train()
        t0, loss_sum = time.perf_counter(), 0.0
        order = torch.randperm(len(ytr), generator=gen)
        for k in range(steps):
            idx = order[k * a.batch:(k + 1) * a.batch]
            xb, yb = norm(augment(xtr[idx], gen)), ytr[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            step += 1
        train_s += time.perf_counter() - t0
        model.eval()
        correct = 0
        with torch.no_grad():
            for k in range(0, len(yte), a.eval_batch):
                out = model(norm(xte[k:k + a.eval_batch]))
                correct += (out.argmax(1) == yte[k:k + a.eval_batch]).sum().item()
        top1 = 100.0 * correct / len(yte)
        print(f"EPOCH {epoch} loss {loss_sum / len(ytr):.4f} test_top1 {top1:.2f} "
              f"train_s {train_s:.1f}", flush=True)
    print(f"FINAL test_top1={top1:.2f} train_s={train_s:.1f}")


if __name__ == "__main__":
    main()
