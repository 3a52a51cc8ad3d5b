"""MNIST CNN: SelfCompress against the tools users would pick instead, same net and data, same run.

- fp32: the plain network (the starting point of the pruning methods);
- SelfCompress(gamma): exact size and real packed file (``selfcompress.io.save``);
- Torch-Pruning: structured magnitude pruning (``MetaPruner`` + ``GroupMagnitudeImportance``)
  of the trained fp32 net to the parameter count of the finalized SelfCompress model, then
  fine-tuning; real on-disk ``torch.save(state_dict)`` bytes;
- Lightning ``ModelPruning`` (global L1 unstructured, same fraction of weights kept),
  pruned at the end of the fp32 epochs then fine-tuned; masks keep dense tensors, so the
  on-disk file stays fp32-sized;
- DiffQ (``pip install diffq``): noise-injection quantization with a size penalty; real
  bytes of ``torch.save(quantizer.get_quantized_state(packed=True))``.

Settings: default (short, CPU) 2 epochs of the 60,000 images at batch 128 (936 steps), gamma
0.02, and 1 fine-tuning epoch for the pruners; ``--full`` (GPU) 20,000 steps of batch 512 and 2,000
fine-tuning steps; ``--smoke`` 512 images, 1 epoch.

    python benchmarks/bench_peers.py --out peers.json --plot benchmarks/plots/peers_accuracy_vs_bytes.png
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "examples")]

import torch  # noqa: E402
from bench_mnist import (  # noqa: E402
    evaluate_selfcompress,
    fit,
    loaders,
    parser_with_common,
    plot,
    skip_without_data,
    state_dict_bytes,
)
from common import header, write_json  # noqa: E402
from digits import accuracy  # noqa: E402
from mnist import mnist_cnn  # noqa: E402
from torch import nn  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prune(net: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    """A copy of ``net`` with ``ratio`` of each layer's channels removed by Torch-Pruning (last layer kept)."""
    import torch_pruning as tp

    model = copy.deepcopy(net).eval()
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[model[-1]])
    pruner.step()
    return model


def torch_pruning_to(net: nn.Module, target_params: int, example: torch.Tensor) -> tuple[nn.Module, float]:
    """A pruned copy of ``net`` with at most ``target_params`` parameters (ratio found by bisection)."""
    low, high = 0.0, 0.99
    for _ in range(14):
        mid = (low + high) / 2
        if params(prune(net, mid, example)) > target_params:
            low = mid
        else:
            high = mid
    return prune(net, high, example), high


def attach_diffq(net: nn.Module, group_size: int):
    """A ``DiffQuantizer`` on ``net``: weights by groups of ``group_size``, biases and batch norms in float32."""
    from diffq import DiffQuantizer

    exclude = [name for name, p in net.named_parameters() if p.dim() < 2]
    return DiffQuantizer(net, group_size=group_size, min_size=0.0, exclude=exclude)


