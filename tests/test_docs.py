"""The docs stay true to the code and the measurements: every generated table equals what ``docs/build.py`` makes
from the benchmark JSON, every relative link of README.md and docs/*.md resolves (file and heading anchor), and a
JSON missing a field fails the build with the file and the key named."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_build", ROOT / "docs" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()


def test_generated_tables_are_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    rc = build.main(["--check"])
    assert rc == 0, f"run `python docs/build.py` and commit the result:\n{capsys.readouterr().err}"


def test_every_generator_is_used_and_every_page_has_a_table() -> None:
    used = {name for page in PAGES for name in build.BLOCK.findall(page.read_text()) for name in [name[1]]}
    assert used == set(build.GENERATORS), f"generators without a page: {set(build.GENERATORS) - used}"
    readme_blocks = [m[1] for m in build.BLOCK.findall((ROOT / "README.md").read_text())]
    assert readme_blocks, "README.md must show numbers generated from the JSON"


def _fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the JSON files and pages under tmp_path, with build.ROOT pointing there."""
    for rel in ("benchmarks/results", "docs/results"):
        shutil.copytree(ROOT / rel, tmp_path / rel, ignore=shutil.ignore_patterns("*.png"))
    (tmp_path / "docs").mkdir(exist_ok=True)
    for page in PAGES:
        shutil.copy(page, tmp_path / page.relative_to(ROOT))
    monkeypatch.setattr(build, "ROOT", tmp_path)
    return tmp_path


def test_check_fails_when_a_number_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = _fake_root(tmp_path, monkeypatch)
    path = root / "benchmarks/results/rerope.json"
    data = json.loads(path.read_text())
    data["layer_cost_vs_rope"]["ReRoPE w=L/2"] = 9.99
    path.write_text(json.dumps(data))
    assert build.main(["--check"]) == 1
    assert "docs/attention.md" in capsys.readouterr().err
    assert build.main([]) == 0  # rewrite ...
    assert "| 9.99× |" in (root / "docs/attention.md").read_text()
    assert build.main(["--check"]) == 0  # ... and then it is up to date


def test_missing_field_names_file_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = _fake_root(tmp_path, monkeypatch)
    before = (root / "docs/optimizers.md").read_text()
    path = root / "benchmarks/results/optimizer_step.json"
    data = json.loads(path.read_text())
    del data["results"][3]["ms"]
    del data["config"]["rounds"]
    path.write_text(json.dumps(data))
    assert build.main([]) == 2
    err = capsys.readouterr().err
    assert "benchmarks/results/optimizer_step.json" in err and "'ms'" in err and "results[3]" in err, err
    assert "Traceback" not in err
    assert (root / "docs/optimizers.md").read_text() == before, "a failed build must not write any page"

    data["results"][3]["ms"] = 1.0
    path.write_text(json.dumps(data))
    assert build.main([]) == 2
    assert "missing key 'config.rounds'" in capsys.readouterr().err


def test_missing_file_and_unknown_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = _fake_root(tmp_path, monkeypatch)
    (root / "benchmarks/results/low_precision.json").unlink()
    assert build.main(["--check"]) == 2
    assert "benchmarks/results/low_precision.json: file not found" in capsys.readouterr().err
    shutil.copy(ROOT / "benchmarks/results/low_precision.json", root / "benchmarks/results/low_precision.json")
    page = root / "docs/index.md"
    page.write_text(page.read_text() + "\n<!-- BEGIN generated: no_such_table -->\n<!-- END generated -->\n")
    assert build.main(["--check"]) == 2
    assert "docs/index.md: unknown generated block 'no_such_table'" in capsys.readouterr().err


