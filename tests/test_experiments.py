"""benchmarks/experiments.py: a section trains its points through the sweep runner, groups the
seeds, names noise, and reruns without training again."""

import argparse
import dataclasses
import json

import pytest

from benchmarks.experiments import (
    BY_NAME,
    Arm,
    Experiment,
    compare_rows,
    compare_to_preset,
    group_seeds,
    in_grid_order,
    run_sweep_section,
    spread,
    trained_on,
)
from benchmarks.helpers import machines_line

pytestmark = pytest.mark.integration

TINY = ("data.synthetic_size=64", "optim.batch_size=32", "optim.epochs=1",
        "trainer.checkpoint_every_steps=100")


def _args(tmp_path, seeds=(0, 1)):
    return argparse.Namespace(runs_dir=str(tmp_path / "runs"), results=str(tmp_path / "results"),
                              seeds=list(seeds), threads=1, workers=1, dataset=None,
                              data_root=None)


def test_a_section_groups_seeds_measures_entropies_and_skips_done_points(tmp_path):
    section = Experiment("masking", "BAM", "q", (Arm("bam", "bam_synthetic", (
        "method.positive_masking_prob=1,0",)),), linear=True,
        measures=("bam_entropies", "attention", "dense"), budget=TINY)
    table = run_sweep_section(section, _args(tmp_path))
    saved = json.loads((tmp_path / "results" / "masking.json").read_text())
    assert len(saved["points"]) == 4 and len(saved["rows"]) == 2
    on, off = sorted(saved["rows"], key=lambda r: r["point"]["method.positive_masking_prob"],
                     reverse=True)
    assert on["is_preset"] and not off["is_preset"]  # the preset masks always
    assert on["seeds"] == [0, 1] and len(on["knn_top1_each"]) == 2
    assert on["knn_top1"] == pytest.approx(sum(on["knn_top1_each"]) / 2)
    assert off["knn_difference"] == pytest.approx(off["knn_top1"] - on["knn_top1"])
    assert off["verdict"] == ("noise" if abs(off["knn_difference"]) <= spread(saved["rows"])
                              else "beyond the spread")
    entropies = off["bam_entropies"]
    assert entropies["source_entropy"] > 0 and entropies["target_entropy"] > 0
    from attnssl.eval.evaluate import load_trained_backbone

    blocks = len(load_trained_backbone(saved["points"][0]["run_dir"]).backbone.blocks)
    assert len(off["attention"]["attention_entropy"]) == blocks  # one per block, first to last
    assert len(off["attention"]["attention_rank"]) == blocks
    assert 0 <= off["dense"]["shape_patches"] <= 100 and "dense probe" in table
    assert "| 1 (preset) |" in table and "Seeds 0, 1" in table
    assert (tmp_path / "results" / "masking.png").stat().st_size > 5_000
    run_dirs = sorted(p["run_dir"] for p in saved["points"])
    assert len(set(run_dirs)) == 4
    stamps = {d: (tmp_path / d / "sweep-trained.json").stat().st_mtime_ns for d in run_dirs}
    run_sweep_section(section, _args(tmp_path))  # done points are not trained again
    assert stamps == {d: (tmp_path / d / "sweep-trained.json").stat().st_mtime_ns
                      for d in run_dirs}


def test_spread_is_the_largest_seed_gap_and_noise_is_inside_it():
    rows = [{"arm": "bam", "point": {"run.seed": str(s), "method.sinkhorn_iters": it},
             "knn_top1": k, "knn_floor": 50.0, "images_per_second": 1.0}
            for it, scores in (("3", (70.0, 71.0)), ("0", (68.0, 68.5)), ("10", (73.0, 72.0)))
            for s, k in enumerate(scores)]
    grouped = group_seeds(rows)
    assert [g["knn_top1"] for g in grouped] == [70.5, 68.25, 72.5]
    assert spread(grouped) == 1.0
    section = Experiment("iters", "BAM", "q", (Arm("bam", "bam_fashion_mnist", (
        "method.sinkhorn_iters=0,3,10",)),))
    compare_to_preset(grouped, section)
    by_iters = {g["point"]["method.sinkhorn_iters"]: g for g in grouped}
    assert by_iters["3"]["is_preset"]  # the preset's 3 iterations
    assert by_iters["0"]["verdict"] == "beyond the spread"  # -2.25 against a spread of 1
    assert by_iters["10"]["verdict"] == "beyond the spread"
    rows[0]["knn_top1"] = 72.5  # iters=3 now 72.5 / 71.0: spread 1.5, iters=10 +0.75 inside
    grouped = group_seeds(rows)
    compare_to_preset(grouped, section)
    assert {g["point"]["method.sinkhorn_iters"]: g.get("verdict") for g in grouped}["10"] == "noise"


