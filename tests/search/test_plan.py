"""``guardmerge plan``: the cheapest merge whose every head agrees with its expert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import guardmerge
from guardmerge.cli import app
from guardmerge.errors import ConfigError
from guardmerge.evaluate.fidelity import fidelity, fidelity_texts
from guardmerge.models.multihead import load_any
from guardmerge.search import Candidate
from guardmerge.search.plan import INFEASIBLE, build_plan_space, plan_config, plan_value
from tests.search.conftest import TASKS, zoo_config

runner = CliRunner()


def test_plan_value_puts_every_plan_that_meets_the_floor_first_cheapest_first() -> None:
    ok_cheap = plan_value({"a": 0.98, "b": 0.99}, 1.0, 0.97, None)
    ok_costly = plan_value({"a": 1.0, "b": 1.0}, 1.5, 0.97, None)
    near = plan_value({"a": 0.96, "b": 1.0}, 1.0, 0.97, None)
    far = plan_value({"a": 0.50, "b": 1.0}, 1.0, 0.97, None)
    too_costly = plan_value({"a": 1.0, "b": 1.0}, 2.0, 0.97, 1.5)
    assert ok_cheap > ok_costly > INFEASIBLE > near > far
    assert too_costly < INFEASIBLE
    # same compute: the higher lowest agreement wins
    assert plan_value({"a": 0.99}, 1.0, 0.97, None) > plan_value({"a": 0.98}, 1.0, 0.97, None)


def test_plan_space_compute_config_and_errors(search_zoo: dict[str, Path]) -> None:
    cfg = zoo_config(search_zoo)
    space = build_plan_space(cfg, 6, heal=("off", "top"))
    assert space.depths == (6, 5, 4) and space.tasks == TASKS
    plan = Candidate({"method": "task_arithmetic", "depth.hate": 6, "depth.injection": 4, "depth.sentiment": 6,
                      "heal": "top"}, space.base_weights)  # fmt: skip
    assert space.compute(plan) == pytest.approx((6 + 2) / 6)  # trunk of 6, injection's own blocks 4..5
    merged = plan_config(cfg, space, plan)
    assert merged.share_depths() == {"hate": 6, "injection": 4, "sentiment": 6}
    assert merged.heal is not None and merged.heal.train == "top"
    flat = plan_config(cfg, space, Candidate({**plan.parameters, "depth.injection": 6, "heal": "off"}, ()))
    assert flat.share_layers is None and flat.heal is None and flat.parameters == cfg.parameters
    other = plan_config(cfg, space, Candidate({**plan.parameters, "method": "ties"}, ()))
    assert other.method == "ties" and other.parameters == {}  # another method: its defaults
    for kwargs, message in (
        ({"depths": [7]}, "each depth must be in 0..6"),
        ({"heal": ["sometimes"]}, "choose from off, heads, top, all"),
        ({"methods": ["nope"]}, "nope"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_plan_space(cfg, 6, **kwargs)


def test_plan_command_writes_the_cheapest_model_that_meets_the_floor(
    search_zoo: dict[str, Path], val_data: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump(zoo_config(search_zoo, parameters={"scaling": 1.0}).model_dump()))
    out = tmp_path / "planned"
    args = ["plan", str(cfg), "--data", str(val_data), "--out", str(out), "--no-progress"]
    # depth 2 (shared) or 0 (a task runs its own expert's blocks: agreement 1.0), no heal
    res = runner.invoke(app, [*args, "--depths", "2,0", "--heal", "off", "--min-agreement", "0.99", "--trials", "8"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "plan.json").read_text())
    chosen, rows = summary["chosen"], summary["frontier"]
    assert len(rows) == 8 and "compute" in res.output and "min agreement" in res.output
    assert summary["meets_floor"] and min(chosen["agreement"].values()) >= 0.99
    assert all(r["compute"] >= chosen["compute"] for r in rows if r["feasible"])  # nothing cheaper meets it
    # what the plan reports is what the written model does on the validation texts
    model = guardmerge.load(str(out))
    texts = fidelity_texts(val_data, split="validation")
    experts = {t: load_any(search_zoo[t], t) for t in TASKS}
    fid = fidelity(model, experts, texts, draws=1)
    for task in TASKS:
        low = min(fid[task]["agreement"], fid[task]["off_task_agreement"])
        assert low == pytest.approx(chosen["agreement"][task])
    assert "## Plan" in (out / "README.md").read_text()


def test_plan_command_refuses_bad_options_before_any_trial(
    search_zoo: dict[str, Path], val_data: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump(zoo_config(search_zoo).model_dump()))
    base = ["plan", str(cfg), "--data", str(val_data), "--out", str(tmp_path / "o"), "--no-progress"]
    for extra, message in (
        (["--min-agreement", "1.5"], "a share of texts in (0, 1]"),
        (["--max-compute", "0.5"], "give at least 1"),
        (["--depths", "1,x"], "comma-separated integers"),
        (["--heal", "top"], "give no `data:` to heal on"),
        (["--heal", "off", "--depths", "9"], "each depth must be in 0..2"),
    ):
        res = runner.invoke(app, base + extra)
        assert res.exit_code != 0 and message in str(res.exception) + res.output, (extra, res.output)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.plan" / "study.db").exists()
