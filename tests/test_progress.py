import io

from sdlab.progress import ProgressBar


def test_log_streams_get_one_summary_line():
    stream = io.StringIO()
    bar = ProgressBar(4, "sampling ", stream=stream)
    for _ in range(4):
        bar.update(1, loss=0.5)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sampling 4/4 |")


def test_a_run_that_never_started_leaves_nothing():
    stream = io.StringIO()
    ProgressBar(20, "sampling ", stream=stream).close()
    assert stream.getvalue() == ""
