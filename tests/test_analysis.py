"""``attnssl analyze``: per-head statistics against loops, hand-made maps, and a real run's report."""

import base64
import html
import json
import math
import re

import pytest
import torch

from attnssl.analysis import foreground_masks, head_statistics
from attnssl.cli import main
from attnssl.data.datasets import TensorImageDataset

GRID, PATCH = (3, 3), 4


def random_maps(batch, heads, tokens, generator):
    return torch.rand(batch, heads, tokens, tokens, generator=generator,
                      dtype=torch.float64).softmax(-1)


def loop_statistics(layer, prefix):
    """The per-head means of one layer's maps, one query and one pair at a time."""
    batch, heads, tokens, _ = layer.shape
    cells = [(r * PATCH + PATCH / 2, c * PATCH + PATCH / 2)
             for r in range(GRID[0]) for c in range(GRID[1])]
    out = {k: torch.zeros(heads, dtype=torch.float64)
           for k in ("entropy", "distance", "diversity", "cls_entropy")}
    patches = tokens - prefix
    for b in range(batch):
        for h in range(heads):
            rows = []
            for i in range(prefix, tokens):
                row = layer[b, h, i, prefix:] / layer[b, h, i, prefix:].sum()
                rows.append(row)
                out["entropy"][h] += -sum(a * math.log(a) for a in row.tolist()) / patches
                out["distance"][h] += sum(
                    row[j].item() * math.dist(cells[i - prefix], cells[j])
                    for j in range(patches)) / patches
            cosines = [torch.dot(rows[i], rows[j]) / (rows[i].norm() * rows[j].norm())
                       for i in range(patches) for j in range(patches) if i != j]
            out["diversity"][h] += 1 - sum(cosines) / len(cosines)
            cls = layer[b, h, 0, prefix:] / layer[b, h, 0, prefix:].sum()
            out["cls_entropy"][h] += -sum(a * math.log(a) for a in cls.tolist())
    return {k: v / batch for k, v in out.items()}


@pytest.mark.parametrize("prefix", [1, 2])
def test_head_statistics_match_a_loop_over_queries_and_pairs(prefix):
    g = torch.Generator().manual_seed(prefix)
    maps = [random_maps(2, 3, prefix + 9, g) for _ in range(2)]
    stats = head_statistics(maps, prefix, GRID, PATCH)
    for layer, layer_maps in enumerate(maps):
        expected = loop_statistics(layer_maps, prefix)
        for name, value in expected.items():
            torch.testing.assert_close(stats[name][layer], value, rtol=1e-9, atol=1e-9)


def with_class_token(patch_maps):
    """Prepend a class token row/column attending uniformly to the patches."""
    b, h, p, _ = patch_maps.shape
    maps = torch.zeros(b, h, p + 1, p + 1, dtype=torch.float64)
    maps[..., 1:, 1:] = patch_maps
    maps[..., 0, 1:] = 1 / p
    maps[..., 1:, 0] = 0
    return maps


def test_hand_made_maps_have_the_known_answers():
    p = 9
    uniform = with_class_token(torch.full((1, 1, p, p), 1 / p, dtype=torch.float64))
    self_only = with_class_token(torch.eye(p, dtype=torch.float64).view(1, 1, p, p))
    # two blocks: patches 0-3 attend uniformly among themselves, 4-8 among themselves
    block = torch.zeros(p, p, dtype=torch.float64)
    block[:4, :4], block[4:, 4:] = 1 / 4, 1 / 5
    blocks = with_class_token(block.view(1, 1, p, p))
    stats = head_statistics([uniform, self_only, blocks], 1, GRID, PATCH)
    assert stats["entropy"][:, 0].tolist() == pytest.approx(
        [math.log(p), 0.0, (4 * math.log(4) + 5 * math.log(5)) / p])
    assert stats["diversity"][:, 0].tolist() == pytest.approx(
        [0.0, 1.0, 1 - (4 * 3 + 5 * 4) / (p * (p - 1))])  # only same-block pairs overlap
    assert stats["distance"][1, 0].item() == 0.0
    assert stats["cls_entropy"][:, 0].tolist() == pytest.approx([math.log(p)] * 3)


def test_class_attention_on_exactly_the_foreground_segments_it_perfectly():
    # foreground: the left column of patches (3 of 9) of a 12x12 image
    foreground = torch.zeros(2, 12, 12, dtype=torch.bool)
    foreground[:, :, :PATCH] = True
    maps = torch.full((2, 2, 10, 10), 0.0, dtype=torch.float64)
    maps[..., 1:] = 1 / 9
    left = torch.tensor([0, 3, 6]) + 1
    maps[:, 0, 0] = 0
    maps[:, 0, 0, left] = 1 / 3  # head 1: all its class attention on the foreground patches
    maps[:, 1, 0] = 0
    maps[:, 1, 0, 5] = 1.0  # head 2: one background patch
    stats = head_statistics([maps], 1, GRID, PATCH, foreground, mass=1.0)
    assert stats["jaccard"][0].tolist() == pytest.approx([1.0, 0.0])
    # the heads' mean holds the three foreground patches and one background patch
    assert stats["jaccard_head_mean"][0].item() == pytest.approx(3 / 4)