def test_rows_follow_the_order_the_section_lists_its_settings():
    """Points finish in any order (a resumed sweep ends with the one it resumed); the table
    lists arm by arm, then by each key in the order the settings name them, each key's values
    in the order written (not sorted), a value written otherwise (0.20) included."""
    finished = [("a", "0.05", "0.025"), ("b", "0.1", "0.05"), ("a", "0.20", "0.025"),
                ("b", "0.05", "0.05"), ("a", "0.05", "0.05"), ("a", "0.2", "0.05")]
    rows = [{"arm": arm, "point": {"method.sinkhorn_eps": e, "run.seed": "0",
                                   "method.temperature": t},
             "knn_top1": 70.0, "knn_floor": 50.0, "images_per_second": 1.0}
            for arm, t, e in finished]
    section = Experiment("gap", "BAM", "q", tuple(
        Arm(label, "bam_fashion_mnist", ("method.temperature=0.2,0.05,0.1",
                                          "method.sinkhorn_eps=0.05,0.025"))
        for label in ("b", "a")))
    ordered = in_grid_order(group_seeds(rows), section)
    assert [(g["arm"], g["point"]["method.temperature"], g["point"]["method.sinkhorn_eps"])
            for g in ordered] == [("b", "0.05", "0.05"), ("b", "0.1", "0.05"),
                                  ("a", "0.2", "0.05"), ("a", "0.20", "0.025"),
                                  ("a", "0.05", "0.05"), ("a", "0.05", "0.025")]


def test_one_seed_is_judged_by_the_test_sets_standard_error():
    from benchmarks.experiments import _standard_error_note, two_standard_errors

    # 2 * 100 * sqrt(2 * 0.8 * 0.2 / 5000) = 1.6 points at 80 %
    assert two_standard_errors(80.0, 5000) == pytest.approx(1.6)
    rows = [{"arm": "bam", "point": {"run.seed": "0", "method.sinkhorn_iters": it},
             "knn_top1": k, "knn_floor": 50.0, "images_per_second": 1.0}
            for it, k in (("3", 80.0), ("0", 78.0), ("10", 81.0))]
    grouped = group_seeds(rows)
    assert spread(grouped) == 0.0
    section = Experiment("iters", "BAM", "q", (Arm("bam", "bam_fashion_mnist", (
        "method.sinkhorn_iters=0,3,10",)),))
    compare_to_preset(grouped, section)
    verdicts = {g["point"]["method.sinkhorn_iters"]: g.get("verdict") for g in grouped}
    assert verdicts == {"3": None, "0": "beyond two standard errors", "10": "noise"}
    # the table's note gives the yardstick the verdicts used: at the preset row's 80 %, not
    # at the first row's
    grouped.sort(key=lambda g: g["knn_top1"], reverse=True)
    note = _standard_error_note(grouped, arms=False)
    assert note == "1.60 points" and note != f"{two_standard_errors(81.0):.2f} points"


