import pytest

tomllib = pytest.importorskip("tomllib")
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_subpackage_and_the_config_tree_ship_in_the_wheel():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dipddpm").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"
    assert config["package-dir"]["dipddpm.conf"] == "conf"
    assert (REPO / "conf" / "train.yaml").is_file()


def test_torch_range_accepts_the_local_cpu_build():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_spec = next(d for d in deps if d.startswith("torch"))
    from packaging.specifiers import SpecifierSet

    assert "2.13.0" in SpecifierSet(torch_spec[len("torch"):])
