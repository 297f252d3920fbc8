from pathlib import Path

from guardmerge.docs import END, START, methods_table
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