def test_foreground_of_fashion_mnist_is_its_non_zero_pixels():
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    images[0, 0, 2:5, 3] = 200
    images[1, 0, 0, 0] = 1
    dataset = TensorImageDataset("fashion-mnist", images, torch.tensor([0, 1]), ("a", "b"))
    masks = foreground_masks(dataset, torch.arange(2), images)
    assert masks.tolist() == (images[:, 0] > 0).tolist() and masks.sum().item() == 4
    other = TensorImageDataset("cifar10", images, torch.tensor([0, 1]), ("a", "b"))
    assert foreground_masks(other, torch.arange(2), images) is None


def test_analyze_writes_json_figures_and_a_self_contained_report(tmp_path, capsys):
    assert main(["pretrain", "-c", "dino_synthetic", f"run.out_dir={tmp_path}", "run.name=r",
                 "data.synthetic_size=128", "optim.batch_size=32", "optim.epochs=1",
                 "trainer.progress_bar=false", "trainer.num_threads=1", "eval.at_end=false"]) == 0
    run = tmp_path / "r"
    capsys.readouterr()
    assert main(["analyze", str(run), "--images", "20"]) == 0
    out = capsys.readouterr().out
    assert "| layer | entropy (nats)" in out and "Jaccard" in out
    result = json.loads((run / "analysis.json").read_text())
    depth, heads, grid = 2, 2, 4  # dino_synthetic: 2 layers, 2 heads, 32 px / patch 8
    assert result["grid"] == [grid, grid] and result["images"] == 20
    for name in ("entropy", "distance", "diversity", "cls_entropy", "jaccard"):
        values = torch.tensor(result["per_head"][name])
        assert values.shape == (depth, heads), name
        assert torch.isfinite(values).all()
    assert (torch.tensor(result["per_head"]["entropy"]) <= math.log(grid * grid) + 1e-6).all()
    assert 0 <= result["segmentation"]["last_layer_head_mean"] <= 1
    layer = result["per_layer"]
    assert len(layer["rollout_cls_entropy"]) == len(layer["rank_collapse"]) == depth
    assert all(0 <= h <= math.log(grid * grid) + 1e-6 for h in layer["rollout_cls_entropy"])
    assert all(0 < r <= 1 for r in layer["rank_collapse"])
    assert all(0 <= j <= 1 for j in layer["rollout_jaccard"])
    assert "rank_collapse" in (run / "report.html").read_text()
    collapse = result["collapse"]
    assert 1 <= collapse["effective_rank"] <= collapse["feature_dim"]
    assert 0 <= collapse["alignment"] <= 4 and collapse["uniformity"] <= 0
    # every figure analysis.json names is a file, and the report embeds exactly those bytes
    report = (run / "report.html").read_text()
    # curves, by-layer, per layer, rollout and flow, segmentation
    assert len(result["figures"]) == 1 + 1 + depth + 1 + 1
    flow = result["rollout_and_flow"]
    assert flow["images"] == 2 and 0 <= flow["last_layer_flow_cls_entropy"] <= math.log(grid**2)
    embedded = dict(re.findall(r'data-file="([^"]+)" src="data:image/png;base64,([^"]+)"', report))
    for figure in result["figures"]:
        path = run / figure
        assert path.is_file(), figure
        assert base64.b64decode(embedded[path.name]) == path.read_bytes(), figure
    assert not re.search(r'src="(?!data:)', report) and "<link" not in report
    blob = re.search(r"id='analysis'>(.*)</script>", report, re.S).group(1)
    assert json.loads(html.unescape(blob))["per_head"] == result["per_head"]


def test_analyze_names_a_missing_run(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nowhere")]) == 2
    assert "neither a checkpoint file nor a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("attention", ["cbsa", "mssa"])
def test_analysis_reads_any_attention_with_two_class_tokens(attention):
    from attnssl.analysis import analyze_backbone
    from attnssl.config import load_config
    from attnssl.data.datasets import load_synthetic
    from attnssl.nn.vit import build_vit

    cfg = load_config("dino_synthetic", [f"model.attention={attention}", "model.cbsa_pool=2",
                                         "model.class_tokens=2"])
    torch.manual_seed(0)
    vit = build_vit(cfg.model, 32, 3)
    result, attn = analyze_backbone(vit, load_synthetic("test", 64), "cls+cls_plus", images=8,
                                    embed_images=16)
    assert result["class_tokens"] == 2 and attn.cls_maps.shape == (4, 2, 2, 16)
    torch.testing.assert_close(attn.cls_maps.sum(-1), torch.ones(4, 2, 2))
    entropy = torch.tensor(result["per_head"]["entropy"])
    assert ((entropy > 0) & (entropy <= math.log(16) + 1e-9)).all()
    assert result["collapse"]["feature_dim"] == 2 * cfg.model.embed_dim
