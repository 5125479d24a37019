"""`tripletloss-cuda demo`: train a small embedding network with the fused loss on scikit-learn's digits.

    tripletloss-cuda demo                                  # CPU (CUDA when present), about 10 s
    tripletloss-cuda demo --epochs 40 --json demo.json --plot demo.png
    torchrun --nproc_per_node=2 -m tripletloss_cuda demo   # DistributedDataParallel, gloo on CPU / NCCL on GPUs

Data: `sklearn.datasets.load_digits` (1,797 8×8 images, shipped with scikit-learn, no download), pixels / 16,
a stratified held-out split (30 %). Model: an MLP 64 → 128 → 32 with L2-normalized output. Batches: P
classes × K images (10 × 8), class-balanced, seeded. Loss: batch-hard mining (the hardest positive and
negative of each anchor in the batch; `tl.batch_hard_triplet_loss` for the fused loss), or with
--random-triplets one random positive and negative per anchor, sampled per batch.

The same training runs once per loss implementation, with the same seed (the same initial weights and the
same batches): "tl" (the fused tripletloss_cuda loss), "naive" (the naive module of the original design) and
"torch" (F.triplet_margin_loss). With mining, "naive" and "torch" get the batch-hard triplets picked with
torch ops. The accuracy must then match within noise while the time per epoch differs.

Evaluation, on the held-out images: each image queries all the other held-out images by Euclidean distance;
recall@1 (the nearest one has the same digit) and mean average precision, for the trained networks, the
untrained network and the raw pixels.

Under torchrun (RANK and WORLD_SIZE set): one process per rank, each on its own shard of the training set,
the model wrapped in DistributedDataParallel, mining across ranks (`distributed=True`) for "tl" ("naive" and
"torch" mine within each rank's batch); rank 0 prints and writes the files; at the end the ranks' parameters
are compared and the demo exits 1 if they differ.
"""

import datetime
import json
import os
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import tripletloss_cuda as tl

from .args import ArgumentParser, missing

IMPLS = {"tl": "tripletloss_cuda", "naive": "naive module", "torch": "F.triplet_margin_loss"}


class EmbeddingNet(nn.Module):
    def __init__(self, d_in=64, hidden=128, d_out=32):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, x):
        return F.normalize(self.layers(x), dim=-1)  # on the unit sphere: the margin has a fixed scale


