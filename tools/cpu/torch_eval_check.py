#!/usr/bin/env python3
"""PyTorch's figures for `kd-runner eval --weights A [--against B] [--ensemble-with C ...]`,
computed independently of kd:
the exported weights (kd's `model.safetensors`, torchvision's key names: ResNet18, 34 or 50, either
stem, any width) load strictly into the torchvision-block `CifarResNet` of
tools/fixtures/make_model_fixtures.py; the CIFAR-10 test split is read from the official
binary files and normalised by each model's sidecar (`model.json`). Prints top-1, NLL and the
expected calibration error (15 equal-width bins (k/15, (k+1)/15] of the top-1 confidence, |accuracy
− mean confidence| weighted by the bin's share: Guo et al. 2017), and with --against the top-1
agreement and the mean KL(B ‖ A) at temperature 1, and with --ensemble-with the top-1, top-5
and NLL of the ensemble of A and the others (their softmax averaged, in float64), and the top-1
and NLL of their mean logits (the ensemble teacher of kd's `teacher.members`).

  python3 tools/cpu/torch_eval_check.py --data data/cifar10 --weights runs/s1 --against runs/t
  kd-runner eval --data-dir data --weights runs/s1 --against runs/t
  python3 tools/cpu/torch_eval_check.py --data data/cifar10 --weights runs/dml --ensemble-with runs/dml/peer1
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))
from make_model_fixtures import ARCHS, CifarResNet  # noqa: E402
from torch_cpu_train import load_cifar10  # noqa: E402


def load_model(path):
    """A run folder (its model.safetensors) or a .safetensors file, with its JSON sidecar."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    meta = json.load(open(os.path.splitext(path)[0] + ".json"))
    if meta["arch"] not in ARCHS:
        sys.exit(f"{path}: this check builds {sorted(ARCHS)}, got {meta['arch']}")
    block, layers, _ = ARCHS[meta["arch"]]
    model = CifarResNet(block, layers, meta["base_width"], meta["num_classes"],
                        meta["stem"] == "cifar-maxpool")
    state = {k: v for k, v in load_file(path).items() if not k.endswith("num_batches_tracked")}
    model.load_state_dict(state, strict=False)
    missing = set(model.state_dict()) - set(state) - {
        k for k in model.state_dict() if k.endswith("num_batches_tracked")}
    if missing:
        sys.exit(f"{path}: missing {sorted(missing)}")
    return model.eval(), meta


@torch.no_grad()
def logits_of(model, meta, images, batch=1000):
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    # CifarResNet returns (logits, stage features, pooled).
    out = [model((images[i:i + batch].float() / 255 - mean) / std)[0]
           for i in range(0, len(images), batch)]
    return torch.cat(out).double()


def ece_pct(logits, labels, bins=15):
    conf, pred = F.softmax(logits, 1).max(1)
    correct = (pred == labels).double()
    total = 0.0
    for k in range(bins):
        inside = (conf > k / bins) & (conf <= (k + 1) / bins)
        if inside.any():
            total += abs(correct[inside].sum().item() - conf[inside].sum().item())
    return 100 * total / len(labels)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, help="folder with cifar-10-batches-bin")
    p.add_argument("--weights", required=True)
    p.add_argument("--against")
    p.add_argument("--ensemble-with", action="append", default=[])
    a = p.parse_args()
    _, (x, y) = load_cifar10(a.data)
    model, meta = load_model(a.weights)
    s = logits_of(model, meta, x)
    top1 = 100 * (s.argmax(1) == y).double().mean().item()
    nll = F.cross_entropy(s, y).item()
    print(f"{a.weights}: top-1 {top1:.2f}%  loss {nll:.4f}  ECE {ece_pct(s, y):.2f}%  ({len(y)} images)")
    if a.against:
        other, ometa = load_model(a.against)
        t = logits_of(other, ometa, x)
        agree = 100 * (s.argmax(1) == t.argmax(1)).double().mean().item()
        kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean().item()
        t1 = 100 * (t.argmax(1) == y).double().mean().item()
        print(f"against {a.against} (top-1 {t1:.2f}%, ECE {ece_pct(t, y):.2f}%): "
              f"top-1 agreement {agree:.2f}%, KL(it ‖ evaluated) {kl:.4f} nats")
    if a.ensemble_with:
        probs = F.softmax(s, 1)
        logit_sum = s.clone()
        for path in a.ensemble_with:
            other, ometa = load_model(path)
            t = logits_of(other, ometa, x)
            print(f"with {path}: top-1 {100 * (t.argmax(1) == y).double().mean().item():.2f}%")
            probs = probs + F.softmax(t, 1)
            logit_sum = logit_sum + t
        probs = probs / (1 + len(a.ensemble_with))
        # kd's ensemble teacher (`teacher.members`) averages logits instead.
        mean_logits = logit_sum / (1 + len(a.ensemble_with))
        m1 = 100 * (mean_logits.argmax(1) == y).double().mean().item()
        print(f"ensemble of {1 + len(a.ensemble_with)} models (logits averaged, kd's ensemble teacher): "
              f"top-1 {m1:.2f}%  NLL {F.cross_entropy(mean_logits, y).item():.4f}")
        e1 = 100 * (probs.argmax(1) == y).double().mean().item()
        e5 = 100 * (probs.topk(5, 1).indices == y[:, None]).any(1).double().mean().item()
        nll = -probs.gather(1, y[:, None]).log().mean().item()
        print(f"ensemble of {1 + len(a.ensemble_with)} models (softmax averaged): "
              f"top-1 {e1:.2f}%  top-5 {e5:.2f}%  NLL {nll:.4f}")


if __name__ == "__main__":
    main()