def test_a_section_over_datasets_judges_each_arm_against_the_first_on_the_same_data():
    """Section 12 sweeps the data (the imbalance), so no row is the preset's: each SimCLR row
    is judged against MAE's row at the same imbalance, never against another imbalance."""
    from benchmarks.experiments import _standard_error_note, markdown, two_standard_errors

    scores = {("mae", "1"): (31.0, 32.0), ("mae", "4"): (17.0, 18.0),
              ("simclr", "1"): (30.0, 31.0), ("simclr", "4"): (13.0, 14.0)}
    rows = [{"arm": arm, "point": {"run.seed": str(seed), "data.synthetic_imbalance": level},
             "knn_top1": k[seed], "knn_floor": 20.0, "images_per_second": 1.0}
            for (arm, level), k in scores.items() for seed in (0, 1)]
    section = BY_NAME["imbalance-vits"]
    assert section.compare == "arms"
    grouped = group_seeds(rows)
    compare_rows(grouped, section)
    by = {(g["arm"], g["point"]["data.synthetic_imbalance"]): g for g in grouped}
    assert not any(g["is_preset"] for g in grouped)  # 4 is the dataset's default, not a preset
    assert "verdict" not in by["mae", "1"] and "verdict" not in by["mae", "4"]
    assert by["simclr", "1"]["knn_difference"] == pytest.approx(-1.0)  # 30.5 - 31.5
    assert by["simclr", "1"]["verdict"] == "noise"  # inside the spread of 1
    assert by["simclr", "4"]["knn_difference"] == pytest.approx(-4.0)  # 13.5 - 17.5
    assert by["simclr", "4"]["verdict"] == "beyond the spread"
    machine = {"cpu": "cpu", "threads": 1, "torch": "2"}
    table = markdown(dataclasses.replace(section, measures=()), grouped, [(machine, 8)], "cmd")
    assert "| vs mae |" in table and "(preset)" not in table
    # one seed: judged by two standard errors at each MAE row, named by its setting
    one_seed = group_seeds([r for r in rows if r["point"]["run.seed"] == "0"])
    compare_rows(one_seed, section)
    note = _standard_error_note(one_seed, arms=True)
    assert note == (f"{two_standard_errors(31.0):.2f} points at synthetic_imbalance 1, "
                    f"{two_standard_errors(17.0):.2f} points at synthetic_imbalance 4")
    with pytest.raises(ValueError, match="compare='arm'; accepted: 'preset'"):
        dataclasses.replace(section, compare="arm")


def test_every_section_names_valid_settings():
    from attnssl.sweep import SweepSpec

    for experiment in BY_NAME.values():
        for arm in experiment.arms:  # validates every grid point's config, trains nothing
            SweepSpec.from_arguments(arm.preset, [*experiment.budget, "run.seed=0,1",
                                                  *arm.settings])


def test_every_section_has_a_cost_and_a_run_all_job():
    from benchmarks.experiments import MINUTES
    from benchmarks.run_all import JOBS

    assert set(MINUTES) == set(BY_NAME)
    jobs = {j.name: j for j in JOBS}
    for name in BY_NAME:
        assert jobs[f"experiment-{name}"].argv == ("experiments.py", name)


def test_a_fixed_list_value_is_not_a_swept_key():
    section = Experiment("views", "BAM", "q", (Arm("bam", "bam_fashion_mnist", (
        "views.global_scale=[0.2,1.0]", "views.blur_prob=[0.0,0.0],[1.0,0.1]")),))
    assert section.swept_keys() == ["views.blur_prob"]


def test_one_argument_moves_a_section_to_another_dataset(tmp_path):
    from attnssl.sweep import SweepSpec
    from benchmarks.experiments import arm_settings

    experiment = BY_NAME["bam-sinkhorn-iters"]
    args = _args(tmp_path)
    args.dataset = "synthetic"
    settings = arm_settings(experiment, experiment.arms[0], args)
    assert "data.dataset=synthetic" in settings and "run.seed=0,1" in settings
    spec = SweepSpec.from_arguments(experiment.arms[0].preset, settings)
    assert {spec.config(p).data.dataset for p in spec.grid()} == {"synthetic"}
    assert len(spec.grid()) == 8  # 4 iteration counts, 2 seeds


def test_a_section_moves_to_the_full_budget_apart_from_its_screen(tmp_path):
    from pathlib import Path

    from attnssl.config import load_config
    from benchmarks.experiments import (
        arm_folder,
        arm_settings,
        on_full_budget,
        section_command,
    )

    screen = BY_NAME["udi-shared-head"]
    full = on_full_budget(screen)
    args = _args(tmp_path, seeds=(0,))
    settings = arm_settings(full, full.arms[0], args)
    assert not [s for s in settings if s.startswith(("data.subset=", "optim.epochs="))]
    config = load_config(full.arms[0].preset, [s.replace(",separate", "") for s in settings])
    assert config.data.subset is None and config.optim.epochs == 5  # the B1 v2 budget
    assert arm_folder(full, full.arms[0], Path("runs")) == Path("runs/udi-shared-head-full")
    assert arm_folder(screen, screen.arms[0], Path("runs")) == Path("runs/udi-shared-head")
    assert section_command(full, args) == (
        "python -m benchmarks.experiments udi-shared-head --full-budget --docs")
    assert "the full B1 v2 budget" in full.budget_text()
    with pytest.raises(SystemExit, match="theory-depth trains no preset"):
        on_full_budget(BY_NAME["theory-depth"])
    # a section that makes its own images makes the full budget's number, not its screen's
    for budget in (BY_NAME["imbalance-vits"], on_full_budget(BY_NAME["imbalance-vits"])):
        settings = [s.replace("=1,4,16", "=4") for s in arm_settings(budget, budget.arms[0],
                                                                      args)]
        config = load_config(budget.arms[0].preset, settings)
        assert config.data.synthetic_size == (60_000 if budget.full else 12_288)
        assert config.optim.epochs == 5 and config.data.subset == (None if budget.full else 12_288)



