import dataclasses
import subprocess
import sys
import tomllib

import pytest

from fedrec.config import SECTIONS, ConfigError, FedRecConfig, merge_run_config, parse_run_config
from fedrec.data.load import check_inputs
from tests.conftest import REPO


def test_pyproject_run_config_equals_defaults():
    app_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_cfg == FedRecConfig().to_dict()


def test_round_trip_through_toml(tmp_path):
    cfg = FedRecConfig(num_rounds=7, lora_targets="q_proj,fc2", learning_rate=0.25)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert FedRecConfig.from_toml(path) == cfg


def test_run_config_parsing_takes_toml_and_bare_words():
    parsed = parse_run_config('num-rounds=3 dataset=movielens learning-rate=0.1 data-path="/x y"'.replace(" y", "y"))
    assert parsed == {"num-rounds": 3, "dataset": "movielens", "learning-rate": 0.1, "data-path": "/xy"}


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"num-round": 3}, "num-round"),
        ({"placement": "edge"}, "placement"),
        ({"num-rounds": 0}, "num-rounds"),
        ({"num-rounds": "many"}, "num-rounds"),
        ({"public-fraction": 1.5}, "public-fraction"),
        ({"lora-targets": "q_proj,item_emb"}, "lora-targets"),
        ({"dataset": "movielens"}, "data-path"),
        ({"secure-aggregation": "secagg+"}, "secure-aggregation"),  # cohort placement, no clipping
        ({"secure-aggregation": "secagg+", "placement": "device", "clipping-norm": 1.0, "secagg-shares": 4},
         "secure-aggregation"),  # fmt: skip
        ({"lora-item-rank": 4}, "lora-item-rank"),
        ({"ceilings": "scratch,best"}, "ceilings"),
        ({"server-momentum": 0.9}, "server-momentum"),
        ({"item-adapter": "rows,table"}, "item-adapter"),
        ({"local-engine": "loop", "scoring-dtype": "bfloat16"}, "scoring-dtype"),
        ({"scoring-dtype": "float16"}, "scoring-dtype"),
        ({"local-dropout": -0.5}, "local-dropout"),
        ({"mechanism": "banded-mf", "sampling": "poisson", "target-epsilon": 4.0, "clipping-norm": 1.0}, "mechanism"),
        ({"model-selection": "private", "noise-multiplier": 1.0, "clipping-norm": 1.0}, "model-selection"),
        ({"model-selection": "public", "placement": "device"}, "model-selection"),
        ({"sampling": "all", "noise-multiplier": 1.0, "clipping-norm": 1.0, "accountant": "rdp"}, "sampling"),
        ({"item-adapter": "affine", "affine-groups": "features", "dataset": "seq-txt", "data-path": "pyproject.toml"},
         "item-features"),  # fmt: skip
        # Settings that would be silently ignored: an ε cap without noise, a file the synthetic data never reads.
        ({"max-epsilon": 3.0, "clipping-norm": 0.5}, "max-epsilon"),
        ({"data-path": "pyproject.toml"}, "data-path"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        FedRecConfig.from_mapping(overrides)
    assert str(err.value).startswith(key + ":")
    assert "\n" not in str(err.value)


def test_a_key_given_twice_in_run_config_is_refused():
    with pytest.raises(ConfigError, match=r"^num-rounds: given twice in --run-config \(3 and 5\); give it once$"):
        parse_run_config("num-rounds=3 seed=1 num-rounds=5")
    # A script layers its recipe under the user's overrides explicitly: the later layer wins.
    assert parse_run_config(merge_run_config("num-rounds=3 seed=1", "num-rounds=5")) == {"seed": 1, "num-rounds": 5}


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'num-rounds'"):
        FedRecConfig.from_mapping({"num-round": 3})


def test_cli_rejects_bad_key_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec.simulate", "--run-config", "cohort-size=-4", "--output-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fedrec: config error: cohort-size: must be >= 1, got -4"]
    assert not (tmp_path / "o").exists()


def test_silo_partition_refuses_combinations_it_does_not_support():
    with pytest.raises(ConfigError, match="^partition: .*placement=device"):
        FedRecConfig.from_mapping({"partition": "silo", "placement": "device"})
    with pytest.raises(ConfigError, match="^lora-share: "):
        FedRecConfig.from_mapping({"lora-share": "a-only", "lora-train": "b-only"})


def test_secagg_error_names_every_missing_condition():
    with pytest.raises(ConfigError) as err:
        FedRecConfig.from_mapping({"secure-aggregation": "secagg+", "adaptive-clipping": True, "clipping-norm": 1.0})
    text = str(err.value)
    assert "placement=device" in text and "adaptive-clipping" in text and "clipping-norm" not in text.split("needs")[1]
    ok = FedRecConfig.from_mapping({"secure-aggregation": "secagg+", "placement": "device", "clipping-norm": 0.5})
    assert ok.secagg_shares == 3 and ok.vectorized


def test_a_resolved_config_travels_whole_and_is_not_validated_again(tmp_path):
    data = tmp_path / "plays.csv"
    data.write_text("user,item,timestamp\nu,i,1\n")
    cfg = FedRecConfig.from_mapping({"dataset": "csv", "data-path": str(data), "num-rounds": 7})
    data.unlink()  # where the config arrives (a device), the server's data path need not exist
    assert FedRecConfig.from_mapping(cfg.to_dict()) == cfg  # a config checks values, not this machine's files
    with pytest.raises(ConfigError, match="data-path"):
        check_inputs(cfg)
    again = FedRecConfig.resolved(cfg.to_dict())
    assert again == cfg and again.num_rounds == 7
    assert FedRecConfig.resolved(dict(cfg.to_dict())) is again  # parsed once per process
    partial = {k: v for k, v in cfg.to_dict().items() if k != "seed"}
    with pytest.raises(ConfigError, match="resolved config"):
        FedRecConfig.resolved(partial)


@pytest.mark.parametrize("text", ["learning-rate=nan", "clipping-norm=inf", "server-learning-rate=-inf", "target-epsilon=nan"])
def test_non_finite_numbers_are_one_line_config_errors(text):
    key = text.split("=")[0]
    with pytest.raises(ConfigError, match=f"^{key}: must be a finite number"):
        FedRecConfig.from_mapping(parse_run_config(text))


def test_pretraining_knobs_get_their_own_cached_base():
    from fedrec.model.base import base_path

    plain, smoothed = FedRecConfig(), FedRecConfig(pretrain_label_smoothing=0.1)
    assert base_path(plain) != base_path(smoothed) and "-ls0.1" in base_path(smoothed).name
    assert base_path(FedRecConfig(local_dropout=0.0)) == base_path(plain)  # a federated knob: same base


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dataset": "csv", "data-path": "/does/not/exist"}, "data-path: '/does/not/exist' does not exist"),
        ({"item-features": "/no/features.json"}, "item-features: '/no/features.json' does not exist"),
        ({"item-text": "/no/texts.csv"}, "item-text: '/no/texts.csv' does not exist"),
    ],
)
def test_missing_files_are_one_line_errors_of_the_machine_not_the_config(overrides, message):
    cfg = FedRecConfig.from_mapping(overrides)  # valid: the files may be where the config goes
    with pytest.raises(ConfigError) as err:
        check_inputs(cfg)
    assert str(err.value) == message


