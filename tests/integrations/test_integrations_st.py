"""tripletloss_cuda.integrations.sentence_transformers against sentence-transformers 6.2's own losses: values and
gradients on random embeddings for every loss, distance_metric (its own and arbitrary callables), margin and
batch shape (anchors without positives or negatives, one label, B = 1), and a tiny SentenceTransformer built
locally (random BERT weights, a word-level tokenizer; no download) trained a few steps with each loss; TripletLoss
with its three TripletDistanceMetric functions (fused), dtypes, other metrics and inputs (its own code)."""

import math
from unittest import mock

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
from helpers import assert_same_error, seed_of
from sentence_transformers.sentence_transformer import losses as st_losses

from tripletloss_cuda import ops as tl_ops
from tripletloss_cuda.integrations import sentence_transformers as ours

Distance = st_losses.BatchHardTripletLossDistanceFunction
LOSSES = ("BatchHardTripletLoss", "BatchHardSoftMarginTripletLoss", "BatchAllTripletLoss", "BatchSemiHardTripletLoss")
METRICS = {
    "euclidean": Distance.euclidean_distance,
    "squared": lambda e: Distance.euclidean_distance(e, squared=True),
    "cosine": Distance.cosine_distance,
    "cdist_l1": lambda e: torch.cdist(e, e, p=1),  # any callable
}
LABELS = {
    "random": lambda g: torch.randint(0, 4, (16,), generator=g),
    "singletons_and_groups": lambda g: torch.tensor([0, 0, 1, 2, 2, 3, 3, 3, 4, 5, 5, 5]),
    "one_label": lambda g: torch.zeros(6, dtype=torch.int64),
    "all_singletons": lambda g: torch.arange(5),
    "one_sample": lambda g: torch.zeros(1, dtype=torch.int64),
}


def make_pair(name, metric, margin):
    kwargs = {"distance_metric": METRICS[metric]}
    if name != "BatchHardSoftMarginTripletLoss":
        kwargs["margin"] = margin
    return getattr(ours, name)(None, **kwargs), getattr(st_losses, name)(None, **kwargs)


def value_and_grad(loss, labels, x):
    x = x.detach().requires_grad_()
    value = loss.compute_loss_from_embeddings([x], labels)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("margin", [5.0, 0.3])
def test_matches_sentence_transformers(name, metric, labels, margin):
    g = torch.Generator().manual_seed(seed_of(name, metric, labels, margin))
    y = LABELS[labels](g)
    x = torch.randn(len(y), 8, generator=g, dtype=torch.float64)
    mine, theirs = make_pair(name, metric, margin)
    got, want = value_and_grad(mine, y, x), value_and_grad(theirs, y, x)
    # rtol 1e-7: torch's softplus (theirs) is the identity above 20, ours exact (gradient 1 - 2e-9 there).
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", LOSSES)
def test_float32_and_label_dtypes(name):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 5, (40,), generator=g)
    x = torch.randn(40, 16, generator=g)
    mine, theirs = make_pair(name, "euclidean", 1.0)
    want = value_and_grad(theirs, y, x)
    for labels in (y, y.int(), y.float() * 0.5, y[:, None]):
        got = value_and_grad(mine, labels, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_errors():
    mine, theirs = make_pair("BatchHardTripletLoss", "euclidean", 1.0)
    x, y = torch.randn(6, 4), torch.zeros(5, dtype=torch.int64)
    for loss in (mine, theirs):
        with pytest.raises(ValueError, match=r"BatchHardTripletLoss expects 6 labels \(one per example\)"):
            loss.compute_loss_from_embeddings([x], y)
    with pytest.raises(
        TypeError, match=r"BatchHardTripletLoss.forward\(\): argument 'labels' \(position 2\) must be Tensor"
    ):
        mine.compute_loss_from_embeddings([x], [0] * 6)
    bad = ours.BatchAllTripletLoss(None, distance_metric=lambda e: e @ e[:3].T)
    with pytest.raises(ValueError, match=r"distance_metric should return a \(6, 6\) matrix"):
        bad.compute_loss_from_embeddings([x], torch.zeros(6, dtype=torch.int64))


def test_config_is_theirs():
    mine, theirs = make_pair("BatchSemiHardTripletLoss", "cosine", 0.5)
    assert mine.get_config_dict() == theirs.get_config_dict()
    assert isinstance(mine, st_losses.BatchSemiHardTripletLoss)


def tiny_sentence_transformer(directory):
    """A 1-layer BERT with random weights and a word-level tokenizer, saved and loaded locally."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = ["the", "a", "cat", "dog", "car", "bus", "red", "blue", "fast", "slow", "runs", "sits", "big", "small"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    BertModel(config).save_pretrained(directory)
    transformer = Transformer(str(directory))
    return SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension())], device="cpu"
    ), words


@pytest.mark.parametrize("name", LOSSES)
def test_tiny_model_trains(name, tmp_path, monkeypatch):
    """A few optimizer steps with each loss: the same loss and parameter gradients as sentence-transformers' loss
    on the same model state, and a loss that goes down."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, words = tiny_sentence_transformer(tmp_path)
    g = torch.Generator().manual_seed(3)
    sentences = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (4,), generator=g)) for _ in range(12)]
    labels = torch.arange(12) % 3
    mine = (
        getattr(ours, name)(model) if name == "BatchHardSoftMarginTripletLoss" else getattr(ours, name)(model, margin=1)
    )
    theirs = (
        getattr(st_losses, name)(model)
        if name == "BatchHardSoftMarginTripletLoss"
        else getattr(st_losses, name)(model, margin=1)
    )
    model.eval()  # no dropout: both losses see the same embeddings
    features = model.preprocess(sentences) if hasattr(model, "preprocess") else model.tokenize(sentences)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    values = []
    for _ in range(4):
        grads = []
        for loss_fn in (theirs, mine):
            model.zero_grad()
            loss = loss_fn([features], labels)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
        values.append(grads[1][0].item())
        optimizer.step()
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0], values