def test_every_section_has_one_block_in_the_docs_under_its_budget():
    """``--docs`` writes a section's table into the block named by its slug, which carries
    ``-full`` on the full budget: UDI's blend and windows (its preset learns only there)."""
    from benchmarks.experiments import ROOT, section_command

    text = (ROOT / "docs" / "experiments.md").read_text()
    for experiment in BY_NAME.values():
        assert text.count(f"<!-- EXPERIMENT-{experiment.slug}:START -->") == 1, experiment.slug
    for name in ("udi-alpha", "udi-sampling-windows"):
        assert BY_NAME[name].full and BY_NAME[name].slug == f"{name}-full"
        assert "--full-budget" in section_command(BY_NAME[name], argparse.Namespace(dataset=None, seeds=[0]))


def test_each_arm_gets_its_range_over_the_settings_named_noise_inside_the_spread():
    """Section 6 asks which method depends more on the views: each arm's best row less its
    worst, beside the spread."""
    from benchmarks.experiments import arm_ranges, markdown

    scores = {("bam", "0.0"): (70.0, 70.5), ("bam", "0.8"): (70.4, 70.9),
              ("simclr", "0.0"): (60.0, 60.2), ("simclr", "0.8"): (65.0, 65.4)}
    rows = [{"arm": arm, "point": {"run.seed": str(seed), "views.color_jitter_prob": jitter},
             "knn_top1": k[seed], "knn_floor": 50.0, "images_per_second": 1.0}
            for (arm, jitter), k in scores.items() for seed in (0, 1)]
    grouped = group_seeds(rows)
    assert arm_ranges(grouped) == pytest.approx({"bam": 0.4, "simclr": 5.1})
    section = Experiment("views", "BAM", "q", tuple(
        Arm(label, preset, ("views.color_jitter_prob=0.0,0.8",))
        for label, preset in (("bam", "bam_fashion_mnist"), ("simclr", "simclr_fashion_mnist"))))
    compare_rows(grouped, section)
    machine = {"cpu": "cpu", "threads": 1, "torch": "2"}
    table = markdown(section, grouped, [(machine, 8)], "cmd")  # spread 0.5: bam's 0.40 is noise
    assert "bam 0.40 (noise), simclr 5.10 points." in table
    # a confirmation of one setting per arm has no range to give
    one_each = [g for g in grouped if g["point"]["views.color_jitter_prob"] == "0.8"]
    assert arm_ranges(one_each) == {}
    assert "Each arm's range" not in markdown(section, one_each, [(machine, 4)], "cmd")


def test_dataset_is_refused_by_a_section_that_makes_its_own_data():
    """--dataset would be overridden by section 12's data.dataset=imbalance, and the theory
    sections train no dataset: both refuse it by name instead of ignoring it."""
    from benchmarks.experiments import check_dataset_applies

    for name in ("imbalance-vits", "imbalance-vits-linear", "theory-depth"):
        with pytest.raises(SystemExit, match=f"{name} trains on its own data .*apply to: "
                                             f"bam-positive-masking"):
            check_dataset_applies(BY_NAME[name])
    check_dataset_applies(BY_NAME["bam-sinkhorn-iters"])  # trains on the chosen dataset


