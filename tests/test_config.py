from pathlib import Path

import pytest

from guardmerge.config import load_config, parse_config
from guardmerge.errors import ConfigError
from tests.builders import merge_cfg


def raw(**over: object) -> dict:
    data = {
        "base_model": "base",
        "experts": [{"model": "a", "task": "hate"}, {"model": "b", "task": "injection", "weight": 0.5}],
        "method": "task_arithmetic",
        "parameters": {"scaling": 0.5},
        "heads": "multi",
    }
    data.update(over)
    return data


def test_valid_config_parses() -> None:
    cfg = parse_config(raw())
    assert cfg.method == "task_arithmetic" and cfg.parameters == {"scaling": 0.5}
    assert [e.weight for e in cfg.experts] == [1.0, 0.5]


def test_duplicate_task_names_are_refused() -> None:
    data = raw(experts=[{"model": "a", "task": "hate"}, {"model": "b", "task": "hate"}])
    with pytest.raises(ConfigError, match="duplicate task names: hate"):
        parse_config(data)


def test_unknown_top_level_field_is_refused() -> None:
    with pytest.raises(ConfigError, match="metod"):
        parse_config(raw(metod="ties"))


def test_bad_heads_mode_and_task_name_are_refused() -> None:
    with pytest.raises(ConfigError, match="heads"):
        parse_config(raw(heads="many"))
    with pytest.raises(ConfigError, match="experts.0.task"):
        parse_config(raw(experts=[{"model": "a", "task": "has.dot"}]))


def test_overrides_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "experts" / "a").mkdir(parents=True)
    path = tmp_path / "m.yaml"
    path.write_text("base_model: some/hub-id\nexperts:\n  - {model: experts/a, task: hate}\nmethod: average\n")
    cfg = load_config(path, ["method=task_arithmetic", "parameters.scaling=0.8", "experts.0.weight=2"])
    assert cfg.method == "task_arithmetic" and cfg.parameters["scaling"] == 0.8
    assert cfg.experts[0].weight == 2.0
    assert cfg.experts[0].model == str(tmp_path / "experts" / "a")  # resolved against the file
    assert cfg.base_model == "some/hub-id"  # hub ids stay as given


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(_good(tmp_path), ["noequals"])


def _good(tmp_path: Path) -> Path:
    p = tmp_path / "good.yaml"
    p.write_text("base_model: b\nexperts: [{model: a, task: t}]\n")
    return p


@pytest.mark.parametrize(
    "override",
    [
        "method=!!python/object/apply:os.system ['true']",
        "parameters=!!python/name:os.system",
        "parameters.scaling=[[[[[[",
        "experts.x.weight=1",
        "base_model.deeper=1",
        "parameters.scaling=" + "[" * 5000 + "]" * 5000,
    ],
)
def test_malformed_overrides_are_one_config_error(override: str) -> None:
    from guardmerge.config import apply_overrides
    from guardmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="override"):
        apply_overrides({"base_model": "b", "experts": [{"model": "m", "task": "t"}]}, [override])


def test_one_key_value_reader_for_every_assignment_argument() -> None:
    from guardmerge.config import parse_assignments, split_assignment

    assert split_assignment("a.b=x=y", "--set") == ("a.b", "x=y")
    assert parse_assignments(["density=0.5", "scope=global", "flag=true"]) == {
        "density": 0.5,
        "scope": "global",
        "flag": True,
    }
    with pytest.raises(ConfigError, match="--set 'density' must look like key=value"):
        parse_assignments(["density"])
    with pytest.raises(ConfigError, match="--set '=3' must look like key=value"):
        parse_assignments(["=3"])
    with pytest.raises(ConfigError, match="not a YAML value"):
        parse_assignments(["x=[1, 2"])


@pytest.mark.parametrize(
    "override", ["parameters.scaling=.nan", "experts.0.weight=.nan", "experts.1.weight=.inf", "align_heads.ridge=.inf"]
)
def test_nonfinite_config_values_refused(tmp_path: Path, zoo: dict[str, Path], override: str) -> None:
    from guardmerge.merge.job import MergeJob

    with pytest.raises(ConfigError, match=r"finite"):
        MergeJob.of(load_config(merge_cfg(tmp_path, zoo), [override]))


def test_zero_sum_weights_refused_up_front(tmp_path: Path, zoo: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="sum to 0"):
        load_config(
            merge_cfg(tmp_path, zoo, method="average", parameters={}), ["experts.0.weight=1.0", "experts.1.weight=-1.0"]
        )


def test_a_binary_config_file_gives_a_clean_error(tmp_path: Path) -> None:
    yml = tmp_path / "bin.yaml"
    yml.write_bytes(b"\xff\xfe\x00\x01" * 20)
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(yml)
