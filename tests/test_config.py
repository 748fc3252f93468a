import pytest

from attnssl.config import ConfigError, load_config, preset_names
from attnssl.methods import method_names


def test_presets_load_and_overrides_apply():
    assert {"bam_fashion_mnist", "bam_synthetic", "simclr_fashion_mnist", "simclr_synthetic",
            "mae_fashion_mnist", "dino_synthetic", "udi_synthetic"} <= set(preset_names())
    cfg = load_config("simclr_fashion_mnist", ["optim.lr=3e-4", "views.global_scale=[0.2, 1.0]",
                                               "trainer.precision=bf16-mixed"])
    assert cfg.optim.lr == 3e-4 and cfg.views.global_scale == (0.2, 1.0)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.method.name == "simclr"
    default = load_config(None, ["trainer.precision=32"])
    assert default.trainer.precision == "32" and default.method.name == "bam"
    assert load_config("mae_fashion_mnist").method.name == "mae"


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key optim\.'lrr' \(did you mean 'lr'\?\); "
                                          r"accepted: optimizer, batch_size"):
        load_config("simclr_fashion_mnist", ["optim.lrr=1"])


def test_unknown_section_and_method():
    with pytest.raises(ConfigError, match="unknown key 'optimiser'"):
        load_config(None, ["optimiser.lr=1"])
    accepted = ", ".join(method_names())  # every registered method, in registration order
    assert {"bam", "dino", "mae", "simclr", "udi"} <= set(method_names())
    with pytest.raises(ConfigError, match=f"unknown method.name 'byol'; accepted: {accepted}"):
        load_config(None, ["method.name=byol"])


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=-1", r"optim\.lr: Input should be greater than 0 \(got -1\)"),
    ("trainer.precision=fp8", r"trainer\.precision: Input should be 'auto', '32', 'bf16-mixed' "
                              r"or '16-mixed' \(got 'fp8'\)"),
    ("data.dataset=mnist", r"data\.dataset: Input should be 'fashion-mnist'"),
    ("views.global_scale=[0.9, 0.1]", r"global_scale must be \(low, high\) with 0 < low <= high"),
    ("method.temperature=abc", r"method\.temperature: Input should be a valid number"),
])
def test_bad_values_are_named_with_what_is_accepted(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("simclr_fashion_mnist", [override])


def test_malformed_override_and_unknown_preset():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="must name a section and a key"):
        load_config(None, ["lr=1"])
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset; presets: "):
        load_config("no_such_preset")


def test_overrides_after_an_option_are_kept_in_order_and_other_words_still_refused(capsys):
    from attnssl.cli import parse_arguments

    args = parse_arguments(["eval", "runs/x", "eval.knn_k=5", "--data-root", "/d",
                            "eval.features=mean", "eval.knn_k=10"])
    assert (args.target, args.data_root) == ("runs/x", "/d")
    assert args.overrides == ["eval.knn_k=5", "eval.features=mean", "eval.knn_k=10"]
    sweep = parse_arguments(["sweep", "-c", "mae_fashion_mnist", "optim.lr=1e-3,2e-3",
                             "--out", "/s", "data.subset=64"])
    assert sweep.settings == ["optim.lr=1e-3,2e-3", "data.subset=64"]
    with pytest.raises(SystemExit) as stopped:
        parse_arguments(["eval", "runs/x", "--data-root", "/d", "stray"])
    assert stopped.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err