TripletDistanceMetric = st_losses.TripletDistanceMetric
TRIPLET_METRICS = {
    "euclidean": TripletDistanceMetric.EUCLIDEAN,
    "manhattan": TripletDistanceMetric.MANHATTAN,
    "cosine": TripletDistanceMetric.COSINE,
}


def triplet_value_and_grad(loss, columns):
    leaves = [x.detach().requires_grad_() for x in columns]
    value = loss.compute_loss_from_embeddings(leaves, None)
    return value.detach(), torch.autograd.grad(value, leaves)


def triplet_columns(seed, shape=(12, 8), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("margin", [5, 0.3])
@pytest.mark.parametrize("metric", TRIPLET_METRICS)
def test_triplet_loss_matches_sentence_transformers(metric, margin):
    """Values and gradients of the three metrics, fused (the op is called, with relu's hinge), on random rows and on
    rows with a zero embedding, a duplicate (anchor == positive: distance 0) and an exactly-zero hinge."""
    columns = triplet_columns(seed_of(metric, margin))
    columns[0][0] = 0
    columns[1][1] = columns[0][1]
    kwargs = {"distance_metric": TRIPLET_METRICS[metric], "triplet_margin": margin}
    mine, theirs = ours.TripletLoss(None, **kwargs), st_losses.TripletLoss(None, **kwargs)
    spy = mock.patch.object(tl_ops, "fused_triplet_margin_loss", wraps=tl_ops.fused_triplet_margin_loss)
    with spy as op:
        got = triplet_value_and_grad(mine, columns)
    assert op.call_count == 1 and op.call_args.kwargs["grad_at_zero_hinge"] is False
    torch.testing.assert_close(got, triplet_value_and_grad(theirs, columns), rtol=1e-10, atol=1e-12)
    # An exactly-zero hinge (d(a, p) - d(a, n) + margin == 0 on every row): relu's gradient there is 0.
    a = torch.zeros(4, 3, dtype=torch.float64)
    pos, neg = a.clone(), a.clone()
    pos[:, 0], neg[:, 0] = 1.0, 1.0 + margin
    if metric != "cosine":
        torch.testing.assert_close(
            triplet_value_and_grad(mine, [a + 1, pos + 1, neg + 1]),
            triplet_value_and_grad(theirs, [a + 1, pos + 1, neg + 1]),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("metric", TRIPLET_METRICS)
def test_triplet_loss_dtypes(metric, dtype):
    """float32 as sentence-transformers; 16-bit embeddings, which its metrics upcast to float32: a float32 loss and
    gradients in the embeddings' dtype, judged against a float64 reference (the fused op reads 16-bit and
    accumulates in float32 too)."""
    columns = triplet_columns(seed_of(metric, str(dtype)), (20, 16), dtype)
    kwargs = {"distance_metric": TRIPLET_METRICS[metric], "triplet_margin": 1.0}
    mine, theirs = ours.TripletLoss(None, **kwargs), st_losses.TripletLoss(None, **kwargs)
    got, want = triplet_value_and_grad(mine, columns), triplet_value_and_grad(theirs, columns)
    assert got[0].dtype == want[0].dtype and all(g.dtype == dtype for g in got[1])
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    ref = triplet_value_and_grad(theirs, [x.double() for x in columns])
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-6)  # float32 accumulation of exact values
    for g, w in zip(got[1], ref[1]):
        torch.testing.assert_close(g.double(), w, rtol=1e-2, atol=1e-2 * w.abs().max().item())


def test_triplet_loss_other_metrics_and_inputs_are_its_own():
    """Any other distance_metric, and inputs the fused op does not take (sparse, integer), run sentence-transformers'
    code itself: its result bit for bit, or its error."""
    columns = triplet_columns(7)
    cases = [
        (lambda x, y: (x - y).pow(2).sum(-1), columns),
        (TRIPLET_METRICS["euclidean"], [x.to_sparse() for x in columns]),  # its code raises (add(sparse, dense))
        (TRIPLET_METRICS["manhattan"], [(x * 10).long() for x in columns]),
        (TRIPLET_METRICS["cosine"], columns[:2] + [columns[2].to_sparse()]),
    ]
    for metric, cols in cases:
        mine, theirs = (cls(None, distance_metric=metric) for cls in (ours.TripletLoss, st_losses.TripletLoss))
        with mock.patch.object(tl_ops, "fused_triplet_margin_loss", side_effect=AssertionError("fused")):
            try:
                want = theirs.compute_loss_from_embeddings(cols, None)
            except RuntimeError:
                assert_same_error(
                    lambda: mine.compute_loss_from_embeddings(cols, None),  # noqa: B023
                    lambda: theirs.compute_loss_from_embeddings(cols, None),  # noqa: B023
                )
                continue
            torch.testing.assert_close(mine.compute_loss_from_embeddings(cols, None), want, rtol=0, atol=0)


def test_triplet_loss_config_is_theirs():
    for metric in (*TRIPLET_METRICS.values(), torch.dist):
        mine = ours.TripletLoss(None, distance_metric=metric, triplet_margin=2)
        theirs = st_losses.TripletLoss(None, distance_metric=metric, triplet_margin=2)
        assert mine.get_config_dict() == theirs.get_config_dict()
        assert mine.citation == theirs.citation
    assert isinstance(mine, st_losses.TripletLoss)
    assert ours.TripletLoss(None).distance_metric is TripletDistanceMetric.EUCLIDEAN


@pytest.mark.parametrize("metric", TRIPLET_METRICS)
def test_tiny_model_trains_with_triplet_loss(metric, tmp_path, monkeypatch):
    """A few optimizer steps on (anchor, positive, negative) columns: sentence-transformers' loss and parameter
    gradients on the same model state at each step, and a loss that goes down."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, words = tiny_sentence_transformer(tmp_path)
    g = torch.Generator().manual_seed(4)

    def column():
        return [" ".join(words[int(i)] for i in torch.randint(0, len(words), (4,), generator=g)) for _ in range(8)]

    mine = ours.TripletLoss(model, distance_metric=TRIPLET_METRICS[metric], triplet_margin=1)
    theirs = st_losses.TripletLoss(model, distance_metric=TRIPLET_METRICS[metric], triplet_margin=1)
    model.eval()
    preprocess = model.preprocess if hasattr(model, "preprocess") else model.tokenize
    features = [preprocess(column()) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    values = []
    for _ in range(4):
        results = []
        for loss_fn in (theirs, mine):
            model.zero_grad()
            loss = loss_fn(features, None)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-6)
        values.append(results[1][0].item())
        optimizer.step()
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0], values