def test_only_trains_a_subset_of_the_grid_as_the_whole_section_would(tmp_path):
    """``--only`` keeps some of a swept key's values (one value fixes the key, which keeps its
    column) and ``--arms`` some arms: the points are the whole section's own training runs,
    the preset's row is still judged, and the table says it is a subset."""
    from pathlib import Path

    from attnssl.sweep import SweepSpec, training_key
    from benchmarks.experiments import arm_settings, narrowed, section_command

    whole = Experiment("masking", "BAM", "q", (Arm("bam", "bam_synthetic", (
        "method.positive_masking_prob=1,0.5,0", "method.sinkhorn_iters=1,3")),), budget=TINY)
    subset = narrowed(whole, ["method.sinkhorn_iters=3", "method.positive_masking_prob=0,1.0"],
                      [])
    assert subset.only == ("method.positive_masking_prob=1,0", "method.sinkhorn_iters=3")
    assert subset.slug == "masking-only-positive_masking_prob-1-0-sinkhorn_iters-3"
    args = _args(tmp_path, seeds=(0,))
    assert section_command(subset, args) == (
        "python -m benchmarks.experiments masking --only method.positive_masking_prob=1,0 "
        "--only method.sinkhorn_iters=3 --seeds 0 --docs")

    def keys(experiment):
        spec = SweepSpec.from_arguments("bam_synthetic", arm_settings(
            experiment, experiment.arms[0], args))
        return {training_key(spec.config(p)) for p in spec.grid()}

    assert len(keys(subset)) == 2 and keys(subset) < keys(whole)

    table = run_sweep_section(subset, args)
    saved = json.loads((tmp_path / "results" / f"{subset.slug}.json").read_text())
    assert [r["point"] for r in saved["rows"]] == [
        {"method.positive_masking_prob": "1", "method.sinkhorn_iters": "3"},
        {"method.positive_masking_prob": "0", "method.sinkhorn_iters": "3"}]
    preset, off = saved["rows"]
    assert preset["is_preset"] and off["verdict"] in ("noise", "beyond two standard errors")
    assert {Path(p["run_dir"]).name for p in saved["points"]} == keys(subset)
    assert "| 1 (preset) | 3 (preset) |" in table and "| 0 | 3 |" in table
    assert "A subset of the section (`method.positive_masking_prob=1,0`" in table

    with pytest.raises(SystemExit, match="0.25 is not among the values masking sweeps for "
                                         r"method.positive_masking_prob \(1, 0.5, 0\)"):
        narrowed(whole, ["method.positive_masking_prob=0.25"], [])
    with pytest.raises(SystemExit, match=r"masking sweeps \(method.positive_masking_prob, "
                                         r"method.sinkhorn_iters\); e.g. --only "):
        narrowed(whole, ["method.sinkhorn_eps=0.1"], [])
    with pytest.raises(SystemExit, match="--only names method.sinkhorn_iters twice"):
        narrowed(whole, ["method.sinkhorn_iters=1", "method.sinkhorn_iters=3"], [])
    with pytest.raises(SystemExit, match="--arms simclr: not an arm of masking; its arms: bam"):
        narrowed(whole, [], ["simclr"])
    with pytest.raises(SystemExit, match="has an empty value"):
        narrowed(whole, ["method.sinkhorn_iters=1,"], [])
    # the row the others are judged against stays: the preset's value, or the first arm
    with pytest.raises(SystemExit, match=r"leaves out the preset's value \(1.0\), the row the "
                                         r"others are judged against; keep it: --only "
                                         r"method.positive_masking_prob=1,0.5,0"):
        narrowed(whole, ["method.positive_masking_prob=0.5,0"], [])
    with pytest.raises(SystemExit, match="keep pooled, the arm the other arms of "
                                         "cbsa-representatives are judged against"):
        narrowed(BY_NAME["cbsa-representatives"], [], ["learned-std1"])
    gap = narrowed(BY_NAME["bam-entropy-gap"], ["method.sinkhorn_eps=0.05,0.1"], [])
    assert gap.only == ("method.sinkhorn_eps=0.05,0.1",)  # its grid has no preset row to keep
    # filters that keep everything change nothing, and so do not rename the section
    assert narrowed(whole, ["method.sinkhorn_iters=3,1"], []).slug == "masking"
    views = narrowed(BY_NAME["bam-vs-simclr-views"], ["views.blur_prob=[0.0,0.0]"], ["simclr"])
    assert narrowed(BY_NAME["bam-vs-simclr-views"], [], ["bam", "simclr"]).slug == \
        "bam-vs-simclr-views"
    assert [arm.label for arm in views.arms] == ["simclr"] and views.several_arms
    assert views.slug == "bam-vs-simclr-views-only-blur_prob-0.0-0.0-simclr"
    assert section_command(views, _args(tmp_path)) == (
        "python -m benchmarks.experiments bam-vs-simclr-views --only "
        "'views.blur_prob=[0.0,0.0]' --arms simclr --docs")


