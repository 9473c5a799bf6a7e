"""BIG-bench JSON tasks: found in an installed ``bigbench`` package, a given folder, or fetched once.

``pip install bigbench==1.0.0`` fails even with ``--no-deps`` (its metadata declares a direct-URL
dependency, which pip refuses for PyPI packages), but its sdist on PyPI holds every task file. When
neither an installed package nor ``bigbench_dir`` has a task, the sdist is downloaded once from the
package index (checked against the index's sha256) and only the requested ``task.json`` files are
extracted under ``cache_dir``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import tarfile
import urllib.request
from pathlib import Path

from datamodules.errors import DataError

log = logging.getLogger(__name__)

SDIST = "bigbench-1.0.0.tar.gz"
DEFAULT_CACHE = ".cache/bigbench"


def _installed_root() -> Path | None:
    spec = importlib.util.find_spec("bigbench")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "benchmark_tasks"
    return root if root.is_dir() else None


def _index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def _sdist_link() -> tuple[str, str]:
    """URL and sha256 of the bigbench 1.0.0 sdist, from the package index's simple page."""
    page = f"{_index_url()}/bigbench/"
    try:
        html = urllib.request.urlopen(page, timeout=60).read().decode()
    except OSError as e:
        raise DataError(
            f"BIG-bench task files are not on this machine and the package index {page} cannot be "
            f"reached ({e}); set data.bigbench_dir to a folder of <task>/task.json files"
        ) from e
    m = re.search(rf'href="([^"]*{re.escape(SDIST)})#sha256=([0-9a-f]{{64}})"', html)
    if not m:
        raise DataError(f"{page} lists no {SDIST}")
    url = m.group(1)
    if url.startswith("/") or not re.match(r"^[a-z]+://", url):
        url = urllib.request.urljoin(page, url)
    return url, m.group(2)


def _download(url: str, sha256: str, dest: Path) -> None:
    from tqdm.auto import tqdm

    tmp = dest.with_suffix(".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as resp, open(tmp, "wb") as out:
        total = int(resp.headers.get("Content-Length", 0)) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {SDIST}") as bar:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise DataError(f"{url}: sha256 mismatch (got {digest.hexdigest()}, the index says {sha256})")
    tmp.rename(dest)


def fetch_tasks(tasks: list[str], cache_dir: str = DEFAULT_CACHE) -> Path:
    """Make ``<cache_dir>/<task>/task.json`` exist for every task, downloading the sdist if needed."""
    root = Path(cache_dir)
    missing = [t for t in tasks if not (root / t / "task.json").is_file()]
    if not missing:
        return root
    root.mkdir(parents=True, exist_ok=True)
    archive = root / SDIST
    if not archive.is_file():
        _download(*_sdist_link(), archive)
    wanted = {f"benchmark_tasks/{t}/task.json": t for t in missing}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            key = member.name.split("bigbench/", 1)[-1]
            if key in wanted:
                (root / wanted[key]).mkdir(exist_ok=True)
                with tar.extractfile(member) as src:
                    (root / wanted[key] / "task.json").write_bytes(src.read())
                del wanted[key]
                if not wanted:
                    break
    if wanted:
        raise DataError(
            f"no BIG-bench JSON task named {sorted(wanted.values())} in {SDIST}; task names are the "
            "folder names under bigbench/benchmark_tasks (e.g. sports_understanding)"
        )
    return root


def task_file(task: str, bigbench_dir: str | None = None, cache_dir: str = DEFAULT_CACHE) -> Path:
    """Where ``<task>/task.json`` is: ``bigbench_dir``, else an installed package, else the fetched cache."""
    if bigbench_dir:
        root = Path(bigbench_dir)
        if not root.is_dir():
            raise DataError(f"bigbench_dir {bigbench_dir!r} does not exist")
    else:
        root = _installed_root()
        if root is None or not (root / task / "task.json").is_file():
            root = fetch_tasks([task], cache_dir)
    path = root / task / "task.json"
    if not path.is_file():
        raise DataError(f"no BIG-bench task {task!r}: {path} does not exist")
    return path


def read_bigbench(
    task: str, bigbench_dir: str | None = None, cache_dir: str = DEFAULT_CACHE
) -> tuple[list[dict], Path]:
    """Read a BIG-bench JSON task as ``{input, target, references, choices}`` rows."""
    path = task_file(task, bigbench_dir, cache_dir)
    data = json.loads(path.read_text())
    if "examples" not in data:
        raise DataError(
            f"{path} has no 'examples': it is a programmatic or multi-subtask BIG-bench task, "
            "which is not supported; pick a JSON task"
        )
    rows = []
    for i, ex in enumerate(data["examples"]):
        if "target_scores" in ex:
            choices = list(ex["target_scores"])
            target = max(choices, key=lambda c: ex["target_scores"][c])
            references = [target]
        elif "target" in ex:
            choices = None
            references = [str(t) for t in ex["target"]] if isinstance(ex["target"], list) else [str(ex["target"])]
            target = references[0]
        else:
            raise DataError(f"{path}, example {i}: neither 'target' nor 'target_scores'")
        rows.append({"input": ex["input"], "target": str(target), "references": references, "choices": choices})
    return rows, path
