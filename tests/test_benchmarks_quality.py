"""The quality study's quick run on seq2seq token cross-entropy (KL between output distributions): the other half of
test_benchmarks.py's, in its own file so that pytest-xdist (``--dist loadfile``) runs the two halves side by side."""

import pytest

from test_benchmarks import check_quality_quick


@pytest.mark.slow
def test_quality_quick_seq2seq(tmp_path):
    check_quality_quick(tmp_path, "translation")