def test_cli_reports_a_missing_data_file_in_one_line_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec.simulate", "--run-config", "dataset=csv data-path=/does/not/exist",
         "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fedrec: config error: data-path: '/does/not/exist' does not exist"]
    assert not (tmp_path / "o").exists()


def test_each_knob_belongs_to_one_section_that_checks_it():
    cfg = FedRecConfig(num_rounds=7, noise_multiplier=1.0, clipping_norm=0.5, hidden_size=32)
    assert cfg.server.num_rounds == 7 and cfg.privacy.enabled and cfg.model.hidden_size == 32
    owners = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert sorted(owners) == sorted(f.name for f in dataclasses.fields(FedRecConfig))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.privacy.noise_multiplier = 0.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="^hidden-size: 30 is not divisible by num-heads=4"):
        SECTIONS["model"](**(dataclasses.asdict(cfg.model) | {"hidden_size": 30, "num_heads": 4}))
    with pytest.raises(ConfigError, match="^num-rounds: must be >= 1"):
        SECTIONS["server"](**(dataclasses.asdict(cfg.server) | {"num_rounds": 0}))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"sampling": "poisson", "target-epsilon": 4.0, "clipping-norm": 0.5, "adaptive-clipping": True},
        {"placement": "device", "secure-aggregation": "secagg+", "clipping-norm": 1.0, "lora-targets": "q_proj,fc2"},
        {"mode": "centralized", "ceilings": "scratch,full", "item-adapter": "affine", "affine-groups": "popularity"},
    ],
)
def test_toml_round_trips_and_resolved_configs_have_the_same_sections(tmp_path, overrides):
    cfg = FedRecConfig.from_mapping(overrides)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    again = FedRecConfig.from_toml(path)
    assert again == cfg and again.to_toml() == cfg.to_toml()
    resolved = FedRecConfig.resolved(cfg.to_dict())
    assert all(getattr(resolved, name) == getattr(cfg, name) for name in SECTIONS)
    assert resolved.dp_enabled == cfg.dp_enabled and resolved.replace(seed=1).privacy == cfg.privacy


def test_too_few_private_users_is_one_line_with_the_numbers(tmp_path, capsys):
    from fedrec.simulate import main

    two = tmp_path / "two.csv"
    two.write_text("user,item,timestamp\na,x,1\na,y,2\na,z,3\nb,x,1\nb,y,2\nb,z,3\n")
    for run_config, said in (("public-fraction=1.0", "public-fraction: 1.0 of 1,200 users leaves 1 private user(s)"),
                             (f"dataset=csv data-path={two}", "public-fraction: 0.1 of 2 users leaves 1 private user(s)")):
        assert main(["--run-config", run_config, "--output-dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fedrec: config error: {said}")
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_a_folder_or_binary_is_one_line(tmp_path):
    (tmp_path / "bin.toml").write_bytes(bytes(range(256)))
    for path, said in ((tmp_path, "is a folder; give a TOML file"), (tmp_path / "bin.toml", "is not a text file")):
        with pytest.raises(ConfigError, match=f"^--config: '{path}' {said}"):
            FedRecConfig.from_toml(path)


def test_keys_lists_every_key_of_the_config_and_help_points_to_it(capsys):
    from dataclasses import fields

    from fedrec.config import FedRecConfig
    from fedrec.config_parse import _kebab
    from fedrec.simulate import main

    assert main(["--keys"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert listed == {_kebab(f.name) for f in fields(FedRecConfig)}
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--keys" in capsys.readouterr().out