def load_data(seed, test_size=0.3):
    """(x_train, y_train, x_test, y_test): the digits, pixels / 16, a stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise missing("scikit-learn", "the demo") from None
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_size, random_state=seed, stratify=y.numpy()
    )
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def retrieval_metrics(embeddings, labels):
    """recall@1 and mean average precision: each row queries all the others by Euclidean distance."""
    emb = embeddings.detach().double().cpu()
    labels = labels.cpu()
    dist = torch.cdist(emb, emb)
    dist.fill_diagonal_(float("inf"))  # a query does not retrieve itself
    order = dist.argsort(dim=1)[:, :-1]  # the self match (inf) sorts last: drop it
    relevant = (labels[order] == labels[:, None]).double()
    recall_at_1 = relevant[:, 0].mean().item()
    precision_at_k = relevant.cumsum(1) / torch.arange(1, relevant.shape[1] + 1, dtype=torch.float64)
    ap = (precision_at_k * relevant).sum(1) / relevant.sum(1).clamp_min(1)
    return {"recall_at_1": recall_at_1, "map": ap.mean().item()}


def class_balanced_batches(labels, classes_per_batch, per_class, batches, gen):
    """`batches` index tensors of P classes × K images each (without replacement inside a batch)."""
    by_class = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]
    eligible = torch.tensor([c for c, idx in enumerate(by_class) if len(idx) >= 2])
    for _ in range(batches):
        chosen = eligible[torch.randperm(len(eligible), generator=gen)[:classes_per_batch]]
        parts = []
        for c in chosen.tolist():
            idx = by_class[c]
            parts.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
        yield torch.cat(parts)


def random_triplets(labels, gen):
    """For each anchor: a random other image of its class and a random image of another class (indices)."""
    same = labels[:, None] == labels[None, :]
    not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    noise = torch.rand(same.shape, generator=gen).to(labels.device)
    # argmax of noise over the allowed entries: a uniform random choice per row
    pos = torch.where(same & not_self, noise, -1.0).argmax(1)
    neg = torch.where(~same, noise, -1.0).argmax(1)
    return pos, neg


def batch_hard_triplets(embeddings, labels):
    """For each anchor: its farthest positive and nearest negative in the batch (indices; no gradient)."""
    with torch.no_grad():
        dist = torch.cdist(embeddings, embeddings)
        same = labels[:, None] == labels[None, :]
        not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos = torch.where(same & not_self, dist, -float("inf")).argmax(1)
        neg = torch.where(~same, dist, float("inf")).argmin(1)
    return pos, neg


def make_loss(impl, margin, batch_hard, distributed):
    """loss(embeddings, labels, gen) for one implementation; all train on the same kind of triplets."""
    triplet_loss = {
        "tl": lambda a, p, n: tl.triplet_margin_loss(a, p, n, margin=margin),
        "naive": tl.naive.TripletLoss(margin=margin),
        "torch": lambda a, p, n: F.triplet_margin_loss(a, p, n, margin=margin),
    }[impl]
    if batch_hard and impl == "tl":
        kwargs = {"distributed": True} if distributed else {}
        return lambda emb, labels, gen: tl.batch_hard_triplet_loss(emb, labels, margin=margin, **kwargs)

    def loss(emb, labels, gen):
        pos, neg = batch_hard_triplets(emb, labels) if batch_hard else random_triplets(labels, gen)
        return triplet_loss(emb, emb[pos], emb[neg])

    return loss


def _progress(iterable, total, desc, enabled):
    if not enabled or not sys.stderr.isatty():  # no bar in a log file
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        raise missing("tqdm", "the demo's progress bar (or --no-progress)") from None
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(impl, args, data, device, dist_info):
    """Train one implementation from the seeded initial weights: (model, [seconds per epoch], [mean loss])."""
    x_train, y_train = data
    rank, world = dist_info
    torch.manual_seed(args.seed)  # the same initial weights for every implementation (and every rank)
    model = EmbeddingNet(x_train.shape[1], args.hidden, args.dim).to(device)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    batch_hard = not args.random_triplets
    loss_fn = make_loss(impl, args.margin, batch_hard, world > 1)
    # This rank's shard: a seeded permutation dealt round-robin; the same number of batches on every rank.
    perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed))
    shard = perm[rank::world]
    x_shard, y_shard = x_train[shard].to(device), y_train[shard].to(device)
    batch_size = args.classes_per_batch * args.per_class
    steps = max(1, (len(y_train) // world) // batch_size)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # batches and sampled triplets
    epoch_seconds, losses = [], []
    for epoch in range(args.epochs):
        batches = class_balanced_batches(y_shard.cpu(), args.classes_per_batch, args.per_class, steps, gen)
        bar = _progress(batches, steps, f"{impl} epoch {epoch + 1}/{args.epochs}", args.progress and rank == 0)
        _sync(device)
        start = time.perf_counter()
        total = torch.zeros((), device=device)
        for idx in bar:
            idx = idx.to(device)
            loss = loss_fn(net(x_shard[idx]), y_shard[idx], gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        _sync(device)
        epoch_seconds.append(time.perf_counter() - start)
        losses.append(total.item() / steps)
    return model, epoch_seconds, losses


def _params_max_diff(model):
    """The largest |parameter - rank 0's parameter| over all ranks (0 when the replicas are identical)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def _init_distributed(requested):
    """(rank, world size, device) from torchrun's environment; (0, 1, device) when not launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if world <= 1:
        return 0, 1, torch.device(requested)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if requested.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def plot(path, panels, title):
    """One scatter per (name, embeddings, labels): a 2-D PCA projection coloured by digit."""
    try:
        import matplotlib
    except ImportError:
        raise missing("matplotlib", "--plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, (name, emb, labels) in zip(axes[0], panels, strict=True):
        x = emb.detach().double().cpu()
        x = x - x.mean(0)
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        xy = x @ v[:2].T
        points = ax.scatter(xy[:, 0], xy[:, 1], c=labels.cpu(), cmap="tab10", s=7, vmin=-0.5, vmax=9.5)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(points, ax=axes[0].tolist(), ticks=range(10), label="digit", shrink=0.8)
    fig.suptitle(title, fontsize=9)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _parse_args(argv):
    parser = ArgumentParser(prog="tripletloss-cuda demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda")
    parser.add_argument("--impls", default=",".join(IMPLS), help="loss implementations (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=0.2, help="default: %(default)s (unit-norm embeddings)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--classes-per-batch", type=int, default=10, help="P (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=8, help="K (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--dim", type=int, default=32, help="embedding size (default: %(default)s)")
    parser.add_argument("--random-triplets", action="store_true", help="random triplets even with mining available")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--plot", help="save a 2-D projection of the held-out embeddings to this image")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not args.impls or any(i not in IMPLS for i in args.impls):
        parser.error(f"--impls: expected some of {','.join(IMPLS)}, got {','.join(args.impls)!r}")
    for name in ("epochs", "classes_per_batch", "hidden", "dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    if args.per_class < 2:
        parser.error(f"--per-class: expected at least 2 (an anchor needs a positive), got {args.per_class}")
    if not args.margin > 0 or not args.lr > 0:
        parser.error(f"--margin and --lr must be positive, got {args.margin} and {args.lr}")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device: expected auto, cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    return args


def _report(results):
    rows = [("raw pixels", results["raw_pixels"], None), ("untrained network", results["untrained"], None)]
    rows += [(f"trained: {IMPLS[i]}", r, r["epoch_seconds"]) for i, r in results["trained"].items()]
    lines = [f"{'':34} {'recall@1':>8} {'mAP':>7} {'s/epoch':>8}"]
    for name, r, seconds in rows:
        lines.append(
            f"{name:34} {r['recall_at_1']:8.4f} {r['map']:7.4f} {'' if seconds is None else f'{seconds:8.4f}'}"
        )
    return "\n".join(lines)


def main(argv=None):
    args = _parse_args(argv)
    x_train, y_train, x_test, y_test = load_data(args.seed)
    rank, world, device = _init_distributed(args.device)
    if world == 1:
        return _run(args, (x_train, y_train, x_test, y_test), rank, world, device)
    import torch.distributed as dist

    try:
        status = _run(args, (x_train, y_train, x_test, y_test), rank, world, device)
        # Without the barrier a rank that finishes first can tear down its gloo connections while the other
        # is still shutting down, which aborts the latter ("terminate called without an active exception",
        # seen about once in four runs). Only on success: after a failure the ranks' collectives differ.
        dist.barrier()
        return status
    finally:
        dist.destroy_process_group()


def _run(args, data, rank, world, device):
    x_train, y_train, x_test, y_test = data
    batch_hard = not args.random_triplets
    # Only the mining loss mines across ranks; the torch-op mining of naive/torch sees this rank's batch.
    across = " (tl: across ranks; naive, torch: within each rank)" if world > 1 else ""
    triplets = "batch-hard" + across if batch_hard else "random per batch"
    if rank == 0:
        print(
            f"digits: {len(y_train)} training images ({world} rank(s)), {len(y_test)} held out; device {device}; "
            f"triplets: {triplets}; seed {args.seed}; {args.epochs} epochs",
            file=sys.stderr,
        )
    torch.manual_seed(args.seed)
    untrained = EmbeddingNet(x_train.shape[1], args.hidden, args.dim)
    with torch.no_grad():
        untrained_emb = untrained(x_test)
    results = {
        "raw_pixels": retrieval_metrics(x_test, y_test),
        "untrained": retrieval_metrics(untrained_emb, y_test),
        "trained": {},
    }
    diffs, embeddings = {}, {}
    for impl in args.impls:
        model, seconds, losses = train(impl, args, (x_train, y_train), device, (rank, world))
        model.eval()
        with torch.no_grad():
            emb = model(x_test.to(device)).cpu()
        embeddings[impl] = emb
        # The first epoch includes one-time costs (allocations, first calls): time the others when there are.
        epoch_s = sum(seconds[1:]) / (len(seconds) - 1) if len(seconds) > 1 else seconds[0]
        results["trained"][impl] = dict(retrieval_metrics(emb, y_test), epoch_seconds=epoch_s, final_loss=losses[-1])
        if world > 1:
            diffs[impl] = _params_max_diff(model)
    if rank != 0:
        return 1 if any(diffs.values()) else 0
    print(_report(results))
    main_impl = "tl" if "tl" in results["trained"] else args.impls[0]
    trained = results["trained"][main_impl]
    summary = {
        "recall_at_1": trained["recall_at_1"],
        "recall_at_1_untrained": results["untrained"]["recall_at_1"],
        "recall_at_1_raw_pixels": results["raw_pixels"]["recall_at_1"],
        "map": trained["map"],
        "map_untrained": results["untrained"]["map"],
        "map_raw_pixels": results["raw_pixels"]["map"],
        "epoch_seconds": {impl: r["epoch_seconds"] for impl, r in results["trained"].items()},
        "per_impl": results["trained"],
        "reported_impl": main_impl,
        "triplets": triplets,
        "world_size": world,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "seed": args.seed,
        "epochs": args.epochs,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if world > 1:
        summary["ranks_param_max_diff"] = diffs
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1) + "\n")
    if args.plot:
        panels = [("raw pixels", x_test, y_test), ("untrained network", untrained_emb, y_test)]
        panels.append((f"trained ({IMPLS[main_impl]}, {args.epochs} epochs)", embeddings[main_impl], y_test))
        title = (
            f"held-out digits, PCA to 2-D; recall@1 {summary['recall_at_1']:.3f}, mAP {summary['map']:.3f}; "
            f"{summary['device_name']}, {summary['date'][:10]}"
        )
        plot(args.plot, panels, title)
    if any(diffs.values()):
        print(f"error: the ranks' parameters differ: {diffs}", file=sys.stderr)
        return 1
    return 0


def _cpu_name():
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return f"{value.strip()}, {torch.get_num_threads()} threads"
    return f"CPU, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    sys.exit(main())
