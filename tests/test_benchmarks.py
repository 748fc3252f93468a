"""The benchmarks package: every module imports from the repository root, and one runs end to
end as ``python -m benchmarks.NAME`` (its helpers' fresh-process timing included)."""

import importlib
import json
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_module_imports_as_part_of_the_package(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__doc__, f"benchmarks/{name}.py needs a docstring saying what it measures"


@pytest.mark.integration
def test_a_benchmark_runs_as_a_module_and_writes_its_results(tmp_path):
    out = tmp_path / "b4.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.b4_attention_cost", "--tokens", "16",
                           "64", "--attentions", "linear", "--repeats", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| linear |" in done.stdout
    points = json.loads(out.read_text())["results"]["linear"]
    assert set(points) == {"16", "64"}  # one record per measured point, each from a fresh process
    assert all(p["seconds"] > 0 and p["peak_mb"] >= 0 for p in points.values())


@pytest.mark.integration
def test_the_prepared_gpu_check_runs_on_the_cpu(tmp_path):
    """``python -m benchmarks.gpu_check --device cpu --tiny`` end to end on UDI, the method with
    extra inputs (its multimodal windows); the full command covers every method."""
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu",
                           "--tiny", "--methods", "udi", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["method"] for row in result["rows"]] == ["udi"]
    for row in result["rows"]:
        assert row["plain"]["finite"] and row["compiled"]["finite"]
        assert row["resume_max_difference"] == 0.0  # resumed on the CPU: bit-exact
    assert "| udi | yes |" in result["table"]


def test_a_b1v2_row_trained_with_other_settings_than_its_preset_is_refused(tmp_path):
    """A row folder whose saved config differs from the preset in a training setting or the
    seed is named with both values; machine, run-folder and read-out settings, and ``auto``
    precision that resolves to what the row ran, are accepted; the folder is left as it was."""
    import yaml

    from attnssl.config import config_to_dict, load_config
    from attnssl.precision import resolve_precision
    from benchmarks.b1v2 import check_row_matches_preset

    trained = load_config("mae_fashion_mnist", ["method.decoder_depth=2", "trainer.num_threads=1",
                                                "trainer.precision=" + resolve_precision("auto", "cpu")])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(trained)))
    same = load_config("mae_fashion_mnist", ["method.decoder_depth=2", "trainer.num_threads=2",
                                             "eval.features=cls", "run.name=mae"])
    check_row_matches_preset(tmp_path, same)
    changed = load_config("mae_fashion_mnist", ["method.decoder_depth=4"])
    with pytest.raises(SystemExit, match=r"method\.decoder_depth \(trained 2, preset now 4\)"):
        check_row_matches_preset(tmp_path, changed)
    other_seed = load_config("mae_fashion_mnist", ["method.decoder_depth=2", "run.seed=1"])
    with pytest.raises(SystemExit, match=r"run\.seed \(trained 0, preset now 1\)"):
        check_row_matches_preset(tmp_path, other_seed)  # a seed row is not its preset's row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_b1v2_reads_a_setting_added_since_a_row_was_trained_at_its_default(tmp_path):
    """A row folder saved before BAM's projector batch norms existed ran the plain projector:
    it is refused as the preset's row (which turns them on) and accepted as the row that pins
    the plain projector."""
    import yaml

    from attnssl.config import config_to_dict, load_config
    from benchmarks.b1v2 import check_row_matches_preset, rows_known

    rows = rows_known()
    plain = load_config(*rows["bam-plain-projector"])
    saved = config_to_dict(plain)
    for key in ("projector_batchnorm", "projector_last_batchnorm"):
        del saved["method"][key]  # as written before the settings existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_row_matches_preset(tmp_path, plain)
    with pytest.raises(SystemExit, match=r"method\.projector_batchnorm \(trained False, preset now True\)"):
        check_row_matches_preset(tmp_path, load_config(*rows["bam"]))


def test_b1v2_has_a_crops_and_flips_row_only_where_the_preset_changes_its_views():
    """MAE's preset is crops and flips already (its official views), so a crops-and-flips row
    would train the preset again (its default local blur acts on no local crop); SimCLR's
    jitter makes its row differ."""
    from attnssl.config import load_config
    from benchmarks.b1v2 import CROPS_AND_FLIPS, has_photometric_views, rows_known

    rows = rows_known()
    assert "mae-crops-flips" not in rows and "simclr-crops-flips" in rows
    preset, overrides = rows["simclr-crops-flips"]
    plain = load_config(preset, overrides).views
    assert overrides == CROPS_AND_FLIPS and plain.color_jitter_prob == 0.0
    assert load_config(preset).views.color_jitter_prob > 0
    assert not has_photometric_views("mae_fashion_mnist")
    assert has_photometric_views("udi_fashion_mnist")  # jitter and blur on its local crops