def diffq_file_bytes(quantizer) -> int:
    """Bytes of the file ``torch.save(quantizer.get_quantized_state(packed=True), "diffq.pt")`` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "diffq.pt"
        torch.save(quantizer.get_quantized_state(packed=True), path)
        return path.stat().st_size


def run_diffq(train_loader, test_loader, epochs: int, max_steps: int, seed: int, penalty: float,
              group_size: int) -> dict:
    """DiffQ on the same net with the same optimizer and schedule, plain training loop."""
    try:
        import diffq  # noqa: F401
    except ImportError as error:
        return {"not_measured": f"diffq not importable: {error}"}
    torch.manual_seed(seed)
    net = mnist_cnn()
    net_params = params(net)
    lr, weight_decay = 3e-3, 5e-4  # as examples/digits.py Classifier
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    quantizer = attach_diffq(net, group_size)
    quantizer.setup_optimizer(optimizer)
    total = max_steps if max_steps > 0 else epochs * len(train_loader)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs or 1, 1))
    steps, start = 0, time.perf_counter()
    net.train()
    while steps < total:
        for x, y in train_loader:
            loss = nn.functional.cross_entropy(net(x), y) + penalty * quantizer.model_size()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps >= total:
                break
        schedule.step()
    seconds = time.perf_counter() - start
    acc = accuracy(net, test_loader)  # eval mode: DiffQ's hooks run the quantized weights
    return dict(method="diffq", steps=steps, seconds=seconds, accuracy=acc, file_bytes=diffq_file_bytes(quantizer),
                estimated_bytes=round(quantizer.true_model_size() * 2**20), params=net_params,
                config=f"penalty {penalty:g} x model_size (MB), group_size {group_size}, biases/BN fp32")


def main(argv: list[str] | None = None) -> dict:
    parser = parser_with_common(__doc__)
    parser.add_argument("--gamma", type=float, default=0.02, help="SelfCompress gamma")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="short setting: pruners' fine-tuning epochs")
    parser.add_argument("--diffq-penalty", type=float, default=10.0)
    parser.add_argument("--diffq-group-size", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if skipped := skip_without_data(args.data_dir):
        return skipped
    if args.smoke:
        cfg = dict(name="smoke", epochs=1, max_steps=-1, ft_epochs=1, ft_steps=-1, batch_size=128,
                   train_subset=512, test_subset=1000)
    elif args.full:
        cfg = dict(name="full (GPU)", epochs=None, max_steps=20000, ft_epochs=None, ft_steps=2000, batch_size=512,
                   train_subset=None, test_subset=None)
    else:
        cfg = dict(name="short (CPU)", epochs=args.epochs, max_steps=-1, ft_epochs=args.finetune_epochs,
                   ft_steps=-1, batch_size=args.batch_size, train_subset=args.train_subset, test_subset=None)
    train_loader, test_loader = loaders(args.data_dir, cfg["batch_size"], cfg["train_subset"], cfg["test_subset"],
                                        args.seed)
    example = next(iter(test_loader))[0][:2]
    rows = []

    base, _, seconds, steps = fit(train_loader, cfg["epochs"], None, args.seed, cfg["max_steps"])
    total_params = params(base.net)
    rows.append(dict(method="fp32", steps=steps, seconds=seconds, accuracy=accuracy(base, test_loader),
                     file_bytes=state_dict_bytes(base.net), params=total_params))

    model, callback, seconds, steps = fit(train_loader, cfg["epochs"], args.gamma, args.seed, cfg["max_steps"])
    sc = evaluate_selfcompress(model, callback, test_loader, example)
    rows.append(dict(method=f"selfcompress gamma {args.gamma:g}", steps=steps, seconds=seconds,
                     accuracy=sc["finalized_accuracy"], file_bytes=sc["packed_file_bytes"],
                     file_note=sc["packed_file_note"], exact_bytes=sc["exact_bytes"], params=sc["params_finalized"]))
    target = sc["params_finalized"]

    # Torch-Pruning: structured, to the same parameter count, then fine-tune.
    try:
        start = time.perf_counter()
        pruned, ratio = torch_pruning_to(base.net, target, example)
        pruned_acc = accuracy(pruned, test_loader)
        tuned, _, ft_seconds, ft_steps = fit(train_loader, cfg["ft_epochs"], None, args.seed, cfg["ft_steps"],
                                             net=pruned)
        rows.append(dict(method="torch-pruning + fine-tune", steps=rows[0]["steps"] + ft_steps,
                         seconds=rows[0]["seconds"] + time.perf_counter() - start,
                         accuracy=accuracy(tuned, test_loader),
                         accuracy_before_finetune=pruned_acc, file_bytes=state_dict_bytes(tuned.net),
                         params=params(tuned.net), pruning_ratio=ratio,
                         config="MetaPruner, GroupMagnitudeImportance(p=2), per-layer ratio, last Linear kept"))
    except Exception as error:  # noqa: BLE001 - reported, not hidden
        rows.append(dict(method="torch-pruning + fine-tune", not_measured=f"{type(error).__name__}: {error}"))

    # Lightning ModelPruning: global L1 unstructured to the same fraction of weights, then fine-tune.
    from lightning.pytorch.callbacks import ModelPruning

    amount = 1.0 - target / total_params
    if cfg["epochs"] is not None:
        prune_epoch, pm_epochs, pm_steps = cfg["epochs"] - 1, cfg["epochs"] + cfg["ft_epochs"], -1
    else:  # full: epoch boundaries of the step budget
        per_epoch = len(train_loader)
        prune_epoch = cfg["max_steps"] // per_epoch - 1
        pm_epochs, pm_steps = None, cfg["max_steps"] + cfg["ft_steps"]
    pruning = ModelPruning("l1_unstructured", amount=lambda epoch: amount if epoch == prune_epoch else 0.0,
                           use_global_unstructured=True, use_lottery_ticket_hypothesis=False,
                           make_pruning_permanent=True, verbose=0)
    pm, _, seconds, steps = fit(train_loader, pm_epochs, None, args.seed, pm_steps, extra_callbacks=[pruning])
    zeros = sum(int((p == 0).sum()) for p in pm.net.parameters())
    rows.append(dict(method="lightning ModelPruning + fine-tune", steps=steps, seconds=seconds,
                     accuracy=accuracy(pm, test_loader), file_bytes=state_dict_bytes(pm.net), params=total_params,
                     nonzero_params=total_params - zeros, amount=amount,
                     config="l1_unstructured, global, pruned after the fp32 epochs, permanent at fit end"))

    diffq = run_diffq(train_loader, test_loader, cfg["epochs"], cfg["max_steps"], args.seed, args.diffq_penalty,
                      args.diffq_group_size)
    rows.append(diffq if "method" in diffq else dict(method="diffq", **diffq))

    print(header())
    print(f"MNIST CNN ({total_params:,} weights), setting {cfg['name']}, batch {cfg['batch_size']}, "
          f"{len(train_loader.dataset):,} training images, {len(test_loader.dataset):,} test images")
    print(f"{'method':<36}{'steps':>7}{'accuracy':>10}{'file bytes':>12}{'params':>9}{'seconds':>9}")
    for r in rows:
        if "not_measured" in r:
            print(f"{r['method']:<36} not measured: {r['not_measured']}")
            continue
        print(f"{r['method']:<36}{r['steps']:>7}{r['accuracy']:>10.2%}{r['file_bytes'] or 0:>12,}"
              f"{r.get('nonzero_params', r['params']):>9,}{r['seconds']:>9.1f}")
    results = {"benchmark": "peers", "setting": cfg, "target_params": target, "runs": rows}
    if args.plot:
        markers = ["o", "s", "^", "v", "D"]
        plot(args.plot, [dict(bytes=r["file_bytes"], accuracy=r["accuracy"], label=r["method"], marker=m)
                         for r, m in zip(rows, markers, strict=True) if r.get("file_bytes")],
             f"MNIST CNN, real file bytes, {cfg['name']} setting; {header().splitlines()[1]}")
        results["plot"] = args.plot
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
