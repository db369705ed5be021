"""scripts/ab_stage + scripts/lib/ab.sh: another revision's code staged in the working tree (what
the device tool carries) and swapped in and back on the device box."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.email=ab@test", "-c", "user.name=ab"]


def _commit(repo: Path, files: dict[str, str], message: str) -> None:
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=repo, check=True)


def _sh(repo: Path, script: str) -> str:
    return subprocess.run(["bash", "-c", script], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


def test_a_revision_is_staged_swapped_in_and_back(tmp_path):
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "scripts" / "lib").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "ab_stage", repo / "scripts" / "ab_stage")
    shutil.copy(REPO / "scripts" / "lib" / "ab.sh", repo / "scripts" / "lib" / "ab.sh")
    _commit(repo, {"pkg/a.py": "old a\n", "pkg/same.py": "same\n", "tests/t.py": "old t\n",
                   "README.md": "old\n"}, "before")
    _commit(repo, {"pkg/a.py": "new a\n", "pkg/b.py": "added\n", "tests/t.py": "new t\n",
                   "README.md": "new\n"}, "after")
    (repo / "pkg" / "a.py").write_text("uncommitted a\n")      # the working tree is `current`

    (repo / ".ab" / "current" / "pkg").mkdir(parents=True)       # an older staging's copy
    (repo / ".ab" / "current" / "pkg" / "a.py").write_text("stale a\n")
    assert _sh(repo, "scripts/ab_stage HEAD~1 before").split() == ["pkg/a.py"]
    assert _sh(repo, "scripts/ab_stage HEAD after").split() == ["pkg/a.py"]
    assert (repo / ".ab" / "before" / "pkg" / "a.py").read_text() == "old a\n"
    assert not (repo / ".ab" / "current").exists()
    # the tree changed after staging: `current` is the tree as it is when a variant goes in
    (repo / "pkg" / "a.py").write_text("changed a\n")
    _sh(repo, "source scripts/lib/ab.sh; ab_use current")             # nothing replaced yet
    assert (repo / "pkg" / "a.py").read_text() == "changed a\n"

    _sh(repo, "source scripts/lib/ab.sh; ab_use before")
    assert (repo / "pkg" / "a.py").read_text() == "old a\n"
    # tests, docs and files added since stay as they are
    assert (repo / "tests" / "t.py").read_text() == "new t\n"
    assert (repo / "pkg" / "b.py").read_text() == "added\n"
    # a second variant straight over the first: the tree's own copy is the one kept
    _sh(repo, "source scripts/lib/ab.sh; ab_use after")
    assert (repo / "pkg" / "a.py").read_text() == "new a\n"
    _sh(repo, "source scripts/lib/ab.sh; ab_use current")
    assert (repo / "pkg" / "a.py").read_text() == "changed a\n"
    missing = subprocess.run(["bash", "-c", "source scripts/lib/ab.sh; ab_use nothing"],
                             cwd=repo, capture_output=True, text=True)
    assert missing.returncode != 0 and "scripts/ab_stage" in missing.stderr
