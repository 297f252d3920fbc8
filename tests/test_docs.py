from pathlib import Path

from guardmerge.docs import (
    END,
    START,
    STEPS,
    STEPS_END,
    STEPS_START,
    methods_table,
    methods_text,
    step_rows,
    steps_table,
)
from guardmerge.methods import METHODS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_methods_table_is_generated_from_the_registry() -> None:
    text = README.read_text()
    current = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert current == methods_table(), "run: python -m guardmerge.docs README.md"


def test_every_method_documents_every_parameter() -> None:
    for spec in METHODS:
        assert spec.summary, spec.name
        for name, _, _, description in spec.parameter_rows():
            assert description, f"{spec.name}.{name} has no description"


def test_readme_steps_table_is_generated_from_the_config_sections() -> None:
    text = README.read_text()
    current = text.split(STEPS_START, 1)[1].split(STEPS_END, 1)[0].strip()
    assert current == steps_table(), "run: python -m guardmerge.docs README.md"
    assert "`heal:`" in current and "`train`='all'" in current


def test_methods_lists_the_steps_with_every_setting_described() -> None:
    text = methods_text()
    assert "heal:" in text and "learning_rate" in text and "trains weights" in text
    for key, schema, summary in STEPS:
        assert summary, key
        for name, _, _, description in step_rows(schema):
            assert description, f"{key}.{name} has no description"