def test_b1v2_variant_rows_are_their_preset_with_the_named_changes():
    """MAE's one-sample rows are the preset with one view per image (the official sampling and
    the demo's), BAM's masked rows the preset with the official teacher, two global views,
    positive masking and crops, SimCLR's two-view rows the preset with two views; BAM's rows
    trained before the preset's projector batch norms pin the plain projector, and those
    trained before its official weight decay and stem pin the former ones; each listed with
    its method's rows."""
    from attnssl.config import load_config
    from benchmarks.b1v2 import VARIANTS, rows_known

    rows = list(rows_known())
    assert set(VARIANTS) <= set(rows)
    assert rows.index("mae-1x") == rows.index("mae") + 2  # mae, mae-20ep, mae-1x, ...
    preset, overrides = rows_known()["mae-1x-20ep"]
    config = load_config(preset, overrides)
    assert (config.views.global_crops, config.optim.epochs) == (1, 20)
    assert load_config(preset).views.global_crops > 1
    preset, overrides = rows_known()["bam-masked"]
    masked, plain = load_config(preset, overrides), load_config(preset)
    assert masked.method.positive_masking and not plain.method.positive_masking
    assert masked.views.global_scale == (0.4, 1.0) != plain.views.global_scale
    assert masked.method.teacher and not plain.method.teacher  # the official EMA teacher
    assert masked.views.global_crops == 2 < plain.views.global_crops  # official: two globals
    previous = load_config(*rows_known()["bam-teacher-2v"])  # the preset before its tenth round
    assert (previous.method.teacher, previous.views.global_crops) == (True, 2)
    assert load_config(*rows_known()["bam-2v"]).method.teacher is False
    assert plain.method.projector_batchnorm and plain.method.projector_last_batchnorm
    for row in ("bam-plain-projector", "bam-plain-projector-seed1", "bam-2v", "bam-6v",
                "bam-teacher", "bam-teacher-2v", "bam-2v-crops-flips", "bam-masked",
                "bam-masked-20ep"):  # trained before the preset took the batch norms
        assert load_config(*rows_known()[row]).method.projector_batchnorm is False, row
    # every BAM row trained before the preset took the official weight decay and stem keeps
    # the constant 0.05 and timm's learned stem; the two rows that try one of them keep the other
    def decay_and_stem(config):
        return (config.optim.weight_decay, config.optim.weight_decay_end,
                config.model.pos_embed, config.model.freeze_patch_embed)

    former = (0.05, None, "learned", False)
    assert decay_and_stem(plain) == (0.04, 0.4, "sincos", True)
    for row, kept in {"bam-timm-stem": former, "bam-timm-stem-seed1": former,
                      "bam-timm-stem-20ep": former, "bam-plain-projector": former,
                      "bam-2v-crops-flips": former, "bam-masked": former,
                      "bam-wd-schedule": (0.04, 0.4, "learned", False),
                      "bam-frozen-patches": (0.05, None, "sincos", True)}.items():
        assert decay_and_stem(load_config(*rows_known()[row])) == kept, row
    assert load_config(*rows_known()["bam-seed1"]).model.freeze_patch_embed  # the preset now
    assert rows.index("bam-masked") < rows.index("dino")
    preset, overrides = rows_known()["simclr-2v-crops-flips"]
    two_views = load_config(preset, overrides)
    assert (two_views.views.global_crops, two_views.views.color_jitter_prob) == (2, 0.0)
    assert load_config(preset).views.global_crops == 4
    assert load_config(*rows_known()["mae-seed1"]).run.seed == 1
    assert load_config(*rows_known()["simclr-seed1"]).run.seed == 1


def test_b1v2_names_the_results_file_of_another_machine_in_its_command(tmp_path):
    """A table kept apart for another machine (``--out``) prints a command that writes there;
    the default results file is not named."""
    from benchmarks.b1v2 import DEFAULT_OUT, regenerate_command

    assert regenerate_command(["bam"], DEFAULT_OUT) == "python -m benchmarks.b1v2 --rows bam"
    other = ROOT / "benchmarks" / "results" / "b1v2_xeon.json"
    assert regenerate_command(["bam", "udi"], other).endswith(
        "--rows bam udi --out benchmarks/results/b1v2_xeon.json")
    assert regenerate_command(["mae"], tmp_path / "t.json").endswith(f"--out {tmp_path / 't.json'}")