def test_docs_without_the_sections_block_is_refused_before_training(tmp_path):
    """``--docs`` writes the table into ``EXPERIMENT-SLUG``; a subset's block is the user's
    to add, so a missing one is said before any point trains, not after hours of training."""
    import subprocess
    import sys

    from benchmarks.experiments import ROOT

    runs = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.experiments", "bam-sinkhorn-iters", "--only",
         "method.sinkhorn_iters=3,10", "--docs", "--runs-dir", str(runs),
         "--results", str(tmp_path / "results")], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert done.returncode != 0
    assert ("<!-- EXPERIMENT-bam-sinkhorn-iters-only-sinkhorn_iters-3-10:START -->"
            in done.stderr and "found in no document" in done.stderr)
    assert not runs.exists() and not (tmp_path / "results").exists()


def test_a_point_moved_from_another_section_gives_only_this_sections_measures(tmp_path):
    """Sections share a point by moving its folder; its cache of measures keeps the first
    section's, which the second section's table has no columns for."""
    from benchmarks.experiments import point_measures

    cached = {"bam_entropies": {"source_entropy": 3.5, "target_entropy": 1.5},
              "attention": {"attention_entropy": [3.4]}}
    (tmp_path / "experiment-measures.json").write_text(json.dumps(cached))
    assert point_measures(tmp_path, ()) == {}
    assert point_measures(tmp_path, ("bam_entropies",)) == {
        "bam_entropies": cached["bam_entropies"]}
    assert json.loads((tmp_path / "experiment-measures.json").read_text()) == cached


def test_the_machine_line_names_every_machine_the_runs_trained_on(tmp_path):
    """Points moved in from another run may have trained at another thread count or on another
    CPU: the table names each with its number of runs, not the first point's alone. Rows that
    differ only in their read-out share one run and count once."""
    one = {"cpu": "Xeon", "cpu_bf16": "native", "threads": 1, "torch": "2.14"}
    two = {**one, "threads": 2}
    rows = []
    for name, machine, read_outs in (("a", one, 3), ("b", two, 1), ("c", one, 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"machine": machine}))
        rows += [{"run_dir": str(tmp_path / name)}] * read_outs
    counted = trained_on(rows)
    assert counted == [(one, 2), (two, 1)]
    assert machines_line(counted, "cmd") == (
        "Machines (the runs did not all train on one): Xeon (bf16 native), 1 threads, torch "
        "2.14: 2 runs; Xeon (bf16 native), 2 threads, torch 2.14: 1 run. Command: `cmd`")
    assert machines_line(trained_on(rows[:3]), "cmd") == (
        "Machine: Xeon (bf16 native), 1 threads, torch 2.14. Command: `cmd`")


def test_workers_train_a_sections_arms_side_by_side_as_in_turn(tmp_path, capfd):
    """A confirmation of one point per arm: ``--workers 2`` trains both arms' points in
    worker processes, each in its arm's folder, and the rows equal the rows in turn."""
    import os

    section = Experiment("methods", "BAM", "q", (
        Arm("simclr", "simclr_synthetic", ("optim.lr=2e-3",)),
        Arm("bam", "bam_synthetic", ("optim.lr=2e-3",))), compare="arms", budget=TINY)
    pooled = _args(tmp_path / "pooled", seeds=(0,))
    pooled.workers = 2
    run_sweep_section(section, pooled)
    workers = {line.split()[2] for line in capfd.readouterr().out.splitlines()
               if line.startswith("sweep: worker ")}
    assert workers and str(os.getpid()) not in workers
    run_sweep_section(section, _args(tmp_path / "in-turn", seeds=(0,)))
    rows = [json.loads((tmp_path / way / "results" / "methods.json").read_text())["rows"]
            for way in ("pooled", "in-turn")]
    assert [(r["arm"], r["knn_top1"], r["knn_floor"]) for r in rows[0]] == [
        (r["arm"], r["knn_top1"], r["knn_floor"]) for r in rows[1]]
    assert [r["arm"] for r in rows[0]] == ["simclr", "bam"]
    for arm in ("simclr", "bam"):
        assert len(list((tmp_path / "pooled" / "runs" / "methods" / arm / "points").iterdir())) == 1
