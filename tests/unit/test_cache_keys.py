"""Cache keys: the same row gives the same key in any process; versions and artifacts never collide."""

import subprocess
import sys

import numpy as np

from service.cache.results import row_keys
from tests.support import ROOT

ROW = [[5.1, 3.5, 1.4, 0.2]]
SHA, OTHER_SHA = "a" * 64, "b" * 64


def test_same_row_same_key_in_another_process():
    here = row_keys("pred", "iris", "1", SHA, np.array(ROW))
    code = (
        "import numpy as np; from service.cache.results import row_keys; "
        f"print(row_keys('pred', 'iris', '1', {SHA!r}, np.array({ROW!r}))[0])"
    )
    there = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here[0]


def test_equal_numbers_share_a_key():
    assert row_keys("p", "m", "1", SHA, np.array([[1, 0.0]])) == row_keys("p", "m", "1", SHA, np.array([[1.0, -0.0]]))
    assert row_keys("p", "m", "1", SHA, np.array([[1, 2]], dtype=np.int64)) == row_keys(
        "p", "m", "1", SHA, np.array([[1.0, 2.0]])
    )


def test_model_version_artifact_and_row_change_the_key():
    base = row_keys("pred", "iris", "1", SHA, np.array(ROW))[0]
    assert row_keys("pred", "iris", "2", SHA, np.array(ROW))[0] != base
    assert row_keys("pred", "other", "1", SHA, np.array(ROW))[0] != base
    assert row_keys("pred", "iris", "1", SHA, np.array([[5.1, 3.5, 1.4, 0.3]]))[0] != base
    assert row_keys("pred", "iris", "1", OTHER_SHA, np.array(ROW))[0] != base, "a rewritten version is another model"
    assert base.startswith("pred:iris:1:aaaaaaaaaaaaaaaa:")


def test_one_key_per_row_in_order():
    rows = np.array([[1, 2], [3, 4], [1, 2]], dtype=float)
    keys = row_keys("p", "m", "1", SHA, rows)
    assert len(keys) == 3 and keys[0] == keys[2] != keys[1]
