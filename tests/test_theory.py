"""The theory experiment's data model, model and a short run of ``attnssl theory``."""

import json

import torch

from attnssl.cli import main
from attnssl.theory import (
    Curve,
    DataModel,
    attention,
    first_step,
    phase_table,
    positions,
    sample_images,
    stack_attention,
)


def test_data_model_has_the_stated_structure():
    data = DataModel(grid=6, clusters=3, local_areas=3, local_size=4, imbalance=3.0,
                     local_scale=1.0, seed=1)
    areas = data.areas()
    for k in range(3):  # one global area and 3 local areas of 4 patches per cluster
        counts = torch.bincount(areas[k], minlength=4).tolist()
        assert counts == [36 - 12, 4, 4, 4]
    assert not torch.equal(areas[0], areas[1])  # each cluster partitions the grid its own way
    batch = sample_images(data, 50, torch.Generator().manual_seed(0), areas)
    x, cluster, area = batch["x"], batch["cluster"], batch["area"]
    e = positions(data)
    # every patch carries exactly one feature, v_{k,j} of its image's cluster and its area ...
    assert torch.all((x != 0).sum(-1) == 1)
    index = x.abs().argmax(-1)
    assert torch.equal(index, cluster.view(-1, 1) * 4 + area)
    # ... with one magnitude per image and area, the global one scaled by the imbalance
    for b in range(5):
        for j in range(4):
            values = x[b][area[b] == j].sum(-1)
            assert torch.allclose(values, values[0].expand_as(values))
            low, high = (3.0, 6.0) if j == 0 else (1.0, 2.0)
            assert low <= values[0] <= high
    # features and positions are orthonormal to one another
    assert torch.equal(e @ e.T, torch.eye(36)) and torch.all(e[:, :12] == 0)


def test_attention_starts_uniform():
    data = DataModel()
    batch = sample_images(data, 4, torch.Generator().manual_seed(0), data.areas())
    attn = attention(torch.zeros(data.width, data.width), batch["x"], positions(data))
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / data.patches))


def test_theory_run_writes_its_table_and_figure(tmp_path, capsys):
    out = tmp_path / "theory"
    assert main(["theory", "--out", str(out), "--steps", "60", "--imbalance", "2",
                 "--local-scale", "1.0"]) == 0
    assert "| mae | 2 |" in capsys.readouterr().out
    result = json.loads((out / "theory.json").read_text())
    assert [c["objective"] for c in result["curves"]] == ["mae", "cl"]
    assert (out / "theory.png").stat().st_size > 10_000
    assert "local query: own area" in (out / "theory.md").read_text()
    mae = result["curves"][0]["metrics"]
    # from uniform attention, masked modelling moves local queries onto their own area
    assert mae[-1]["local_own_area"] > mae[0]["local_own_area"] + 0.3


def test_phase_table_reports_the_first_step_each_phase_is_reached():
    flat = {"local_own_area": 0.1, "local_on_global": 0.7, "global_own_area": 0.7, "diversity": 0.0}
    curve = Curve("mae", 2.0, [0, 10, 20], [
        flat, {**flat, "global_own_area": 0.95}, {**flat, "global_own_area": 0.97,
                                                   "local_own_area": 0.6, "diversity": 0.7}])
    assert first_step(curve, "global_own_area", 0.9) == 10
    assert first_step(curve, "local_own_area", 0.5) == 20
    assert first_step(curve, "local_on_global", 0.9) is None
    assert "| mae | 2 | 10 | 20 | 20 | 0.600 | 0.700 |" in phase_table([curve])


def test_linear_attention_follows_its_formula_and_starts_near_uniform(generator):
    data = DataModel()
    batch = sample_images(data, 2, torch.Generator().manual_seed(0), data.areas())
    x, e = batch["x"], positions(data)
    q = torch.randn(data.width, data.width, generator=generator) * 0.1
    attn = attention(q, x, e, "linear")
    h = x + e
    phi = lambda v: torch.nn.functional.elu(v) + 1  # noqa: E731
    for b in range(2):
        for p in (0, 7):
            sims = torch.stack([phi(q @ h[b, p]) @ phi(h[b, k]) for k in range(data.patches)])
            torch.testing.assert_close(attn[b, p], sims / sims.sum())
    start = attention(torch.zeros(data.width, data.width), x, e, "linear")
    assert (start - 1 / data.patches).abs().max() < 0.2 / data.patches  # keys weigh d to d + 3


def test_theory_runs_with_linear_attention(tmp_path, capsys):
    out = tmp_path / "theory"
    assert main(["theory", "--out", str(out), "--steps", "60", "--imbalance", "2",
                 "--local-scale", "1.0", "--attention", "linear"]) == 0
    result = json.loads((out / "theory.json").read_text())
    assert result["settings"]["attention"] == "linear"
    mae = result["curves"][0]["metrics"]
    assert mae[-1]["local_own_area"] > mae[0]["local_own_area"]


def test_a_stack_of_attentions_feeds_each_layer_the_last_ones_output(generator):
    data = DataModel()
    batch = sample_images(data, 2, torch.Generator().manual_seed(0), data.areas())
    x, e = batch["x"], positions(data)
    q = torch.randn(3, data.width, data.width, generator=generator) * 0.05
    maps, out = stack_attention(q, x, e)
    features = x.clone()
    for layer in range(3):  # the equations, one query patch at a time
        h = features + e
        nxt = torch.zeros_like(features)
        for b in range(2):
            for p in range(data.patches):
                weights = torch.softmax(h[b] @ (q[layer] @ h[b, p]), dim=0)
                torch.testing.assert_close(maps[layer][b, p], weights)
                nxt[b, p] = weights @ features[b]
        features = nxt
    torch.testing.assert_close(out, features)
    one_maps, one_out = stack_attention(q[0], x, e)  # a (d, d) matrix is the one-layer model
    assert len(one_maps) == 1 and torch.equal(one_out, maps[0] @ x)


def test_theory_runs_a_two_layer_stack(tmp_path):
    out = tmp_path / "theory"
    assert main(["theory", "--out", str(out), "--steps", "60", "--imbalance", "2",
                 "--local-scale", "1.0", "--layers", "2"]) == 0
    result = json.loads((out / "theory.json").read_text())
    assert result["settings"]["layers"] == 2
    mae = result["curves"][0]["metrics"]
    assert [len(m["per_layer"]) for m in (mae[0], mae[-1])] == [2, 2]
    assert mae[-1]["per_layer"][-1] == {k: mae[-1][k] for k in mae[-1] if k != "per_layer"}
    start = mae[0]["per_layer"]
    assert all(abs(layer["diversity"]) < 1e-5 for layer in start)  # uniform at Q = 0
    assert max(layer["local_own_area"] for layer in mae[-1]["per_layer"]) > \
        max(layer["local_own_area"] for layer in start)
