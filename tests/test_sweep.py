"""attnssl sweep: parsing, grid expansion, checks before training, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from attnssl.cli import main
from attnssl.config import CONFIG_DIR, ConfigError, config_to_dict
from attnssl.sweep import (
    Choice,
    Range,
    SweepSpec,
    check_workers,
    describe,
    open_study,
    parse_dimension,
    plot_sweep,
    run_sweep,
    run_sweeps,
    split_values,
    sweep_differences,
    written_files,
)

TINY = ["data.synthetic_size=128", "optim.batch_size=32", "optim.epochs=1", "model.depth=1",
        "trainer.progress_bar=false", "trainer.num_threads=1"]
SCORE = dict(eval_train=96, eval_test=64)


def test_values_split_on_top_level_commas_only():
    assert split_values("0.1,0.2") == ["0.1", "0.2"]
    assert split_values("[0.2,1.0],[0.4,1.0]") == ["[0.2,1.0]", "[0.4,1.0]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    with pytest.raises(ConfigError, match="empty value"):
        split_values("0.1,,0.2")


def test_dimensions_are_lists_or_ranges():
    assert parse_dimension("views.brightness=0.2,0.4") == Choice("views.brightness",
                                                                 ("0.2", "0.4"))
    assert parse_dimension("optim.lr=1e-4..3e-3:log") == Range("optim.lr", 1e-4, 3e-3, True,
                                                               False)
    assert parse_dimension("views.local_crops=0..6") == Range("views.local_crops", 0, 6, False,
                                                              True)
    with pytest.raises(ConfigError, match="low < high"):
        parse_dimension("optim.lr=3e-3..1e-4")
    with pytest.raises(ConfigError, match="log scale needs low > 0"):
        parse_dimension("optim.weight_decay=0..0.1:log")


def test_grid_is_every_combination_and_single_values_are_fixed():
    spec = SweepSpec.from_arguments("simclr_synthetic", [
        *TINY, "views.global_scale=[0.2,1.0],[0.4,1.0]", "method.temperature=0.1,0.2,0.5"])
    assert "optim.epochs=1" in spec.fixed and len(spec.dimensions) == 2
    grid = spec.grid()
    assert len(grid) == 6
    assert {(p["views.global_scale"], p["method.temperature"]) for p in grid} == {
        (s, t) for s in ("[0.2,1.0]", "[0.4,1.0]") for t in ("0.1", "0.2", "0.5")}
    assert spec.config(grid[0]).views.global_scale == (0.2, 1.0)


def test_a_bad_key_or_value_is_named_before_any_training(tmp_path):
    with pytest.raises(ConfigError, match="views.'brightnes'.*did you mean 'brightness'"):
        SweepSpec.from_arguments("simclr_synthetic", [*TINY, "views.brightnes=0.1,0.2"])
    with pytest.raises(ConfigError,
                       match="(?s)sweep point optim.lr=-1: .*optim.lr: Input should be greater"):
        SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=1e-3,-1"])
    with pytest.raises(ConfigError, match="optim.lr=0.0"):  # a range's ends are checked
        SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=0.0..1e-3"], trials=3)
    with pytest.raises(ConfigError, match="--trials"):
        SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=1e-4..1e-3"])
    # from the command line: exit code 2, the key named, nothing written
    out = tmp_path / "sweep"
    assert main(["sweep", "-c", "simclr_synthetic", "--out", str(out), *TINY,
                 "method.temprature=0.1,0.2"]) == 2
    assert not out.exists()


def _sweep_command(out: Path) -> list[str]:
    return ["sweep", "-c", "simclr_synthetic", "--out", str(out), "--eval-train", "96",
            "--eval-test", "64", *TINY, "optim.lr=1e-3,2e-3"]


def test_a_killed_sweep_resumes_and_skips_finished_points(tmp_path):
    out = tmp_path / "sweep"
    child = subprocess.Popen([sys.executable, "-m", "attnssl", *_sweep_command(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    # kill it once the first point is trained and scored and the second has begun
    deadline = time.time() + 300
    lines = []
    for line in child.stdout:
        lines.append(line)
        if "point 2/2" in line:
            break
        assert time.time() < deadline, "".join(lines)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    first = [p for p in (out / "points").iterdir() if (p / "sweep-trained.json").is_file()]
    assert len(first) == 1, "".join(lines)
    first_mtime = (first[0] / "sweep-trained.json").stat().st_mtime

    logged = []  # continued with another thread count: a setting that cannot change results
    more_threads = [t.replace("num_threads=1", "num_threads=2") for t in TINY]
    spec = SweepSpec.from_arguments("simclr_synthetic", [*more_threads, "optim.lr=1e-3,2e-3"],
                                    **SCORE)
    results = run_sweep(spec, out, log=logged.append)
    trained = [m for m in logged if m.startswith("sweep: point")]
    assert trained == ["sweep: point 2/2: optim.lr=2e-3"], logged  # only the unfinished one
    assert (first[0] / "sweep-trained.json").stat().st_mtime == first_mtime
    assert sorted(r["point"]["optim.lr"] for r in results) == ["1e-3", "2e-3"]
    assert all(0 <= r["knn_top1"] <= 100 and 0 <= r["knn_floor"] <= 100 for r in results)

    # a third run has nothing left to do, and says so in the same files
    logged.clear()
    again = run_sweep(spec, out, log=logged.append)
    assert not [m for m in logged if m.startswith("sweep: point")]
    assert [r["knn_top1"] for r in again] == [r["knn_top1"] for r in results]
    table = (out / "results.md").read_text()
    assert "| `optim.lr` | k-NN | random init |" in table and table.count("\n| 2e-3 |") == 1
    assert json.loads((out / "results.json").read_text())["results"] == again
    assert (out / "sweep.png").stat().st_size > 0

    # an override that restates the preset's value resolves to the same sweep: continued, not
    # refused, and nothing is trained again
    logged.clear()
    restated = SweepSpec.from_arguments(
        "simclr_synthetic", [*more_threads, "method.temperature=0.2", "optim.lr=1e-3,2e-3"],
        **SCORE)
    assert [r["knn_top1"] for r in run_sweep(restated, out, log=logged.append)] == [
        r["knn_top1"] for r in results]
    assert not [m for m in logged if m.startswith("sweep: point")]
    # a fixed setting that changes the recipe is refused, and named with both values
    changed = SweepSpec.from_arguments(
        "simclr_synthetic", [*TINY, "method.temperature=0.5", "optim.lr=1e-3,2e-3"], **SCORE)
    with pytest.raises(ConfigError, match=r"method.temperature \(recorded 0.2, asked 0.5\)"):
        run_sweep(changed, out)

    # other settings in the same folder are refused by name
    other = SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=1e-3,5e-3"], **SCORE)
    with pytest.raises(ConfigError, match="holds a sweep of other settings"):
        run_sweep(other, out)
    # as the refusal says: the points moved into a new folder are reused, not trained again
    moved = tmp_path / "other"
    moved.mkdir()
    (out / "points").rename(moved / "points")
    reused = run_sweep(other, moved)
    assert (moved / "points" / first[0].name / "sweep-trained.json").stat().st_mtime == first_mtime
    assert len(list((moved / "points").iterdir())) == 3  # 1e-3 reused, 2e-3 kept, 5e-3 new
    assert [r["knn_top1"] for r in reused if r["point"]["optim.lr"] == "1e-3"] == [
        r["knn_top1"] for r in results if r["point"]["optim.lr"] == "1e-3"]


def test_sweep_identity_compares_resolved_settings():
    spec = SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=1e-3,2e-3"], **SCORE)
    recorded_config = config_to_dict(spec.reference_config())
    assert sweep_differences(None, None, spec) == []  # a new folder
    assert sweep_differences(describe(spec), recorded_config, spec) == []
    # recorded before a setting joined the schema: the setting counts at its default
    older = {k: v for k, v in recorded_config.items() if k != "model"}
    older["model"] = {k: v for k, v in recorded_config["model"].items() if k != "pos_embed"}
    assert recorded_config["model"]["pos_embed"] == "learned"
    assert sweep_differences(describe(spec), older, spec) == []
    # the swept keys' own values come from the points, not from the record
    swept_elsewhere = {**recorded_config, "optim": {**recorded_config["optim"], "lr": 0.5}}
    assert sweep_differences(describe(spec), swept_elsewhere, spec) == []
    edited = {**recorded_config, "method": {**recorded_config["method"], "temperature": 0.3}}
    assert sweep_differences(describe(spec), edited, spec) == [
        "method.temperature (recorded 0.3, asked 0.2)"]
    other_space = {**describe(spec), "swept": ["optim.lr=1e-3"]}
    assert sweep_differences(other_space, recorded_config, spec) == [
        "swept (recorded ['optim.lr=1e-3'], asked ['optim.lr=1e-3,2e-3'])"]
    # a record written before sweeps kept resolved settings is compared as written
    written = {k: v for k, v in describe(spec).items() if k != "swept"}
    assert sweep_differences(written, None, spec) == []
    assert sweep_differences({**written, "settings": ["method.temperature=0.2"]}, None, spec) == [
        "its settings as written"]


def test_a_sweep_folder_is_named_by_a_checked_point(tmp_path):
    # every point is valid but the preset alone is not (a method key of another method): the
    # folder records the first checked point, so the sweep opens
    tree = yaml.safe_load((CONFIG_DIR / "simclr_synthetic.yaml").read_text())
    tree["method"] = {"name": "mae"}
    preset = tmp_path / "mixed.yaml"
    preset.write_text(yaml.safe_dump(tree))
    spec = SweepSpec.from_arguments(str(preset), ["method.name=simclr,bam",
                                                  "method.temperature=0.2"])
    with pytest.raises(ConfigError):
        spec.config({})
    study = open_study(tmp_path, spec)
    assert study.user_attrs["config"]["method"]["name"] == "simclr"
    assert sweep_differences(study.user_attrs["spec"], study.user_attrs["config"], spec) == []
    # the same command after the preset was edited is refused, and told so
    tree["optim"]["lr"] = 5e-3
    preset.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"its preset or the settings' defaults changed since "
                                          r"it ran .*optim.lr \(recorded 0.001, asked 0.005\)"):
        open_study(tmp_path, spec)


def _sigterm_at_first_checkpoint(args: list[str], out: Path) -> tuple[str, str]:
    """Run ``attnssl ARGS`` (a sweep into ``out``), send SIGTERM once a point has written a
    checkpoint, and return its output; the sweep must exit 143."""
    child = subprocess.Popen([sys.executable, "-m", "attnssl", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not list((out / "points").glob("*/checkpoints/*.ckpt")) and time.time() < deadline:
        assert child.poll() is None, child.communicate()
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 143, stdout + stderr
    return stdout, stderr


def test_a_stop_signal_stops_the_whole_sweep_and_the_rerun_continues_its_point(tmp_path,
                                                                               capsys):
    """SIGTERM (what a scheduler sends) while the first point trains: the point keeps its
    checkpoint, the sweep exits 143 instead of going on to the next point, and the same
    command first resumes the point from its checkpoint and then trains the other."""
    out = tmp_path / "sweep"
    args = [*_sweep_command(out)]
    args[args.index("optim.epochs=1")] = "optim.epochs=4"  # 16 steps, a checkpoint every 2
    args.append("trainer.checkpoint_every_steps=2")
    stdout, stderr = _sigterm_at_first_checkpoint(args, out)
    assert "point 2/2" not in stdout and "the same command continues the sweep" in stderr
    (point,) = list((out / "points").iterdir())
    assert not (point / "sweep-trained.json").exists() and list((point / "checkpoints").iterdir())

    assert main(args) == 0
    points = [line for line in capsys.readouterr().out.splitlines() if "sweep: point" in line]
    assert points == ["sweep: point 1/2: optim.lr=1e-3", "sweep: point 2/2: optim.lr=2e-3"]
    results = json.loads((out / "results.json").read_text())["results"]
    assert sorted(r["point"]["optim.lr"] for r in results) == ["1e-3", "2e-3"]
    assert all("error" not in r for r in results)
    log = (point / "metrics.csv").read_text().splitlines()
    assert int(log[-1].split(",")[0]) == 16  # the stopped point trained to its end, resumed


def test_points_that_differ_only_in_evaluation_share_one_training_run(tmp_path):
    spec = SweepSpec.from_arguments(
        "simclr_synthetic", [*TINY, "eval.features=cls,mean", "eval.blocks=1"], **SCORE)
    results = run_sweep(spec, tmp_path / "sweep", log=lambda _: None)
    assert len(results) == 2 and len(list((tmp_path / "sweep" / "points").iterdir())) == 1
    assert results[0]["run_dir"] == results[1]["run_dir"]
    assert results[0]["knn_top1"] != results[1]["knn_top1"] or \
        results[0]["knn_floor"] != results[1]["knn_floor"]


def test_sampled_sweep_runs_the_asked_number_of_trials(tmp_path):
    spec = SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=1e-4..1e-2:log",
                                                         "method.temperature=0.1,0.5"],
                                    trials=2, **SCORE)
    results = run_sweep(spec, tmp_path / "sweep", log=lambda _: None)
    assert len(results) == 2
    for row in results:
        assert 1e-4 <= float(row["point"]["optim.lr"]) <= 1e-2
        assert row["point"]["method.temperature"] in ("0.1", "0.5")


def test_two_process_points_train_in_their_own_command_and_resume_after_a_stop(tmp_path):
    """Points with trainer.devices=2 (real gloo processes): Fabric relaunches the child's
    ``attnssl pretrain``, not the sweep; a SIGTERM to the sweep stops the point with a
    checkpoint, and the rerun continues it. Local and global Sinkhorn balancing differ."""
    from attnssl.runs.checkpoint import list_checkpoints, safe_torch_load

    out = tmp_path / "sweep"
    args = ["sweep", "-c", "bam_synthetic", "--out", str(out), "--eval-train", "96",
            "--eval-test", "64", *TINY, "optim.epochs=4", "trainer.checkpoint_every_steps=2",
            "trainer.accelerator=cpu", "trainer.devices=2", "method.normalization=global,local"]
    args.remove("optim.epochs=1")
    _sigterm_at_first_checkpoint(args, out)
    (stopped,) = [p for p in (out / "points").iterdir() if p.is_dir()]
    assert not (stopped / "sweep-trained.json").exists()

    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert sorted(r["point"]["method.normalization"] for r in results) == ["global", "local"]
    assert all("error" not in r and r["steps"] == 16 for r in results)
    log = (stopped / "metrics.csv").read_text().splitlines()
    assert int(log[-1].split(",")[0]) == 16  # the stopped point trained to its end, resumed
    weights = {r["point"]["method.normalization"]:
               safe_torch_load(list_checkpoints(Path(r["run_dir"]))[-1])["method"]
               for r in results}
    assert any(not torch.equal(weights["global"][k], weights["local"][k])
               for k in weights["global"])


def test_a_point_trained_under_an_older_key_is_found_by_its_settings(tmp_path):
    """A setting added to the schema (at its default) changes the training key; the folder of
    a point trained before is found by its saved config and not trained again."""
    import shutil

    spec = SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=1e-3"], **SCORE)
    first = run_sweep(spec, tmp_path / "before", log=lambda _: None)[0]
    trained = Path(first["run_dir"])
    older = tmp_path / "after" / "points" / "0123456789ab"  # the key an older version gave it
    shutil.copytree(trained, older)
    stamp = (older / "sweep-trained.json").stat().st_mtime_ns
    again = run_sweep(spec, tmp_path / "after", log=lambda _: None)[0]
    assert Path(again["run_dir"]) == older and again["knn_top1"] == first["knn_top1"]
    assert [p.name for p in (tmp_path / "after" / "points").iterdir()] == [older.name]
    assert (older / "sweep-trained.json").stat().st_mtime_ns == stamp


def test_a_sweep_names_only_the_files_it_writes(tmp_path):
    """A sweep of fixed settings alone (one point, nothing swept) has no plot to draw, and does
    not claim one."""
    fixed = SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=1e-3"], **SCORE)
    swept = SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=1e-3,2e-3"], **SCORE)
    scored = [{"point": {"optim.lr": "1e-3"}, "knn_top1": 50.0, "knn_floor": 40.0}]
    assert written_files(fixed, scored) == ["results.json", "results.md"]
    assert plot_sweep(fixed, scored, tmp_path / "sweep.png") is None
    assert not (tmp_path / "sweep.png").exists()
    assert written_files(swept, scored) == ["results.json", "results.md", "sweep.png"]
    assert written_files(swept, [{"point": {"optim.lr": "1e-3"}, "error": "x"}])[-1] != "sweep.png"


def test_workers_are_a_whole_number_and_only_for_grids():
    grid = SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=1e-3,2e-3"], **SCORE)
    with pytest.raises(ConfigError, match=r"--workers 0: give a whole number of processes"):
        check_workers(grid, 0)
    sampled = SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=1e-4..1e-2"],
                                       trials=2, **SCORE)
    with pytest.raises(ConfigError, match=r"--workers 2 trains a grid's points side by side"):
        check_workers(sampled, 2)
    check_workers(grid, 2)
    check_workers(sampled, 1)


@pytest.mark.integration
@pytest.mark.slow
def test_grid_points_train_side_by_side_and_score_as_in_one_process(tmp_path, capfd):
    """Two worker processes: each training run is trained once, by one worker (the two points
    that differ only in their read-out go to the same one), and every score equals the score
    the same sweep gets in one process. (That the workers train at the same time is shown by
    the stop tests below, which stop both in training.)"""
    spec = SweepSpec.from_arguments(
        "simclr_synthetic", [*TINY, "optim.lr=1e-3,2e-3", "eval.features=cls,mean",
                             "eval.blocks=1"], **SCORE)
    side_by_side = run_sweep(spec, tmp_path / "two", log=lambda _: None, workers=2)
    workers = {line.split()[2] for line in capfd.readouterr().out.splitlines()
               if line.startswith("sweep: worker ")}
    in_turn = run_sweep(spec, tmp_path / "one", log=lambda _: None)
    assert workers and str(os.getpid()) not in workers  # trained in worker processes
    assert len(side_by_side) == 4 and all("error" not in r for r in side_by_side)
    assert len(list((tmp_path / "two" / "points").iterdir())) == 2

    def scores(rows):
        return {tuple(r["point"].values()): (r["knn_top1"], r["knn_floor"], r["steps"])
                for r in rows}

    assert scores(side_by_side) == scores(in_turn)
    floors = json.loads((tmp_path / "two" / "floors.json").read_text())
    assert floors == json.loads((tmp_path / "one" / "floors.json").read_text())
    # a rerun finds nothing left to do: no worker starts, no trial is left running
    again = run_sweep(spec, tmp_path / "two", log=lambda _: None, workers=2)
    assert "sweep: worker" not in capfd.readouterr().out
    assert scores(again) == scores(side_by_side)
    study = open_study(tmp_path / "two", spec)
    assert {t.state.name for t in study.get_trials()} == {"COMPLETE"}


@pytest.mark.integration
@pytest.mark.slow
def test_several_sweeps_share_one_pool_of_workers_and_score_as_each_alone(tmp_path, capfd):
    """Two sweeps of one point each (another preset each, as the arms of a comparison are)
    in one pool of two workers: both are trained by worker processes, each into its own
    folder, and each scores as it does alone in turn; two sweeps in one folder are refused."""
    simclr = SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=2e-3"], **SCORE)
    bam = SweepSpec.from_arguments("bam_synthetic", [*TINY, "optim.lr=2e-3"], **SCORE)
    logged = []
    pooled = run_sweeps([(simclr, tmp_path / "simclr"), (bam, tmp_path / "bam")],
                        log=logged.append, workers=2)
    workers = {line.split()[2] for line in capfd.readouterr().out.splitlines()
               if line.startswith("sweep: worker ")}
    assert workers and str(os.getpid()) not in workers
    assert {m.split(": ")[1] for m in logged if m.startswith("sweep: point")} == {
        f"point 1/1 of {tmp_path / 'simclr'}", f"point 1/1 of {tmp_path / 'bam'}"}
    alone = [run_sweep(simclr, tmp_path / "simclr-alone", log=lambda _: None),
             run_sweep(bam, tmp_path / "bam-alone", log=lambda _: None)]

    def scores(results):
        return [(r["knn_top1"], r["knn_floor"], r["steps"]) for r in results]

    assert [scores(r) for r in pooled] == [scores(r) for r in alone]
    for name in ("simclr", "bam"):
        (point,) = (tmp_path / name / "points").iterdir()  # each folder trained its own method
        assert yaml.safe_load((point / "config.yaml").read_text())["method"]["name"] == name
        assert json.loads((tmp_path / name / "results.json").read_text())["results"] == \
            pooled[("simclr", "bam").index(name)]
    with pytest.raises(ConfigError, match="two sweeps share one folder"):
        run_sweeps([(simclr, tmp_path / "x"), (bam, tmp_path / "x")], workers=2)


def _sweep_with_two_workers(out: Path) -> tuple[list[str], subprocess.Popen]:
    """Start ``attnssl sweep --workers 2`` (two points of 512 steps, about 10 s each, a
    checkpoint every 8) and return its arguments and process once both points have a
    checkpoint: long enough that neither ends before the other starts, on a loaded machine."""
    args = [*_sweep_command(out), "--workers", "2", "trainer.checkpoint_every_steps=8"]
    args[args.index("optim.epochs=1")] = "optim.epochs=128"
    child = subprocess.Popen([sys.executable, "-m", "attnssl", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while len({p.parent.parent for p in (out / "points").glob("*/checkpoints/*.ckpt")}) < 2:
        assert child.poll() is None and time.time() < deadline, child.communicate()
        time.sleep(0.05)
    return args, child


def _continues_to_the_end(args: list[str], points: list[Path]) -> None:
    """The same command finishes both stopped points, each resumed from its checkpoint."""
    assert len(points) == 2 and not any((p / "sweep-trained.json").exists() for p in points)
    assert main(args) == 0
    results = json.loads((points[0].parent.parent / "results.json").read_text())["results"]
    assert sorted(r["point"]["optim.lr"] for r in results) == ["1e-3", "2e-3"]
    assert all("error" not in r and r["steps"] == 512 for r in results)
    for point in points:  # each trained to its end, no step twice
        steps = [int(line.split(",")[0]) for line in
                 (point / "metrics.csv").read_text().splitlines()[1:]]
        assert steps[-1] == 512 and len(steps) == len(set(steps))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("to", ["the sweep", "every process"])
def test_a_stop_signal_stops_every_worker_with_a_checkpoint(tmp_path, to):
    """SIGTERM while both workers train, sent to the sweep alone (it passes it on) or to
    every process, as a scheduler does (a worker then gets it twice and must still stop with
    a checkpoint, not die mid-step): the sweep exits 143 and the same command continues."""
    out = tmp_path / "sweep"
    args, child = _sweep_with_two_workers(out)
    points = [p for p in (out / "points").iterdir() if p.is_dir()]
    if to == "every process":
        for point in points:  # a worker names itself in its run folder's lock
            os.kill(int((point / ".lock").read_text().split()[1]), signal.SIGTERM)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 143, stdout + stderr
    assert "the same command continues the sweep" in stderr
    assert "without stopping cleanly" not in stdout, stdout  # no worker died mid-step
    _continues_to_the_end(args, points)


@pytest.mark.integration
@pytest.mark.slow
def test_workers_of_a_killed_sweep_stop_instead_of_training_on(tmp_path):
    """SIGKILL to the sweep's process (an out-of-memory kill, say): its workers are told by
    the kernel and stop with their checkpoints, so they neither finish unseen nor hold the
    point folders against the rerun."""
    from attnssl.runs.folder import RunFolderLock

    out = tmp_path / "sweep"
    args, child = _sweep_with_two_workers(out)
    child.kill()
    child.communicate(timeout=60)
    points = [p for p in (out / "points").iterdir() if p.is_dir()]
    deadline = time.time() + 120
    for point in points:  # each worker lets go of its folder
        while True:
            try:
                RunFolderLock(point).acquire().release()
                break
            except ConfigError:
                assert time.time() < deadline, f"{point} is still held"
                time.sleep(0.1)
    _continues_to_the_end(args, points)


def test_the_training_key_reads_the_peak_learning_rate_the_trainer_uses():
    """``lr_scaling_batch`` at the batch itself, or an lr already scaled, trains as the rule
    left unset does: one key, one run. A batch the rule scales to another peak is another key."""
    from attnssl.sweep import training_key

    def key(*overrides):
        return training_key(SweepSpec.from_arguments("simclr_synthetic", list(overrides),
                                                     **SCORE).reference_config())

    tiny = [o for o in TINY if not o.startswith("optim.batch_size=")]
    unset = key(*TINY, "optim.lr=1e-3")  # batch 32
    assert key(*TINY, "optim.lr=1e-3", "optim.lr_scaling_batch=32") == unset
    scaled = key(*tiny, "optim.batch_size=64", "optim.lr=1e-3", "optim.lr_scaling_batch=32")
    assert scaled == key(*tiny, "optim.batch_size=64", "optim.lr=2e-3")
    assert scaled != key(*tiny, "optim.batch_size=64", "optim.lr=1e-3")


def test_a_floor_another_worker_scored_is_read_not_computed_again(tmp_path):
    """Side-by-side workers each start with the floors known then; a floor the sweep saved
    since (another worker's point) is read from ``floors.json`` instead of scored again."""
    from attnssl.sweep import _run_point, floor_key

    spec = SweepSpec.from_arguments("simclr_synthetic", [*TINY, "optim.lr=1e-3"], **SCORE)
    point = spec.grid()[0]
    saved = {floor_key(spec.config(point)): 12.5}  # not a score the untrained backbone gives
    (tmp_path / "floors.json").write_text(json.dumps(saved))
    floors: dict = {}
    assert _run_point(spec, tmp_path, point, floors)["knn_floor"] == 12.5
    assert floors == saved