def test_b1v2_table_only_rebuilds_the_table_from_the_results_file_and_trains_nothing(tmp_path):
    """``--table-only`` reads the stored rows (and raw-pixel floor) of ``--out`` and prints
    their table; listed rows without a run folder are not trained (no folder appears); a
    missing results file is named."""
    stored = json.loads((ROOT / "benchmarks" / "results" / "b1v2.json").read_text())
    out, runs = tmp_path / "b1v2.json", tmp_path / "runs"
    out.write_text(json.dumps(stored))
    done = subprocess.run([sys.executable, "-m", "benchmarks.b1v2", "--table-only", "--rows", "bam",
                           "--out", str(out), "--runs-dir", str(runs)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not runs.exists()
    for row in stored["rows"]:
        assert f"| {row['row']} | {row['readout']} |" in done.stdout
    assert f"| raw pixels (floor) | 784 pixels | - | - | {stored['raw_pixel_knn_top1']:.2f} |" in done.stdout
    assert json.loads(out.read_text())["rows"] == stored["rows"]
    missing = subprocess.run([sys.executable, "-m", "benchmarks.b1v2", "--table-only",
                              "--out", str(tmp_path / "none.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "none.json does not exist" in missing.stderr


def test_the_lightly_comparison_runs_the_official_sampling():
    """lightly's examples view each image twice (SimCLR) and sample it once (MAE) a step: the
    presets that now take more are compared in that setting."""
    from benchmarks.b1_peers import peer_config

    assert peer_config("simclr").views.global_crops == 2
    assert (peer_config("mae").views.global_crops, peer_config("mae").optim.lr) == (1, 3e-3)


def test_the_lightly_comparison_names_rows_the_presets_moved_away_from():
    """A stored peer row keeps the settings it was measured with; the table names a row whose
    preset changed since (and a row that recorded nothing), and not one that still matches."""
    from benchmarks.b1_peers import grayscale_jitter, peer_config, recorded_settings, stale_note

    def stored(*overrides):  # as the results file holds them
        return json.loads(json.dumps(recorded_settings(peer_config(*overrides))))

    now = stored("simclr")
    results = {"methods": {"simclr": {"settings": stored("simclr", ["method.temperature=0.5"])},
                           "mae": {}, "dino": {"settings": stored("dino")}}}
    note = " ".join(stale_note(results))
    assert "simclr (changed since: `method.temperature`)" in note
    assert "mae (settings not recorded)" in note and "dino" not in note
    assert stale_note({"methods": {"simclr": {"settings": now}}}) == []
    older = {k: v for k, v in now.items() if k != "views.erasing_prob"}  # a setting added since
    assert stale_note({"methods": {"simclr": {"settings": older}}}) == []
    views = peer_config("simclr").views  # lightly's jitter is the preset's, on one channel
    assert grayscale_jitter(views) == {"cj_prob": views.color_jitter_prob, "cj_strength": 1.0,
                                       "cj_bright": views.brightness,
                                       "cj_contrast": views.contrast, "cj_sat": 0.0, "cj_hue": 0.0}


def test_run_all_stops_a_job_at_the_budget_with_sigterm_and_kills_only_a_deaf_one(tmp_path):
    """A job past its budget is asked to stop (SIGTERM, so a training job checkpoints first) and
    is killed only when it has not ended after the grace time."""
    from benchmarks.run_all import run_job

    mark = tmp_path / "stopped"
    listens = (f"import pathlib, signal, sys, time\n"
               f"def stop(*_):\n    pathlib.Path({str(mark)!r}).write_text('checkpoint')\n"
               f"    sys.exit(143)\n"
               f"signal.signal(signal.SIGTERM, stop)\ntime.sleep(60)")
    assert run_job([sys.executable, "-c", listens], seconds=5, grace_seconds=60) == (
        "stopped at the budget")
    assert mark.read_text() == "checkpoint"
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    started = time.monotonic()
    assert run_job([sys.executable, "-c", deaf], seconds=1, grace_seconds=1) == (
        "stopped at the budget")
    assert time.monotonic() - started < 30
    assert run_job([sys.executable, "-c", "raise SystemExit(3)"], seconds=60) == (
        "failed (exit 3)")
