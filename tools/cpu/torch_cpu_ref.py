#!/usr/bin/env python3
"""PyTorch on the CPU, the same workloads as `kd-runner bench --device cpu`: a ResNet18 training
step (forward, cross-entropy, backward, SGD with Nesterov momentum), ResNet50 inference, and the KD
step (frozen ResNet50 forward + ResNet18 step with the Hinton loss, T = 4), on synthetic 32×32
batches, f32, warm-up excluded. CIFAR ResNets as kd builds them with `--stem cifar`: torchvision's
ResNet with a 3×3/s1 stem and no max-pool. Prints one `TORCH workload=… images_per_s=…` line per
row, and the train step's phases with --phases.

  pip install torch torchvision
  python3 tools/cpu/torch_cpu_ref.py --batch 32 --steps 3 --warmup 1 --workloads train --phases

Run it on the machine and at the thread count (`--threads`, default: all cores) that kd ran on,
with nothing else running, and divide kd's figure by this one.
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


def cifar_resnet(arch, classes=10):
    """torchvision's ResNet at width 64 (kd's default `--width`)."""
    block, layers = {"resnet18": (BasicBlock, [2, 2, 2, 2]),
                     "resnet50": (Bottleneck, [3, 4, 6, 3])}[arch]
    m = ResNet(block, layers, num_classes=classes)
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def kd_loss(s, t, y, temperature=4.0, alpha=0.9):
    kl = F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * F.cross_entropy(s, y) + alpha * temperature ** 2 * kl


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workloads", default="train,infer,kd")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--channels-last", action="store_true", help="NHWC tensors and weights")
    p.add_argument("--phases", action="store_true", help="also time forward, backward, optimizer")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (a.batch,))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}, "
          f"{'channels_last' if a.channels_last else 'NCHW'}, f32")

    def net(arch):
        return cifar_resnet(arch).to(memory_format=fmt)

    for workload in a.workloads.split(","):
        if workload == "infer":
            model = net("resnet50").eval()

            def step():
                with torch.inference_mode():
                    model(x)
        elif workload in ("train", "kd"):
            model = net("resnet18").train()
            teacher = net("resnet50").eval() if workload == "kd" else None
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4)
            phases = [0.0, 0.0, 0.0]

            def step(phases=phases):
                t0 = time.perf_counter()
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(x)
                out = model(x)
                loss = kd_loss(out, t_out, y) if teacher is not None else F.cross_entropy(out, y)
                t1 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
                for i, d in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                    phases[i] += d
        else:
            raise SystemExit(f"--workloads: unknown workload {workload!r}; expected train, infer or kd")
        for _ in range(a.warmup):
            step()
        if workload != "infer":
            phases[:] = [0.0, 0.0, 0.0]
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        dt = time.perf_counter() - t0
        name = {"train": "resnet18-train", "infer": "resnet50-infer", "kd": "kd-step"}[workload]
        if a.phases and workload != "infer":
            f, b, o = (1000 * v / a.steps for v in phases)
            print(f"PHASES workload={name} forward_ms={f:.2f} backward_ms={b:.2f} optimizer_ms={o:.2f}")
        print(f"TORCH workload={name} images_per_s={a.batch * a.steps / dt:.1f} "
              f"ms_per_step={1000 * dt / a.steps:.2f}", flush=True)


if __name__ == "__main__":
    main()