def test_pending_benchmark_fills_in_when_its_json_lands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A benchmark added with this change shows a 'not measured yet' note until its JSON exists; then the page is
    out of date until rebuilt, and the table comes from the JSON."""
    root = _fake_root(tmp_path, monkeypatch)
    # The README's summary reads every JSON (its distributed row included) and has no pending form: hold it fixed
    # here, the pending path under test is the docs page's.
    monkeypatch.setitem(build.GENERATORS, "headline", lambda: "(summary)")
    rel = "benchmarks/results/distributed.json"
    if (root / rel).exists():
        (root / rel).unlink()
        assert build.main([]) == 0
    assert "Not measured in this tree yet" in (root / "docs/distributed.md").read_text()
    row = {"row": "tight-fisted DDP k=4", "k": 4, "step_ms": 4329.9, "calls_per_step": 3, "mb_sent_per_step": 36.04,
           "time_vs_sync_every": 2.355, "bytes_vs_sync_every": 0.25}
    mem = {"row": "tight-fisted DDP k=4", "peak_over_baseline_mib": [103.9, 104.2], "accounted_mib": 97.1,
           "parts_mib": {"params": 36.0, "reduction_bucket": 25.0}}
    data = {"quick": False, "world_size": 2, "k": 4, "n_params": 9446400, "width": 1024, "depth": 8,
            "batch_per_rank": 8, "rounds": 5, "steps_per_round": 3, "rows": [row], "memory": [mem]}
    (root / rel).write_text(json.dumps(data))
    capsys.readouterr()
    assert build.main(["--check"]) == 1
    assert "docs/distributed.md" in capsys.readouterr().err
    assert build.main([]) == 0
    page = (root / "docs/distributed.md").read_text()
    assert "| `tight-fisted DDP k=4` | 4 | 4330 | 3 | 36.0 |  | 2.35× / 0.25× |" in page, page
    del data["memory"]
    (root / rel).write_text(json.dumps(data))
    assert build.main(["--check"]) == 2
    assert "benchmarks/results/distributed.json: missing key 'memory'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _strip_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", _strip_code_blocks(path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _strip_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _relative_links() -> list[tuple[str, str]]:
    links = []
    for page in PAGES:
        for target in LINK.findall(_strip_code(page.read_text())):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked offline
                links.append((page.relative_to(ROOT).as_posix(), target))
    return links


LINKS = _relative_links()


def test_pages_have_relative_links() -> None:
    assert len(LINKS) > 20, LINKS


@pytest.mark.parametrize(("page", "target"), LINKS, ids=[f"{p}->{t}" for p, t in LINKS])
def test_relative_link_resolves(page: str, target: str) -> None:
    file_part, _, anchor = target.partition("#")
    resolved = (ROOT / page).parent / file_part if file_part else ROOT / page
    assert resolved.exists(), f"{page}: link {target!r} points to a missing file {resolved}"
    if anchor and resolved.suffix == ".md":
        assert anchor in _anchors(resolved), f"{page}: link {target!r}: no heading with id {anchor!r} in {file_part}"


def test_no_internal_spec_references() -> None:
    """Docs cite papers, posts and equations, not an internal document that does not ship."""
    for path in [*PAGES, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs" / "results").rglob("*.md"))]:
        assert "SPEC" not in path.read_text(), f"{path.relative_to(ROOT)} cites SPEC; cite the primary source"


def _key_paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """Every key of every dict in ``node``, descending into the first two containers of a dict and the first
    element of a list: the others have the same fields (rows of a table), and the walk stays fast."""
    out = []
    if isinstance(node, dict):
        containers = 0
        for k, v in node.items():
            out.append((*prefix, k))
            if isinstance(v, (dict, list)) and containers < 2:
                containers += 1
                out += _key_paths(v, (*prefix, k))
    elif isinstance(node, list) and node:
        out += _key_paths(node[0], (*prefix, 0))
    return out


def _files_read(generator: object, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    read: set[str] = set()
    original_init = build.Source.__init__

    def spy(self: object, rel: str) -> None:
        read.add(rel)
        original_init(self, rel)

    with monkeypatch.context() as m:
        m.setattr(build.Source, "__init__", spy)
        generator()  # type: ignore[operator]
    return read


def _top_keys_read(generators: object, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    keys: set[str] = set()
    original_get = build.Source.get

    def spy(self: object, *path: object, **kwargs: object) -> object:
        if "within" not in kwargs and path:
            keys.add(path[0])  # type: ignore[arg-type]
        return original_get(self, *path, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(build.Source, "get", spy)
        for generator in generators:  # type: ignore[attr-defined]
            generator()
    return keys


JSONS = sorted(p.relative_to(ROOT).as_posix() for base in ("benchmarks/results", "docs/results")
               for p in (ROOT / base).rglob("*.json"))


@pytest.mark.parametrize("rel", JSONS)
def test_any_missing_field_is_a_clear_error(rel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Delete each field of the JSON in turn: every generator either still works or raises DocsBuildError naming
    the file — never a KeyError/TypeError traceback."""
    root = _fake_root(tmp_path, monkeypatch)
    original = json.loads((ROOT / rel).read_text())
    readers = {name: g for name, g in build.GENERATORS.items() if rel in _files_read(g, monkeypatch)}
    # Top-level keys no generator reads (the per-run log of results.json) are left out: faster, same coverage.
    original = {k: v for k, v in original.items() if k in _top_keys_read(readers.values(), monkeypatch)}
    (root / rel).write_text(json.dumps(original))
    for generator in readers.values():
        generator()  # the pruned file still builds
    for path in _key_paths(original):
        data = json.loads(json.dumps(original))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        (root / rel).write_text(json.dumps(data))
        for name, generator in readers.items():
            try:
                generator()
            except build.DocsBuildError as exc:
                assert str(exc).startswith(rel + ":"), (path, name, exc)
    (root / rel).write_text(json.dumps(original))
