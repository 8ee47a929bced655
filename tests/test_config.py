"""The config loader: YAML + dotted overrides -> typed config; each kind of bad input is one
``ConfigError`` naming the key, the value, what is allowed and, for typos, the closest key."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypipe.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    config_to_yaml,
    load_config,
    parse_override,
)


@pytest.mark.parametrize("name", ["default.yaml", "flowers.yaml", "flowers5.yaml", "xray.yaml"])
def test_training_configs_load(name: str) -> None:
    assert isinstance(load_config(CONFIG_DIR / name, []), Config)


def test_config_found_by_name_in_the_configs_folder() -> None:
    assert load_config("default", []) == load_config(CONFIG_DIR / "default.yaml", [])


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(None, ["train.lr=0.01", "train.epochs=3", "data.class_names=[cats, dogs]",
                             "pipeline.workers=3", "train.use_gpu=false",
                             "run.name=exp-1", "data.root=s3://bucket/images"])
    assert cfg.train.lr == 0.01 and isinstance(cfg.train.epochs, int) and cfg.train.epochs == 3
    assert cfg.data.class_names == ["cats", "dogs"]
    assert cfg.pipeline.workers == 3
    assert cfg.train.use_gpu is False
    assert cfg.run.name == "exp-1" and cfg.data.root == "s3://bucket/images"


def test_later_override_wins_and_file_values_are_kept(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.2\n  epochs: 5\n")
    cfg = load_config(f, ["train.lr=0.3", "train.lr=0.4"])
    assert cfg.train.lr == 0.4 and cfg.train.epochs == 5


def test_written_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=0.01", "data.class_names=[a, b]"])
    f = tmp_path / "config.yaml"
    f.write_text(config_to_yaml(cfg))
    assert load_config(f, []) == cfg


def test_parse_override() -> None:
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override("a.b=") == (["a", "b"], None)


@pytest.mark.parametrize(("override", "pattern"), [
    # wrong type: key, value and what was expected
    ("train.epochs=abc", r"train.epochs = 'abc': Input should be a valid integer"),
    # out of range: the bound
    ("train.lr=-1", r"train.lr = -1: Input should be greater than or equal to 0"),
    ("data.val_fraction=1.5", r"data.val_fraction = 1.5: Input should be less than 1"),
    ("pipeline.files_per_batch=0", r"pipeline.files_per_batch = 0: .*greater than or equal to 1"),
    ("pipeline.workers=many",
     r"pipeline.workers = 'many': Input should be a valid integer.* Or: Input should be 'auto'"),
    # not one of the choices: the allowed values
    ("model.name=resnet19", r"model.name = 'resnet19': .*'resnet18', 'resnet34'"),
    ("data.on_bad_file=ignore", r"data.on_bad_file = 'ignore': Input should be 'skip' or 'fail'"),
    # typos: the closest valid key
    ("train.lrr=0.1", r"unknown config key 'train.lrr' \(value 0.1\). Did you mean 'train.lr'\?"),
    ("trian.lr=0.1", r"unknown config key 'trian'.*Did you mean 'train'\?"),
    ("data.max_pixel=10", r"Did you mean 'data.max_pixels'\?.*Valid keys in data: "),
    # cross-field rules
    ("preprocess.percentiles=[90, 10]", r"percentiles must satisfy 0 <= low < high <= 100"),
    ("augment.zoom=[2, 1]", r"zoom must satisfy"),
    ("run.name=a/b", r"run.name = 'a/b': String should match pattern"),
])
def test_bad_values_name_key_value_and_what_is_allowed(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(None, [override])
    assert "Fix the YAML file or the key=value override" in str(info.value)
    assert str(info.value).count("Allowed:") <= 1


@pytest.mark.parametrize(("override", "pattern"), [
    ("train.lr", r"not of the form key=value"),
    ("=3", r"empty key"),
    ("train..lr=3", r"empty key"),
    ("train.lr.x=1", r"'train.lr' is a value, not a section"),
    ("train.lr=[1,", r"value '\[1,' is not valid YAML"),
])
def test_malformed_overrides(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_missing_config_file_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"config file 'nope.yaml' not found.*Available: .*default.yaml"):
        load_config("nope.yaml", [])


@pytest.mark.parametrize(("text", "pattern"), [
    ("- a\n- b\n", r"must hold a mapping of sections.*got list"),
    ("train: [\n", r"is not valid YAML"),
    ("train:\n  lr: 0.1\ntrain:\n  lr: 0.2\n", None),  # duplicate keys: last one wins, like YAML
])
def test_bad_config_files(tmp_path: Path, text: str, pattern: str | None) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    if pattern is None:
        assert load_config(f, []).train.lr == 0.2
        return
    with pytest.raises(ConfigError, match=pattern):
        load_config(f, [])


def test_binary_config_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(f, [])


def test_empty_config_file_means_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("")
    assert load_config(f, []) == Config()


def test_every_key_is_described_once_in_the_help() -> None:
    from raypipe.config import config_help

    lines = config_help().splitlines()
    keys = [line.split(" = ")[0].strip() for line in lines]
    assert len(keys) == len(set(keys)) and "pipeline.files_per_batch" in keys and "train.lr" in keys
    expected = sum(len(f.annotation.model_fields) for f in Config.model_fields.values())
    assert len(keys) == expected
    undescribed = [line for line in lines if len(line.split("  ")) < 3]
    assert not undescribed, undescribed
    assert any(line.startswith("  train.batch_size = 32  global training batch") for line in lines)


def test_no_internal_knobs_or_dead_keys_are_left() -> None:
    from raypipe.config import config_help

    keys = {line.split(" = ")[0].strip() for line in config_help().splitlines()}
    for gone in ("data.builtin", "run.resume", "pipeline.blocks", "pipeline.block_rows",
                 "pipeline.max_block_mib", "pipeline.one_execution", "pipeline.cache_val_mb",
                 "pipeline.prefetch_next_epoch", "train.torch_threads"):
        assert gone not in keys


def test_the_python_api_names_runs_as_the_job_does(tmp_path: Path) -> None:
    from raypipe.api import override_list, resolve_config

    assert override_list({"train.lr": 0.01, "data.class_names": ["a", "b"], "model.pretrained": None}) == [
        "train.lr=0.01", "data.class_names=[a, b]", "model.pretrained=null"]
    with pytest.raises(ConfigError, match="a dict or a list"):
        override_list("train.lr=0.1")
    cfg = resolve_config("flowers", {"run.storage_path": str(tmp_path), "train.lr": 0.01})
    assert cfg.run.name.startswith("flowers-") and cfg.run.storage_path == str(tmp_path)
    assert cfg.train.lr == 0.01 and cfg.data.class_names == ["daisy", "roses"]
    (tmp_path / "flowers-20260101-000000").mkdir()
    again = resolve_config("flowers", {"run.storage_path": str(tmp_path)}, resume=True)
    assert again.run.name == "flowers-20260101-000000"
    with pytest.raises(ConfigError, match="no earlier run of 'default'"):
        resolve_config(None, [f"run.storage_path={tmp_path}"], resume=True)
    from_object = resolve_config(Config(), ["train.epochs=2"])
    assert from_object.train.epochs == 2 and from_object.run.name.startswith("run-")


def test_train_help_lists_every_key_and_print_config_prints_the_resolved_yaml(capsys) -> None:
    from raypipe.jobs.train import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "pipeline.cache = auto" in out and "model.name = resnet18" in out and "--print-config" in out
    assert main(["--config", "flowers", "--print-config", "train.lr=0.002"]) == 0
    printed = capsys.readouterr().out
    import yaml

    tree = yaml.safe_load(printed)
    assert tree["train"]["lr"] == 0.002 and tree["data"]["class_names"] == ["daisy", "roses"]


