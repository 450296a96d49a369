"""A package whose content does not match its hash (issue 7, item 3): where it is tested.

Every layer already has its test, so this module only keeps the map honest
(it fails if one of them is renamed or removed):

* chunk store: a tampered chunk fails the sha256 at commit and is deleted
  (``tests/nodes/test_packages.py::test_tampered_chunk_rejected_and_deleted``,
  ``tests/bus/test_transfer.py::test_writer_rewriting_hashed_bytes_is_still_verified``);
* transfer: an upstream serving tampered bytes is refused and nothing is
  cached (``tests/bus/test_transfer.py::test_tampered_object_upstream_is_refused``);
* deploy: a web package pinned by ``sha256`` in the spec and served
  tampered is refused with ``BAD_PACKAGE`` before any node is touched
  (``tests/tools/test_deploy.py::test_web_package_pinned_by_sha256_and_tampered_copy_refused``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COVERED = [
    ("tests/nodes/test_packages.py", "test_tampered_chunk_rejected_and_deleted"),
    ("tests/bus/test_transfer.py", "test_writer_rewriting_hashed_bytes_is_still_verified"),
    ("tests/bus/test_transfer.py", "test_tampered_object_upstream_is_refused"),
    ("tests/tools/test_deploy.py", "test_web_package_pinned_by_sha256_and_tampered_copy_refused"),
]


@pytest.mark.parametrize("path,name", COVERED)
def test_hash_mismatch_is_tested_at_every_layer(path, name):
    tree = ast.parse((ROOT / path).read_text())
    assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{path}::{name} is gone"
