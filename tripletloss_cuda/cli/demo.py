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

With --chunk-size C every implementation trains with `tl.cached_loss_backward` (GradCache): the batch is
embedded C images at a time without a graph, the loss and its gradient with respect to the embeddings are
computed on the whole batch, then each chunk runs again with grad and backpropagates its slice, so the mined
batch is the whole batch while the activations in memory are one chunk's. The gradients are those of the
plain step (up to rounding), so the figures match a run without it. The demo then measures, on rank 0, the
peak activation memory of one plain step and one cached step at the training batch size, and the largest
batch each fits under --memory-cap MiB (searched by doubling then bisection, each candidate measured on
random inputs with P classes). Activation memory is measured, not estimated, with
`tl.gradcache.SavedTensorMemory`: the bytes of the tensors autograd saves for backward (the parameters
excluded), live at once; the cached step adds its two N x D caches (embeddings and their gradient).
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
from .common import sync

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
        sync(device)
        start = time.perf_counter()
        total = torch.zeros((), device=device)
        for idx in bar:
            idx = idx.to(device)
            optimizer.zero_grad(set_to_none=True)
            if args.chunk_size:
                loss = tl.cached_loss_backward(
                    net, x_shard[idx], y_shard[idx], lambda emb, labels: loss_fn(emb, labels, gen), args.chunk_size
                )
            else:
                loss = loss_fn(net(x_shard[idx]), y_shard[idx], gen)
                loss.backward()
            optimizer.step()
            total += loss.detach()
        sync(device)
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


def step_memory(model, x, labels, loss_fn, chunk_size=None):
    """Peak activation memory (bytes) of one training step: the plain step, or with chunk_size the cached
    step plus its two N x D caches. Measured with tl.gradcache.SavedTensorMemory; the gradients are cleared."""
    with tl.gradcache.SavedTensorMemory(exclude=model.parameters()) as memory:
        if chunk_size:
            tl.cached_loss_backward(model, x, labels, loss_fn, chunk_size)
        else:
            loss_fn(model(x), labels).backward()
    model.zero_grad(set_to_none=True)
    if not chunk_size:
        return memory.peak_bytes
    with torch.no_grad():
        row = model(x[:1])
    return memory.peak_bytes + 2 * x.shape[0] * row[0].numel() * row.element_size()


def largest_batch(measure, cap_bytes, start, limit=1 << 16):
    """The largest n in [start, limit] with measure(n) <= cap_bytes (0 if even start does not fit): doubling,
    then bisection; measure is assumed to grow with n."""
    if measure(start) > cap_bytes:
        return 0
    lo, hi = start, start * 2
    while hi <= limit and measure(hi) <= cap_bytes:
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if measure(mid) <= cap_bytes else (lo, mid)
    return lo


def memory_report(args, d_in, device):
    """The cached step against the plain step: peak activation memory at the training batch size, and the
    largest batch each fits under --memory-cap MiB (batch-hard loss, the demo's model, random inputs)."""
    torch.manual_seed(args.seed)
    model = EmbeddingNet(d_in, args.hidden, args.dim).to(device)
    loss_fn = lambda emb, labels: tl.batch_hard_triplet_loss(emb, labels, margin=args.margin)
    gen = torch.Generator().manual_seed(args.seed)
    classes = args.classes_per_batch

    def measure(n, chunk_size):
        x = torch.rand(n, d_in, generator=gen).to(device)
        return step_memory(model, x, (torch.arange(n) % classes).to(device), loss_fn, chunk_size)

    cap = int(args.memory_cap * 2**20)
    batch = args.classes_per_batch * args.per_class
    return {
        "batch": batch,
        "chunk_size": args.chunk_size,
        "plain_bytes": measure(batch, None),
        "cached_bytes": measure(batch, args.chunk_size),
        "memory_cap_mib": args.memory_cap,
        "largest_batch_plain": largest_batch(lambda n: measure(n, None), cap, 2 * classes),
        "largest_batch_cached": largest_batch(lambda n: measure(n, args.chunk_size), cap, 2 * classes),
        "method": "peak bytes of autograd's saved tensors (parameters excluded), tl.gradcache.SavedTensorMemory; "
        "cached: plus the N x D embedding and gradient caches",
    }


def _memory_lines(m):
    mib = 2**20
    at_batch = (
        f"peak activation memory at batch {m['batch']}: plain step {m['plain_bytes'] / mib:.2f} MiB, "
        f"cached step (chunks of {m['chunk_size']}) {m['cached_bytes'] / mib:.2f} MiB"
    )
    under_cap = (
        f"largest batch under {m['memory_cap_mib']:g} MiB: plain step {m['largest_batch_plain']}, "
        f"cached step {m['largest_batch_cached']}"
    )
    return at_batch + "\n" + under_cap


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
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=0,
        help="train with tl.cached_loss_backward, embedding this many images at a time (default: the plain step)",
    )
    parser.add_argument(
        "--memory-cap",
        type=float,
        default=4.0,
        help="with --chunk-size: the activation memory (MiB) under which to find the largest batch (default: %(default)s)",
    )
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
    if args.chunk_size < 0:
        parser.error(f"--chunk-size: expected a positive number (0: the plain step), got {args.chunk_size}")
    if not args.memory_cap > 0:
        parser.error(f"--memory-cap: expected a positive number of MiB, got {args.memory_cap}")
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
            f"triplets: {triplets}; seed {args.seed}; {args.epochs} epochs"
            + (f"; cached_loss_backward, chunks of {args.chunk_size}" if args.chunk_size else ""),
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
    memory = memory_report(args, x_train.shape[1], device) if args.chunk_size else None
    if memory:
        print(_memory_lines(memory))
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
    if memory:
        summary["gradcache"] = memory
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
